//! One stream API over the three socket-like transports, so every measurement runs the same
//! code whichever transport carries it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use shunt_client::{Session, Worker};

use crate::Transport;
use crate::daemon::{self, Daemon};
use crate::polled::{self, Polled};

const ACCEPT_TIMEOUT: Duration = Duration::from_secs(20);

/// How a measured connection waits for its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Mode {
    /// Spin on the FIFO: `read_busy_poll` and `try_write`.
    BusyPoll,
    /// Blocking `Read`/`Write`, sleeping on the doorbell.
    Event,
    /// Blocking `Read`/`Write` that poll for a budget before sleeping on the doorbell.
    Adaptive,
    /// Kernel sockets in blocking mode.
    Blocking,
}

impl Mode {
    /// The polling budget a cut-through worker in this mode attaches with.
    pub(crate) fn busy_poll(self, adaptive_budget: Duration) -> Duration {
        if self == Mode::Adaptive {
            adaptive_budget
        } else {
            Duration::ZERO
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::BusyPoll => "busy-poll",
            Mode::Event => "event",
            Mode::Adaptive => "adaptive",
            Mode::Blocking => "blocking",
        }
    }
}

pub(crate) enum Acceptor {
    // The listener does not hand out its worker, which waiting needs (and which holds the
    // polling budget for cut-through).
    CutThrough(shunt_client::Listener, Worker),
    /// With the polling budget for accepting and for the accepted connections.
    Tcp(TcpListener, Duration),
    Unix(UnixListener, PathBuf, Duration),
}

impl Acceptor {
    /// Listens on a fresh address; returns it as the string a peer passes to [`Conn::connect`].
    /// Kernel sockets poll for `busy_poll` before they sleep; cut-through takes the budget its
    /// worker attached with.
    pub(crate) fn bind(
        transport: Transport,
        daemon: &Daemon,
        worker: &Worker,
        busy_poll: Duration,
    ) -> anyhow::Result<(Acceptor, String)> {
        match transport {
            Transport::CutThrough => {
                let ep = daemon::fresh_endpoint();
                let l = worker
                    .listen(ep)
                    .with_context(|| format!("cut-through listen on {ep}"))?;
                Ok((Acceptor::CutThrough(l, worker.clone()), ep.to_string()))
            }
            Transport::TcpLoopback => {
                let l = TcpListener::bind("127.0.0.1:0")?;
                // Non-blocking, so that `try_accept` never blocks: `accept_within` tries first
                // and waits after, for every transport alike.
                l.set_nonblocking(true)?;
                let target = l.local_addr()?.to_string();
                Ok((Acceptor::Tcp(l, busy_poll), target))
            }
            Transport::Unix => {
                let path = daemon.unix_path("unix");
                let l = UnixListener::bind(&path)
                    .with_context(|| format!("bind {}", path.display()))?;
                l.set_nonblocking(true)?;
                let target = path.display().to_string();
                Ok((Acceptor::Unix(l, path, busy_poll), target))
            }
            Transport::Memcpy | Transport::Eventfd | Transport::Pipe => {
                anyhow::bail!("{} has no connections", transport.name())
            }
        }
    }

    /// Waits for a peer process that may have died: gives up after [`ACCEPT_TIMEOUT`].
    pub(crate) fn accept_peer(&self, nodelay: bool) -> anyhow::Result<Conn> {
        self.accept_within(ACCEPT_TIMEOUT, nodelay)?
            .with_context(|| format!("no peer connected within {ACCEPT_TIMEOUT:?}"))
    }

    /// Accepts a connection if one arrives within `timeout`.
    pub(crate) fn accept_within(
        &self,
        timeout: Duration,
        nodelay: bool,
    ) -> anyhow::Result<Option<Conn>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(c) = self.try_accept(nodelay)? {
                return Ok(Some(c));
            }
            if left.is_zero() {
                return Ok(None);
            }
            match self {
                Acceptor::CutThrough(_, w) => w.wait(Some(left)).context("cut-through accept")?,
                Acceptor::Tcp(l, budget) => {
                    polled::readable_polling(l.as_fd(), *budget, left)?;
                }
                Acceptor::Unix(l, _, budget) => {
                    polled::readable_polling(l.as_fd(), *budget, left)?;
                }
            }
        }
    }

    /// Takes a waiting connection, if any; never blocks.
    fn try_accept(&self, nodelay: bool) -> anyhow::Result<Option<Conn>> {
        let kernel = |r: io::Result<Conn>| match r {
            Ok(c) => Ok(Some(c)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(anyhow::Error::from(e).context("accept")),
        };
        match self {
            Acceptor::CutThrough(l, _) => Ok(l
                .try_accept()
                .context("cut-through accept")?
                .map(Conn::CutThrough)),
            Acceptor::Tcp(l, budget) => kernel(l.accept().and_then(|(s, _)| {
                s.set_nodelay(nodelay)?;
                Ok(Conn::Tcp(Polled::new(s, *budget)?))
            })),
            Acceptor::Unix(l, _, budget) => kernel(
                l.accept()
                    .and_then(|(s, _)| Ok(Conn::Unix(Polled::new(s, *budget)?))),
            ),
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        if let Acceptor::Unix(_, path, _) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub(crate) enum Conn {
    CutThrough(Session),
    Tcp(Polled<TcpStream>),
    Unix(Polled<UnixStream>),
}

impl Conn {
    /// Connects to `target`; cut-through goes through `worker`, which must be attached (and
    /// polls as it was attached to), kernel sockets poll for `busy_poll` before sleeping.
    pub(crate) fn connect(
        transport: Transport,
        target: &str,
        worker: Option<&Worker>,
        nodelay: bool,
        busy_poll: Duration,
    ) -> anyhow::Result<Conn> {
        Ok(match transport {
            Transport::CutThrough => {
                let w = worker.context("cut-through needs an attached worker")?;
                let ep = target.parse().context("cut-through endpoint")?;
                Conn::CutThrough(
                    w.connect(ep)
                        .with_context(|| format!("cut-through connect {ep}"))?,
                )
            }
            Transport::TcpLoopback => {
                let s = TcpStream::connect(target)?;
                s.set_nodelay(nodelay)?;
                Conn::Tcp(Polled::new(s, busy_poll)?)
            }
            Transport::Unix => Conn::Unix(Polled::new(UnixStream::connect(target)?, busy_poll)?),
            Transport::Memcpy | Transport::Eventfd | Transport::Pipe => {
                anyhow::bail!("{} has no connections", transport.name())
            }
        })
    }

    pub(crate) fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            Conn::CutThrough(s) => s.shutdown_write(),
            Conn::Tcp(s) => s.inner.shutdown(Shutdown::Write),
            Conn::Unix(s) => s.inner.shutdown(Shutdown::Write),
        }
    }

    pub(crate) fn close(self) {
        match self {
            Conn::CutThrough(s) => s.close(),
            Conn::Tcp(s) => drop(s),
            Conn::Unix(s) => drop(s),
        }
    }

    /// Writes all of `buf` spinning instead of sleeping; kernel sockets just block.
    pub(crate) fn write_all_spin(&mut self, mut buf: &[u8]) -> io::Result<()> {
        let Conn::CutThrough(s) = self else {
            return self.write_all(buf);
        };
        while !buf.is_empty() {
            match s.try_write(buf) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Fills `buf` spinning instead of sleeping; kernel sockets just block.
    pub(crate) fn read_exact_spin(&mut self, mut buf: &mut [u8]) -> io::Result<()> {
        let Conn::CutThrough(s) = self else {
            return self.read_exact(buf);
        };
        while !buf.is_empty() {
            match s.read_busy_poll(buf)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => buf = &mut buf[n..],
            }
        }
        Ok(())
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::CutThrough(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::CutThrough(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
