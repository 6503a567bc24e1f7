//! Jaunt data plane.

pub mod hello;
pub mod mux;
pub mod route;
pub mod server;
pub mod tunnel;
pub mod verified;
