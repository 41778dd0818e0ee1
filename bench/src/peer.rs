//! The other process of a two-process measurement: this same binary, re-executed with the
//! hidden `peer` subcommand, so that cut-through really crosses address spaces (shared mapping,
//! doorbells between processes) the way apps use it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use shunt_client::{AttachOptions, Worker};

use crate::Transport;
use crate::conn::Conn;
use crate::pattern::Source;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Role {
    /// Streams the pattern for a while, shuts down writing, reports how much it wrote.
    Writer,
    /// Sends back every message it gets, until end-of-stream.
    Echo,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct PeerArgs {
    #[arg(long, value_enum)]
    role: Role,
    #[arg(long, value_enum)]
    transport: Transport,
    /// Endpoint, TCP address or socket path to connect to.
    #[arg(long)]
    target: String,
    /// shuntd's app socket, for cut-through.
    #[arg(long)]
    shuntd: Option<PathBuf>,
    #[arg(long)]
    msg_size: usize,
    #[arg(long, default_value_t = 1.0)]
    duration: f64,
    #[arg(long, default_value_t = u64::MAX)]
    max_bytes: u64,
    /// Spin on the FIFO instead of sleeping on the doorbell.
    #[arg(long)]
    spin: bool,
    /// Microseconds a blocking call polls before it sleeps.
    #[arg(long, default_value_t = 0)]
    busy_poll_us: u64,
    #[arg(long)]
    nodelay: bool,
}

/// What the parent asks of its peer.
pub(crate) struct Spec {
    pub(crate) role: Role,
    pub(crate) transport: Transport,
    pub(crate) target: String,
    pub(crate) shuntd: PathBuf,
    pub(crate) msg_size: usize,
    pub(crate) duration: Duration,
    pub(crate) max_bytes: u64,
    pub(crate) spin: bool,
    pub(crate) busy_poll: Duration,
    pub(crate) nodelay: bool,
}

/// A running peer; killed if dropped before [`PeerProcess::finish`], so a failed measurement
/// never leaves a writer spinning.
pub(crate) struct PeerProcess {
    child: Option<Child>,
    stdout: BufReader<ChildStdout>,
}

impl PeerProcess {
    pub(crate) fn spawn(spec: &Spec) -> anyhow::Result<PeerProcess> {
        let exe = std::env::current_exe().context("locate the bench binary")?;
        let mut cmd = Command::new(exe);
        cmd.arg("peer")
            .arg("--role")
            .arg(role_name(spec.role))
            .arg("--transport")
            .arg(spec.transport.name())
            .arg("--target")
            .arg(&spec.target)
            .arg("--shuntd")
            .arg(&spec.shuntd)
            .arg("--msg-size")
            .arg(spec.msg_size.to_string())
            .arg("--duration")
            .arg(spec.duration.as_secs_f64().to_string())
            .arg("--max-bytes")
            .arg(spec.max_bytes.to_string())
            .arg("--busy-poll-us")
            .arg(spec.busy_poll.as_micros().to_string());
        if spec.spin {
            cmd.arg("--spin");
        }
        if spec.nodelay {
            cmd.arg("--nodelay");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the peer process")?;
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        Ok(PeerProcess {
            child: Some(child),
            stdout,
        })
    }

    /// Completes the start handshake on an accepted `conn`; afterwards both ends have the
    /// session open and the peer is running its role.
    ///
    /// The peer says "ready" on its stdout once its connect has returned, and then waits for
    /// one byte on the session before it sends anything. Going out-of-band first matters for
    /// cut-through: the client library drops a FIFO notification that arrives before its end
    /// of the session is open, and the FIFO then never notifies again, so the first byte must
    /// not be sent until both ends are open.
    pub(crate) fn start(&mut self, conn: &mut Conn) -> anyhow::Result<()> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        anyhow::ensure!(
            line.trim() == READY,
            "peer did not get ready: `{}`",
            line.trim()
        );
        conn.write_all(GO)?;
        Ok(())
    }

    /// Waits for the peer to exit and returns what it printed after "ready".
    pub(crate) fn finish(mut self) -> anyhow::Result<String> {
        let mut out = String::new();
        self.stdout.read_to_string(&mut out)?;
        let status = self.child.take().expect("finish runs once").wait()?;
        anyhow::ensure!(status.success(), "peer process failed: {status}");
        Ok(out)
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const READY: &str = "ready";
const GO: &[u8; 1] = b"g";

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Writer => "writer",
        Role::Echo => "echo",
    }
}

pub(crate) fn run(args: PeerArgs) -> anyhow::Result<()> {
    // The worker must outlive the session: dropping it would strand the session's state.
    let worker = match args.transport {
        Transport::CutThrough => {
            let sock = args.shuntd.clone().context("cut-through needs --shuntd")?;
            Some(Worker::attach(
                AttachOptions::new(sock)
                    .app_name("shunt-bench-peer")
                    .busy_poll(Duration::from_micros(args.busy_poll_us)),
            )?)
        }
        _ => None,
    };
    let mut conn = Conn::connect(
        args.transport,
        &args.target,
        worker.as_ref(),
        args.nodelay,
        Duration::from_micros(args.busy_poll_us),
    )?;
    println!("{READY}");
    std::io::stdout().flush()?;
    let mut go = [0u8; 1];
    conn.read_exact(&mut go).context("wait for the go byte")?;
    anyhow::ensure!(go == *GO, "wrong go byte");
    match args.role {
        Role::Writer => {
            let bytes = write_stream(&mut conn, &args)?;
            conn.shutdown_write()?;
            // Stay until the reader has closed: if this process exits while bytes are still
            // unread, shuntd may reset the session and the reader loses the tail.
            let mut rest = [0u8; 64];
            while conn.read(&mut rest)? > 0 {}
            println!("{{\"bytes\":{bytes}}}");
        }
        Role::Echo => echo(&mut conn, &args)?,
    }
    conn.close();
    Ok(())
}

fn write_stream(conn: &mut Conn, args: &PeerArgs) -> anyhow::Result<u64> {
    let mut src = Source::new(args.msg_size);
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let mut sent = 0u64;
    let mut writes = 0u32;
    while sent < args.max_bytes {
        let len = (args.max_bytes - sent).min(args.msg_size as u64) as usize;
        conn.write_all(src.next(len))?;
        sent += len as u64;
        writes = writes.wrapping_add(1);
        // Reading the clock per 64-byte write would be a noticeable part of the work.
        if writes.is_multiple_of(64) && Instant::now() >= deadline {
            break;
        }
    }
    Ok(sent)
}

fn echo(conn: &mut Conn, args: &PeerArgs) -> anyhow::Result<()> {
    let mut buf = vec![0u8; args.msg_size];
    loop {
        let got = if args.spin {
            conn.read_exact_spin(&mut buf)
        } else {
            conn.read_exact(&mut buf)
        };
        match got {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        if args.spin {
            conn.write_all_spin(&buf)?;
        } else {
            conn.write_all(&buf)?;
        }
    }
}
