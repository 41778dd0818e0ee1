//! The companion network filter, `peer_identity`: Envoy 1.40 gives a dynamic-module transport
//! socket no way to expose what its TLS handshake proved (`ssl()` is null), but a network
//! filter of the same module can set filter state. On the connection's first data, which only
//! flows once the transport socket has decided its mode, the filter publishes
//! `shunt.peer_identity` (the verified SPIFFE id, with mutual TLS) and `shunt.mode` as string
//! filter state, which RBAC's `filter_state` principals and access logs
//! (`%FILTER_STATE(shunt.peer_identity:PLAIN)%`) read.
//!
//! ```yaml
//! - name: envoy.filters.network.dynamic_modules
//!   typed_config:
//!     "@type": type.googleapis.com/envoy.extensions.filters.network.dynamic_modules.v3.DynamicModuleNetworkFilter
//!     dynamic_module_config: {name: shunt_envoy}
//!     filter_name: peer_identity
//! ```

use std::ffi::c_void;

use super::{Buffer, guarded, log_global};
use crate::host::LogLevel;
use crate::identity::{self, MODE_KEY, PEER_IDENTITY_KEY};

/// The name this filter goes by in `filter_name`.
pub const FILTER_NAME: &str = "peer_identity";

/// `envoy_dynamic_module_type_on_network_filter_data_status_Continue`.
const CONTINUE: u32 = 0;

unsafe extern "C" {
    fn envoy_dynamic_module_callback_network_filter_get_connection_id(envoy: *mut c_void) -> u64;
    fn envoy_dynamic_module_callback_network_set_filter_state_bytes(
        envoy: *mut c_void,
        key: Buffer,
        value: Buffer,
    ) -> bool;
}

struct FilterConfig;

struct Filter {
    published: bool,
}

/// Sets the filter state of the connection behind `envoy` from what its transport socket
/// recorded.
///
/// # Safety
/// `envoy` must be the live filter of the current hook, on its worker thread.
unsafe fn publish(envoy: *mut c_void) {
    // SAFETY: per the contract, `envoy` is live during this hook.
    let id = unsafe { envoy_dynamic_module_callback_network_filter_get_connection_id(envoy) };
    let Some(peer) = identity::lookup(id) else {
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
    set(MODE_KEY, peer.mode);
    if let Some(identity) = &peer.identity {
        set(PEER_IDENTITY_KEY, identity);
    }
}

/// # Safety
/// Envoy passes buffers valid for the duration of the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_config_new(
    _config_envoy: *mut c_void,
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
        Box::into_raw(Box::new(FilterConfig)).cast_const().cast()
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
    _config: *const c_void,
    _envoy: *mut c_void,
) -> *const c_void {
    guarded(std::ptr::null(), || {
        Box::into_raw(Box::new(Filter { published: false }))
            .cast_const()
            .cast()
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
    _data_length: usize,
    _end_stream: bool,
) -> u32 {
    // SAFETY: a non-null `filter` is our live Filter; Envoy calls a filter's hooks one at a
    // time on its worker thread, so no other reference to it exists.
    let Some(filter) = (unsafe { filter.cast_mut().cast::<Filter>().as_mut() }) else {
        return CONTINUE;
    };
    if !filter.published {
        filter.published = true;
        // SAFETY: `envoy` is this hook's live filter.
        guarded((), || unsafe { publish(envoy) });
    }
    CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_network_filter_write(
    _envoy: *mut c_void,
    _filter: *const c_void,
    _data_length: usize,
    _end_stream: bool,
) -> u32 {
    CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_network_filter_event(
    _envoy: *mut c_void,
    _filter: *const c_void,
    _event: u32,
) {
}

/// # Safety
/// `filter` must come from `on_network_filter_new` and not be used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_destroy(filter: *const c_void) {
    if !filter.is_null() {
        // SAFETY: `filter` came from Box::into_raw in on_network_filter_new; destroyed once.
        drop(unsafe { Box::from_raw(filter.cast_mut().cast::<Filter>()) });
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
