//! The contract between apps and `shuntd`.
//!
//! An app worker talks to `shuntd` over one `SOCK_SEQPACKET` Unix socket ([`message`]) and hears
//! about sessions through a shared-memory event queue, woken through a wake-up pipe of its own
//! ([`event`]). Cut-through peers talk to each other, without `shuntd`, through rings and FIFOs at
//! fixed places in a shared segment ([`layout`]). Apps also report what their connections did
//! ([`usage`]). Everything here decodes untrusted bytes and never panics on them.

pub mod decode_check;
pub mod endpoint;
pub mod error;
pub mod event;
pub mod layout;
pub mod message;
pub mod usage;

pub use endpoint::EndpointError;
pub use error::ErrorCode;
pub use event::{Event, EventDecodeError};
pub use message::{DaemonReply, Request};
pub use usage::UsageReport;
