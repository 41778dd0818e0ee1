//! Shunt's own wire APIs, generated from the `.proto` files beside this crate.
//!
//! - [`sapi`]: the session API an app worker speaks with `shuntd` over its Unix socket.
//! - [`control`] (feature `grpc`): `shuntd`'s gRPC control API, used by the `shunt` CLI.

/// The app <-> shuntd session API (messages only; no gRPC).
pub mod sapi {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/shunt.sapi.v1.rs"));
}

/// shuntd's gRPC control API.
#[cfg(feature = "grpc")]
pub mod control {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/shunt.control.v1.rs"));
}

#[cfg(feature = "grpc")]
mod unix;
#[cfg(feature = "grpc")]
pub use unix::{CONTROL_MESSAGE_LIMIT, control_client, unix_channel};
