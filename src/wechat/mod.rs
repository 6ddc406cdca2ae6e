//! The WeChat server API: the client wxgate uses ([`client`], over [`transport`]) and the mock that
//! tests, the demo and the benchmarks use in its place ([`mock`]). Both follow
//! `shared/docs/wechat-protocol.md`.

pub mod access_token;
pub mod client;
pub mod crypto;
pub mod mock;
pub mod transport;
