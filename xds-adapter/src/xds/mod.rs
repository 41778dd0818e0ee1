//! The xDS client: transports, streams, reconnect backoff, and the accepted state.

pub mod backoff;
pub mod client;
pub mod state;
pub mod transport;

pub use client::{Api, Protocol, StreamConfig, run};
pub use state::State;
pub use transport::{Target, TlsFiles};
