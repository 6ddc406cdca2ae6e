//! The request a line is logged for. Every line logged while wxgate serves one of its own endpoints
//! (a login's line, a store's error) names the request as a `tracing` span named `request` would:
//! `request{method=POST request_id="…" path="/auth/login"}: ` in text, `"span":{"method":…,
//! "path":…,"request_id":…,"name":"request"}` in JSON. It is not a span, though.
//!
//! A span costs the same whether or not anything is logged under it: the registry stores it, the
//! format writes its fields into a string of their own when it opens, and both are taken down when
//! it closes. That was ~4,000 of a login's ~75,000 instructions (callgrind). A [`RequestContext`] is
//! three owned values in a task-local, written out only on the lines that are logged.

use std::future::Future;

use http::{HeaderValue, Method};
use tokio::task::futures::TaskLocalFuture;

tokio::task_local! {
    static CURRENT: RequestContext;
}

/// One request: its method, its request id and its path (`-` for what is missing).
pub struct RequestContext {
    method: Method,
    request_id: HeaderValue,
    path: Option<String>,
}

impl RequestContext {
    pub fn new(method: &Method, request_id: &HeaderValue, path: Option<&str>) -> Self {
        RequestContext {
            method: method.clone(),
            request_id: request_id.clone(),
            path: path.map(str::to_owned),
        }
    }

    /// `future`, serving this request: each line it logs while it runs (and while it is dropped)
    /// names the request.
    pub fn scope<F: Future>(self, future: F) -> TaskLocalFuture<RequestContext, F> {
        CURRENT.scope(self, future)
    }

    /// `f`, run for this request: each line it logs names the request.
    pub fn in_scope<R>(self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, f)
    }

    pub(super) fn method(&self) -> &str {
        self.method.as_str()
    }

    pub(super) fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("-")
    }

    pub(super) fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("-")
    }
}

/// `write` applied to the request this thread is serving, if it is serving one.
pub(super) fn with_current(
    write: impl FnOnce(&RequestContext) -> std::fmt::Result,
) -> std::fmt::Result {
    CURRENT.try_with(write).unwrap_or(Ok(()))
}
