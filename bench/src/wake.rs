//! The wake-up floor: two processes ping-pong through a pair of eventfds, or a pair of pipes,
//! and move no payload at all.
//!
//! Any transport whose reader sleeps until the writer wakes it pays at least this per round
//! trip, so a sleeping transport's latency minus this floor is what its data path costs. On a
//! machine where a wake-up across CPUs is expensive (a guest whose idle vCPU must be kicked
//! out of halt), the floor, not the data path, decides event-driven latency. Cut-through wakes
//! through pipes, so the pipe floor is its own; the eventfd floor is the cheapest there is.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustix::event::{EventfdFlags, eventfd};
use rustix::fs::FileType;
use rustix::pipe::{PipeFlags, pipe_with};

/// What the pinging side writes for one ping, and for "stop".
const PING: u64 = 1;
const STOP: u64 = 2;

/// What carries the wake-ups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Channel {
    /// An eventfd per direction; a signal is its 8-byte count.
    Eventfd,
    /// A pipe per direction; a signal is one byte.
    Pipe,
}

/// One direction: the end this process keeps and the end the echo process gets.
struct Direction {
    ours: OwnedFd,
    theirs: OwnedFd,
}

impl Channel {
    /// `to_echo` keeps the write end, `from_echo` the read end.
    fn directions(self) -> anyhow::Result<(Direction, Direction)> {
        Ok(match self {
            Channel::Eventfd => {
                let to = eventfd(0, EventfdFlags::CLOEXEC).context("eventfd")?;
                let from = eventfd(0, EventfdFlags::CLOEXEC).context("eventfd")?;
                (
                    Direction {
                        theirs: to.try_clone()?,
                        ours: to,
                    },
                    Direction {
                        theirs: from.try_clone()?,
                        ours: from,
                    },
                )
            }
            Channel::Pipe => {
                let (to_read, to_write) = pipe_with(PipeFlags::CLOEXEC).context("pipe")?;
                let (from_read, from_write) = pipe_with(PipeFlags::CLOEXEC).context("pipe")?;
                (
                    Direction {
                        ours: to_write,
                        theirs: to_read,
                    },
                    Direction {
                        ours: from_read,
                        theirs: from_write,
                    },
                )
            }
        })
    }
}

/// Round trips, the first `warmup` of them unmeasured.
pub(crate) fn round_trips(
    channel: Channel,
    iters: usize,
    warmup: usize,
) -> anyhow::Result<Vec<Duration>> {
    let (to_echo, from_echo) = channel.directions()?;
    let exe = std::env::current_exe().context("locate the bench binary")?;
    // The child gets its ends as its stdin and stdout, the one way std passes descriptors
    // across exec without unsafe code.
    let mut child = Command::new(exe)
        .arg("wake-echo")
        .stdin(Stdio::from(to_echo.theirs))
        .stdout(Stdio::from(from_echo.theirs))
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the wake-echo process")?;
    let (to_echo, from_echo) = (to_echo.ours, from_echo.ours);
    let result = (|| {
        let mut samples = Vec::with_capacity(iters);
        for i in 0..warmup + iters {
            let t0 = Instant::now();
            signal(channel, &to_echo, PING)?;
            let got = wait(channel, &from_echo)?;
            let dt = t0.elapsed();
            anyhow::ensure!(got == PING, "wake-echo answered {got}, not {PING}");
            if i >= warmup {
                samples.push(dt);
            }
        }
        signal(channel, &to_echo, STOP)?;
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

/// The hidden `wake-echo` subcommand: answers every ping on stdin with one on stdout. A pipe
/// on stdin means pipes; anything else, eventfds.
pub(crate) fn echo() -> anyhow::Result<()> {
    let stdin = io::stdin();
    let stdout = io::stdout();
    let stat = rustix::fs::fstat(stdin.as_fd())?;
    let channel = if FileType::from_raw_mode(stat.st_mode) == FileType::Fifo {
        Channel::Pipe
    } else {
        Channel::Eventfd
    };
    loop {
        match wait(channel, &stdin.as_fd())? {
            PING => signal(channel, &stdout.as_fd(), PING)?,
            STOP => return Ok(()),
            other => anyhow::bail!("unexpected signal {other}"),
        }
    }
}

fn signal(channel: Channel, fd: &impl AsFd, value: u64) -> io::Result<()> {
    let bytes = value.to_ne_bytes();
    let signal = match channel {
        Channel::Eventfd => &bytes[..],
        // One byte, as a cut-through ring writes; the value fits.
        Channel::Pipe => &[value as u8][..],
    };
    let n = rustix::io::write(fd, signal)?;
    if n != signal.len() {
        return Err(io::Error::other("short signal write"));
    }
    Ok(())
}

/// Sleeps until a signal comes and takes it.
fn wait(channel: Channel, fd: &impl AsFd) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    match channel {
        Channel::Eventfd => {
            let n = rustix::io::read(fd, &mut buf)?;
            if n != 8 {
                return Err(io::Error::other("short eventfd read"));
            }
            Ok(u64::from_ne_bytes(buf))
        }
        Channel::Pipe => {
            let n = rustix::io::read(fd, &mut buf[..1])?;
            if n != 1 {
                return Err(io::Error::other("the pipe closed"));
            }
            Ok(u64::from(buf[0]))
        }
    }
}
