//! `tokio` adapters: [`AsyncWorker`], [`AsyncListener`] and [`AsyncSession`], which implements
//! `AsyncRead` and `AsyncWrite`.
//!
//! The core library never blocks or spawns; here one task per worker watches the readiness fd
//! in the caller's runtime and runs [`Worker::dispatch`], which wakes the sessions, listeners
//! and connects that are waiting. Operations register their waker *before* trying, so an event
//! dispatched between the try and the registration cannot be lost.
#![allow(
    unsafe_code,
    reason = "tokio's fd registration is unsafe; see the safety comment"
)]

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;

use crate::{Error, Listener, Session, SessionInfo, Worker};

/// A [`Worker`] driven by the current tokio runtime.
pub struct AsyncWorker {
    worker: Worker,
    dispatcher: JoinHandle<()>,
}

impl AsyncWorker {
    /// Starts dispatching `worker`'s events on the current runtime. Must be called from within
    /// a tokio runtime with I/O enabled.
    pub fn new(worker: Worker) -> io::Result<AsyncWorker> {
        let fd = rustix::io::fcntl_dupfd_cloexec(worker.readiness_fd(), 0)?;
        let watched = watch(fd)?;
        let dispatched = worker.clone();
        let dispatcher = tokio::spawn(async move {
            loop {
                let mut ready = match watched.readable().await {
                    Ok(guard) => guard,
                    Err(e) => {
                        tracing::error!(error = %e, "readiness fd failed; stopping dispatch");
                        return;
                    }
                };
                if let Err(e) = dispatched.dispatch() {
                    tracing::warn!(error = %e, "dispatch failed");
                }
                // Clears only the readiness seen before dispatch; anything newer stays set.
                ready.clear_ready();
            }
        });
        Ok(AsyncWorker { worker, dispatcher })
    }

    /// The synchronous worker underneath.
    pub fn worker(&self) -> &Worker {
        &self.worker
    }

    /// Connects to `remote` and waits for the session.
    pub async fn connect(&self, remote: SocketAddr) -> Result<AsyncSession, Error> {
        let pending = self.worker.start_connect(remote)?;
        let session = poll_fn(
            |cx| match self.worker.take_connect(&pending, Some(cx.waker())) {
                Ok(Some(s)) => Poll::Ready(Ok(s)),
                Ok(None) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        )
        .await?;
        Ok(AsyncSession { session })
    }

    /// Listens on `endpoint`.
    pub fn listen(&self, endpoint: SocketAddr) -> Result<AsyncListener, Error> {
        Ok(AsyncListener {
            listener: self.worker.listen(endpoint)?,
        })
    }
}

impl Drop for AsyncWorker {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

/// A listener whose [`AsyncListener::accept`] awaits.
pub struct AsyncListener {
    listener: Listener,
}

impl AsyncListener {
    pub fn endpoint(&self) -> SocketAddr {
        self.listener.endpoint()
    }

    /// Waits for the next accepted session.
    pub async fn accept(&self) -> Result<AsyncSession, Error> {
        let session = poll_fn(|cx| match self.listener.take(Some(cx.waker())) {
            Ok(Some(s)) => Poll::Ready(Ok(s)),
            Ok(None) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        })
        .await?;
        Ok(AsyncSession { session })
    }
}

/// A session with `AsyncRead` and `AsyncWrite`. `poll_shutdown` half-closes (the peer reads
/// end-of-stream); dropping closes.
#[derive(Debug)]
pub struct AsyncSession {
    session: Session,
}

impl AsyncSession {
    pub fn info(&self) -> SessionInfo {
        self.session.info()
    }

    /// The synchronous session underneath.
    pub fn into_inner(self) -> Session {
        self.session
    }

    /// Aborts: the peer sees a reset.
    pub fn reset(self) {
        self.session.reset();
    }
}

fn pending_on_would_block<T>(r: io::Result<T>) -> Poll<io::Result<T>> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
        other => Poll::Ready(other),
    }
}

impl AsyncRead for AsyncSession {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.session.register_read(cx.waker());
        let n = std::task::ready!(pending_on_would_block(
            self.session.try_read(buf.initialize_unfilled())
        ))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for AsyncSession {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.session.register_write(cx.waker());
        pending_on_would_block(self.session.try_write(buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.session.register_write(cx.waker());
        pending_on_would_block(self.session.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bytes are in the peer's FIFO as soon as a write returns.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.session.shutdown_write())
    }
}

/// Moves `fd` into tokio's reactor.
fn watch(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of `fd`, so the descriptor stays open and names the
    // same open file description until the AsyncFd is dropped, and `OwnedFd::as_raw_fd` returns
    // that same descriptor on every call.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}
