//! The app at both ends of a sidecar chain: a minimal HTTP/1.1 keep-alive server and the load
//! that drives it, on blocking std TCP with one thread per connection.
//!
//! HTTP because that is what sidecars carry; minimal because the proxies only relay bytes
//! (`tcp_proxy`), so anything beyond framing would measure the app instead of the path.
//! Two requests exist: `POST /rr` with a small body, answered by a fixed small body, and
//! `PUT /bulk` with a large patterned body, answered by the number of bytes the server
//! received and checked, so a path that loses or reorders bytes fails instead of reporting.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::pattern::{Checker, Source};

/// A proxy chain that stops answering fails the run instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const BULK_WRITE: usize = 1 << 20;
const MAX_HEAD: usize = 16 << 10;

/// A request or response head: what framing needs and nothing more.
struct Head {
    /// The request line or the status line.
    start: String,
    content_length: Option<u64>,
    chunked: bool,
}

/// One end of an HTTP/1.1 connection, buffered so that a head and the start of its body can
/// arrive in one read.
pub(crate) struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl HttpConn {
    fn new(stream: TcpStream, buf_size: usize) -> io::Result<Self> {
        // Requests are single small writes; Nagle would hold each for the previous ACK.
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: vec![0; buf_size.max(MAX_HEAD)],
            start: 0,
            end: 0,
        })
    }

    pub(crate) fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Self::new(stream, 64 << 10)?)
    }

    /// Reads more bytes into the buffer; false at end of stream.
    fn fill(&mut self) -> io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "HTTP head too large",
            ));
        }
        let n = self.stream.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n > 0)
    }

    /// The buffered bytes up to and including the first `delim`, read as needed; None at a
    /// clean end of stream before any byte.
    fn take_through(&mut self, delim: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let mut searched = 0;
        loop {
            let window = &self.buf[self.start..self.end];
            if let Some(i) = window[searched..]
                .windows(delim.len())
                .position(|w| w == delim)
            {
                let line = window[..searched + i].to_vec();
                self.start += searched + i + delim.len();
                return Ok(Some(line));
            }
            searched = window.len().saturating_sub(delim.len() - 1);
            let had = window.len();
            // Filling keeps the window's bytes at the same offsets from its start.
            if !self.fill()? {
                return if had == 0 {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }

    fn read_head(&mut self) -> io::Result<Option<Head>> {
        let Some(raw) = self.take_through(b"\r\n\r\n")? else {
            return Ok(None);
        };
        let text = String::from_utf8(raw)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "HTTP head not UTF-8"))?;
        let mut lines = text.split("\r\n");
        let start = lines.next().unwrap_or_default().to_owned();
        let mut head = Head {
            start,
            content_length: None,
            chunked: false,
        };
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                head.content_length = Some(value.parse().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length")
                })?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                head.chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
        Ok(Some(head))
    }

    /// Hands `len` body bytes to `sink`, as they arrive.
    fn read_body(
        &mut self,
        mut len: u64,
        mut sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        while len > 0 {
            if self.start == self.end && !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let n = (self.end - self.start).min(usize::try_from(len).unwrap_or(usize::MAX));
            sink(&self.buf[self.start..self.start + n])?;
            self.start += n;
            len -= n as u64;
        }
        Ok(())
    }

    /// The whole body of a message with `head`, in any framing this side may meet.
    fn read_body_to_vec(&mut self, head: &Head) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        let mut append = |b: &[u8]| -> io::Result<()> {
            body.extend_from_slice(b);
            Ok(())
        };
        if head.chunked {
            loop {
                let line = self
                    .take_through(b"\r\n")?
                    .ok_or(io::ErrorKind::UnexpectedEof)?;
                let line = String::from_utf8_lossy(&line);
                let size = line.split(';').next().unwrap_or_default().trim();
                let size = u64::from_str_radix(size, 16)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                if size == 0 {
                    // Trailers, if any, end with an empty line.
                    while !self
                        .take_through(b"\r\n")?
                        .ok_or(io::ErrorKind::UnexpectedEof)?
                        .is_empty()
                    {}
                    break;
                }
                self.read_body(size, &mut append)?;
                self.take_through(b"\r\n")?
                    .ok_or(io::ErrorKind::UnexpectedEof)?;
            }
        } else if let Some(len) = head.content_length {
            self.read_body(len, &mut append)?;
        } else {
            loop {
                append(&self.buf[self.start..self.end])?;
                self.start = self.end;
                if !self.fill()? {
                    break;
                }
            }
        }
        Ok(body)
    }

    fn status(head: &Head) -> u16 {
        head.start
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// One request and its response, checked.
    pub(crate) fn round_trip(
        &mut self,
        request: &[u8],
        response_body: &[u8],
    ) -> anyhow::Result<()> {
        self.stream.write_all(request)?;
        let head = self
            .read_head()?
            .context("the connection closed instead of answering")?;
        anyhow::ensure!(Self::status(&head) == 200, "answer: {}", head.start);
        let len = head
            .content_length
            .context("answer without Content-Length")?;
        anyhow::ensure!(
            len == response_body.len() as u64,
            "answer of {len} bytes, expected {}",
            response_body.len()
        );
        let mut at = 0;
        self.read_body(len, |b| {
            if b != &response_body[at..at + b.len()] {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "answer differs"));
            }
            at += b.len();
            Ok(())
        })?;
        Ok(())
    }

    /// Uploads `bytes` of the pattern and returns once the server confirms it received and
    /// checked every one of them.
    pub(crate) fn upload(&mut self, bytes: u64) -> anyhow::Result<()> {
        // Formatted first: `write!` on a socket may send each piece as its own segment.
        let head =
            format!("PUT /bulk HTTP/1.1\r\nHost: backend\r\nContent-Length: {bytes}\r\n\r\n");
        self.stream.write_all(head.as_bytes())?;
        let mut source = Source::new(BULK_WRITE);
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(BULK_WRITE as u64) as usize;
            self.stream
                .write_all(source.next(n))
                .with_context(|| format!("after {sent} of {bytes} bytes"))?;
            sent += n as u64;
        }
        let head = self
            .read_head()?
            .context("the connection closed instead of confirming the upload")?;
        let body = self.read_body_to_vec(&head)?;
        let body = String::from_utf8_lossy(&body);
        anyhow::ensure!(
            Self::status(&head) == 200,
            "upload refused: {} {body}",
            head.start
        );
        let got: u64 = body
            .trim()
            .parse()
            .context("upload answer is not a count")?;
        anyhow::ensure!(got == bytes, "the server received {got} of {bytes} bytes");
        Ok(())
    }
}

/// A GET on a short-lived connection, for admin and metrics endpoints; the body on 200.
pub(crate) fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut conn = HttpConn::connect(addr)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.stream.write_all(request.as_bytes())?;
    let head = conn
        .read_head()?
        .with_context(|| format!("GET {path}: no answer"))?;
    let body = String::from_utf8_lossy(&conn.read_body_to_vec(&head)?).into_owned();
    anyhow::ensure!(
        HttpConn::status(&head) == 200,
        "GET {path}: {} {body}",
        head.start
    );
    Ok(body)
}

/// The small request and its fixed answer, both with `size`-byte bodies.
pub(crate) struct Exchange {
    pub(crate) request: Vec<u8>,
    pub(crate) response_body: Vec<u8>,
}

impl Exchange {
    pub(crate) fn new(size: usize) -> Self {
        let response_body = fixed_body(size);
        let mut request =
            format!("POST /rr HTTP/1.1\r\nHost: backend\r\nContent-Length: {size}\r\n\r\n")
                .into_bytes();
        request.extend_from_slice(&response_body);
        Self {
            request,
            response_body,
        }
    }
}

fn fixed_body(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

/// The server: accepts forever on a thread of its own, one thread per connection.
pub(crate) struct Backend {
    pub(crate) addr: SocketAddr,
}

impl Backend {
    /// `size` is the body size of its `/rr` answers.
    pub(crate) fn start(size: usize) -> anyhow::Result<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let answer = {
            let mut a = format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n").into_bytes();
            a.extend_from_slice(&fixed_body(size));
            a
        };
        thread::Builder::new()
            .name("backend".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let answer = answer.clone();
                    let _ = thread::Builder::new()
                        .name("backend-conn".into())
                        .spawn(move || {
                            // A connection ends when its client goes; errors end it the same way.
                            let _ = serve(stream, &answer);
                        });
                }
            })?;
        Ok(Backend { addr })
    }
}

fn serve(stream: TcpStream, answer: &[u8]) -> io::Result<()> {
    let mut conn = HttpConn::new(stream, BULK_WRITE)?;
    while let Some(head) = conn.read_head()? {
        let len = head.content_length.unwrap_or(0);
        if head.start.starts_with("PUT /bulk ") {
            let mut checker = Checker::default();
            let mut failure = None;
            conn.read_body(len, |b| {
                if failure.is_none()
                    && let Err(e) = checker.feed(b)
                {
                    failure = Some(e);
                }
                Ok(())
            })?;
            let (status, body) = match failure {
                None => ("200 OK", checker.bytes().to_string()),
                Some(e) => ("500 Internal Server Error", format!("{e:#}")),
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            conn.stream.write_all(answer.as_bytes())?;
        } else {
            conn.read_body(len, |_| Ok(()))?;
            conn.stream.write_all(answer)?;
        }
    }
    Ok(())
}

/// Latencies of closed-loop request/response traffic on `connections` connections at once.
pub(crate) struct RrRun {
    /// One per request that started after the warm-up and finished before the end.
    pub(crate) samples: Vec<Duration>,
    pub(crate) secs: f64,
    /// Every request made, warm-up included: what the proxies' CPU time was spent on.
    pub(crate) requests_made: usize,
}

/// Each connection sends a request, waits for its answer, and repeats, for `warmup` and then
/// `duration`.
pub(crate) fn request_response(
    addr: SocketAddr,
    exchange: &Exchange,
    connections: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<RrRun> {
    let mut conns = Vec::with_capacity(connections);
    for i in 0..connections {
        let mut c = HttpConn::connect(addr).with_context(|| format!("connection {i}"))?;
        // Setting a connection up through proxies is not what the latencies are about.
        c.round_trip(&exchange.request, &exchange.response_body)
            .with_context(|| format!("first request on connection {i}"))?;
        conns.push(c);
    }
    let from = Instant::now() + warmup;
    let until = from + duration;
    let samples = thread::scope(|s| {
        let workers: Vec<_> = conns
            .into_iter()
            .map(|mut c| {
                s.spawn(move || -> anyhow::Result<(Vec<Duration>, usize)> {
                    let mut samples = Vec::new();
                    // The set-up request above counts too.
                    let mut made = 1;
                    loop {
                        let t0 = Instant::now();
                        if t0 >= until {
                            return Ok((samples, made));
                        }
                        c.round_trip(&exchange.request, &exchange.response_body)?;
                        made += 1;
                        let t1 = Instant::now();
                        if t0 >= from && t1 <= until {
                            samples.push(t1 - t0);
                        }
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut made = 0;
        for (i, w) in workers.into_iter().enumerate() {
            let (got, n) = w
                .join()
                .map_err(|_| anyhow::anyhow!("connection {i} panicked"))?
                .with_context(|| format!("connection {i}"))?;
            all.extend(got);
            made += n;
        }
        anyhow::Ok((all, made))
    })?;
    let (samples, requests_made) = samples;
    anyhow::ensure!(!samples.is_empty(), "no request completed in the window");
    Ok(RrRun {
        samples,
        secs: duration.as_secs_f64(),
        requests_made,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_uploads_round_trip_on_one_connection() {
        let backend = Backend::start(100).unwrap();
        let exchange = Exchange::new(100);
        let mut c = HttpConn::connect(backend.addr).unwrap();
        c.round_trip(&exchange.request, &exchange.response_body)
            .unwrap();
        c.upload(3 * BULK_WRITE as u64 + 17).unwrap();
        c.round_trip(&exchange.request, &exchange.response_body)
            .unwrap();
        c.upload(0).unwrap();
    }

    #[test]
    fn a_wrong_answer_is_an_error() {
        let backend = Backend::start(100).unwrap();
        let exchange = Exchange::new(100);
        let mut c = HttpConn::connect(backend.addr).unwrap();
        assert!(c.round_trip(&exchange.request, &[b'x'; 100]).is_err());
    }

    #[test]
    fn chunked_bodies_are_joined() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut conn = HttpConn::new(s.try_clone().unwrap(), 0).unwrap();
            conn.read_head().unwrap().unwrap();
            s.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                  4\r\nLIVE\r\n1;x=y\r\n\n\r\n0\r\nTrailer: z\r\n\r\n",
            )
            .unwrap();
        });
        assert_eq!(get(addr, "/ready").unwrap(), "LIVE\n");
        server.join().unwrap();
    }

    #[test]
    fn the_load_counts_requests_in_its_window() {
        let backend = Backend::start(100).unwrap();
        let run = request_response(
            backend.addr,
            &Exchange::new(100),
            3,
            Duration::from_millis(10),
            Duration::from_millis(50),
        )
        .unwrap();
        assert!(!run.samples.is_empty());
        assert!(run.samples.iter().all(|d| *d <= Duration::from_millis(50)));
    }
}
