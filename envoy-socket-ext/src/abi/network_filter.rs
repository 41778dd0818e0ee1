//! The companion network filter, `peer_identity`: Envoy 1.40 gives a dynamic-module transport
//! socket no way to expose what its TLS handshake proved (`ssl()` is null) nor to define stats,
//! but a network filter of the same module can set filter state and count Envoy stats. It
//! reads what the transport socket recorded of the connection ([`crate::identity`]).
//!
//! * Filter state: once the mode is known (on the connection's first data, which only flows
//!   once the transport socket has decided its mode, or at its close), the filter publishes
//!   `shunt.peer_identity` (the verified SPIFFE id, with mutual TLS) and `shunt.mode` as string
//!   filter state, which RBAC's `filter_state` principals and access logs
//!   (`%FILTER_STATE(shunt.peer_identity:PLAIN)%`) read.
//! * Stats ([`crate::envoy_stats`]): per mode, `shunt.mode.<mode>.connections_total`,
//!   `.connections_active`, `.rx_bytes_total` and `.tx_bytes_total`; per reason a connection
//!   is not cut-through, `shunt.reason.<reason>.fallbacks_total`. Envoy 1.40 puts them under
//!   the module config's `metrics_namespace`, by default `dynamicmodulescustom`:
//!   `dynamicmodulescustom.shunt.mode.tls.connections_total` in `/stats`,
//!   `envoy_dynamicmodulescustom_shunt_mode_tls_connections_total` in `/stats/prometheus`.
//!
//! ```yaml
//! - name: envoy.filters.network.dynamic_modules
//!   typed_config:
//!     "@type": type.googleapis.com/envoy.extensions.filters.network.dynamic_modules.v3.DynamicModuleNetworkFilter
//!     dynamic_module_config: {name: shunt_envoy}
//!     filter_name: peer_identity
//! ```

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Buffer, guarded, log_global};
use crate::envoy_stats::{Direction, Kind, Sink, StatId, StatIds, Tally};
use crate::host::LogLevel;
use crate::identity::{self, MODE_KEY, PEER_IDENTITY_KEY, PeerRecord};

/// The name this filter goes by in `filter_name`.
pub const FILTER_NAME: &str = "peer_identity";

/// `envoy_dynamic_module_type_on_network_filter_data_status_Continue`.
const CONTINUE: u32 = 0;
/// `envoy_dynamic_module_type_network_connection_event_RemoteClose` and `_LocalClose`.
const EVENT_REMOTE_CLOSE: u32 = 0;
const EVENT_LOCAL_CLOSE: u32 = 1;
/// `envoy_dynamic_module_type_metrics_result_Success`.
const METRICS_SUCCESS: u32 = 0;

// Envoy 1.40 (ABI v0.2.0), source/extensions/dynamic_modules/abi/abi.h. The metric callbacks
// take ids from 1 (0 is never a metric) and no labels; the `config_` variants take the
// config's Envoy pointer, which a filter's destruction still has.
unsafe extern "C" {
    fn envoy_dynamic_module_callback_network_filter_get_connection_id(envoy: *mut c_void) -> u64;
    fn envoy_dynamic_module_callback_network_set_filter_state_bytes(
        envoy: *mut c_void,
        key: Buffer,
        value: Buffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_network_filter_config_define_counter(
        config_envoy: *mut c_void,
        name: Buffer,
        counter_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_network_filter_config_define_gauge(
        config_envoy: *mut c_void,
        name: Buffer,
        gauge_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_network_filter_config_increment_counter(
        config_envoy: *mut c_void,
        id: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_network_filter_config_increment_gauge(
        config_envoy: *mut c_void,
        id: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_network_filter_config_decrement_gauge(
        config_envoy: *mut c_void,
        id: usize,
        value: u64,
    ) -> u32;
}

struct FilterConfig {
    /// Envoy's side of this config, the `config_envoy` of `config_new`. Envoy destroys this
    /// config only after its last filter: each of its filters holds a reference to it.
    envoy: *mut c_void,
    stats: StatIds,
    refusal_logged: AtomicBool,
}

impl FilterConfig {
    /// Logs the first refusal only: a stat update runs per read and write, and a refusal
    /// (such as a frozen stats store) would repeat on every one.
    fn checked(&self, what: &str, result: u32) {
        if result != METRICS_SUCCESS && !self.refusal_logged.swap(true, Ordering::Relaxed) {
            log_global(
                LogLevel::Error,
                &format!("shunt: Envoy refused to {what} a stat of `{FILTER_NAME}`: {result}"),
            );
        }
    }
}

/// Envoy's stats of this config. Its callbacks are atomic updates, safe from any worker.
impl Sink for FilterConfig {
    fn add(&self, counter: StatId, n: u64) {
        // SAFETY: `self.envoy` is the live config (see its field); `counter` came from define.
        let result = unsafe {
            envoy_dynamic_module_callback_network_filter_config_increment_counter(
                self.envoy, counter, n,
            )
        };
        self.checked("increment", result);
    }

    fn gauge_up(&self, gauge: StatId) {
        // SAFETY: `self.envoy` is the live config (see its field); `gauge` came from define.
        let result = unsafe {
            envoy_dynamic_module_callback_network_filter_config_increment_gauge(
                self.envoy, gauge, 1,
            )
        };
        self.checked("increment", result);
    }

    fn gauge_down(&self, gauge: StatId) {
        // SAFETY: `self.envoy` is the live config (see its field); `gauge` came from define.
        let result = unsafe {
            envoy_dynamic_module_callback_network_filter_config_decrement_gauge(
                self.envoy, gauge, 1,
            )
        };
        self.checked("decrement", result);
    }
}

struct Filter {
    /// Our config, which outlives the filter (see [`FilterConfig::envoy`]).
    config: *const FilterConfig,
    tally: Tally,
}

impl Filter {
    /// The config, borrowed apart from the filter (so that its tally can change meanwhile).
    fn config<'a>(&self) -> Option<&'a FilterConfig> {
        // SAFETY: a non-null `config` is our live FilterConfig, which Envoy destroys only after
        // this filter, so for as long as the filter is used; it is only read.
        unsafe { self.config.as_ref() }
    }

    /// Looks up what the transport socket recorded of this connection, if that is still to
    /// be done; `settle_if_absent`: a missing record is final (data has been read, or the
    /// connection closed, so the mode would have been recorded by now).
    ///
    /// # Safety
    /// `envoy` must be the live filter of the current hook, on its worker thread.
    unsafe fn observe(&mut self, envoy: *mut c_void, settle_if_absent: bool) {
        if !self.tally.unsettled() {
            return;
        }
        // SAFETY: per the contract, `envoy` is live during this hook.
        let id = unsafe { envoy_dynamic_module_callback_network_filter_get_connection_id(envoy) };
        let peer = identity::lookup(id);
        if peer.is_none() && !settle_if_absent {
            return;
        }
        if let Some(peer) = &peer {
            // SAFETY: per the contract, `envoy` is live during this hook.
            unsafe { publish(envoy, peer) };
        }
        if let Some(config) = self.config() {
            self.tally.settle(peer.as_ref(), &config.stats, config);
        }
    }

    fn data(&mut self, direction: Direction, n: usize) {
        if let Some(config) = self.config() {
            self.tally.data(direction, n as u64, &config.stats, config);
        }
    }

    fn closed(&mut self) {
        if let Some(config) = self.config() {
            self.tally.closed(&config.stats, config);
        }
    }
}

/// Sets the filter state of the connection behind `envoy` from what its transport socket
/// recorded.
///
/// # Safety
/// `envoy` must be the live filter of the current hook, on its worker thread.
unsafe fn publish(envoy: *mut c_void, peer: &PeerRecord) {
    let Some(mode) = peer.mode else {
        // Refused before it had a mode: nothing to tell policy, and the connection is closing.
        return;
    };
    let set = |key: &str, value: &str| {
        // SAFETY: `envoy` is live; Envoy copies both buffers before returning.
        unsafe {
            envoy_dynamic_module_callback_network_set_filter_state_bytes(
                envoy,
                Buffer::of(key.as_bytes()),
                Buffer::of(value.as_bytes()),
            )
        }
    };
    set(MODE_KEY, mode.as_str());
    if let Some(identity) = &peer.identity {
        set(PEER_IDENTITY_KEY, identity);
    }
}

/// # Safety
/// `filter` must be null or our live Filter, and Envoy calls a filter's hooks one at a time on
/// its worker thread, so no other reference to it exists during the call.
unsafe fn filter<'a>(filter: *const c_void) -> Option<&'a mut Filter> {
    // SAFETY: per the contract.
    unsafe { filter.cast_mut().cast::<Filter>().as_mut() }
}

/// Defines the filter's stats on Envoy's side of its config.
///
/// # Safety
/// `config_envoy` must be the config Envoy passed to `config_new`, during that call.
unsafe fn define_stats(config_envoy: *mut c_void) -> Result<StatIds, String> {
    StatIds::define(|kind, name| {
        let define = match kind {
            Kind::Counter => envoy_dynamic_module_callback_network_filter_config_define_counter,
            Kind::Gauge => envoy_dynamic_module_callback_network_filter_config_define_gauge,
        };
        let mut id = 0usize;
        // SAFETY: `config_envoy` is live during config_new; Envoy copies the name before
        // returning and writes the id to a valid local.
        let result = unsafe { define(config_envoy, Buffer::of(name.as_bytes()), &mut id) };
        if result == METRICS_SUCCESS {
            Ok(id)
        } else {
            Err(format!(
                "Envoy refused to define the stat `{name}`: {result}"
            ))
        }
    })
}

/// # Safety
/// Envoy passes buffers valid for the duration of the call, and its live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_config_new(
    config_envoy: *mut c_void,
    name: Buffer,
    _config: Buffer,
) -> *const c_void {
    // SAFETY: the buffer is valid during this call and only read inside it.
    let name = unsafe { name.as_slice() };
    guarded(std::ptr::null(), || {
        if name != FILTER_NAME.as_bytes() {
            let name = String::from_utf8_lossy(name);
            log_global(
                LogLevel::Error,
                &format!("shunt: network filter `{name}` is unknown; use `{FILTER_NAME}`"),
            );
            return std::ptr::null();
        }
        // SAFETY: `config_envoy` is the config of this call.
        match unsafe { define_stats(config_envoy) } {
            Ok(stats) => {
                let config = FilterConfig {
                    envoy: config_envoy,
                    stats,
                    refusal_logged: AtomicBool::new(false),
                };
                Box::into_raw(Box::new(config)).cast_const().cast()
            }
            Err(e) => {
                log_global(LogLevel::Error, &format!("shunt: `{FILTER_NAME}`: {e}"));
                std::ptr::null()
            }
        }
    })
}

/// # Safety
/// `config` must come from `config_new` and not be used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_config_destroy(
    config: *const c_void,
) {
    if !config.is_null() {
        // SAFETY: `config` came from Box::into_raw in config_new; Envoy destroys it once.
        drop(unsafe { Box::from_raw(config.cast_mut().cast::<FilterConfig>()) });
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_network_filter_new(
    config: *const c_void,
    _envoy: *mut c_void,
) -> *const c_void {
    guarded(std::ptr::null(), || {
        let filter = Filter {
            config: config.cast(),
            tally: Tally::default(),
        };
        Box::into_raw(Box::new(filter)).cast_const().cast()
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_network_filter_new_connection(
    _envoy: *mut c_void,
    _filter: *const c_void,
) -> u32 {
    CONTINUE
}

/// # Safety
/// `envoy` and `filter` must be the live pair of one connection.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_read(
    envoy: *mut c_void,
    filter: *const c_void,
    data_length: usize,
    _end_stream: bool,
) -> u32 {
    // SAFETY: see `filter`.
    if let Some(filter) = unsafe { self::filter(filter) } {
        guarded((), || {
            // Data reaches filters only once the mode is decided: a record would exist now.
            // SAFETY: `envoy` is this hook's live filter.
            unsafe { filter.observe(envoy, true) };
            filter.data(Direction::Read, data_length);
        });
    }
    CONTINUE
}

/// # Safety
/// `envoy` and `filter` must be the live pair of one connection.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_write(
    envoy: *mut c_void,
    filter: *const c_void,
    data_length: usize,
    _end_stream: bool,
) -> u32 {
    // SAFETY: see `filter`.
    if let Some(filter) = unsafe { self::filter(filter) } {
        guarded((), || {
            // Envoy may write before the transport socket decided (a server that speaks
            // first): those bytes wait for the mode.
            // SAFETY: `envoy` is this hook's live filter.
            unsafe { filter.observe(envoy, false) };
            filter.data(Direction::Written, data_length);
        });
    }
    CONTINUE
}

/// # Safety
/// `envoy` and `filter` must be the live pair of one connection.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_event(
    envoy: *mut c_void,
    filter: *const c_void,
    event: u32,
) {
    if event != EVENT_REMOTE_CLOSE && event != EVENT_LOCAL_CLOSE {
        return;
    }
    // SAFETY: see `filter`.
    if let Some(filter) = unsafe { self::filter(filter) } {
        guarded((), || {
            // The transport socket, and so its record, outlives the close event: a
            // connection that closes without data still counts in its mode.
            // SAFETY: `envoy` is this hook's live filter.
            unsafe { filter.observe(envoy, true) };
            filter.closed();
        });
    }
}

/// # Safety
/// `filter` must come from `on_network_filter_new` and not be used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_destroy(filter: *const c_void) {
    if !filter.is_null() {
        // SAFETY: `filter` came from Box::into_raw in on_network_filter_new; destroyed once.
        let mut filter = unsafe { Box::from_raw(filter.cast_mut().cast::<Filter>()) };
        // Without a close event (Envoy shutting down), the connection leaves the gauge here.
        guarded((), || filter.closed());
    }
}

// Envoy resolves these too; the filter schedules nothing, calls out to nothing and buffers
// nothing, so they have nothing to do.

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_network_filter_scheduled(
    _envoy: *mut c_void,
    _filter: *const c_void,
    _event_id: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_network_filter_config_scheduled(
    _config: *const c_void,
    _event_id: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_network_filter_http_callout_done(
    _envoy: *mut c_void,
    _filter: *const c_void,
    _callout_id: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_network_filter_above_write_buffer_high_watermark(
    _envoy: *mut c_void,
    _filter: *const c_void,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_network_filter_below_write_buffer_low_watermark(
    _envoy: *mut c_void,
    _filter: *const c_void,
) {
}
