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
use crate::wechat::client::WechatError;
use crate::wechat::crypto::{CryptoError, WatermarkError};

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
    /// A request to a wxgate endpoint that cannot be used; the message says what was expected.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// A request body over the endpoint's limit.
    #[error("request body too large")]
    PayloadTooLarge,
    /// A wxgate endpoint called with the wrong method; carries the `Allow` value.
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    /// WeChat refused the login code: wrong, expired, or from another app (40029, 42003).
    #[error("invalid login code")]
    InvalidCode,
    /// WeChat says the code was already exchanged (40163).
    #[error("login code already used")]
    CodeUsed,
    /// WeChat's risk control blocked this user (40226).
    #[error("login blocked by WeChat")]
    LoginBlocked,
    /// WeChat's per-user rate limit (45011).
    #[error("WeChat rate limit")]
    RateLimited,
    /// WeChat is busy, unreachable, slow or answering garbage.
    #[error("WeChat unavailable")]
    WechatUnavailable(#[source] WechatError),
    /// `identity.user_id = "unionid"` and this login yields no unionid.
    #[error("no unionid for this user")]
    UnionidUnavailable,
    /// The identity store failed; logins fail closed.
    #[error("identity store unavailable")]
    IdentityUnavailable(#[source] BoxError),
    /// Open data that does not decrypt (bad base64, lengths, padding, not JSON, no session_key fits).
    #[error("open data: {0}")]
    DecryptFailed(CryptoError),
    /// Open data issued for another app or user, or too old.
    #[error("open data watermark: {0}")]
    WatermarkMismatch(WatermarkError),
    /// `signature` is not `sha1(rawData + session_key)`.
    #[error("rawData signature mismatch")]
    SignatureMismatch,
    /// An OAuth callback whose `state` is unknown, expired, already used, for another app, or not
    /// started in this browser.
    #[error("invalid OAuth state")]
    InvalidState,
    /// The user declined WeChat's consent page (the callback came back without a code).
    #[error("login declined")]
    LoginDeclined,
    /// An official-account page opened in snapshot mode: WeChat gives a virtual user, never linked.
    #[error("snapshot-mode user")]
    SnapshotUser,
    /// `return_to` is not a path on this site.
    #[error("return_to is not a local path")]
    BadReturnTo,
    /// A state-changing request authenticated by the session cookie from another origin.
    #[error("cross-origin request with the session cookie")]
    CrossOrigin,
    /// The client stopped sending its request body for `limits.idle_timeout`.
    #[error("request body stalled")]
    RequestTimeout,
    /// wxgate's own rate limit (`[limits]`): retry after this many seconds.
    #[error("rate limited by wxgate")]
    TooManyRequests { retry_after: u64 },
    /// `/auth/verify` asked by a peer that is not in `server.trusted_proxies`.
    #[error("forward-auth request from an untrusted peer")]
    UntrustedProxy,
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
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Error::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::InvalidCode | Error::CodeUsed => StatusCode::BAD_REQUEST,
            Error::LoginBlocked | Error::UnionidUnavailable => StatusCode::FORBIDDEN,
            Error::RateLimited | Error::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::WechatUnavailable(WechatError::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            Error::WechatUnavailable(WechatError::Api { errcode: -1 }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::WechatUnavailable(WechatError::Api { .. } | WechatError::Unavailable(_)) => {
                StatusCode::BAD_GATEWAY
            }
            Error::IdentityUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::DecryptFailed(_) | Error::WatermarkMismatch(_) | Error::SignatureMismatch => {
                StatusCode::BAD_REQUEST
            }
            Error::InvalidState | Error::BadReturnTo => StatusCode::BAD_REQUEST,
            Error::LoginDeclined
            | Error::SnapshotUser
            | Error::CrossOrigin
            | Error::UntrustedProxy => StatusCode::FORBIDDEN,
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
            Error::BadRequest(_) => "bad_request",
            Error::PayloadTooLarge => "payload_too_large",
            Error::MethodNotAllowed(_) => "method_not_allowed",
            Error::InvalidCode => "invalid_code",
            Error::CodeUsed => "code_used",
            Error::LoginBlocked => "login_blocked",
            Error::RateLimited => "rate_limited",
            Error::WechatUnavailable(_) => "wechat_unavailable",
            Error::UnionidUnavailable => "unionid_unavailable",
            Error::IdentityUnavailable(_) => "identity_unavailable",
            Error::DecryptFailed(_) => "decrypt_failed",
            Error::WatermarkMismatch(_) => "watermark_mismatch",
            Error::SignatureMismatch => "signature_mismatch",
            Error::InvalidState => "invalid_state",
            Error::LoginDeclined => "login_declined",
            Error::SnapshotUser => "snapshot_user",
            Error::BadReturnTo => "invalid_return_to",
            Error::CrossOrigin => "cross_origin",
            Error::UntrustedProxy => "untrusted_proxy",
            Error::RequestTimeout => "request_timeout",
            Error::TooManyRequests { .. } => "too_many_requests",
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
            Error::InvalidToken => "The token is not valid or no longer accepted; log in again.",
            Error::TokenExpired => "The access token has expired; refresh it or log in again.",
            Error::AuthUnavailable(_) => {
                "Authentication is temporarily unavailable; try again shortly."
            }
            Error::UpstreamUnavailable(_) => "The backend service is unavailable.",
            Error::UpstreamTimeout => "The backend service did not answer in time.",
            Error::BadRequest(message) => message,
            Error::PayloadTooLarge => "The request body is too large.",
            Error::MethodNotAllowed(_) => "This endpoint does not accept that method.",
            Error::InvalidCode => "The login code is invalid or expired; call wx.login() again.",
            Error::CodeUsed => "The login code was already used; call wx.login() again.",
            Error::LoginBlocked => "WeChat blocked this login for risk control.",
            Error::RateLimited => "Too many logins for this user; try again in a minute.",
            Error::WechatUnavailable(_) => {
                "WeChat is unavailable; call wx.login() and try again shortly."
            }
            Error::UnionidUnavailable => {
                "No unionid is known for this user, and this gateway identifies users by unionid."
            }
            Error::IdentityUnavailable(_) => "Login is temporarily unavailable; try again shortly.",
            Error::DecryptFailed(CryptoError::Base64(_)) => {
                "encryptedData, iv or the session_key is not valid base64."
            }
            Error::DecryptFailed(CryptoError::KeyLength) => {
                "The session_key is not 16 bytes; log in again."
            }
            Error::DecryptFailed(CryptoError::IvLength) => "iv is not 16 bytes.",
            Error::DecryptFailed(CryptoError::CiphertextLength) => {
                "encryptedData is not a non-zero multiple of 16 bytes."
            }
            Error::DecryptFailed(CryptoError::Padding) => {
                "encryptedData does not decrypt with this session's keys; call wx.checkSession() and log in again if it failed."
            }
            Error::DecryptFailed(CryptoError::NotJson) => {
                "The decrypted data is not a JSON object."
            }
            Error::WatermarkMismatch(WatermarkError::OtherApp) => {
                "The data was issued for another app or user."
            }
            Error::WatermarkMismatch(WatermarkError::Stale) => {
                "The data is too old (or from the future); fetch it again."
            }
            Error::WatermarkMismatch(WatermarkError::Missing) => "The data carries no watermark.",
            Error::SignatureMismatch => {
                "signature is not the SHA-1 of rawData and the session_key."
            }
            Error::InvalidState => {
                "This login link is invalid, expired, already used or from another browser; start the login again."
            }
            Error::LoginDeclined => "The WeChat login was declined.",
            Error::SnapshotUser => {
                "This page is open in WeChat's preview (snapshot) mode, which has no real user; open it in full to log in."
            }
            Error::BadReturnTo => {
                "return_to must be a path on this site, like /orders?id=1 (not //host, /\\host or a URL)."
            }
            Error::CrossOrigin => {
                "A request from another origin cannot use the session cookie; send the access token instead."
            }
            Error::RequestTimeout => "The request body stopped arriving; send it again.",
            Error::TooManyRequests { .. } => {
                "Too many requests from this client; retry after the seconds in Retry-After."
            }
            Error::UntrustedProxy => {
                "Forward authentication answers only the proxies listed in server.trusted_proxies."
            }
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
        match self {
            Error::MethodNotAllowed(allow) => {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            // WeChat's limit is per user per minute.
            Error::RateLimited => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            }
            Error::TooManyRequests { retry_after } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            _ => {}
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
    match err {
        Error::IdentityUnavailable(_) => metrics.count_store_error("identity"),
        Error::AuthUnavailable(_) => metrics.count_store_error("session"),
        _ => {}
    }
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
