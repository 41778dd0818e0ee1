//! Istio-shaped xDS resources for tests and benchmarks (feature `testing`).

pub mod mesh;
