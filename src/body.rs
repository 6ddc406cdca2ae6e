//! The one response/request body type that crosses wxgate's services, and helpers to build small
//! JSON responses. Upstream bodies are streamed through this type, never collected.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// Errors of any body we stream (client uploads, upstream responses).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed body of any origin.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body that is already in memory.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// Boxes any body whose errors can be boxed.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A JSON response with the given status.
pub fn json<T: serde::Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Body> {
    json_text(
        status,
        serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()),
    )
}

/// A JSON response with the given status from JSON text already written.
pub fn json_text(status: StatusCode, text: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Appends `text` to `out` as a JSON string, escaped as serde_json escapes it. Text with nothing to
/// escape (tokens, ids: almost always) is one vectorised check and one copy; the rest is left to
/// serde_json, which writes it a character at a time.
pub fn push_json_str(out: &mut Vec<u8>, text: &str) {
    // Every byte looked at, without stopping at the first: the compiler makes that a vector loop.
    let escapes = text.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !escapes {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
    }
}

pin_project! {
    /// A body that fails with [`BodyIdle`] when no frame arrives for `idle`: a stalled upload or
    /// download does not hold a connection and a backend connection forever.
    ///
    /// The timer is armed only when the inner body first has nothing ready, so a small body that
    /// arrives with its headers (most API responses) never touches the timer wheel.
    pub struct IdleTimeout<B> {
        #[pin]
        inner: B,
        deadline: Option<Pin<Box<Sleep>>>,
        idle: Duration,
    }
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            deadline: None,
            idle,
        }
    }
}

/// A body moved no byte for the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no body data for the idle timeout")]
pub struct BodyIdle;

impl<B> http_body::Body for IdleTimeout<B>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(deadline) = this.deadline.as_mut() {
                    deadline.as_mut().reset(Instant::now() + *this.idle);
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = *this.idle;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyIdle)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `err`, or any error it was caused by, is a `T`.
pub fn caused_by<T: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if e.is::<T>() {
            return true;
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The shortcut for text with nothing to escape writes what serde_json writes, and so
        /// does the rest.
        #[test]
        fn a_json_string_is_written_as_serde_writes_it(
            text in prop_oneof![
                "[A-Za-z0-9_.-]{0,300}",
                any::<String>(),
                "[ -~\\x00-\\x1f\\u{7f}\\u{a0}-\\u{ff}]{0,40}",
            ]
        ) {
            let mut out = b"[".to_vec();
            push_json_str(&mut out, &text);
            let serde = serde_json::to_vec(&text).unwrap();
            prop_assert_eq!(&out[1..], serde.as_slice());
        }
    }
}
