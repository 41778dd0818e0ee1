#![allow(dead_code, unreachable_pub)]
pub mod nebucloud;
pub mod scripted_ads;
pub mod shuntd;
