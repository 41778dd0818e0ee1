//! What a connection asks of Envoy. The `abi` module implements it over Envoy's callbacks;
//! tests implement it over plain sockets, so everything above `abi` runs without Envoy.

use std::net::SocketAddr;

/// Result of reading from, or writing to, the kernel socket Envoy owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// Moved this many bytes (more than zero).
    Done(usize),
    /// Nothing can move now; Envoy raises an event when it can.
    Again,
    /// Reading: the peer shut down its write side.
    Eof,
    /// The socket failed (reset, for instance).
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

pub trait Host {
    fn io_read(&mut self, buf: &mut [u8]) -> Io;
    fn io_write(&mut self, buf: &[u8]) -> Io;
    /// Reads up to `max` bytes from the socket straight into Envoy's read buffer (no copy
    /// through ours); only inside `do_read`.
    fn io_read_into_buffer(&mut self, max: usize) -> Io;
    /// Writes from Envoy's write buffer to the socket and drains what went out; only inside
    /// `do_write`.
    fn io_write_from_buffer(&mut self) -> Io;
    /// `shutdown(SHUT_WR)` on the kernel socket.
    fn io_shutdown_write(&mut self);

    /// Hands payload to Envoy; only inside `do_read`.
    fn read_buffer_add(&mut self, data: &[u8]);
    /// Envoy's read buffer is over its limit: stop reading and come back later.
    fn should_drain_read_buffer(&self) -> bool;
    /// What Envoy wants written; only inside `do_write`.
    fn write_slices(&self) -> Vec<&[u8]>;
    fn write_drain(&mut self, len: usize);

    /// Tells Envoy the transport is up (held back until the handshake has decided the mode).
    fn raise_connected(&mut self);
    /// Asks Envoy for another `do_read` soon, although the socket may have nothing new.
    fn set_readable(&mut self);
    /// Asks Envoy for another `do_write` soon.
    fn set_writable(&mut self);
    /// Has Envoy run `do_write`, once this hook returns, if it holds data for us.
    fn flush_write_buffer(&mut self);

    /// Envoy's id of this connection.
    fn connection_id(&self) -> Option<u64>;
    fn local_address(&self) -> Option<SocketAddr>;
    fn remote_address(&self) -> Option<SocketAddr>;

    fn log_enabled(&self, level: LogLevel) -> bool;
    fn log(&self, level: LogLevel, message: &str);
}
