//! The admin listener: `GET /healthz`, `GET /readyz`, `GET /metrics` for orchestrators, and
//! `GET /users/{user_id}`, `GET /users?openid=...[&appid=...]`, `GET /users?unionid=...` for operators
//! asking "who is this?". It must never share a port with client traffic (the config refuses that).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::json;

use crate::auth::service::AuthService;
use crate::body::{self, Body};
use crate::identity::UserKey;
use crate::metrics::Metrics;

/// Whether the instance should receive traffic: true once the listeners are bound, false from the
/// moment shutdown begins (before the listeners close, so a load balancer stops sending first).
#[derive(Debug, Default, Clone)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Shared state of the admin endpoints.
#[derive(Clone)]
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
    /// Its stores must answer for the instance to be ready.
    pub auth: Option<Arc<AuthService>>,
}

impl Admin {
    pub async fn handle<B>(&self, request: Request<B>) -> Result<Response<Body>, Infallible> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = body::json(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method_not_allowed", "message": "Admin endpoints answer GET only."}),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return Ok(response);
        }
        let response = match request.uri().path() {
            "/healthz" => body::json(StatusCode::OK, &json!({"status": "ok"})),
            "/readyz" => self.readyz().await,
            "/users" => self.user(request.uri().query()).await,
            path if path.starts_with("/users/") => self.user_by_id(&path["/users/".len()..]).await,
            "/metrics" => {
                if let Some(sessions) = self.auth.as_ref().and_then(|a| a.sessions().count()) {
                    self.metrics.set_sessions(sessions);
                }
                let mut response = Response::new(body::full(self.metrics.render()));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            _ => body::json(
                StatusCode::NOT_FOUND,
                &json!({"error": "not_found", "message": "Admin endpoints are /healthz, /readyz, /metrics and /users."}),
            ),
        };
        Ok(response)
    }

    async fn user_by_id(&self, user_id: &str) -> Response<Body> {
        self.lookup(UserKey::UserId(user_id)).await
    }

    async fn user(&self, query: Option<&str>) -> Response<Body> {
        let params: Vec<(String, String)> = query
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        match (get("openid"), get("appid"), get("unionid")) {
            (Some(openid), appid, None) => self.lookup(UserKey::OpenId { appid, openid }).await,
            (None, None, Some(unionid)) => self.lookup(UserKey::UnionId(unionid)).await,
            _ => body::json(
                StatusCode::BAD_REQUEST,
                &json!({"error": "bad_request", "message": "Ask /users/{user_id}, /users?openid=...[&appid=...] or /users?unionid=..."}),
            ),
        }
    }

    async fn lookup(&self, key: UserKey<'_>) -> Response<Body> {
        let Some(auth) = self.auth.as_ref().filter(|a| a.identities().has_store()) else {
            return body::json(
                StatusCode::NOT_FOUND,
                &json!({"error": "not_found", "message": "This gateway keeps no identity store (no apps, or identity.user_id is not internal)."}),
            );
        };
        match auth.identities().user(key).await {
            Ok(Some(record)) => body::json(StatusCode::OK, &json!(record)),
            Ok(None) => body::json(
                StatusCode::NOT_FOUND,
                &json!({"error": "not_found", "message": "No such user."}),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "user lookup failed");
                body::json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"error": "identity_unavailable", "message": "The identity store does not answer."}),
                )
            }
        }
    }

    async fn readyz(&self) -> Response<Body> {
        if !self.readiness.is_ready() {
            return body::json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "not_ready", "message": "Starting up or shutting down."}),
            );
        }
        let Some(auth) = &self.auth else {
            return body::json(StatusCode::OK, &json!({"status": "ready"}));
        };
        // The session store decides: without it no authenticated request can be served, so the
        // instance is taken out. The identity store only serves logins: while it is down, sessions
        // already issued keep working, and taking every instance out (they share the store) would
        // stop those too; the instance reports itself degraded and stays in.
        let (sessions, identities) = auth.ready().await;
        let state = |up: bool| if up { "up" } else { "down" };
        let checks =
            json!({"sessions": state(sessions.is_ok()), "identities": state(identities.is_ok())});
        if let Err(e) = &sessions {
            tracing::warn!(error = %e, "not ready: the session store does not answer");
        }
        if let Err(e) = &identities {
            tracing::warn!(error = %e, "degraded: the identity store does not answer; logins fail");
        }
        match (sessions, identities) {
            (Err(_), _) => body::json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "not_ready", "message": "The session store does not answer.", "checks": checks}),
            ),
            (Ok(()), Err(_)) => body::json(
                StatusCode::OK,
                &json!({"status": "degraded", "message": "The identity store does not answer: logins fail, sessions work.", "checks": checks}),
            ),
            (Ok(()), Ok(())) => body::json(
                StatusCode::OK,
                &json!({"status": "ready", "checks": checks}),
            ),
        }
    }
}
