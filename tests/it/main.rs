//! Integration tests: a sample backend and wxgate on 127.0.0.1:0, talking over real sockets.

mod admin;
mod cluster;
mod fast_lane;
mod forward_auth;
mod forwarding;
mod identity_stores;
mod lifecycle;
mod limits;
mod login;
mod mock_wechat;
mod nginx;
mod oauth;
mod open_data;
mod phone;
mod routing;
mod secrets;
mod servers;
mod support;
mod tls;
mod websocket;
