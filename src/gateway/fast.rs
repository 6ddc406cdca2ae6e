//! The fast lane: wxgate's own HTTP/1.1 loop for the requests that are almost all of the traffic.
//!
//! A request in origin form over HTTP/1.1, without a body or with a `Content-Length` one, is parsed
//! with httparse, judged by the same route policy and authenticator as every other request, and
//! written to the backend as text by the same header rules ([`HeaderRules::write_request_headers`],
//! checked against the `HeaderMap` form by a property test). The backend's response head is
//! rewritten by the same hop-by-hop rules and its body forwarded as it comes, by its framing
//! ([`raw`]). No header map is built and no body is re-encoded: measured with bench/instructions.sh,
//! a proxied request costs a fraction of what it does through hyper's server and client.
//!
//! Anything else is handed to hyper with the bytes read so far, and the connection stays with hyper
//! from then on: HTTP/2 with prior knowledge, HTTP/1.0, `Transfer-Encoding` in a request, `Expect`,
//! upgrades (WebSocket), absolute or asterisk targets, `CONNECT`, heads that do not parse or are
//! larger than the lane reads (hyper answers those with its 400s and 431s). So does every
//! connection when `upstream.http2` is set.
//!
//! [`HeaderRules::write_request_headers`]: crate::proxy::headers::HeaderRules::write_request_headers

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::{Gateway, Outcome, Page, X_REQUEST_ID, fresh_request_id, wants_html};
use crate::auth::Identity;
use crate::auth::oauth::SESSION_COOKIE;
use crate::auth::service::Via;
use crate::body::{self, Body, BoxError};
use crate::config::Config;
use crate::error::Error;
use crate::logging::RequestContext;
use crate::proxy::headers::{self, ClientInfo, HeadLines, LineRuns, Span, Survey};
use crate::proxy::raw::{self, Chunks, Framing, RawConn, RawPool, ResponseHead};
use crate::routes;
use crate::server::{Raised, Signal};

/// The most headers a request in the fast lane has; one with more goes to hyper, which applies
/// `limits.max_headers`.
const MAX_HEADERS: usize = 64;
// A header's roles are kept as bit `i` of a u64 (see `Roles`).
const _: () = assert!(MAX_HEADERS <= 64);
/// A request body up to this size is copied into the same write as its head.
const INLINE_BODY: usize = 16 * 1024;
/// How much is read or written at a time while a body streams.
const CHUNK: usize = 64 * 1024;

/// What the fast lane needs of the configuration; `None` in the gateway when it is off.
pub(crate) struct FastLane {
    pool: RawPool,
    base_path: String,
    /// The upstream's own `Host`, when the client's is not passed on.
    host: Option<Bytes>,
    /// `upstream.timeout`: how long the backend may take to start its answer.
    timeout: Duration,
    header_timeout: Duration,
    idle_timeout: Duration,
    max_body: u64,
    /// Heads larger than this go to hyper, which answers 431 past `limits.max_header_bytes`.
    max_head: usize,
    /// Heads with more headers go to hyper, which answers 431 past `limits.max_headers`.
    max_headers: usize,
}

impl FastLane {
    /// The lane for `config`, or `None` when the backend speaks HTTP/2.
    pub(crate) fn new(config: &Config) -> Option<FastLane> {
        let upstream = &config.upstream;
        if upstream.http2 {
            return None;
        }
        let port = upstream.authority.port_u16().unwrap_or(80);
        Some(FastLane {
            pool: RawPool::new(
                format!("{}:{port}", upstream.authority.host()),
                upstream.connect_timeout,
                upstream.pool_idle_timeout,
            ),
            base_path: upstream.base_path.clone(),
            host: (!upstream.preserve_host)
                .then(|| Bytes::copy_from_slice(upstream.authority.as_str().as_bytes())),
            timeout: upstream.timeout,
            header_timeout: config.limits.header_timeout,
            idle_timeout: config.limits.idle_timeout,
            max_body: config.limits.max_body,
            max_head: config.limits.max_header_bytes.max(8 * 1024),
            max_headers: config.limits.max_headers.min(MAX_HEADERS),
        })
    }
}

/// How a connection is handed to hyper, and how it learns that shutdown has begun.
pub(crate) struct Handover {
    pub builder: auto::Builder<TokioExecutor>,
    pub watcher: hyper_util::server::graceful::Watcher,
    pub draining: Arc<Signal>,
}

/// Serves one client connection: in the fast lane while its requests allow, then (if one does not)
/// through hyper.
pub(crate) async fn serve<IO>(
    gateway: Arc<Gateway>,
    io: IO,
    client: Arc<ClientInfo>,
    handover: Handover,
) -> Result<(), BoxError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(lane) = gateway.fast.as_ref() else {
        return hand_to_hyper(gateway, Prefixed::new(Bytes::new(), io), client, handover).await;
    };
    let mut conn = Conn::new(io);
    let mut draining = std::pin::pin!(handover.draining.raised());
    loop {
        let request = match conn.next_request(lane, draining.as_mut()).await {
            Next::Request(request) => request,
            Next::Closed => return Ok(()),
            Next::Hyper(prefix) => {
                let io = Prefixed::new(prefix, conn.io);
                return hand_to_hyper(gateway, io, client, handover).await;
            }
        };
        let keep_alive = gateway
            .serve_fast(lane, &mut conn, request, &client)
            .await?;
        if !keep_alive || handover.draining.is_raised() {
            return Ok(());
        }
    }
}

async fn hand_to_hyper<IO>(
    gateway: Arc<Gateway>,
    io: Prefixed<IO>,
    client: Arc<ClientInfo>,
    handover: Handover,
) -> Result<(), BoxError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = gateway.service_with(client);
    let connection = handover
        .builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .into_owned();
    handover.watcher.watch(connection).await
}

/// A parsed request head: the bytes, and where each part is in them.
struct Parsed {
    head: Bytes,
    method: Method,
    target: Span,
    /// Each header's name and value.
    headers: smallvec::SmallVec<[(Span, Span); 24]>,
    body_len: u64,
    /// `Connection: close`.
    close: bool,
    /// The headers the lane reads, found while parsing.
    roles: Roles,
}

/// Which of a request's headers have a part in deciding it: bit `i` of a mask is header `i` (the
/// lane takes at most 64 headers), so reading them later costs no search by name.
#[derive(Default)]
struct Roles {
    authorization: u64,
    cookie: u64,
    connection: u64,
    accept: u64,
    /// The first `X-Request-Id`.
    request_id: Option<u8>,
    /// The first `Origin`.
    origin: Option<u8>,
}

/// The headers whose name the lane looks at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Other,
    TransferEncoding,
    Expect,
    Upgrade,
    ContentLength,
    Connection,
    Authorization,
    Cookie,
    Accept,
    RequestId,
    Origin,
}

impl Role {
    fn of(name: &[u8]) -> Role {
        let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
        match name.len() {
            6 if is(b"cookie") => Role::Cookie,
            6 if is(b"accept") => Role::Accept,
            6 if is(b"origin") => Role::Origin,
            6 if is(b"expect") => Role::Expect,
            7 if is(b"upgrade") => Role::Upgrade,
            10 if is(b"connection") => Role::Connection,
            12 if is(b"x-request-id") => Role::RequestId,
            13 if is(b"authorization") => Role::Authorization,
            14 if is(b"content-length") => Role::ContentLength,
            17 if is(b"transfer-encoding") => Role::TransferEncoding,
            _ => Role::Other,
        }
    }
}

/// The positions of the bits set in `mask`, lowest first.
fn bits(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (mask != 0).then(|| {
            let i = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            i
        })
    })
}

impl Parsed {
    fn text(&self, (start, end): Span) -> &[u8] {
        &self.head[start as usize..end as usize]
    }

    fn target(&self) -> &str {
        // httparse admits only visible ASCII in a request target.
        std::str::from_utf8(self.text(self.target)).unwrap_or("/")
    }

    fn lines(&self) -> HeadLines<'_> {
        HeadLines {
            text: &self.head,
            spans: &self.headers,
        }
    }

    /// The values of the headers in `mask`.
    fn values(&self, mask: u64) -> impl Iterator<Item = &[u8]> + '_ {
        bits(mask).map(|i| self.lines().get(i).1)
    }

    fn request_id(&self) -> Option<&[u8]> {
        self.roles.request_id.map(|i| self.lines().get(i.into()).1)
    }

    fn origin(&self) -> Option<&[u8]> {
        self.roles.origin.map(|i| self.lines().get(i.into()).1)
    }

    fn accepts_html(&self) -> bool {
        self.values(self.roles.accept).any(wants_html)
    }

    /// The bearer token, else wxgate's session cookie.
    fn credential(&self) -> Option<(&str, Via)> {
        fn text(v: &[u8]) -> Option<&str> {
            std::str::from_utf8(v).ok()
        }
        let bearer = self
            .values(self.roles.authorization)
            .find_map(|v| text(v).and_then(crate::auth::bearer_in));
        if let Some(token) = bearer {
            return Some((token, Via::Bearer));
        }
        self.values(self.roles.cookie)
            .find_map(|v| text(v).and_then(|v| crate::auth::oauth::cookie_in(v, SESSION_COOKIE)))
            .map(|token| (token, Via::Cookie))
    }

    /// The survey of the header rules: only `Connection`, `Authorization` and `Cookie` headers
    /// change it.
    fn survey(&self) -> Survey<'_> {
        let mut survey = Survey::new();
        let roles = &self.roles;
        for value in self.values(roles.connection) {
            survey.connection(value);
        }
        for value in self.values(roles.authorization) {
            survey.authorization(value);
        }
        for value in self.values(roles.cookie) {
            survey.cookie(value);
        }
        survey
    }

    /// The head as hyper would have made it, for wxgate's own endpoints.
    fn to_request(&self, body: Body, request_id: Option<&HeaderValue>) -> Option<Request<Body>> {
        let mut headers = HeaderMap::with_capacity(self.headers.len() + 1);
        for (name, value) in self.lines().iter() {
            headers.append(
                HeaderName::from_bytes(name).ok()?,
                HeaderValue::from_bytes(value).ok()?,
            );
        }
        if let Some(id) = request_id {
            headers.insert(X_REQUEST_ID, id.clone());
        }
        let mut request = Request::builder()
            .method(self.method.clone())
            .uri(self.target())
            .body(body)
            .ok()?;
        *request.headers_mut() = headers;
        Some(request)
    }
}

// Returned once a request, and moved at once into the request's handling: a box would cost as much
// as the copy it saves.
#[allow(clippy::large_enum_variant)]
enum Next {
    Request(Parsed),
    /// The client closed, went quiet, or shutdown began.
    Closed,
    /// For hyper, with what has been read of it.
    Hyper(Bytes),
}

/// What a read came to.
enum Read {
    Bytes,
    Eof,
    TimedOut,
}

/// A client connection in the fast lane.
struct Conn<IO> {
    io: IO,
    /// Read from the client and not yet used.
    buf: BytesMut,
    /// The next write to the client.
    out: Vec<u8>,
    /// The next write to the backend.
    up: Vec<u8>,
    /// One timer for whatever the connection waits on; moving its deadline later is cheap.
    timer: Pin<Box<Sleep>>,
    /// Requests served on this connection so far.
    served: u64,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Conn<IO> {
    fn new(io: IO) -> Self {
        Conn {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
            out: Vec::with_capacity(2 * 1024),
            up: Vec::with_capacity(2 * 1024),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            served: 0,
        }
    }

    /// Waits for the next request head and parses it, or decides it is hyper's.
    async fn next_request(&mut self, lane: &FastLane, mut draining: Pin<&mut Raised<'_>>) -> Next {
        // The header timeout also bounds how long a keep-alive connection may sit idle, as hyper's
        // does: a client that sends its head too slowly (slowloris) or never is cut off.
        let deadline = Instant::now() + lane.header_timeout;
        loop {
            if !self.buf.is_empty() {
                match parse_request(&self.buf, lane.max_head, lane.max_headers) {
                    Ok(Some((len, parsed))) => {
                        let head = self.buf.split_to(len).freeze();
                        return Next::Request(Parsed { head, ..parsed });
                    }
                    Ok(None) => {}
                    Err(Unusual(why)) => {
                        tracing::debug!(why, "the connection goes on through hyper");
                        return Next::Hyper(self.buf.split().freeze());
                    }
                }
            }
            let idle = self.buf.is_empty();
            let read = {
                let read = read_more(&mut self.io, &mut self.buf, &mut self.timer, deadline);
                if idle {
                    // Waiting between requests, shutdown ends the wait.
                    tokio::select! {
                        biased;
                        read = read => read,
                        () = draining.as_mut() => return Next::Closed,
                    }
                } else {
                    read.await
                }
            };
            match read {
                Ok(Read::Bytes) => {}
                // Closed or timed out mid-head: hyper would close too, without an answer.
                Ok(Read::Eof | Read::TimedOut) | Err(_) => return Next::Closed,
            }
        }
    }

    /// Writes `out` to the client, waiting at most `idle` for it to make room.
    async fn flush_out(&mut self, idle: Duration) -> io::Result<()> {
        write_all(&mut self.io, &self.out, &mut self.timer, idle).await?;
        self.out.clear();
        Ok(())
    }
}

/// The request did not fit the fast lane: hyper takes the connection.
#[derive(Clone, Copy)]
struct Unusual(&'static str);

/// Parses the request head at the start of `buf`: `Ok(None)` while it is incomplete.
fn parse_request(
    buf: &[u8],
    max_head: usize,
    max_headers: usize,
) -> Result<Option<(usize, Parsed)>, Unusual> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut storage);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Ok(None),
        // Too large, too many headers, malformed, HTTP/2's preface: hyper answers or serves it.
        Ok(httparse::Status::Partial) => return Err(Unusual("a head larger than the lane reads")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Unusual("more headers than the lane takes"));
        }
        Err(_) => return Err(Unusual("a head httparse refuses (or HTTP/2's preface)")),
    };
    if request.version != Some(1) {
        return Err(Unusual("HTTP/1.0"));
    }
    if request.headers.len() > max_headers {
        return Err(Unusual("more headers than limits.max_headers"));
    }
    let method = Method::from_bytes(request.method.unwrap_or("").as_bytes())
        .map_err(|_| Unusual("an unreadable method"))?;
    let target = request.path.unwrap_or("");
    if method == Method::CONNECT || !target.starts_with('/') || target.contains('#') {
        return Err(Unusual("CONNECT, or a target not in origin form"));
    }
    // Heads are far smaller than 4 GiB (`max_head`), so positions fit in 32 bits.
    let offset = |part: &[u8]| {
        let start = part.as_ptr() as usize - buf.as_ptr() as usize;
        (start as u32, (start + part.len()) as u32)
    };
    let mut parsed = Parsed {
        head: Bytes::new(),
        method,
        target: offset(target.as_bytes()),
        headers: smallvec::SmallVec::new(),
        body_len: 0,
        close: false,
        roles: Roles::default(),
    };
    let mut length: Option<u64> = None;
    for (i, header) in request.headers.iter().enumerate() {
        // At most MAX_HEADERS (64) headers: each has its bit.
        let bit = 1u64 << i;
        let roles = &mut parsed.roles;
        match Role::of(header.name.as_bytes()) {
            Role::Other => {}
            Role::TransferEncoding | Role::Expect | Role::Upgrade => {
                return Err(Unusual("Transfer-Encoding, Expect or Upgrade"));
            }
            Role::ContentLength => {
                let bad = Unusual("a Content-Length hyper must judge");
                let value = std::str::from_utf8(header.value).map_err(|_| bad)?;
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad);
                }
                let n: u64 = value.parse().map_err(|_| bad)?;
                if length.is_some_and(|l| l != n) {
                    return Err(bad);
                }
                length = Some(n);
            }
            Role::Connection => {
                roles.connection |= bit;
                for token in header.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"upgrade") {
                        return Err(Unusual("an upgrade"));
                    }
                    parsed.close |= token.eq_ignore_ascii_case(b"close");
                }
            }
            Role::Authorization => roles.authorization |= bit,
            Role::Cookie => roles.cookie |= bit,
            Role::Accept => roles.accept |= bit,
            Role::RequestId => {
                roles.request_id.get_or_insert(i as u8);
            }
            Role::Origin => {
                roles.origin.get_or_insert(i as u8);
            }
        }
        parsed
            .headers
            .push((offset(header.name.as_bytes()), offset(header.value)));
    }
    parsed.body_len = length.unwrap_or(0);
    Ok(Some((len, parsed)))
}

/// Reads more of `io` into `buf`, giving up at `deadline`.
async fn read_more<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    timer: &mut Pin<Box<Sleep>>,
    deadline: Instant,
) -> io::Result<Read> {
    if buf.capacity() - buf.len() < 4 * 1024 {
        buf.reserve(16 * 1024);
    }
    let mut armed = false;
    poll_fn(|cx| {
        match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Ok(Read::Eof)),
            Poll::Ready(Ok(_)) => return Poll::Ready(Ok(Read::Bytes)),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        // The timer is armed only when the read has to wait.
        if !armed {
            timer.as_mut().reset(deadline.into());
            armed = true;
        }
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Ok(Read::TimedOut))
    })
    .await
}

/// Writes all of `data`, failing when a write waits longer than `idle`.
async fn write_all<W: AsyncWrite + Unpin>(
    io: &mut W,
    mut data: &[u8],
    timer: &mut Pin<Box<Sleep>>,
    idle: Duration,
) -> io::Result<()> {
    while !data.is_empty() {
        let mut armed = false;
        let written = poll_fn(|cx| {
            if let Poll::Ready(result) = Pin::new(&mut *io).poll_write(cx, data) {
                return Poll::Ready(result);
            }
            if !armed {
                timer.as_mut().reset((Instant::now() + idle).into());
                armed = true;
            }
            ready!(timer.as_mut().poll(cx));
            Poll::Ready(Err(io::ErrorKind::TimedOut.into()))
        })
        .await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[written..];
    }
    Ok(())
}

/// Why a forwarded request got no answer from the backend, before anything was sent to the client.
enum Failed {
    Upstream(Error),
    /// The client's body stalled or broke: 408, or nothing when it is gone.
    ClientBody(Error),
}

/// Where a forwarded exchange ended.
struct Forwarded {
    status: u16,
    /// The client connection can take another request.
    keep_alive: bool,
}

impl Gateway {
    /// Serves one request in the fast lane; `Ok(false)` when the connection must close after it.
    async fn serve_fast<IO: AsyncRead + AsyncWrite + Unpin>(
        &self,
        lane: &FastLane,
        conn: &mut Conn<IO>,
        request: Parsed,
        client: &ClientInfo,
    ) -> io::Result<bool> {
        let started = Instant::now();
        let _in_flight = self.metrics.in_flight();
        conn.served += 1;
        let (request_id, generated) = match request.request_id() {
            Some(id) => match HeaderValue::from_bytes(id) {
                Ok(id) => (id, false),
                Err(_) => (fresh_request_id(), true),
            },
            None => (fresh_request_id(), true),
        };
        let method = request.method.clone();
        let target = request.target();
        let (raw_path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        };
        let path = match routes::normalize_path(raw_path, self.allow_encoded_slashes) {
            Ok(path) => path,
            Err(e) => {
                let outcome = Outcome::failed(self.labels.invalid.clone(), None, e.into());
                return self
                    .answer(lane, conn, &request, outcome, &request_id, started)
                    .await;
            }
        };
        if routes::has_prefix(&path, &self.auth_prefix) {
            return self
                .own_fast(
                    lane,
                    conn,
                    request,
                    path,
                    client,
                    &request_id,
                    generated,
                    started,
                )
                .await;
        }

        let route = self.routes.matching(&method, &path);
        let origin = request.origin();
        let decided = self
            .decide(route, &method, request.credential(), origin)
            .await;
        let identity = match decided {
            Ok(identity) => identity,
            Err((e, via)) => {
                let page = Page {
                    method: &method,
                    accepts_html: request.accepts_html(),
                    query,
                };
                let outcome = self.refused(route, path, page, e, via);
                return self
                    .answer(lane, conn, &request, outcome, &request_id, started)
                    .await;
            }
        };
        if let Some(identity) = &identity
            && let Err(retry_after) = self.limits.check_user(identity.user_id()).await
        {
            let outcome = Outcome::failed(
                route.name.clone(),
                Some(path),
                Error::TooManyRequests { retry_after },
            );
            return self
                .answer(lane, conn, &request, outcome, &request_id, started)
                .await;
        }
        if request.body_len > lane.max_body {
            let outcome = Outcome::failed(route.name.clone(), Some(path), Error::PayloadTooLarge);
            return self
                .answer(lane, conn, &request, outcome, &request_id, started)
                .await;
        }

        let exchange = self
            .forward_fast(
                lane,
                conn,
                &request,
                (&path, query),
                identity.as_ref(),
                client,
                (&request_id, generated),
            )
            .await;
        match exchange {
            Ok(done) => {
                self.record(
                    &method,
                    &route.name,
                    Some(&path),
                    done.status,
                    started,
                    identity.as_ref(),
                    &request_id,
                );
                Ok(done.keep_alive && !request.close)
            }
            Err(Failed::Upstream(e)) | Err(Failed::ClientBody(e)) => {
                // Nothing was sent to the client yet: it gets the error. The request's body may be
                // unread, so the connection closes after it.
                let outcome = Outcome {
                    route: route.name.clone(),
                    path: Some(path),
                    user: identity,
                    result: Err(e),
                    clear_cookie: false,
                };
                let response = self.finish(outcome, &method, &request_id, started);
                conn.write_own(response, method == Method::HEAD, true, lane.idle_timeout)
                    .await?;
                Ok(false)
            }
        }
    }

    /// Answers `outcome` (an error, a refusal, a redirect) without asking the backend. The
    /// connection is kept when the request's body, if any, has already arrived and can be skipped.
    async fn answer<IO: AsyncRead + AsyncWrite + Unpin>(
        &self,
        lane: &FastLane,
        conn: &mut Conn<IO>,
        request: &Parsed,
        outcome: Outcome,
        request_id: &HeaderValue,
        started: Instant,
    ) -> io::Result<bool> {
        let skippable = request.body_len <= conn.buf.len() as u64;
        if skippable {
            conn.buf.advance(request.body_len as usize);
        }
        let close = request.close || !skippable;
        let response = self.finish(outcome, &request.method, request_id, started);
        conn.write_own(
            response,
            request.method == Method::HEAD,
            close,
            lane.idle_timeout,
        )
        .await?;
        Ok(!close)
    }

    /// A request for wxgate's own endpoints: the head becomes an `http::Request` (with its body,
    /// read whole: these are small) for the same code the hyper path runs.
    #[allow(clippy::too_many_arguments)]
    async fn own_fast<IO: AsyncRead + AsyncWrite + Unpin>(
        &self,
        lane: &FastLane,
        conn: &mut Conn<IO>,
        request: Parsed,
        path: String,
        client: &ClientInfo,
        request_id: &HeaderValue,
        generated: bool,
        started: Instant,
    ) -> io::Result<bool> {
        let route = self.labels.auth(&path[self.auth_prefix.len()..]);
        if request.body_len > lane.max_body {
            let outcome = Outcome::failed(route, Some(path), Error::PayloadTooLarge);
            return self
                .answer(lane, conn, &request, outcome, request_id, started)
                .await;
        }
        let len = request.body_len as usize;
        let deadline = || Instant::now() + lane.idle_timeout;
        while conn.buf.len() < len {
            match read_more(&mut conn.io, &mut conn.buf, &mut conn.timer, deadline()).await? {
                Read::Bytes => {}
                Read::TimedOut => {
                    let outcome = Outcome::failed(route, Some(path), Error::RequestTimeout);
                    return self
                        .answer(lane, conn, &request, outcome, request_id, started)
                        .await;
                }
                Read::Eof => return Ok(false),
            }
        }
        let bytes = conn.buf.split_to(len).freeze();
        let body = body::boxed(http_body_util::Full::new(bytes));
        let Some(own) = request.to_request(body, generated.then_some(request_id)) else {
            let outcome = Outcome::failed(
                route,
                Some(path),
                Error::BadRequest("The request head could not be read."),
            );
            return self
                .answer(lane, conn, &request, outcome, request_id, started)
                .await;
        };
        let context = RequestContext::new(&request.method, request_id, Some(&path));
        let outcome = Box::pin(context.scope(self.own_endpoint(path, own, client))).await;
        let response = self.finish(outcome, &request.method, request_id, started);
        conn.write_own(
            response,
            request.method == Method::HEAD,
            request.close,
            lane.idle_timeout,
        )
        .await?;
        Ok(!request.close)
    }

    /// Sends the request to the backend and its answer to the client. `request_id` is the id and
    /// whether wxgate made it (then the backend is told it).
    #[allow(clippy::too_many_arguments)]
    async fn forward_fast<IO: AsyncRead + AsyncWrite + Unpin>(
        &self,
        lane: &FastLane,
        conn: &mut Conn<IO>,
        request: &Parsed,
        (path, query): (&str, Option<&str>),
        identity: Option<&Identity>,
        client: &ClientInfo,
        (request_id, generated): (&HeaderValue, bool),
    ) -> Result<Forwarded, Failed> {
        // The head, as text, in the connection's upstream buffer (taken out while it is used).
        let mut out = std::mem::take(&mut conn.up);
        out.clear();
        out.extend_from_slice(request.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(lane.base_path.as_bytes());
        out.extend_from_slice(path.as_bytes());
        if let Some(query) = query {
            out.push(b'?');
            out.extend_from_slice(query.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let written = self.headers.write_request_headers(
            &mut out,
            request.lines(),
            &request.survey(),
            identity,
            client,
            lane.host.as_deref(),
        );
        if let Err(e) = written {
            conn.up = out;
            return Err(Failed::Upstream(e));
        }
        if generated {
            headers::write_header(&mut out, b"x-request-id", request_id.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        // As much of the body as has arrived, in the same write when it is small.
        let body_len = request.body_len;
        let arrived = (body_len as usize).min(conn.buf.len());
        let inline = if arrived <= INLINE_BODY {
            out.extend_from_slice(&conn.buf[..arrived]);
            conn.buf.advance(arrived);
            arrived
        } else {
            0
        };
        let result = self
            .exchange(lane, conn, request, &out, inline, request_id)
            .await;
        conn.up = out;
        result
    }

    async fn exchange<IO: AsyncRead + AsyncWrite + Unpin>(
        &self,
        lane: &FastLane,
        conn: &mut Conn<IO>,
        request: &Parsed,
        out: &[u8],
        inline: usize,
        request_id: &HeaderValue,
    ) -> Result<Forwarded, Failed> {
        let unavailable = |e: Box<dyn std::error::Error + Send + Sync>| {
            Failed::Upstream(Error::UpstreamUnavailable(e))
        };
        let body_len = request.body_len;
        // A request that may be sent twice (RFC 9110 §9.2.2: idempotent, and no body to send
        // again) goes on a pooled connection unchecked, and again on a new one if that turns out
        // closed before answering. Any other is sent only on a connection checked to be open.
        let replayable = body_len == 0 && crate::proxy::pool::is_idempotent(&request.method);
        let head_request = request.method == Method::HEAD;
        let mut first = true;
        let (mut upstream, head) = loop {
            let pooled = match first {
                true => lane.pool.get(!replayable).await,
                false => lane.pool.connect().await,
            };
            let mut upstream = pooled.map_err(|e| unavailable(Box::new(e)))?;
            let retry = replayable && first && upstream.idle_since.is_some();
            first = false;
            if let Err(e) = write_all(
                &mut upstream.stream,
                out,
                &mut conn.timer,
                lane.idle_timeout,
            )
            .await
            {
                if retry {
                    continue;
                }
                return Err(unavailable(Box::new(e)));
            }
            // The rest of the body, as it comes from the client.
            // What has arrived and was not copied into the head's write (a large body) goes first.
            let mut left = body_len - inline as u64;
            while left > 0 {
                if conn.buf.is_empty() {
                    let deadline = Instant::now() + lane.idle_timeout;
                    match read_more(&mut conn.io, &mut conn.buf, &mut conn.timer, deadline).await {
                        Ok(Read::Bytes) => {}
                        Ok(Read::TimedOut) => {
                            return Err(Failed::ClientBody(Error::RequestTimeout));
                        }
                        Ok(Read::Eof) | Err(_) => {
                            return Err(Failed::ClientBody(Error::BadRequest(
                                "The request body ended before its Content-Length.",
                            )));
                        }
                    }
                }
                let take = (left as usize).min(conn.buf.len());
                let part = conn.buf.split_to(take);
                write_all(
                    &mut upstream.stream,
                    &part,
                    &mut conn.timer,
                    lane.idle_timeout,
                )
                .await
                .map_err(|e| unavailable(Box::new(e)))?;
                left -= take as u64;
            }
            match read_head(&mut upstream, head_request, &mut conn.timer, lane.timeout).await {
                Ok(head) => break (upstream, head),
                // Nothing came back on a connection the backend was closing: once more, anew.
                Err(HeadError::Closed) if retry => continue,
                Err(HeadError::Closed) => {
                    return Err(unavailable(
                        "the backend closed the connection before answering".into(),
                    ));
                }
                Err(HeadError::TimedOut) => return Err(Failed::Upstream(Error::UpstreamTimeout)),
                Err(HeadError::Io(e)) => return Err(unavailable(Box::new(e))),
                Err(HeadError::Response(e)) => return Err(unavailable(Box::new(e))),
            }
        };

        // The answer's head, rewritten by the hop-by-hop rules.
        let close = head.framing == Framing::UntilClose || request.close;
        let reply = &mut conn.out;
        reply.clear();
        write_status_line(reply, head.status);
        let has_date = {
            let named: smallvec::SmallVec<[&[u8]; 4]> = head
                .headers
                .iter()
                .filter(|(name, _)| upstream.buf[name.clone()].eq_ignore_ascii_case(b"connection"))
                .flat_map(|(_, value)| upstream.buf[value.clone()].split(|&b| b == b','))
                .map(<[u8]>::trim_ascii)
                .collect();
            let (mut has_id, mut has_date) = (false, false);
            // The lines that stay are copied as they came.
            let mut runs = LineRuns::new(&upstream.buf);
            for (name_at, value_at) in &head.headers {
                let name = &upstream.buf[name_at.clone()];
                if headers::is_hop_by_hop(name)
                    || named.iter().any(|n| n.eq_ignore_ascii_case(name))
                {
                    continue;
                }
                has_id |= name.eq_ignore_ascii_case(b"x-request-id");
                has_date |= name.eq_ignore_ascii_case(b"date");
                runs.pass(reply, name_at.start, value_at.end);
            }
            runs.flush(reply);
            if head.framing == Framing::Chunked {
                reply.extend_from_slice(b"transfer-encoding: chunked\r\n");
            }
            if !has_id {
                // Echoed, as on every answer; a backend's own id stays.
                headers::write_header(reply, b"x-request-id", request_id.as_bytes());
            }
            has_date
        };
        if !has_date {
            write_date(reply);
        }
        if close {
            reply.extend_from_slice(b"connection: close\r\n");
        }
        reply.extend_from_slice(b"\r\n");
        upstream.buf.advance(head.len);

        let status = head.status;
        let complete = self
            .stream_body(lane, conn, &mut upstream, head.framing)
            .await;
        match complete {
            Ok(()) => {
                if !head.close {
                    lane.pool.put(upstream);
                }
                Ok(Forwarded {
                    status,
                    keep_alive: !close,
                })
            }
            Err(e) => {
                // The head is out: the client learns of the failure by the connection closing.
                tracing::warn!(status, error = %e, "the backend's answer broke off mid-body");
                Ok(Forwarded {
                    status,
                    keep_alive: false,
                })
            }
        }
    }

    /// Sends `conn.out` (the answer's head) and the body after it, as the backend sends it.
    async fn stream_body<IO: AsyncRead + AsyncWrite + Unpin>(
        &self,
        lane: &FastLane,
        conn: &mut Conn<IO>,
        upstream: &mut RawConn,
        framing: Framing,
    ) -> io::Result<()> {
        let idle = lane.idle_timeout;
        let mut chunks = Chunks::default();
        let mut left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        loop {
            // What of the body is in hand, up to its end.
            let take = match framing {
                Framing::Empty => 0,
                Framing::Length(_) => (left as usize).min(upstream.buf.len()),
                Framing::Chunked => chunks
                    .advance(&upstream.buf)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
                Framing::UntilClose => upstream.buf.len(),
            };
            let part = upstream.buf.split_to(take);
            left -= take.min(left as usize) as u64;
            if conn.out.len() + part.len() <= CHUNK {
                conn.out.extend_from_slice(&part);
            } else {
                conn.flush_out(idle).await?;
                write_all(&mut conn.io, &part, &mut conn.timer, idle).await?;
            }
            let done = match framing {
                Framing::Empty => true,
                Framing::Length(_) => left == 0,
                Framing::Chunked => chunks.is_done(),
                Framing::UntilClose => false,
            };
            if done {
                return conn.flush_out(idle).await;
            }
            // Whatever is ready goes to the client before waiting on the backend.
            if !conn.out.is_empty() {
                conn.flush_out(idle).await?;
            }
            let deadline = Instant::now() + idle;
            match read_more(
                &mut upstream.stream,
                &mut upstream.buf,
                &mut conn.timer,
                deadline,
            )
            .await?
            {
                Read::Bytes => {}
                Read::Eof if framing == Framing::UntilClose => return conn.flush_out(idle).await,
                Read::Eof => return Err(io::ErrorKind::UnexpectedEof.into()),
                Read::TimedOut => return Err(io::ErrorKind::TimedOut.into()),
            }
        }
    }
}

/// Why no response head came from the backend.
enum HeadError {
    /// Closed before sending anything.
    Closed,
    TimedOut,
    Io(io::Error),
    Response(raw::ResponseError),
}

/// Reads the final response head (interim 1xx responses are skipped).
async fn read_head(
    upstream: &mut RawConn,
    head_request: bool,
    timer: &mut Pin<Box<Sleep>>,
    timeout: Duration,
) -> Result<ResponseHead, HeadError> {
    let deadline = Instant::now() + timeout;
    loop {
        if !upstream.buf.is_empty() {
            match raw::parse_response(&upstream.buf, head_request) {
                Ok(Some(head)) if head.status < 200 => {
                    upstream.buf.advance(head.len);
                    continue;
                }
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(e) => return Err(HeadError::Response(e)),
            }
        }
        let nothing_yet = upstream.buf.is_empty();
        match read_more(&mut upstream.stream, &mut upstream.buf, timer, deadline).await {
            Ok(Read::Bytes) => {}
            Ok(Read::Eof) if nothing_yet => return Err(HeadError::Closed),
            Ok(Read::Eof) => return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(Read::TimedOut) => return Err(HeadError::TimedOut),
            // A reset before any answer is the same race as a close.
            Err(e) if nothing_yet && e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(HeadError::Closed);
            }
            Err(e) => return Err(HeadError::Io(e)),
        }
    }
}

fn write_status_line(out: &mut Vec<u8>, status: u16) {
    out.extend_from_slice(b"HTTP/1.1 ");
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(digits.format(status).as_bytes());
    out.push(b' ');
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `date: <now>\r\n`, formatted once a second.
fn write_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((0, String::new()))
        };
    }
    let now = std::time::SystemTime::now();
    let second = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != second || text.is_empty() {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        headers::write_header(out, b"date", text.as_bytes());
    });
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Conn<IO> {
    /// Writes one of wxgate's own responses (errors, redirects, `/auth` answers), whose bodies are
    /// small and whole.
    async fn write_own(
        &mut self,
        response: Response<Body>,
        head_request: bool,
        close: bool,
        idle: Duration,
    ) -> io::Result<()> {
        let (parts, body) = response.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let out = &mut self.out;
        out.clear();
        write_status_line(out, parts.status.as_u16());
        for (name, value) in &parts.headers {
            if name == header::CONTENT_LENGTH || name == header::CONNECTION {
                continue;
            }
            headers::write_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
        let bodiless = parts.status.is_informational()
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED;
        if !bodiless {
            let mut digits = itoa::Buffer::new();
            headers::write_header(out, b"content-length", digits.format(body.len()).as_bytes());
        }
        if !parts.headers.contains_key(header::DATE) {
            write_date(out);
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_request && !bodiless {
            out.extend_from_slice(&body);
        }
        self.flush_out(idle).await
    }
}

pin_project_lite::pin_project! {
    /// A client connection handed to hyper: what the fast lane had read of it comes first.
    pub(crate) struct Prefixed<IO> {
        prefix: Bytes,
        #[pin]
        io: IO,
    }
}

impl<IO> Prefixed<IO> {
    fn new(prefix: Bytes, io: IO) -> Self {
        Prefixed { prefix, io }
    }
}

impl<IO: AsyncRead> AsyncRead for Prefixed<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        this.io.poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Parsed {
        let (len, parsed) = parse_request(head.as_bytes(), 64 * 1024, MAX_HEADERS)
            .unwrap_or_else(|Unusual(why)| panic!("not for the lane: {why}"))
            .expect("a whole head");
        assert_eq!(len, head.len());
        Parsed {
            head: Bytes::copy_from_slice(head.as_bytes()),
            ..parsed
        }
    }

    #[test]
    fn the_parse_finds_the_headers_the_lane_reads_in_any_case() {
        let request = parse(
            "GET /a?b HTTP/1.1\r\nHost: h\r\nX-REQUEST-ID: first\r\naccept: text/html\r\n\
             AUTHORIZATION: Basic dXNlcjpwdw==\r\nOrigin: https://o\r\nx-request-id: second\r\n\
             authorization: bearer tok.en\r\nCookie: __Host-wxgate=c\r\nCONNECTION: x-hop\r\n\r\n",
        );
        assert_eq!(request.target(), "/a?b");
        assert_eq!(request.request_id(), Some(&b"first"[..]));
        assert_eq!(request.origin(), Some(&b"https://o"[..]));
        assert!(request.accepts_html());
        // The first Authorization that is a bearer token, before the cookie.
        assert_eq!(request.credential(), Some(("tok.en", Via::Bearer)));
        assert_eq!(request.roles.authorization.count_ones(), 2);
        assert_eq!(request.roles.connection, 1 << 8);
        assert!(!request.close);

        let cookie_only = parse("GET / HTTP/1.1\r\ncookie: a=b; __Host-wxgate=c\r\n\r\n");
        assert_eq!(cookie_only.credential(), Some(("c", Via::Cookie)));
        assert_eq!(cookie_only.request_id(), None);
        assert!(!cookie_only.accepts_html());
    }

    #[test]
    fn every_name_and_value_lies_in_the_head_even_empty_ones() {
        let request = parse(
            "GET / HTTP/1.1\r\nX-Empty:\r\nX-Spaces:   \r\nX-Tab:\tv\r\nConnection: Close\r\n\r\n",
        );
        let lines = request.lines();
        let got: Vec<(&[u8], &[u8])> = lines.iter().collect();
        assert_eq!(
            got,
            [
                (&b"X-Empty"[..], &b""[..]),
                (b"X-Spaces", b""),
                (b"X-Tab", b"v"),
                (b"Connection", b"Close")
            ]
        );
        for &((name_start, name_end), (value_start, value_end)) in lines.spans {
            assert!(name_start < name_end && name_end < value_start && value_start <= value_end);
            assert!(value_end as usize <= request.head.len());
        }
        assert!(request.close);
    }

    #[test]
    fn requests_that_are_not_the_lanes_go_to_hyper() {
        for head in [
            "GET / HTTP/1.0\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nexpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "GET http://example.com/ HTTP/1.1\r\n\r\n",
            "CONNECT example.com:443 HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                parse_request(head.as_bytes(), 64 * 1024, MAX_HEADERS).is_err(),
                "{head:?}"
            );
        }
    }
}
