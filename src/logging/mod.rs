//! Logging: what a line looks like, as text ([`UtcMicros`], [`PlainFields`]) or JSON ([`JsonLine`]),
//! and where every line goes ([`LogSink`]). All of it is on the request path when the access log is
//! on, one line per request. Nothing here decides what is logged; secrets are kept out where events
//! are made.

mod format;
mod json;
mod sink;

pub use format::{PlainFields, UtcMicros};
pub use json::JsonLine;
pub use sink::{LogSink, SinkGuard};
