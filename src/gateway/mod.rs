//! The request pipeline of the main listener. [`Gateway::service`] is what hyper drives for one
//! connection; [`Gateway::handle`] walks a request through normalise → route → authenticate →
//! header hygiene → forward, and turns every failure into a response (it never returns an error to
//! hyper, so a client always gets an answer and a connection is never dropped on a bug).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::auth::oauth::{self, SESSION_COOKIE};
use crate::auth::service::{AuthService, Via, credential};
use crate::auth::{Authenticator, Identity};
use crate::body::{self, Body};
use crate::config::Config;
use crate::error::{self, Error};
use crate::limits::RateLimits;
use crate::logging::RequestContext;
use crate::metrics::Metrics;
use crate::proxy::Upstream;
use crate::proxy::headers::{self, ClientInfo, HeaderRules};
use crate::routes::{self, Policy, RouteTable};

pub(crate) mod fast;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Connections upgraded after a `101` (WebSocket and the like): tracked so that shutdown gives them
/// the same grace period as requests in flight, and cut when it ends.
#[derive(Clone, Default)]
pub struct Tunnels {
    pub tracker: tokio_util::task::TaskTracker,
    pub cut_off: Arc<crate::server::Signal>,
}

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    routes: RouteTable,
    auth_prefix: String,
    allow_encoded_slashes: bool,
    /// wxgate's own endpoints; `None` when no app is configured (then they all answer 404).
    auth: Option<Arc<AuthService>>,
    authenticator: Arc<dyn Authenticator>,
    headers: HeaderRules,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    /// Labels for requests that never reach a configured route.
    labels: Labels,
    /// Origins of the browser apps (`apps[].public_url`): the only ones whose pages may send
    /// state-changing requests with the session cookie.
    browser_origins: Vec<String>,
    limits: Arc<RateLimits>,
    /// `limits.max_body`: the largest request body forwarded.
    max_body: u64,
    /// `limits.idle_timeout`: a request body that stalls this long fails the request.
    idle_timeout: std::time::Duration,
    tunnels: Tunnels,
    /// wxgate's own HTTP/1.1 loop; `None` when the backend speaks HTTP/2.
    fast: Option<fast::FastLane>,
}

struct Labels {
    invalid: Arc<str>,
    /// `auth` for unknown paths under the prefix; `auth_login`, `auth_refresh`, ... for the endpoints.
    auth: Arc<str>,
    auth_endpoints: Vec<(&'static str, Arc<str>)>,
    /// `/auth/verify`, however much original path follows it.
    verify: Arc<str>,
}

impl Labels {
    /// The metrics label of a path under the auth prefix (bounded: unknown paths share one label).
    fn auth(&self, rest: &str) -> Arc<str> {
        // The browser flow's paths name the app; one label per step keeps the label set bounded.
        let rest = match rest.strip_prefix("/oauth/").and_then(|r| r.split_once('/')) {
            Some((_, "start")) => "/oauth/*/start",
            Some((_, "callback")) => "/oauth/*/callback",
            _ => rest,
        };
        self.auth_endpoints
            .iter()
            .find(|(path, _)| *path == rest)
            .map_or_else(|| self.auth.clone(), |(_, label)| label.clone())
    }
}

impl Gateway {
    pub fn new(
        config: &Config,
        auth: Option<Arc<AuthService>>,
        authenticator: Arc<dyn Authenticator>,
        metrics: Arc<Metrics>,
        limits: Arc<RateLimits>,
        tunnels: Tunnels,
    ) -> Self {
        Gateway {
            routes: config.routes.clone(),
            auth_prefix: config.server.auth_prefix.clone(),
            allow_encoded_slashes: config.server.allow_encoded_slashes,
            auth,
            authenticator,
            headers: HeaderRules::from_config(config),
            upstream: Upstream::new(&config.upstream, config.limits.idle_timeout),
            max_body: config.limits.max_body,
            idle_timeout: config.limits.idle_timeout,
            tunnels,
            fast: fast::FastLane::new(config),
            metrics,
            labels: Labels {
                invalid: Arc::from("invalid_path"),
                auth: Arc::from("auth"),
                auth_endpoints: [
                    ("/login", "auth_login"),
                    ("/refresh", "auth_refresh"),
                    ("/logout", "auth_logout"),
                    ("/session", "auth_session"),
                    ("/userinfo", "auth_userinfo"),
                    ("/phone", "auth_phone"),
                    ("/oauth/login", "auth_oauth_login"),
                    ("/oauth/*/start", "auth_oauth_start"),
                    ("/oauth/*/callback", "auth_oauth_callback"),
                ]
                .into_iter()
                .map(|(path, label)| (path, Arc::from(label)))
                .collect(),
                verify: Arc::from("auth_verify"),
            },
            browser_origins: config
                .apps
                .iter()
                .filter_map(|a| a.public_url.clone())
                .collect(),
            limits,
        }
    }

    /// The service hyper drives for one connection from `peer`.
    ///
    /// The request id, the marking of credentials as sensitive and the panic guard are written
    /// here rather than stacked as tower-http layers: each layer is a future wrapping the next, and
    /// the boxed service they need costs an allocation and a copy of the whole request future, on
    /// every request. Measured with bench/instructions.sh, the stack was about 4,000 instructions
    /// a request, a tenth of wxgate's whole share of a proxied request.
    pub fn service(
        self: &Arc<Self>,
        peer: SocketAddr,
        scheme: &'static str,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static {
        self.service_with(Arc::new(ClientInfo::new(peer.ip(), scheme)))
    }

    /// [`Gateway::service`] for a client already described.
    pub(crate) fn service_with(
        self: &Arc<Self>,
        client: Arc<ClientInfo>,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static {
        let gateway = self.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let gateway = gateway.clone();
            let client = client.clone();
            async move {
                let metrics = gateway.metrics.clone();
                // A panic becomes a JSON 500 and a count, never a dropped connection.
                let handled = AssertUnwindSafe(gateway.handle(request, &client))
                    .catch_unwind()
                    .await;
                Ok::<_, Infallible>(handled.unwrap_or_else(|_panic| {
                    error::respond(
                        Error::Internal("panic while handling a request".into()),
                        &metrics,
                    )
                }))
            }
        })
    }

    /// Handles one request from end to end, recording its metrics and access-log line.
    pub async fn handle(
        &self,
        mut request: Request<Incoming>,
        client: &ClientInfo,
    ) -> Response<Body> {
        let started = Instant::now();
        let _in_flight = self.metrics.in_flight();
        let method = request.method().clone();
        let request_id = request_id(request.headers_mut());
        let outcome = self.route_and_forward(request, client, &request_id).await;
        self.finish(outcome, &method, &request_id, started)
    }

    /// The response an outcome gives the client: the error answered, a refused cookie cleared, the
    /// request id echoed. Records the request's metrics and access line.
    fn finish(
        &self,
        outcome: Outcome,
        method: &Method,
        request_id: &HeaderValue,
        started: Instant,
    ) -> Response<Body> {
        let mut response = match outcome.result {
            Ok(response) => response,
            // Named only now: a proxied request that succeeds logs nothing but its access line,
            // which carries the same fields.
            Err(err) => RequestContext::new(method, request_id, outcome.path.as_deref())
                .in_scope(|| error::respond(err, &self.metrics)),
        };
        if outcome.clear_cookie {
            // The session cookie was refused: forget it, so the next page is simply anonymous.
            response.headers_mut().append(
                header::SET_COOKIE,
                oauth::set_cookie(SESSION_COOKIE, String::new(), std::time::Duration::ZERO),
            );
        }
        // Echoed to the client, errors included, so it can quote it; a backend's own id stays.
        if !response.headers().contains_key(&X_REQUEST_ID) {
            response
                .headers_mut()
                .insert(X_REQUEST_ID, request_id.clone());
        }
        self.record(
            method,
            &outcome.route,
            outcome.path.as_deref(),
            response.status().as_u16(),
            started,
            outcome.user.as_ref(),
            request_id,
        );
        response
    }

    /// The metrics and the access line of one request.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        method: &Method,
        route: &Arc<str>,
        path: Option<&str>,
        status: u16,
        started: Instant,
        user: Option<&Identity>,
        request_id: &HeaderValue,
    ) {
        let elapsed = started.elapsed();
        self.metrics.observe_request(route, status, elapsed);
        tracing::info!(
            target: "wxgate::access",
            method = %method,
            path = path.unwrap_or("-"),
            route = &**route,
            status,
            duration_us = elapsed.as_micros() as u64,
            user_id = user.map_or("-", Identity::user_id),
            request_id = request_id.to_str().unwrap_or("-"),
        );
    }

    async fn route_and_forward(
        &self,
        request: Request<Incoming>,
        client: &ClientInfo,
        request_id: &HeaderValue,
    ) -> Outcome {
        let path = match routes::normalize_path(request.uri().path(), self.allow_encoded_slashes) {
            Ok(path) => path,
            Err(e) => return Outcome::failed(self.labels.invalid.clone(), None, e.into()),
        };

        if routes::has_prefix(&path, &self.auth_prefix) {
            // wxgate's own endpoints log (logins, merges, refusals): their lines carry the request.
            // Boxed: their futures (WeChat calls, store transactions, Redis) are large, and inline
            // they would make every proxied request's future as large, copied at each move.
            let context = RequestContext::new(request.method(), request_id, Some(&path));
            let (parts, incoming) = request.into_parts();
            let request = Request::from_parts(parts, body::boxed(incoming));
            return Box::pin(context.scope(self.own_endpoint(path, request, client))).await;
        }
        self.forward(path, request, client).await
    }

    /// A request under the auth prefix: answered here, never forwarded.
    async fn own_endpoint(
        &self,
        path: String,
        request: Request<Body>,
        client: &ClientInfo,
    ) -> Outcome {
        {
            let rest = &path[self.auth_prefix.len()..];
            if let Some(original) = rest.strip_prefix("/verify")
                && (original.is_empty() || original.starts_with('/'))
            {
                let original = original.to_owned();
                return self.verify(&original, path, request, client).await;
            }
            // Logins cost WeChat calls and database writes: limited per client address.
            let ip = self.headers.client_ip(request.headers(), client.peer);
            if let Err(retry_after) = self.limits.check_auth(ip).await {
                tracing::info!(client = %ip, retry_after, "auth request over the rate limit");
                return Outcome::failed(
                    self.labels.auth(rest),
                    Some(path),
                    Error::TooManyRequests { retry_after },
                );
            }
            let result = match &self.auth {
                Some(auth) => auth.endpoint(rest, request).await,
                None => Err(Error::NotFound),
            };
            Outcome {
                route: self.labels.auth(rest),
                path: Some(path),
                user: None,
                result,
                clear_cookie: false,
            }
        }
    }

    /// A request for the backend: judged by its route's policy, cleaned, and forwarded.
    async fn forward(
        &self,
        path: String,
        request: Request<Incoming>,
        client: &ClientInfo,
    ) -> Outcome {
        let route = self.routes.matching(request.method(), &path);
        let (mut parts, incoming) = request.into_parts();
        let origin = parts.headers.get(header::ORIGIN).map(HeaderValue::as_bytes);
        let decided = self
            .decide(route, &parts.method, credential(&parts.headers), origin)
            .await;
        let identity = match decided {
            Ok(identity) => identity,
            Err((e, via)) => {
                let page = Page {
                    method: &parts.method,
                    accepts_html: accepts_html(&parts.headers),
                    query: parts.uri.query(),
                };
                return self.refused(route, path, page, e, via);
            }
        };
        if let Some(identity) = &identity
            && let Err(retry_after) = self.limits.check_user(identity.user_id()).await
        {
            return Outcome::failed(
                route.name.clone(),
                Some(path),
                Error::TooManyRequests { retry_after },
            );
        }

        // An HTTP/1.1 upgrade (a WebSocket handshake) keeps its two hop-by-hop headers, and the
        // client's side of the connection, for when the backend agrees.
        let upgrade = (parts.version == http::Version::HTTP_11)
            .then(|| headers::requested_upgrade(&parts.headers))
            .flatten();
        // HTTP/2 clients name the host in :authority; the backend and X-Forwarded-Host want Host.
        if !parts.headers.contains_key(header::HOST)
            && let Some(host) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, host);
        }
        if let Err(e) = self
            .headers
            .prepare_request(&mut parts.headers, identity.as_ref(), client)
        {
            return Outcome::failed(route.name.clone(), Some(path), e);
        }
        let client_upgrade = match upgrade {
            Some(protocol) => {
                headers::restore_upgrade(&mut parts.headers, protocol);
                parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
            }
            None => None,
        };
        let body = match self.request_body(&parts.headers, incoming) {
            Ok(body) => body,
            Err(e) => return Outcome::failed(route.name.clone(), Some(path), e),
        };
        let request = Request::from_parts(parts, body);
        let result = self
            .upstream
            .forward(request, &path)
            .await
            .map_err(|e| match e {
                // The request body, not the backend, is what failed.
                Error::UpstreamUnavailable(cause)
                    if body::caused_by::<http_body_util::LengthLimitError>(&*cause) =>
                {
                    Error::PayloadTooLarge
                }
                Error::UpstreamUnavailable(cause) if body::caused_by::<body::BodyIdle>(&*cause) => {
                    Error::RequestTimeout
                }
                other => other,
            });
        let result = match (result, client_upgrade) {
            (Ok(mut response), Some(client))
                if response.status() == StatusCode::SWITCHING_PROTOCOLS =>
            {
                match response
                    .extensions_mut()
                    .remove::<hyper::upgrade::OnUpgrade>()
                {
                    Some(upstream) => {
                        self.tunnel(client, upstream);
                        Ok(response)
                    }
                    None => Err(Error::Internal(
                        "the backend switched protocols on a connection that cannot be upgraded"
                            .into(),
                    )),
                }
            }
            (result, _) => result,
        };
        Outcome {
            route: route.name.clone(),
            path: Some(path),
            user: identity,
            result,
            clear_cookie: false,
        }
    }
}

impl Gateway {
    /// Joins the client's and the backend's upgraded connections and copies bytes both ways until
    /// either closes, or shutdown's grace period ends.
    fn tunnel(&self, client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
        let cut_off = self.tunnels.cut_off.clone();
        self.tunnels.tracker.spawn(
            async move {
                let (client, upstream) = match tokio::try_join!(client, upstream) {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::debug!(error = %e, "upgrade failed");
                        return;
                    }
                };
                let mut client = hyper_util::rt::TokioIo::new(client);
                let mut upstream = hyper_util::rt::TokioIo::new(upstream);
                tokio::select! {
                    copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                        tracing::debug!(?copied, "upgraded connection closed");
                    }
                    () = cut_off.raised() => tracing::debug!("upgraded connection cut off at shutdown"),
                }
            }
            .in_current_span(),
        );
    }

    /// The client's body as it is forwarded: refused at once when its declared length is over
    /// `limits.max_body`, cut when a chunked body grows past it or stalls for `limits.idle_timeout`.
    fn request_body(&self, headers: &HeaderMap, incoming: Incoming) -> Result<Body, Error> {
        use http_body::Body as _;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body) {
            return Err(Error::PayloadTooLarge);
        }
        if incoming.is_end_stream() {
            return Ok(body::boxed(incoming));
        }
        let limited = http_body_util::Limited::new(incoming, self.max_body as usize);
        Ok(body::boxed(body::IdleTimeout::new(
            limited,
            self.idle_timeout,
        )))
    }

    /// Who a request to `route` comes from, as its policy demands: `Ok(None)` is an anonymous request
    /// the route lets through; `Err` says why it is refused and where the refused credential came from.
    async fn decide(
        &self,
        route: &crate::routes::Route,
        method: &Method,
        credential: Option<(&str, Via)>,
        origin: Option<&[u8]>,
    ) -> Result<Option<Identity>, (Error, Option<Via>)> {
        if route.policy == Policy::Public {
            return Ok(None);
        }
        let Some((token, via)) = credential else {
            return match route.policy {
                Policy::Required => Err((Error::LoginRequired, None)),
                _ => Ok(None),
            };
        };
        if !is_safe(method) && via == Via::Cookie && !self.origin_allowed(origin) {
            return Err((Error::CrossOrigin, Some(Via::Cookie)));
        }
        match self.authenticator.authenticate(token).await {
            Ok(None) if route.policy == Policy::Required => Err((Error::LoginRequired, Some(via))),
            Ok(identity) => Ok(identity),
            Err(e) => Err((e, Some(via))),
        }
    }

    /// Forward authentication (`/auth/verify`): judges the request a front proxy (nginx
    /// `auth_request`, Traefik `ForwardAuth`, Envoy `ext_authz`) is about to pass, by the same route
    /// policy, and answers 200 with the identity headers or the refusal.
    ///
    /// The original method and URI come from `X-Forwarded-Method`/`X-Original-Method` and
    /// `X-Forwarded-Uri`/`X-Original-URI`, or, for Envoy (which appends the original path to this
    /// one), from this request's method and the path after `/verify`. Only peers in
    /// `server.trusted_proxies` are answered. Refusals other than 401 are answered 403 (with the
    /// precise code in the body), because nginx turns any other status into a 500.
    async fn verify(
        &self,
        original_path: &str,
        path: String,
        request: Request<Body>,
        client: &ClientInfo,
    ) -> Outcome {
        let label = self.labels.verify.clone();
        // Only the head is judged; a body held across the await would not be `Sync`.
        let (parts, _) = request.into_parts();
        let judged = self.judge(original_path, &parts, client).await;
        let user = judged.as_ref().ok().and_then(Option::clone);
        let result = match judged {
            Ok(identity) => {
                let mut response = Response::new(body::empty());
                match identity.map(|i| self.headers.insert_identity(response.headers_mut(), &i)) {
                    Some(Err(e)) => Err(e),
                    _ => Ok(response),
                }
            }
            Err(e) => {
                let mut response = error::respond(e, &self.metrics);
                let status = response.status();
                if status.is_client_error()
                    && status != StatusCode::UNAUTHORIZED
                    && status != StatusCode::FORBIDDEN
                {
                    *response.status_mut() = StatusCode::FORBIDDEN;
                }
                Ok(response)
            }
        };
        Outcome {
            route: label,
            path: Some(path),
            user,
            result,
            clear_cookie: false,
        }
    }

    async fn judge(
        &self,
        original_path: &str,
        request: &http::request::Parts,
        client: &ClientInfo,
    ) -> Result<Option<Identity>, Error> {
        if !self.headers.is_trusted(client.peer) {
            return Err(Error::UntrustedProxy);
        }
        let headers = &request.headers;
        let first = |names: [&str; 2]| {
            names
                .iter()
                .find_map(|name| headers.get(*name))
                .and_then(|v| v.to_str().ok())
        };
        let method = match first(["x-forwarded-method", "x-original-method"]) {
            Some(m) => Method::from_bytes(m.trim().as_bytes())
                .map_err(|_| Error::BadRequest(VERIFY_EXPECTED))?,
            None => request.method.clone(),
        };
        let uri: http::Uri = match first(["x-forwarded-uri", "x-original-uri"]) {
            Some(uri) => uri
                .parse()
                .map_err(|_| Error::BadRequest(VERIFY_EXPECTED))?,
            None if !original_path.is_empty() => {
                let mut envoy = original_path.to_owned();
                if let Some(query) = request.uri.query() {
                    envoy.push('?');
                    envoy.push_str(query);
                }
                envoy
                    .parse()
                    .map_err(|_| Error::BadRequest(VERIFY_EXPECTED))?
            }
            None => return Err(Error::BadRequest(VERIFY_EXPECTED)),
        };
        let path = routes::normalize_path(uri.path(), self.allow_encoded_slashes)?;
        // wxgate's own endpoints are open to everyone.
        if routes::has_prefix(&path, &self.auth_prefix) {
            return Ok(None);
        }
        let route = self.routes.matching(&method, &path);
        let origin = headers.get(header::ORIGIN).map(HeaderValue::as_bytes);
        self.decide(route, &method, credential(headers), origin)
            .await
            .map_err(|(e, _)| e)
    }

    /// The answer to a request its route refuses for want of a valid identity: a redirect to the
    /// route's browser login for a page request, else the error (401 for credential errors). A
    /// refused session cookie is cleared either way.
    fn refused(
        &self,
        route: &crate::routes::Route,
        path: String,
        page: Page<'_>,
        err: Error,
        via: Option<Via>,
    ) -> Outcome {
        let credential_error = matches!(
            err,
            Error::LoginRequired | Error::InvalidToken | Error::TokenExpired
        );
        let clear_cookie = via == Some(Via::Cookie) && credential_error;
        let result = match &route.browser_login {
            Some(start)
                if credential_error
                    && matches!(*page.method, Method::GET | Method::HEAD)
                    && page.accepts_html =>
            {
                Ok(login_redirect(start, &path, page.query))
            }
            _ => Err(err),
        };
        Outcome {
            route: route.name.clone(),
            path: Some(path),
            user: None,
            result,
            clear_cookie,
        }
    }

    /// Whether a state-changing request carrying the session cookie comes from one of the browser
    /// apps' own pages. Browsers send `Origin` with such requests; a request without it (an old
    /// browser, a non-browser client) relies on the cookie's `SameSite=Lax`.
    fn origin_allowed(&self, origin: Option<&[u8]>) -> bool {
        match origin {
            None => true,
            Some(origin) => self
                .browser_origins
                .iter()
                .any(|o| o.as_bytes().eq_ignore_ascii_case(origin)),
        }
    }
}

/// The request's id: the client's own (`X-Request-Id`), else a new UUID, set on the request so the
/// backend and the logs see the same one.
fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(&X_REQUEST_ID) {
        return id.clone();
    }
    let id = fresh_request_id();
    headers.insert(X_REQUEST_ID, id.clone());
    id
}

/// A new request id: a random UUID.
fn fresh_request_id() -> HeaderValue {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_str(uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text))
        .expect("a UUID is a valid header value")
}

const VERIFY_EXPECTED: &str = "Send the original request's method and URI in X-Forwarded-Method and X-Forwarded-Uri (or X-Original-Method and X-Original-URI).";

/// Methods that must not change state (RFC 9110 §9.2.1), so need no cross-origin check.
fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// Whether the client is a browser asking for a page.
fn accepts_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| wants_html(v.as_bytes()))
}

/// Whether one `Accept` value asks for HTML.
fn wants_html(accept: &[u8]) -> bool {
    accept.windows(9).any(|w| w == b"text/html")
}

/// What a refusal needs to know to choose between a login redirect and an error.
struct Page<'a> {
    pub method: &'a Method,
    pub accepts_html: bool,
    pub query: Option<&'a str>,
}

/// `302` to the browser login at `start`, coming back to this page afterwards.
fn login_redirect(start: &str, path: &str, query: Option<&str>) -> Response<Body> {
    let here = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let here = oauth::safe_return_to(Some(&here)).unwrap_or_else(|_| "/".to_owned());
    let location = format!(
        "{start}?{}",
        form_urlencoded::Serializer::new(String::new())
            .append_pair("return_to", &here)
            .finish()
    );
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::FOUND;
    if let Ok(location) = HeaderValue::try_from(location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// What happened to one request, for the metrics and the access log.
struct Outcome {
    route: Arc<str>,
    path: Option<String>,
    /// Who the request came from, when it was proven.
    user: Option<Identity>,
    result: Result<Response<Body>, Error>,
    /// Clear the session cookie in the response (it was refused).
    clear_cookie: bool,
}

impl Outcome {
    fn failed(route: Arc<str>, path: Option<String>, err: Error) -> Self {
        Outcome {
            route,
            path,
            user: None,
            result: Err(err),
            clear_cookie: false,
        }
    }
}
