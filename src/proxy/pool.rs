//! Keep-alive HTTP/1.1 connections to the backend, for requests hyper parsed: a stack of idle
//! connections, newest on top. (The fast lane has its own, [`super::raw`]; WeChat's API has
//! [`crate::wechat::transport`].)
//!
//! One backend, one protocol: so no pool keyed by host, no checkout futures, no idle reaper task.
//! A request takes the most recently used idle connection (its socket is the warmest, and a stack
//! lets the oldest ones age out at the bottom), sends on it, and the response body puts the
//! connection back once the backend's answer has been read to its end. Each connection is driven by
//! its own task, which also notices when the backend closes an idle one.
//!
//! A request that could not be written because the connection had closed in the meantime is sent
//! again on another one (hyper hands it back untouched). One that was written to a connection the
//! backend had just closed (its close was on the wire but not yet read: the classic race with a
//! backend's keep-alive timeout) is sent again only when that is safe and cheap: an idempotent
//! method without a body (RFC 9110 §9.2.2), on a connection that had been idle long enough for the
//! backend to time it out. Connections reused within a second, as under load, are not at risk, so
//! the request head is not copied for them.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::{Body, BoxError};

/// The most idle connections kept; more are closed when they come back.
const MAX_IDLE: usize = 1024;
/// How long a returned connection may take to become ready again.
const SETTLING: Duration = Duration::from_secs(1);
/// Idle at least this long, a connection may be one the backend is closing as it is reused.
const RISKY_IDLE: Duration = Duration::from_secs(1);

/// Connections to one server.
pub struct Pool {
    /// `host:port`, resolved at each new connection.
    address: String,
    connect_timeout: Duration,
    /// How long an idle connection is kept.
    idle_timeout: Duration,
    /// See [`RISKY_IDLE`].
    risky_idle: Duration,
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

/// Why a request got no response from the server.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connecting timed out")]
    ConnectTimeout,
    #[error("the connection failed: {0}")]
    Http(#[source] hyper::Error),
}

impl Pool {
    pub fn new(address: String, connect_timeout: Duration, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            address,
            connect_timeout,
            idle_timeout,
            risky_idle: RISKY_IDLE,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // The stack holds no invariant a panic could break half-way.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection ready for a request, if one is left, and how long it was idle.
    fn checkout(&self) -> Option<(SendRequest<Body>, Duration)> {
        let mut idle = self.lock();
        let mut settling = Vec::new();
        let found = loop {
            let Some(conn) = idle.pop() else {
                break None;
            };
            let age = conn.since.elapsed();
            if conn.sender.is_closed() || age >= self.idle_timeout {
                // Closed by the backend, or idle too long: it closes when its sender is dropped.
                continue;
            }
            if conn.sender.is_ready() {
                break Some((conn.sender, age));
            }
            // Its task has not yet taken in the end of the last response (another thread): it will
            // be ready in a moment. One that stays unready is not coming back.
            if age < SETTLING {
                settling.push(conn);
            }
        };
        idle.extend(settling);
        found
    }

    fn checkin(&self, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() >= MAX_IDLE {
            // The bottom of the stack is the least recently used.
            idle.remove(0);
        }
        idle.push(Idle {
            sender,
            since: Instant::now(),
        });
    }

    async fn connect(&self) -> Result<SendRequest<Body>, SendError> {
        let stream = connect_tcp(&self.address, self.connect_timeout).await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            // Upgrades (WebSocket) hand the socket over to the tunnel when the backend agrees.
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "backend connection closed with an error");
            }
        });
        Ok(sender)
    }

    /// Sends `request` (origin-form URI, `Host` set) and returns the response head, with a body that
    /// puts the connection back when it has been read.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<Body>,
    ) -> Result<Response<PooledBody>, SendError> {
        loop {
            let (mut sender, fresh, replay) = match self.checkout() {
                Some((sender, idle)) => {
                    let replay = (idle >= self.risky_idle)
                        .then(|| replayable(&request))
                        .flatten();
                    (sender, false, replay)
                }
                None => (self.connect().await?, true, None),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    // After a 101 the connection is the tunnel's, never the pool's again.
                    let lease = (parts.status != http::StatusCode::SWITCHING_PROTOCOLS)
                        .then(|| (sender, Arc::downgrade(self)));
                    let body = PooledBody { inner: body, lease };
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut failed) => match (failed.take_message(), replay) {
                    // Never written: the idle connection had closed. Another one, or a new one.
                    (Some(unsent), _) if !fresh => request = unsent,
                    // Written, but the connection closed before any answer: safe to send again.
                    (None, Some(again)) if failed.error().is_incomplete_message() => {
                        tracing::debug!(
                            "the backend closed an idle connection as it was reused; sending again"
                        );
                        request = again;
                    }
                    _ => return Err(SendError::Http(failed.into_error())),
                },
            }
        }
    }
}

/// A copy of `request` to send again should its connection turn out to be closing, when sending it
/// twice is harmless: an idempotent method and no body.
fn replayable(request: &Request<Body>) -> Option<Request<Body>> {
    if !is_idempotent(request.method()) || !request.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(crate::body::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    Some(copy)
}

/// Methods a client may expect to be repeated safely (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

pin_project_lite::pin_project! {
    /// A backend response body that returns its connection to the pool once it is read to the end.
    /// Dropped before that, the connection is closed (hyper cannot reuse a connection mid-response).
    pub struct PooledBody {
        #[pin]
        inner: Incoming,
        lease: Option<(SendRequest<Body>, Weak<Pool>)>,
    }

    impl PinnedDrop for PooledBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // A body nobody reads to its end (HEAD, 204, 304) is finished when it says so.
            if this.inner.is_end_stream() {
                give_back(this.lease);
            }
        }
    }
}

fn give_back(lease: &mut Option<(SendRequest<Body>, Weak<Pool>)>) {
    if let Some((sender, pool)) = lease.take()
        && let Some(pool) = pool.upgrade()
    {
        pool.checkin(sender);
    }
}

impl HttpBody for PooledBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            // The end: the connection is ready for the next request.
            Poll::Ready(None) => give_back(this.lease),
            // An error: the connection is closed, never reused.
            Poll::Ready(Some(Err(_))) => drop(this.lease.take()),
            _ => {}
        }
        polled.map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A TCP connection to `address` within `timeout`, with Nagle off: proxied requests are small
/// writes that must not wait. Shared by this pool, the fast lane's [`super::raw::RawPool`] and
/// WeChat's [`crate::wechat::transport`].
pub(crate) async fn connect_tcp(address: &str, timeout: Duration) -> Result<TcpStream, SendError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Err(_) => return Err(SendError::ConnectTimeout),
        Ok(Err(e)) => return Err(SendError::Connect(e)),
        Ok(Ok(stream)) => stream,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::mpsc;

    use http_body_util::BodyExt;

    use super::*;

    /// Reads one request head from a blocking socket and answers `200 ok`.
    fn answer_one(stream: &mut std::net::TcpStream) {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                stream.read(&mut byte).unwrap(),
                1,
                "the request head arrives"
            );
            head.push(byte[0]);
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .unwrap();
    }

    fn get() -> Request<Body> {
        Request::builder()
            .uri("/")
            .header(http::header::HOST, "backend")
            .body(crate::body::empty())
            .unwrap()
    }

    /// The backend closes an idle connection, and the pool hands it out before its task has seen
    /// the close (tokio has not yet read the socket's events): the GET is written to a dead
    /// connection, and sent again on a new one instead of failing.
    #[tokio::test(flavor = "current_thread")]
    async fn a_request_on_a_connection_closed_before_it_was_written_is_sent_again() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (close, closing) = mpsc::channel::<()>();
        let (closed, is_closed) = mpsc::channel::<()>();
        let backend = std::thread::spawn(move || {
            let (mut first, _) = listener.accept().unwrap();
            answer_one(&mut first);
            closing.recv().unwrap();
            drop(first);
            closed.send(()).unwrap();
            let (mut second, _) = listener.accept().unwrap();
            answer_one(&mut second);
        });
        let mut pool = Pool::new(address, Duration::from_secs(5), Duration::from_secs(60));
        // Every reused connection counts as at risk, as one idle for a while does.
        Arc::get_mut(&mut pool).unwrap().risky_idle = Duration::ZERO;
        let response = pool.send(get()).await.unwrap();
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
        assert_eq!(pool.lock().len(), 1, "the connection is back in the pool");

        // The backend closes; this thread blocks (so the connection's task cannot run and notice)
        // until it has.
        close.send(()).unwrap();
        is_closed.recv().unwrap();
        let response = pool.send(get()).await.unwrap();
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
        backend.join().unwrap();
    }

    /// The same race with a POST that carries a body: it may have been acted on, so it fails (the
    /// client sees 502) and is not sent again.
    #[tokio::test(flavor = "current_thread")]
    async fn a_written_post_is_never_sent_twice() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let (close, closing) = mpsc::channel::<()>();
        let (closed, is_closed) = mpsc::channel::<()>();
        let (first_bytes, next_connection) = mpsc::channel::<Vec<u8>>();
        let backend = std::thread::spawn(move || {
            let (mut first, _) = listener.accept().unwrap();
            answer_one(&mut first);
            closing.recv().unwrap();
            drop(first);
            closed.send(()).unwrap();
            // Whoever connects next: a resent request, or the test's probe.
            let (mut next, _) = listener.accept().unwrap();
            let mut bytes = [0u8; 5];
            next.read_exact(&mut bytes).unwrap();
            first_bytes.send(bytes.to_vec()).unwrap();
        });
        let mut pool = Pool::new(
            address.to_string(),
            Duration::from_secs(5),
            Duration::from_secs(60),
        );
        Arc::get_mut(&mut pool).unwrap().risky_idle = Duration::ZERO;
        let response = pool.send(get()).await.unwrap();
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
        close.send(()).unwrap();
        is_closed.recv().unwrap();
        let post = Request::builder()
            .method(http::Method::POST)
            .uri("/orders")
            .header(http::header::HOST, "backend")
            .body(crate::body::boxed(http_body_util::Full::new(
                bytes::Bytes::from("x"),
            )))
            .unwrap();
        assert!(pool.send(post).await.is_err());
        let mut probe = std::net::TcpStream::connect(address).unwrap();
        probe.write_all(b"probe").unwrap();
        assert_eq!(
            next_connection.recv().unwrap(),
            b"probe",
            "the POST was not sent again"
        );
        backend.join().unwrap();
    }

    #[tokio::test]
    async fn a_response_read_to_its_end_returns_the_connection_and_one_dropped_early_does_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let backend = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            answer_one(&mut stream);
            answer_one(&mut stream);
            // The third answer is sent in two parts; the client drops it after the first.
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
                .unwrap();
        });
        let pool = Pool::new(address, Duration::from_secs(5), Duration::from_secs(60));
        for _ in 0..2 {
            let response = pool.send(get()).await.unwrap();
            assert_eq!(
                response.into_body().collect().await.unwrap().to_bytes(),
                "ok"
            );
            assert_eq!(pool.lock().len(), 1);
            // The next send takes it again.
        }
        let response = pool.send(get()).await.unwrap();
        assert!(pool.lock().is_empty(), "lent out");
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "ab");
        drop(body);
        assert!(
            pool.lock().is_empty(),
            "a connection mid-response is not reused"
        );
        backend.join().unwrap();
    }
}
