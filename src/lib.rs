//! wxgate: a reverse-proxy authentication sidecar for WeChat.
//!
//! Clients (a mini program, a mobile app, H5 pages, a website) talk to wxgate; wxgate performs the WeChat
//! login handshake on its own endpoints, keeps sessions, and forwards every other request to the backend
//! with identity headers it can trust, after removing anything a client could have forged.
//!
//! ```text
//! client ──> server (accept, HTTP/1.1 + h2c) ──> gateway (panic guard, request id)
//!              │
//!              ├─ routes:  normalise the path, pick the first matching [[routes]] rule
//!              ├─ auth:    /auth/* answered here (wechat -> identity -> session); elsewhere the
//!              │           Authenticator proves who is calling (token -> live session)
//!              ├─ proxy/headers: hop-by-hop and forgeable headers out, X-Forwarded-* and identity in
//!              └─ proxy:   pooled keep-alive client, bodies streamed both ways ──> backend
//! admin listener: /healthz /readyz /metrics
//! ```
//!
//! # Layout
//!
//! Modules follow the path of a request:
//!
//! - [`config`]: the TOML file and the validated [`config::Config`];
//! - [`server`]: listeners, accept loop, graceful shutdown;
//! - [`gateway`]: the per-request pipeline;
//! - [`routes`]: path normalisation and route policy;
//! - [`auth`]: the authenticator seam and wxgate's own endpoints (login, OAuth and the browser flow,
//!   refresh, logout, session, user info, phone);
//! - [`wechat`]: the WeChat API client and the mock WeChat;
//! - [`identity`]: identity rules and the identity store (SQLite);
//! - [`limits`]: rate limits per client address and per user;
//! - [`tls`]: TLS termination and certificate reload;
//! - [`session`]: sessions, tokens and the session store (memory);
//! - [`proxy`]: header hygiene and the upstream client;
//! - [`error`]: the one error type and its responses;
//! - [`admin`], [`metrics`]: operators' endpoints and Prometheus metrics; [`logging`]: the log line,
//!   text or JSON, written cheaply, and the thread that writes lines out in batches;
//! - [`sample_backend`]: a recording echo backend for the demo, the tests and the benchmarks.

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod body;
pub mod config;
pub mod error;
pub mod gateway;
pub mod identity;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod routes;
pub mod sample_backend;
pub mod server;
pub mod session;
pub mod shared;
pub mod tls;
pub mod wechat;

pub use config::Config;
pub use server::{Listeners, Server};
