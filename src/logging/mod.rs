//! Logging: what a text line looks like ([`UtcMicros`], [`PlainFields`]) and where every line goes
//! ([`LogSink`]). Both are on the request path when the access log is on, one line per request.
//! Nothing here decides what is logged; secrets are kept out where events are made.

mod format;
mod sink;

pub use format::{PlainFields, UtcMicros};
pub use sink::{LogSink, SinkGuard};
