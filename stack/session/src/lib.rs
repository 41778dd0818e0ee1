//! Shunt's session layer, as run inside `shuntd`.
//!
//! Apps attach into a [`namespace`] by proving its secret, as a user its [`access`] list admits,
//! within their user's and namespace's [`limits`]. Their listeners and sessions live in
//! [`tables`] (source ports from [`ports`]); connects and pairings are filtered or redirected by
//! the [`rules`] tables, whose rules may name the peer's identity ([`identity_match`]); and every
//! session is carried by a [`transport`]. The layer reaches apps through a [`link`], never
//! touching an app's descriptors under its lock, and believes sessions carried over from an
//! earlier shuntd only as far as it can check them ([`resume`]).
//!
//! Only one transport exists so far, [`cut_through`], which joins two co-located app workers
//! FIFO-to-FIFO in a shared segment. [`layer::SessionLayer`] ties them together and never
//! branches on which transport carries a session. Config sources also describe the mesh's
//! [`services`], which shuntd keeps for its control API.

pub mod access;
pub mod app;
pub mod certificates;
pub mod cut_through;
pub mod identity_match;
pub mod layer;
pub mod limits;
pub mod link;
pub mod namespace;
pub mod pairing;
pub mod ports;
pub mod resume;
pub mod rules;
pub mod services;
pub mod tables;
pub mod transport;

pub use layer::{SessionLayer, SessionLayerConfig};
