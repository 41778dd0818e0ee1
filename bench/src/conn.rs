//! One stream API over the three socket-like transports, so every measurement runs the same
//! code whichever transport carries it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use anyhow::Context;
use shunt_client::{Session, Worker};

use crate::Transport;
use crate::daemon::{self, Daemon};

const ACCEPT_TIMEOUT: Duration = Duration::from_secs(20);

fn readable(fd: BorrowedFd<'_>, timeout: Duration) -> anyhow::Result<bool> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let ts = Timespec {
        tv_sec: timeout.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: timeout.subsec_nanos().into(),
    };
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    match poll(&mut fds, Some(&ts)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

pub(crate) enum Acceptor {
    // The listener does not hand out its worker, which waiting needs.
    CutThrough(shunt_client::Listener, Worker),
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Acceptor {
    /// Listens on a fresh address; returns it as the string a peer passes to [`Conn::connect`].
    pub(crate) fn bind(
        transport: Transport,
        daemon: &Daemon,
        worker: &Worker,
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
                let target = l.local_addr()?.to_string();
                Ok((Acceptor::Tcp(l), target))
            }
            Transport::Unix => {
                let path = daemon.unix_path("unix");
                let l = UnixListener::bind(&path)
                    .with_context(|| format!("bind {}", path.display()))?;
                let target = path.display().to_string();
                Ok((Acceptor::Unix(l, path), target))
            }
            Transport::Memcpy => anyhow::bail!("memcpy has no connections"),
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
            let ready = match self {
                Acceptor::CutThrough(l, w) => {
                    if let Some(s) = l.try_accept().context("cut-through accept")? {
                        return Ok(Some(Conn::CutThrough(s)));
                    }
                    if left.is_zero() {
                        return Ok(None);
                    }
                    w.wait(Some(left)).context("cut-through accept")?;
                    false
                }
                Acceptor::Tcp(l) => readable(l.as_fd(), left)?,
                Acceptor::Unix(l, _) => readable(l.as_fd(), left)?,
            };
            if ready {
                return self.accept(nodelay).map(Some);
            }
            if left.is_zero() {
                return Ok(None);
            }
        }
    }

    pub(crate) fn accept(&self, nodelay: bool) -> anyhow::Result<Conn> {
        Ok(match self {
            Acceptor::CutThrough(l, _) => {
                Conn::CutThrough(l.accept().context("cut-through accept")?)
            }
            Acceptor::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(nodelay)?;
                Conn::Tcp(s)
            }
            Acceptor::Unix(l, _) => Conn::Unix(l.accept()?.0),
        })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        if let Acceptor::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub(crate) enum Conn {
    CutThrough(Session),
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    /// Connects to `target`; cut-through goes through `worker`, which must be attached.
    pub(crate) fn connect(
        transport: Transport,
        target: &str,
        worker: Option<&Worker>,
        nodelay: bool,
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
                Conn::Tcp(s)
            }
            Transport::Unix => Conn::Unix(UnixStream::connect(target)?),
            Transport::Memcpy => anyhow::bail!("memcpy has no connections"),
        })
    }

    pub(crate) fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            Conn::CutThrough(s) => s.shutdown_write(),
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
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
