//! Envoy 1.40's dynamic-module ABI for transport sockets (ABI version `v0.2.0`): the hooks
//! this library exports and the callbacks it imports; [`network_filter`] has the companion
//! network filter's. All of the crate's unsafe code is here.
//!
//! Each hook checks its pointers once, turns them into references or slices, runs safe code
//! under `catch_unwind`, and maps the result back: a panic fails that one call (the connection
//! closes) instead of aborting Envoy.
//!
//! Envoy does not check signatures, only the version string, so a drifted declaration here
//! would load and misbehave. `tests/loading.rs` compares the callbacks this library imports
//! with the symbols the pinned Envoy binary exports.

#![allow(unsafe_code)]

pub mod network_filter;

use std::ffi::{c_char, c_void};
use std::net::{IpAddr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::config::Settings;
use crate::connection::{Connection, IoResult, Side};
use crate::host::{Host, Io, LogLevel};

/// The version string Envoy 1.40 expects from `envoy_dynamic_module_on_program_init`.
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Buffer {
    ptr: *const c_char,
    length: usize,
}

impl Buffer {
    const EMPTY: Buffer = Buffer {
        ptr: std::ptr::null(),
        length: 0,
    };

    fn of(bytes: &[u8]) -> Buffer {
        Buffer {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }

    /// # Safety
    /// `ptr` must point to `length` readable bytes that outlive `'a` (or be null).
    unsafe fn as_slice<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.length == 0 {
            &[]
        } else {
            // SAFETY: the caller guarantees `length` readable bytes at `ptr` for `'a`.
            unsafe { std::slice::from_raw_parts(self.ptr.cast(), self.length) }
        }
    }
}

#[repr(C)]
pub struct AbiIoResult {
    action: u32,
    bytes_processed: u64,
    end_stream_read: bool,
}

const ACTION_KEEP_OPEN: u32 = 0;
const ACTION_CLOSE: u32 = 1;
const STATUS_SUCCESS: u32 = 0;
const STATUS_AGAIN: u32 = 1;
const EVENT_CONNECTED: u32 = 2;

impl From<IoResult> for AbiIoResult {
    fn from(r: IoResult) -> Self {
        AbiIoResult {
            action: if r.close {
                ACTION_CLOSE
            } else {
                ACTION_KEEP_OPEN
            },
            bytes_processed: r.bytes,
            end_stream_read: r.end_stream,
        }
    }
}

// The callbacks Envoy exports. Keep this list exactly what the code calls: the drift test reads
// the library's undefined symbols.
unsafe extern "C" {
    fn envoy_dynamic_module_callback_transport_socket_io_read(
        envoy: *mut c_void,
        buf: *mut c_char,
        len: usize,
        n: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_transport_socket_io_write(
        envoy: *mut c_void,
        buf: *const c_char,
        len: usize,
        n: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_transport_socket_io_shutdown_write(envoy: *mut c_void);
    fn envoy_dynamic_module_callback_transport_socket_io_read_to_read_buffer(
        envoy: *mut c_void,
        max_len: u64,
        n: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_transport_socket_io_write_from_write_buffer(
        envoy: *mut c_void,
        n: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_transport_socket_read_buffer_add(
        envoy: *mut c_void,
        data: *const c_char,
        len: usize,
    );
    fn envoy_dynamic_module_callback_transport_socket_should_drain_read_buffer(
        envoy: *mut c_void,
    ) -> bool;
    fn envoy_dynamic_module_callback_transport_socket_write_buffer_get_slices(
        envoy: *mut c_void,
        slices: *mut Buffer,
        count: *mut usize,
    );
    fn envoy_dynamic_module_callback_transport_socket_write_buffer_drain(
        envoy: *mut c_void,
        len: usize,
    );
    fn envoy_dynamic_module_callback_transport_socket_raise_event(envoy: *mut c_void, event: u32);
    fn envoy_dynamic_module_callback_transport_socket_set_is_readable(envoy: *mut c_void);
    fn envoy_dynamic_module_callback_transport_socket_set_is_writable(envoy: *mut c_void);
    fn envoy_dynamic_module_callback_transport_socket_flush_write_buffer(envoy: *mut c_void);
    fn envoy_dynamic_module_callback_transport_socket_get_connection_id(
        envoy: *mut c_void,
        id: *mut u64,
    ) -> bool;
    fn envoy_dynamic_module_callback_transport_socket_get_local_address(
        envoy: *mut c_void,
        addr: *mut Buffer,
        port: *mut u32,
    ) -> bool;
    fn envoy_dynamic_module_callback_transport_socket_get_remote_address(
        envoy: *mut c_void,
        addr: *mut Buffer,
        port: *mut u32,
    ) -> bool;
    fn envoy_dynamic_module_callback_log(level: u32, message: Buffer);
    fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;
}

/// An `io_status` and byte count from a read: success with no bytes is the peer's FIN.
fn read_result(status: u32, n: usize, max: usize) -> Io {
    match status {
        STATUS_SUCCESS if n == 0 => Io::Eof,
        STATUS_SUCCESS => Io::Done(n.min(max)),
        STATUS_AGAIN => Io::Again,
        _ => Io::Error,
    }
}

/// An `io_status` and byte count from a write: success with no bytes moved nothing, so it
/// counts as "again" (`Io::Done` always carries progress).
fn write_result(status: u32, n: usize, max: usize) -> Io {
    match status {
        STATUS_SUCCESS if n > 0 => Io::Done(n.min(max)),
        STATUS_SUCCESS | STATUS_AGAIN => Io::Again,
        _ => Io::Error,
    }
}

/// Envoy's side of one connection, valid for the duration of one hook call.
struct EnvoySocket {
    ptr: *mut c_void,
    /// Envoy's flush runs our `do_write` at once, re-entering the connection; so it is asked
    /// for here and done by the hook once the connection is no longer borrowed.
    flush_requested: bool,
}

impl EnvoySocket {
    fn new(ptr: *mut c_void) -> Self {
        Self {
            ptr,
            flush_requested: false,
        }
    }

    /// Runs the flush a hook's connection asked for, after that connection's borrow ended.
    fn flush_if_requested(&mut self, closing: bool) {
        if self.flush_requested && !closing {
            // SAFETY: `self.ptr` is the live socket, on Envoy's worker thread, and no reference
            // to the connection is held while Envoy calls back into `do_write`.
            unsafe { envoy_dynamic_module_callback_transport_socket_flush_write_buffer(self.ptr) }
        }
    }
}

fn level(l: LogLevel) -> u32 {
    match l {
        LogLevel::Trace => 0,
        LogLevel::Debug => 1,
        LogLevel::Info => 2,
        LogLevel::Warn => 3,
        LogLevel::Error => 4,
    }
}

impl EnvoySocket {
    fn address(
        &self,
        get: unsafe extern "C" fn(*mut c_void, *mut Buffer, *mut u32) -> bool,
    ) -> Option<SocketAddr> {
        let mut addr = Buffer::EMPTY;
        let mut port = 0u32;
        // SAFETY: `self.ptr` is the live socket Envoy passed to this hook; both out-pointers are
        // valid locals.
        let ok = unsafe { get(self.ptr, &mut addr, &mut port) };
        if !ok {
            return None;
        }
        // SAFETY: on success Envoy points `addr` at the address string it owns, valid during
        // this hook; it is copied out before returning.
        let text = unsafe { addr.as_slice() };
        let ip: IpAddr = std::str::from_utf8(text).ok()?.parse().ok()?;
        Some(SocketAddr::new(ip, u16::try_from(port).ok()?))
    }
}

impl Host for EnvoySocket {
    fn io_read(&mut self, buf: &mut [u8]) -> Io {
        let mut n = 0usize;
        // SAFETY: `buf` is writable for `buf.len()` bytes and `n` is a valid out-pointer.
        let status = unsafe {
            envoy_dynamic_module_callback_transport_socket_io_read(
                self.ptr,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut n,
            )
        };
        read_result(status, n, buf.len())
    }

    fn io_write(&mut self, buf: &[u8]) -> Io {
        let mut n = 0usize;
        // SAFETY: `buf` is readable for `buf.len()` bytes and `n` is a valid out-pointer.
        let status = unsafe {
            envoy_dynamic_module_callback_transport_socket_io_write(
                self.ptr,
                buf.as_ptr().cast(),
                buf.len(),
                &mut n,
            )
        };
        write_result(status, n, buf.len())
    }

    fn io_read_into_buffer(&mut self, max: usize) -> Io {
        let mut n = 0usize;
        // SAFETY: `self.ptr` is the live socket inside do_read; `n` is a valid out-pointer.
        let status = unsafe {
            envoy_dynamic_module_callback_transport_socket_io_read_to_read_buffer(
                self.ptr, max as u64, &mut n,
            )
        };
        read_result(status, n, max)
    }

    fn io_write_from_buffer(&mut self) -> Io {
        let mut n = 0usize;
        // SAFETY: `self.ptr` is the live socket inside do_write; `n` is a valid out-pointer.
        let status = unsafe {
            envoy_dynamic_module_callback_transport_socket_io_write_from_write_buffer(
                self.ptr, &mut n,
            )
        };
        write_result(status, n, usize::MAX)
    }

    fn io_shutdown_write(&mut self) {
        // SAFETY: `self.ptr` is the live socket of this hook call.
        unsafe { envoy_dynamic_module_callback_transport_socket_io_shutdown_write(self.ptr) }
    }

    fn read_buffer_add(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        // SAFETY: Envoy copies `data` (readable for its length) into its read buffer.
        unsafe {
            envoy_dynamic_module_callback_transport_socket_read_buffer_add(
                self.ptr,
                data.as_ptr().cast(),
                data.len(),
            )
        }
    }

    fn should_drain_read_buffer(&self) -> bool {
        // SAFETY: `self.ptr` is the live socket of this hook call.
        unsafe { envoy_dynamic_module_callback_transport_socket_should_drain_read_buffer(self.ptr) }
    }

    fn write_slices(&self) -> Vec<&[u8]> {
        let mut count = 0usize;
        // SAFETY: a null slice array asks Envoy only for the count, written to a valid local.
        unsafe {
            envoy_dynamic_module_callback_transport_socket_write_buffer_get_slices(
                self.ptr,
                std::ptr::null_mut(),
                &mut count,
            )
        };
        if count == 0 {
            return Vec::new();
        }
        let mut slices = vec![Buffer::EMPTY; count];
        // SAFETY: `slices` has room for `count` entries, and `count` says so.
        unsafe {
            envoy_dynamic_module_callback_transport_socket_write_buffer_get_slices(
                self.ptr,
                slices.as_mut_ptr(),
                &mut count,
            )
        };
        slices.truncate(count);
        slices
            .into_iter()
            // SAFETY: the slices point into Envoy's write buffer, which stays unchanged until
            // this hook drains it; the borrow of `self` keeps them from outliving the call.
            .map(|b| unsafe { b.as_slice() })
            .collect()
    }

    fn write_drain(&mut self, len: usize) {
        // SAFETY: `self.ptr` is the live socket; Envoy bounds the drain by its buffer length.
        unsafe { envoy_dynamic_module_callback_transport_socket_write_buffer_drain(self.ptr, len) }
    }

    fn raise_connected(&mut self) {
        // SAFETY: `self.ptr` is the live socket of this hook call.
        unsafe {
            envoy_dynamic_module_callback_transport_socket_raise_event(self.ptr, EVENT_CONNECTED)
        }
    }

    fn set_readable(&mut self) {
        // SAFETY: `self.ptr` is the live socket, on Envoy's worker thread.
        unsafe { envoy_dynamic_module_callback_transport_socket_set_is_readable(self.ptr) }
    }

    fn set_writable(&mut self) {
        // SAFETY: `self.ptr` is the live socket, on Envoy's worker thread.
        unsafe { envoy_dynamic_module_callback_transport_socket_set_is_writable(self.ptr) }
    }

    fn flush_write_buffer(&mut self) {
        self.flush_requested = true;
    }

    fn connection_id(&self) -> Option<u64> {
        let mut id = 0u64;
        // SAFETY: `self.ptr` is the live socket of this hook; `id` is a valid out-pointer.
        let ok = unsafe {
            envoy_dynamic_module_callback_transport_socket_get_connection_id(self.ptr, &mut id)
        };
        ok.then_some(id)
    }

    fn local_address(&self) -> Option<SocketAddr> {
        self.address(envoy_dynamic_module_callback_transport_socket_get_local_address)
    }

    fn remote_address(&self) -> Option<SocketAddr> {
        self.address(envoy_dynamic_module_callback_transport_socket_get_remote_address)
    }

    fn log_enabled(&self, l: LogLevel) -> bool {
        // SAFETY: no pointers.
        unsafe { envoy_dynamic_module_callback_log_enabled(level(l)) }
    }

    fn log(&self, l: LogLevel, message: &str) {
        // SAFETY: Envoy copies the message, readable for its length, before returning.
        unsafe { envoy_dynamic_module_callback_log(level(l), Buffer::of(message.as_bytes())) }
    }
}

/// Logs outside a connection (config errors), straight to Envoy.
fn log_global(l: LogLevel, message: &str) {
    // SAFETY: Envoy copies the message, readable for its length, before returning.
    unsafe { envoy_dynamic_module_callback_log(level(l), Buffer::of(message.as_bytes())) }
}

struct Factory {
    settings: Arc<Settings>,
    side: Side,
}

/// Runs `f` and turns a panic into `fallback`.
fn guarded<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// # Safety
/// `socket` must be null or a pointer returned by `on_transport_socket_new` and not destroyed.
unsafe fn connection<'a>(socket: *const c_void) -> Option<&'a mut Connection> {
    // SAFETY: per the contract, a non-null `socket` is our live boxed Connection, and Envoy
    // calls a connection's hooks one at a time on its worker thread, so no other reference
    // to it exists during this call.
    unsafe { socket.cast_mut().cast::<Connection>().as_mut() }
}

// ---- hooks ----

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    ABI_VERSION.as_ptr().cast()
}

/// # Safety
/// Envoy passes buffers valid for the duration of the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_transport_socket_factory_config_new(
    _factory_envoy: *mut c_void,
    socket_name: Buffer,
    socket_config: Buffer,
    is_upstream: bool,
) -> *const c_void {
    // SAFETY: both buffers are valid during this call and only read inside it.
    let (name, config) = unsafe { (socket_name.as_slice(), socket_config.as_slice()) };
    guarded(std::ptr::null(), || match Settings::parse(name, config) {
        Ok(settings) => {
            let side = if is_upstream {
                Side::Initiator
            } else {
                Side::Responder
            };
            let factory = Box::new(Factory {
                settings: Arc::new(settings),
                side,
            });
            Box::into_raw(factory).cast_const().cast()
        }
        Err(e) => {
            log_global(LogLevel::Error, &format!("shunt: {e}"));
            std::ptr::null()
        }
    })
}

/// # Safety
/// `factory` must come from `factory_config_new` and not be used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_transport_socket_factory_config_destroy(
    factory: *const c_void,
) {
    if !factory.is_null() {
        // SAFETY: `factory` came from Box::into_raw in factory_config_new; Envoy destroys once.
        drop(unsafe { Box::from_raw(factory.cast_mut().cast::<Factory>()) });
    }
}

/// # Safety
/// `factory` must be a live factory from `factory_config_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_transport_socket_new(
    factory: *const c_void,
    _envoy: *mut c_void,
) -> *const c_void {
    // SAFETY: a non-null `factory` is our live Factory, shared read-only across workers.
    let Some(factory) = (unsafe { factory.cast::<Factory>().as_ref() }) else {
        return std::ptr::null();
    };
    guarded(std::ptr::null(), || {
        let conn = Box::new(Connection::new(factory.settings.clone(), factory.side));
        Box::into_raw(conn).cast_const().cast()
    })
}

/// # Safety
/// `socket` must come from `on_transport_socket_new` and not be used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_transport_socket_destroy(socket: *const c_void) {
    if !socket.is_null() {
        // SAFETY: `socket` came from Box::into_raw in on_transport_socket_new; destroyed once.
        let conn = unsafe { Box::from_raw(socket.cast_mut().cast::<Connection>()) };
        guarded((), || drop(conn));
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_transport_socket_set_callbacks(
    _envoy: *mut c_void,
    _socket: *const c_void,
) {
}

/// # Safety
/// `envoy` and `socket` must be the live pair of one connection.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_transport_socket_on_connected(
    envoy: *mut c_void,
    socket: *const c_void,
) {
    // SAFETY: see `connection`.
    let Some(conn) = (unsafe { connection(socket) }) else {
        return;
    };
    let mut host = EnvoySocket::new(envoy);
    guarded((), || conn.on_connected(&mut host));
    host.flush_if_requested(false);
}

/// # Safety
/// `envoy` and `socket` must be the live pair of one connection.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_transport_socket_do_read(
    envoy: *mut c_void,
    socket: *const c_void,
) -> AbiIoResult {
    // SAFETY: see `connection`.
    let Some(conn) = (unsafe { connection(socket) }) else {
        return IoResult::closed().into();
    };
    let mut host = EnvoySocket::new(envoy);
    let result = guarded(IoResult::closed(), || conn.do_read(&mut host));
    host.flush_if_requested(result.close);
    result.into()
}

/// # Safety
/// `envoy` and `socket` must be the live pair of one connection.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_transport_socket_do_write(
    envoy: *mut c_void,
    socket: *const c_void,
    end_stream: bool,
) -> AbiIoResult {
    // SAFETY: see `connection`.
    let Some(conn) = (unsafe { connection(socket) }) else {
        return IoResult::closed().into();
    };
    // A flush asked for here is moot: this is the write.
    let mut host = EnvoySocket::new(envoy);
    guarded(IoResult::closed(), || conn.do_write(&mut host, end_stream)).into()
}

/// # Safety
/// `socket` must be a live connection.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_transport_socket_close(
    _envoy: *mut c_void,
    socket: *const c_void,
    _event: u32,
    abort_reset: bool,
) {
    // SAFETY: see `connection`.
    if let Some(conn) = unsafe { connection(socket) } {
        guarded((), || conn.close(abort_reset));
    }
}

/// # Safety
/// `out` must be null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_transport_socket_get_protocol(
    _envoy: *mut c_void,
    _socket: *const c_void,
    out: *mut Buffer,
) {
    // No ALPN: Envoy picks its codec from its own config, as for a raw TCP connection.
    // SAFETY: a non-null `out` is writable, per Envoy's contract.
    if let Some(out) = unsafe { out.as_mut() } {
        *out = Buffer::EMPTY;
    }
}

/// # Safety
/// `socket` must be a live connection and `out` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_transport_socket_get_failure_reason(
    _envoy: *mut c_void,
    socket: *const c_void,
    out: *mut Buffer,
) {
    // SAFETY: see `connection`; a non-null `out` is writable. The reason string lives in the
    // connection, which outlives Envoy's use of it.
    unsafe {
        if let (Some(conn), Some(out)) = (connection(socket), out.as_mut()) {
            *out = Buffer::of(conn.failure_reason().as_bytes());
        }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_transport_socket_can_flush_close(
    _envoy: *mut c_void,
    _socket: *const c_void,
) -> bool {
    true
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_transport_socket_start_secure_transport(
    _envoy: *mut c_void,
    _socket: *const c_void,
) -> bool {
    false
}
