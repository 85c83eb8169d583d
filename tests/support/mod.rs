//! The test harness every test binary shares (each uses a part of it): a fresh database per test
//! (`db`), the real app with its simulators (`app`), HTTP calls to a service at a base URL
//! (`client`), loopback ports and servers (`net`), and collected spans drawn as a tree (`spans`).

#![allow(dead_code, unused_imports)]

pub mod app;
pub mod client;
pub mod db;
pub mod net;
pub mod spans;

pub use app::*;
pub use db::*;
pub use net::*;
