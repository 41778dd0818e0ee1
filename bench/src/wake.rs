//! The wake-up floor: two processes ping-pong a counter through a pair of eventfds and move no
//! payload at all.
//!
//! Any transport whose reader sleeps until the writer wakes it pays at least this per round
//! trip, so a sleeping transport's latency minus this floor is what its data path costs. On a
//! machine where a wake-up across CPUs is expensive (a guest whose idle vCPU must be kicked
//! out of halt), the floor, not the data path, decides event-driven latency.

use std::io;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustix::event::{EventfdFlags, eventfd};

/// What the pinging side writes for one ping, and for "stop".
const PING: u64 = 1;
const STOP: u64 = 2;

/// Round trips, the first `warmup` of them unmeasured.
pub(crate) fn round_trips(iters: usize, warmup: usize) -> anyhow::Result<Vec<Duration>> {
    let to_echo = eventfd(0, EventfdFlags::CLOEXEC).context("eventfd")?;
    let from_echo = eventfd(0, EventfdFlags::CLOEXEC).context("eventfd")?;
    let exe = std::env::current_exe().context("locate the bench binary")?;
    // The child gets the eventfds as its stdin and stdout, the one way std passes descriptors
    // across exec without unsafe code.
    let mut child = Command::new(exe)
        .arg("wake-echo")
        .stdin(Stdio::from(to_echo.try_clone()?))
        .stdout(Stdio::from(from_echo.try_clone()?))
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the wake-echo process")?;
    let result = (|| {
        let mut samples = Vec::with_capacity(iters);
        for i in 0..warmup + iters {
            let t0 = Instant::now();
            signal(&to_echo, PING)?;
            let got = wait(&from_echo)?;
            let dt = t0.elapsed();
            anyhow::ensure!(got == PING, "wake-echo answered {got}, not {PING}");
            if i >= warmup {
                samples.push(dt);
            }
        }
        signal(&to_echo, STOP)?;
        Ok(samples)
    })();
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    let samples = result?;
    anyhow::ensure!(status.success(), "wake-echo failed: {status}");
    Ok(samples)
}

/// The hidden `wake-echo` subcommand: answers every ping on stdin with one on stdout.
pub(crate) fn echo() -> anyhow::Result<()> {
    let stdin = io::stdin();
    let stdout = io::stdout();
    loop {
        match wait(&stdin.as_fd())? {
            PING => signal(&stdout.as_fd(), PING)?,
            STOP => return Ok(()),
            other => anyhow::bail!("unexpected eventfd count {other}"),
        }
    }
}

fn signal(fd: &impl AsFd, value: u64) -> io::Result<()> {
    let n = rustix::io::write(fd, &value.to_ne_bytes())?;
    if n != 8 {
        return Err(io::Error::other("short eventfd write"));
    }
    Ok(())
}

/// Sleeps until the eventfd's count is non-zero and takes it.
fn wait(fd: &impl AsFd) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    let n = rustix::io::read(fd, &mut buf)?;
    if n != 8 {
        return Err(io::Error::other("short eventfd read"));
    }
    Ok(u64::from_ne_bytes(buf))
}
