//! Where the two processes of a measurement run: wherever the scheduler puts them, or both on
//! one CPU.
//!
//! Sharing a CPU turns every wake-up into a context switch, with no inter-processor interrupt
//! and no idle CPU to bring out of halt. Measuring both placements separates what a transport
//! costs from what waking a peer on another CPU costs on this machine.

use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Placement {
    /// The scheduler's choice: what apps get unless someone pins them.
    AnyCpu,
    /// This thread and the peer process it starts share one CPU.
    OneCpu,
}

impl Placement {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Placement::AnyCpu => "any CPU",
            Placement::OneCpu => "one CPU",
        }
    }

    /// Applies the placement to the calling thread until the guard drops. A peer process
    /// started meanwhile inherits it.
    pub(crate) fn apply(self) -> anyhow::Result<PlacementGuard> {
        let before = sched_getaffinity(None)?;
        if self == Placement::OneCpu {
            let cpu = (0..CpuSet::MAX_CPU)
                .find(|&c| before.is_set(c))
                .ok_or_else(|| anyhow::anyhow!("this thread may run on no CPU"))?;
            let mut one = CpuSet::new();
            one.set(cpu);
            sched_setaffinity(None, &one)?;
        }
        Ok(PlacementGuard { before })
    }
}

/// Restores the thread's CPU affinity.
pub(crate) struct PlacementGuard {
    before: CpuSet,
}

impl Drop for PlacementGuard {
    fn drop(&mut self) {
        if let Err(e) = sched_setaffinity(None, &self.before) {
            eprintln!("could not restore CPU affinity: {e}");
        }
    }
}
