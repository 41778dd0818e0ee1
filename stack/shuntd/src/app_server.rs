//! The attach socket and the worker threads that serve attached app workers.
//!
//! Each app worker's connection is pinned to one shuntd worker thread (round robin), which runs
//! a single-threaded runtime. Everything the app worker asks for is handled there, and the
//! sessions it opens are pinned there too.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use rustix::net::{self, AddressFamily, SocketFlags, SocketType};
use shunt_sapi::ErrorCode;
use shunt_sapi::event::Event;
use shunt_sapi::message::{CertificateMaterial, DaemonReply, MAX_MESSAGE_LEN, Request};
use shunt_session::SessionLayer;
use shunt_session::app::{PeerCred, WorkerId, WorkerLink};
use shunt_session::layer::{AttachRequest, Attached, PairOutcome, SessionError, SessionId};
use shunt_shm::doorbell::Doorbell;
use shunt_shm::fdpass;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::link::DaemonLink;
use crate::sidecar_usage::SidecarUsage;

/// Daemon-side counters that the session layer does not see.
#[derive(Debug, Default)]
pub struct ServerCounters {
    pub decode_errors: AtomicU64,
    /// Control API calls refused for the caller's credentials.
    pub control_refusals: AtomicU64,
    pub sidecar_usage: SidecarUsage,
}

struct NewConnection {
    fd: OwnedFd,
    cred: PeerCred,
}

pub struct AppServer {
    workers: Vec<mpsc::UnboundedSender<NewConnection>>,
    next: AtomicUsize,
}

#[derive(Clone)]
struct Shared {
    layer: Arc<SessionLayer>,
    counters: Arc<ServerCounters>,
    event_queue_len: u32,
}

/// Binds a SOCK_SEQPACKET listening socket at `path`, replacing a stale socket file.
pub fn bind_seqpacket(path: &Path) -> std::io::Result<OwnedFd> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    remove_stale_socket(path)?;
    let fd = net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    let addr = net::SocketAddrUnix::new(path)?;
    net::bind(&fd, &addr)?;
    net::listen(&fd, 1024)?;
    Ok(fd)
}

/// Removes `path` if it is a socket nobody listens on; refuses to steal a live one.
pub fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    let probe = net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let in_use = net::SocketAddrUnix::new(path)
        .and_then(|a| net::connect(&probe, &a))
        .is_ok();
    if in_use {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("another shuntd is serving {}", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

impl AppServer {
    /// Starts `n` worker threads.
    pub fn start(
        n: usize,
        layer: Arc<SessionLayer>,
        counters: Arc<ServerCounters>,
        event_queue_len: u32,
    ) -> std::io::Result<Self> {
        let shared = Shared {
            layer,
            counters,
            event_queue_len,
        };
        let mut workers = Vec::with_capacity(n);
        for thread in 0..n {
            let (tx, mut rx) = mpsc::unbounded_channel::<NewConnection>();
            let shared = shared.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            std::thread::Builder::new()
                .name(format!("shunt-wrk-{thread}"))
                .spawn(move || {
                    rt.block_on(async move {
                        while let Some(conn) = rx.recv().await {
                            tokio::spawn(serve(conn, thread, shared.clone()));
                        }
                    })
                })?;
            workers.push(tx);
        }
        Ok(Self {
            workers,
            next: AtomicUsize::new(0),
        })
    }

    /// Accepts app connections forever, handing each to the next worker thread.
    pub async fn accept_loop(&self, listener: OwnedFd) -> std::io::Result<()> {
        let listener = crate::reactor::watch(listener)?;
        loop {
            let mut guard = listener.readable().await?;
            match net::accept_with(
                guard.get_inner(),
                SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            ) {
                Ok(fd) => {
                    let cred = net::sockopt::socket_peercred(&fd)
                        .map(|c| PeerCred {
                            pid: c.pid.as_raw_nonzero().get() as u32,
                            uid: c.uid.as_raw(),
                            gid: c.gid.as_raw(),
                        })
                        .unwrap_or_default();
                    let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
                    if self.workers[i].send(NewConnection { fd, cred }).is_err() {
                        tracing::error!(
                            worker = i,
                            "worker thread is gone; dropping app connection"
                        );
                    }
                }
                Err(e) if e == rustix::io::Errno::AGAIN => guard.clear_ready(),
                Err(e) => tracing::warn!(error = %e, "accept on the app socket failed"),
            }
        }
    }
}

enum Step {
    Continue,
    Close,
}

struct Connection {
    fd: AsyncFd<OwnedFd>,
    cred: PeerCred,
    thread: usize,
    shared: Shared,
    worker: Option<(WorkerId, Arc<DaemonLink>)>,
}

async fn serve(conn: NewConnection, thread: usize, shared: Shared) {
    let fd = match crate::reactor::watch(conn.fd) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch app connection");
            return;
        }
    };
    let mut c = Connection {
        fd,
        cred: conn.cred,
        thread,
        shared,
        worker: None,
    };
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    loop {
        let received = {
            let Ok(mut guard) = c.fd.readable().await else {
                break;
            };
            match fdpass::recv_with_fds(guard.get_inner().as_fd(), &mut buf, 1) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    continue;
                }
                other => other,
            }
        };
        match received {
            Ok((0, _)) => break,
            Ok((n, fds)) => match c.handle(&buf[..n], fds).await {
                Step::Continue => {}
                Step::Close => break,
            },
            Err(e) => {
                tracing::debug!(pid = c.cred.pid, error = %e, "app connection failed");
                break;
            }
        }
    }
    if let Some((worker, _)) = c.worker.take() {
        tracing::info!(%worker, pid = c.cred.pid, "app worker detached");
        c.shared.layer.detach_worker(worker);
    }
}

impl Connection {
    async fn send(&self, request_id: u32, reply: DaemonReply, fds: &[std::os::fd::BorrowedFd<'_>]) {
        let msg = reply.encode(request_id);
        loop {
            match fdpass::send_with_fds(self.fd.get_ref().as_fd(), &msg, fds) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    match self.fd.writable().await {
                        Ok(mut g) => g.clear_ready(),
                        Err(_) => return,
                    }
                }
                Err(e) => {
                    tracing::debug!(pid = self.cred.pid, error = %e, "cannot reply to app");
                    return;
                }
                Ok(_) => return,
            }
        }
    }

    async fn fail(&self, request_id: u32, code: ErrorCode, message: String) {
        self.send(request_id, DaemonReply::Failure { code, message }, &[])
            .await;
    }

    async fn handle(&mut self, bytes: &[u8], fds: Vec<OwnedFd>) -> Step {
        let (request_id, request) = match Request::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.shared
                    .counters
                    .decode_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(pid = self.cred.pid, error = %e, "malformed session-API message");
                self.fail(0, ErrorCode::InvalidRequest, e.to_string()).await;
                return Step::Close;
            }
        };
        let Request::Batch(requests) = request else {
            return self.handle_request(request_id, request, fds).await;
        };
        for (id, request) in requests {
            if let Step::Close = self.handle_request(id, request, Vec::new()).await {
                return Step::Close;
            }
        }
        Step::Continue
    }

    async fn handle_request(
        &mut self,
        request_id: u32,
        request: Request,
        fds: Vec<OwnedFd>,
    ) -> Step {
        let worker = self.worker.as_ref().map(|(w, _)| *w);
        match (request, worker) {
            (
                Request::Attach {
                    namespace_id,
                    namespace_secret,
                    app_name,
                    scope,
                    event_queue_len,
                    resume,
                },
                None,
            ) => {
                let Some((doorbell, link)) = self.make_link(request_id, fds, event_queue_len).await
                else {
                    return Step::Close;
                };
                let req = AttachRequest {
                    namespace_id: namespace_id.clone(),
                    namespace_secret,
                    app_name: app_name.clone(),
                    scope,
                    cred: self.cred,
                    thread: self.thread,
                    link: link.clone(),
                    doorbell,
                    resume,
                };
                match self.shared.layer.attach(req) {
                    Ok(a) => {
                        tracing::info!(app = a.app.0, worker = %a.worker, name = %app_name, namespace = %namespace_id, pid = self.cred.pid, uid = self.cred.uid, "app attached");
                        self.attached(request_id, a, link).await;
                        Step::Continue
                    }
                    Err(e) => {
                        tracing::warn!(namespace = %namespace_id, pid = self.cred.pid, uid = self.cred.uid, error = %e, "attach refused");
                        self.fail(request_id, e.code(), e.to_string()).await;
                        Step::Close
                    }
                }
            }
            (
                Request::AttachWorker {
                    app_id,
                    app_token,
                    event_queue_len,
                    resume,
                },
                None,
            ) => {
                let Some((doorbell, link)) = self.make_link(request_id, fds, event_queue_len).await
                else {
                    return Step::Close;
                };
                let app = shunt_session::app::AppId(app_id);
                match self.shared.layer.attach_worker(
                    app,
                    &app_token,
                    self.thread,
                    link.clone(),
                    doorbell,
                    &resume,
                ) {
                    Ok(a) => {
                        tracing::info!(app = app_id, worker = %a.worker, pid = self.cred.pid, "app worker attached");
                        self.attached(request_id, a, link).await;
                        Step::Continue
                    }
                    Err(e) => {
                        tracing::warn!(app = app_id, pid = self.cred.pid, error = %e, "worker attach refused");
                        self.fail(request_id, e.code(), e.to_string()).await;
                        Step::Close
                    }
                }
            }
            (Request::Batch(_), _) => {
                // Request::decode never nests batches.
                self.fail(request_id, ErrorCode::InvalidRequest, "nested batch".into())
                    .await;
                Step::Close
            }
            (Request::Attach { .. } | Request::AttachWorker { .. }, Some(_)) => {
                self.fail(
                    request_id,
                    ErrorCode::InvalidRequest,
                    "already attached".into(),
                )
                .await;
                Step::Continue
            }
            (_, None) => {
                self.fail(request_id, ErrorCode::NotAttached, "attach first".into())
                    .await;
                Step::Close
            }
            (Request::Listen { endpoint }, Some(w)) => {
                match self.shared.layer.listen(w, endpoint) {
                    Ok(lid) => {
                        tracing::debug!(worker = %w, %endpoint, "listening");
                        self.send(
                            request_id,
                            DaemonReply::Listening {
                                listener_id: lid.0,
                                endpoint,
                            },
                            &[],
                        )
                        .await;
                    }
                    Err(e) => {
                        tracing::info!(worker = %w, %endpoint, error = %e, "listen refused");
                        self.fail(request_id, e.code(), e.to_string()).await;
                    }
                }
                Step::Continue
            }
            (Request::Unlisten { listener_id }, Some(w)) => {
                match self
                    .shared
                    .layer
                    .unlisten(w, shunt_session::app::ListenerId(listener_id))
                {
                    Ok(()) => self.send(request_id, DaemonReply::Ack, &[]).await,
                    Err(e) => self.fail(request_id, e.code(), e.to_string()).await,
                }
                Step::Continue
            }
            (Request::Connect { remote, standby }, Some(w)) => {
                let layer = &self.shared.layer;
                let result = if standby {
                    layer.connect_standby(w, request_id, remote)
                } else {
                    layer.connect(w, request_id, remote)
                };
                if let Err(e) = result {
                    self.connect_failed(w, request_id, remote, e).await;
                }
                Step::Continue
            }
            (Request::Pair(offer), Some(w)) => {
                let remote = offer.remote;
                match self.shared.layer.pair(w, request_id, offer) {
                    Ok(PairOutcome::Paired(o)) => {
                        tracing::debug!(worker = %w, %remote, session = o.client_session.0, "paired")
                    }
                    Ok(PairOutcome::Waiting) => {}
                    Err(e) => self.connect_failed(w, request_id, remote, e).await,
                }
                Step::Continue
            }
            (Request::GetCertificate { name }, Some(w)) => {
                match self.shared.layer.certificate_for(w, &name) {
                    Ok(c) => {
                        let reply = DaemonReply::Certificate(CertificateMaterial {
                            cert_chain: c.cert_chain,
                            private_key: c.private_key,
                            trust_bundle: c.trust_bundle,
                            version: c.version,
                        });
                        self.send(request_id, reply, &[]).await;
                    }
                    Err(e) => self.fail(request_id, e.code(), e.to_string()).await,
                }
                Step::Continue
            }
            (Request::Usage(report), Some(_)) => {
                self.shared.counters.sidecar_usage.record(&report);
                Step::Continue
            }
            (Request::SessionClosed { session_id, reset }, Some(w)) => {
                if let Err(e) = self
                    .shared
                    .layer
                    .session_closed(w, SessionId(session_id), reset)
                {
                    tracing::debug!(worker = %w, session_id, error = %e, "close of an unknown session");
                }
                Step::Continue
            }
        }
    }

    async fn connect_failed(
        &self,
        w: WorkerId,
        request_id: u32,
        remote: std::net::SocketAddr,
        e: SessionError,
    ) {
        let code = e.code();
        match code {
            ErrorCode::Denied => tracing::info!(worker = %w, %remote, error = %e, "connect denied"),
            _ => tracing::debug!(worker = %w, %remote, error = %e, "connect failed"),
        }
        let posted = self.worker.as_ref().is_some_and(|(_, link)| {
            link.post(&Event::ConnectFailed { request_id, code })
                .is_ok()
        });
        if !posted {
            // The worker's own queue is full: answer on the socket instead.
            self.fail(request_id, code, e.to_string()).await;
        }
    }

    /// Checks the attach's doorbell fd and builds the worker's event queue.
    async fn make_link(
        &self,
        request_id: u32,
        mut fds: Vec<OwnedFd>,
        queue_len: u32,
    ) -> Option<(OwnedFd, Arc<DaemonLink>)> {
        if fds.len() != 1 {
            self.fail(
                request_id,
                ErrorCode::InvalidRequest,
                format!("attach carries {} fds, expected 1 doorbell", fds.len()),
            )
            .await;
            return None;
        }
        let doorbell_fd = fds.pop().expect("one fd");
        let queue_len = if queue_len == 0 {
            self.shared.event_queue_len
        } else {
            queue_len
        };
        if !queue_len.is_power_of_two() || !(16..=1 << 20).contains(&queue_len) {
            self.fail(
                request_id,
                ErrorCode::InvalidRequest,
                "event_queue_len must be a power of two from 16 to 1048576".into(),
            )
            .await;
            return None;
        }
        let built = (|| -> anyhow::Result<(OwnedFd, Arc<DaemonLink>)> {
            let keep = doorbell_fd.try_clone()?;
            let socket = self.fd.get_ref().try_clone()?;
            let name = format!("shunt-evq-{}", self.cred.pid);
            let link = DaemonLink::new(socket, Doorbell::from_fd(doorbell_fd)?, queue_len, &name)?;
            Ok((keep, Arc::new(link)))
        })();
        match built {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(pid = self.cred.pid, error = %e, "cannot set up an app worker");
                self.fail(request_id, ErrorCode::Internal, e.to_string())
                    .await;
                None
            }
        }
    }

    async fn attached(&mut self, request_id: u32, a: Attached, link: Arc<DaemonLink>) {
        let reply = DaemonReply::Attached {
            app_id: a.app.0,
            app_token: a.app_token.to_vec(),
            worker_id: a.worker.0,
            event_queue_offset: shunt_sapi::layout::event_queue_offset() as u64,
            namespace_address: std::net::SocketAddr::new(a.namespace_address, 0),
        };
        let seg = link.segment().clone();
        self.send(request_id, reply, &[seg.as_fd()]).await;
        tracing::trace!(fd = self.fd.get_ref().as_raw_fd(), "attach reply sent");
        self.worker = Some((a.worker, link));
    }
}
