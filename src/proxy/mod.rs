//! Forwarding to the backend: a pooled, keep-alive HTTP client that streams bodies in both directions.
//! Header rules live in [`headers`]; this module only moves requests and responses and maps transport
//! failures to [`Error`]s.

pub mod headers;

use std::time::Duration;

use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, Version, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{self, Body};
use crate::config::UpstreamConfig;
use crate::error::Error;

/// The backend and the connection pool to it.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Body>,
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
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(config.http2)
            .build(connector);
        Upstream {
            client,
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
        *request.uri_mut() = self.target(request.uri(), path)?;
        // Whatever the client speaks to us, the pool speaks the configured protocol to the backend.
        *request.version_mut() = self.version;
        if !self.preserve_host {
            request
                .headers_mut()
                .insert(header::HOST, self.host.clone());
        }
        let response = match tokio::time::timeout(self.timeout, self.client.request(request)).await
        {
            Err(_elapsed) => return Err(Error::UpstreamTimeout),
            Ok(Err(e)) => return Err(Error::UpstreamUnavailable(Box::new(e))),
            Ok(Ok(response)) => response,
        };
        let (mut parts, incoming) = response.into_parts();
        let switching = (parts.status == http::StatusCode::SWITCHING_PROTOCOLS)
            .then(|| parts.headers.get(header::UPGRADE).cloned())
            .flatten();
        headers::remove_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = switching {
            headers::restore_upgrade(&mut parts.headers, protocol);
        }
        let body = body::boxed(body::IdleTimeout::new(incoming, self.idle_timeout));
        Ok(Response::from_parts(parts, body))
    }

    /// The backend URI for a client request: our scheme and authority, the base path, the normalised
    /// path, and the client's query unchanged.
    fn target(&self, original: &Uri, path: &str) -> Result<Uri, Error> {
        let path_and_query = if self.base_path.is_empty() && original.path() == path {
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
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| Error::Internal(format!("cannot build the upstream URI: {e}")))
    }
}
