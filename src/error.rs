//! The one error type of the request path, and the only place an error becomes a response.
//!
//! Every failure while handling a request ends as an [`Error`]; [`respond`] logs it once (with its
//! cause chain), counts it by code and sends the client `{"error": code, "message": sentence}`. The
//! client message is fixed per variant, so no detail of a cause (an address, a token, a code) can leak.

use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use crate::body::{self, Body, BoxError};
use crate::metrics::Metrics;
use crate::routes::PathError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request path cannot be normalised; it is never forwarded.
    #[error("unusable request path: {0}")]
    BadPath(#[from] PathError),
    /// A path under the auth prefix that wxgate does not serve.
    #[error("no such endpoint")]
    NotFound,
    /// A required route and no credentials.
    #[error("login required")]
    LoginRequired,
    /// Credentials that are not valid (bad signature, unknown or revoked session, wrong algorithm).
    #[error("invalid token")]
    InvalidToken,
    /// Credentials that were valid but have expired.
    #[error("token expired")]
    TokenExpired,
    /// Identity could not be decided (a store is down); fail closed.
    #[error("authentication unavailable")]
    AuthUnavailable(#[source] BoxError),
    /// The backend refused the connection or broke it.
    #[error("upstream unavailable")]
    UpstreamUnavailable(#[source] BoxError),
    /// The backend did not answer in time.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// A bug: a panic or a broken invariant. The client learns nothing more.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadPath(_) => StatusCode::BAD_REQUEST,
            Error::NotFound => StatusCode::NOT_FOUND,
            Error::LoginRequired | Error::InvalidToken | Error::TokenExpired => {
                StatusCode::UNAUTHORIZED
            }
            Error::AuthUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            Error::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable snake_case code clients and SDKs match on.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadPath(_) => "invalid_path",
            Error::NotFound => "not_found",
            Error::LoginRequired => "login_required",
            Error::InvalidToken => "invalid_token",
            Error::TokenExpired => "token_expired",
            Error::AuthUnavailable(_) => "auth_unavailable",
            Error::UpstreamUnavailable(_) => "upstream_unavailable",
            Error::UpstreamTimeout => "upstream_timeout",
            Error::Internal(_) => "internal_error",
        }
    }

    /// One sentence for the client. Never includes a cause.
    pub fn message(&self) -> &'static str {
        match self {
            Error::BadPath(PathError::NotAbsolute) => {
                "The request target must be an absolute path."
            }
            Error::BadPath(PathError::BadPercentEncoding) => {
                "The path contains a % that is not followed by two hex digits."
            }
            Error::BadPath(PathError::EncodedSlash) => {
                "The path contains an encoded slash or backslash (%2F, %5C, \\), which this gateway does not accept."
            }
            Error::BadPath(PathError::AmbiguousDotSegment) => {
                "The path contains a dot segment with parameters (like ..;), which this gateway does not accept."
            }
            Error::NotFound => "There is no such endpoint.",
            Error::LoginRequired => "This resource requires login.",
            Error::InvalidToken => "The access token is not valid; log in again.",
            Error::TokenExpired => "The access token has expired; refresh it or log in again.",
            Error::AuthUnavailable(_) => {
                "Authentication is temporarily unavailable; try again shortly."
            }
            Error::UpstreamUnavailable(_) => "The backend service is unavailable.",
            Error::UpstreamTimeout => "The backend service did not answer in time.",
            Error::Internal(_) => "Internal error.",
        }
    }

    /// The response, without logging or counting; see [`respond`].
    pub fn to_response(&self) -> Response<Body> {
        let mut response = body::json(
            self.status(),
            &json!({ "error": self.code(), "message": self.message() }),
        );
        // RFC 6750 §3: a 401 names the scheme; with a rejected token it also says why.
        let challenge = match self {
            Error::LoginRequired => Some(r#"Bearer realm="wxgate""#),
            Error::InvalidToken => Some(r#"Bearer realm="wxgate", error="invalid_token""#),
            Error::TokenExpired => Some(
                r#"Bearer realm="wxgate", error="invalid_token", error_description="token expired""#,
            ),
            _ => None,
        };
        if let Some(challenge) = challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

/// Logs `err` once with its cause chain, counts it by code, and builds the client's response.
pub fn respond(err: Error, metrics: &Metrics) -> Response<Body> {
    metrics.count_error(err.code());
    let status = err.status();
    let chain = cause_chain(&err);
    if status.is_server_error() {
        tracing::warn!(error = err.code(), status = status.as_u16(), cause = %chain, "request failed");
    } else {
        tracing::debug!(error = err.code(), status = status.as_u16(), cause = %chain, "request refused");
    }
    err.to_response()
}

fn cause_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(response: Response<Body>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn login_required_is_a_json_401_with_a_bearer_challenge() {
        let response = Error::LoginRequired.to_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let challenge = response.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = body_json(response).await;
        assert_eq!(body["error"], "login_required");
        assert!(body["message"].as_str().unwrap().ends_with('.'));
    }

    #[tokio::test]
    async fn causes_never_reach_the_client() {
        let err = Error::UpstreamUnavailable("connect to 10.1.2.3:5432 refused, token=abc".into());
        let response = err.to_response();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        let text = body_json(response).await.to_string();
        assert!(
            !text.contains("10.1.2.3") && !text.contains("token"),
            "{text}"
        );
    }
}
