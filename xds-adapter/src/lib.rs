//! `shunt-xds`: keeps shuntd's rules, services and certificates in step with the mesh's xDS.

pub mod apply;
pub mod cluster_name;
pub mod config_dump;
pub mod metrics;
pub mod node;
pub mod offline;
pub mod resource;
pub mod tables;
#[cfg(feature = "testing")]
pub mod testing;
pub mod translate;
pub mod xds;
