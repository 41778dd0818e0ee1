#![allow(dead_code, unreachable_pub)]
pub mod mesh;
pub mod nebucloud;
pub mod scripted_ads;
