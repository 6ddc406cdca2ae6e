//! Forwarding to the backend: pooled keep-alive connections that stream bodies in both directions.
//! HTTP/1.1 goes through wxgate's own [`pool`] (one backend needs no more); HTTP/2
//! (`upstream.http2`) through hyper-util's client, which multiplexes one connection. Header rules
//! live in [`headers`]; this module only moves requests and responses and maps transport failures
//! to [`Error`]s.

pub mod headers;
pub mod pool;
pub mod raw;

use std::sync::Arc;

use std::time::Duration;

use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, Version, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{self, Body};
use crate::config::UpstreamConfig;
use crate::error::Error;

/// How requests reach the backend.
#[derive(Clone)]
enum Transport {
    Http1(Arc<pool::Pool>),
    Http2(Box<Client<HttpConnector, Body>>),
}

/// The backend and the connection pool to it.
#[derive(Clone)]
pub struct Upstream {
    transport: Transport,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    host: http::HeaderValue,
    base_path: String,
    timeout: Duration,
    preserve_host: bool,
    /// `limits.idle_timeout`: a response body that stalls this long is cut.
    idle_timeout: Duration,
    /// The protocol spoken to the backend.
    version: Version,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, idle_timeout: Duration) -> Self {
        let transport = if config.http2 {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            connector.set_connect_timeout(Some(config.connect_timeout));
            connector.enforce_http(true);
            Transport::Http2(Box::new(
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(config.pool_idle_timeout)
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .http2_only(true)
                    .build(connector),
            ))
        } else {
            let port = config.authority.port_u16().unwrap_or(80);
            Transport::Http1(pool::Pool::new(
                format!("{}:{port}", config.authority.host()),
                config.connect_timeout,
                config.pool_idle_timeout,
            ))
        };
        Upstream {
            transport,
            scheme: config.scheme.clone(),
            authority: config.authority.clone(),
            host: http::HeaderValue::from_str(config.authority.as_str())
                .expect("an authority is a valid header value"),
            base_path: config.base_path.clone(),
            timeout: config.timeout,
            preserve_host: config.preserve_host,
            idle_timeout,
            version: if config.http2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            },
        }
    }

    /// Sends `request` to the backend at `path` (normalised) with the client's query, and returns the
    /// backend's response with its body still streaming. The request's headers must already be
    /// prepared by [`headers::HeaderRules::prepare_request`], and carry the client's `Host`.
    pub async fn forward(
        &self,
        mut request: Request<Body>,
        path: &str,
    ) -> Result<Response<Body>, Error> {
        // Whatever the client speaks to us, the pool speaks the configured protocol to the backend.
        *request.version_mut() = self.version;
        if !self.preserve_host {
            request
                .headers_mut()
                .insert(header::HOST, self.host.clone());
        }
        let (mut parts, body) = match &self.transport {
            Transport::Http1(pool) => {
                // On its own connection HTTP/1.1 wants the origin form: /path?query.
                *request.uri_mut() = Uri::from(self.path_and_query(request.uri(), path)?);
                match tokio::time::timeout(self.timeout, pool.send(request)).await {
                    Err(_elapsed) => return Err(Error::UpstreamTimeout),
                    Ok(Err(e)) => return Err(Error::UpstreamUnavailable(Box::new(e))),
                    Ok(Ok(response)) => {
                        let (parts, body) = response.into_parts();
                        (
                            parts,
                            body::boxed(body::IdleTimeout::new(body, self.idle_timeout)),
                        )
                    }
                }
            }
            Transport::Http2(client) => {
                *request.uri_mut() = self.target(request.uri(), path)?;
                match tokio::time::timeout(self.timeout, client.request(request)).await {
                    Err(_elapsed) => return Err(Error::UpstreamTimeout),
                    Ok(Err(e)) => return Err(Error::UpstreamUnavailable(Box::new(e))),
                    Ok(Ok(response)) => {
                        let (parts, body) = response.into_parts();
                        (
                            parts,
                            body::boxed(body::IdleTimeout::new(body, self.idle_timeout)),
                        )
                    }
                }
            }
        };
        let switching = (parts.status == http::StatusCode::SWITCHING_PROTOCOLS)
            .then(|| parts.headers.get(header::UPGRADE).cloned())
            .flatten();
        headers::remove_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = switching {
            headers::restore_upgrade(&mut parts.headers, protocol);
        }
        Ok(Response::from_parts(parts, body))
    }

    /// The backend URI for a client request: our scheme and authority, then
    /// [`Upstream::path_and_query`].
    fn target(&self, original: &Uri, path: &str) -> Result<Uri, Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(self.path_and_query(original, path)?)
            .build()
            .map_err(|e| Error::Internal(format!("cannot build the upstream URI: {e}")))
    }

    /// The base path, the normalised path, and the client's query unchanged.
    fn path_and_query(&self, original: &Uri, path: &str) -> Result<PathAndQuery, Error> {
        Ok(if self.base_path.is_empty() && original.path() == path {
            // The common case: the path was already normal; reuse it without copying.
            original
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"))
        } else {
            let mut pq = String::with_capacity(self.base_path.len() + path.len() + 64);
            pq.push_str(&self.base_path);
            pq.push_str(path);
            if let Some(query) = original.query() {
                pq.push('?');
                pq.push_str(query);
            }
            PathAndQuery::try_from(pq)
                .map_err(|e| Error::Internal(format!("cannot build the upstream path: {e}")))?
        })
    }
}
