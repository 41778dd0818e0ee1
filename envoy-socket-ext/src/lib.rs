//! `libshunt_envoy.so`: an Envoy transport socket that moves payload between co-located
//! sidecars through Shunt's shared-memory FIFOs.
//!
//! Stock Envoy 1.40 loads it from its bootstrap, on a cluster (the upstream side, which
//! initiates) and on a listener's filter chain (the downstream side, which responds). Two
//! sidecars with the module decide the mode in-band on their TCP connection ([`wire`]): with
//! mutual TLS configured, a TLS handshake proves both identities first. If both reach the same
//! `shuntd` and it pairs them, payload moves through a FIFO pair and the TCP connection carries
//! only doorbells ([`connection`]). Otherwise the connection carries payload itself, in TLS
//! records or in the clear, and it always works.
//!
//! [`abi`] holds every unsafe line: Envoy's hooks and callbacks. The rest is safe Rust behind
//! the [`host::Host`] trait and runs in tests without Envoy.

pub mod abi;
pub mod attach;
pub mod config;
pub mod connection;
pub mod envoy_stats;
pub mod host;
pub mod identity;
pub mod stats;
pub mod tls_source;
pub mod wire;
