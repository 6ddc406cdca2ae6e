//! Who a request comes from: the [`Authenticator`] seam the proxy asks on every non-public route, and
//! wxgate's own endpoints under the auth prefix (`/auth/...`, in [`service`] and [`login`]), which are
//! answered here and never forwarded.

pub mod login;
pub mod oauth;
pub mod open_data;
pub mod phone;
pub mod service;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::HeaderMap;
use http::header::AUTHORIZATION;

use crate::error::Error;
use crate::session::{Session, SessionApp, SessionId, SessionIds};

/// A proven caller, as the backend will see it in the identity headers: the live session the
/// credential names (shared, not copied: a request costs a reference count, not five strings).
#[derive(Clone)]
pub struct Identity(Arc<Session>);

impl Identity {
    /// The identity a live session proves.
    pub fn of(session: Arc<Session>) -> Self {
        Identity(session)
    }

    /// An identity that is no wxgate session's, for authenticators of other kinds and for tests.
    /// `None` when an id is empty or implausibly long.
    pub fn new(appid: &str, ids: SessionIds<'_>) -> Option<Self> {
        let session = Session::new(
            SessionId([0; 16]),
            SessionApp::new("", appid),
            ids,
            0,
            u64::MAX,
            [0; 32],
        )
        .ok()?;
        Some(Identity(Arc::new(session)))
    }

    pub fn user_id(&self) -> &str {
        self.0.user_id()
    }

    pub fn appid(&self) -> &str {
        self.0.appid()
    }

    pub fn openid(&self) -> &str {
        self.0.openid()
    }

    pub fn unionid(&self) -> Option<&str> {
        self.0.unionid()
    }

    /// Verified with `/auth/phone`; sent upstream only when `[headers] phone` is configured.
    pub fn phone(&self) -> Option<&str> {
        self.0.phone()
    }

    /// user_id, openid, unionid and phone as bytes, an absent one empty.
    pub fn id_bytes(&self) -> [&[u8]; 4] {
        self.0.id_bytes()
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("user_id", &self.user_id())
            .field("appid", &self.appid())
            .finish_non_exhaustive()
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        (
            self.user_id(),
            self.appid(),
            self.openid(),
            self.unionid(),
            self.phone(),
        ) == (
            other.user_id(),
            other.appid(),
            other.openid(),
            other.unionid(),
            other.phone(),
        )
    }
}

impl Eq for Identity {}

/// The future an [`Authenticator`] returns.
pub type AuthFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Identity>, Error>> + Send + 'a>>;

/// Decides who presents a credential: the bearer token, or the session cookie of a browser login.
///
/// `Ok(None)`: this authenticator recognises no credential (the request is anonymous).
/// `Ok(Some(_))`: the credential is proven. `Err(_)`: the credential is not acceptable
/// (`InvalidToken`, `TokenExpired`) or the decision could not be made (`AuthUnavailable`) — the proxy
/// fails closed on every error. A request without any credential never reaches the authenticator.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a>;
}

/// The authenticator before any login method is configured: no request carries an identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Anonymous;

impl Authenticator for Anonymous {
    fn authenticate<'a>(&'a self, _token: &'a str) -> AuthFuture<'a> {
        Box::pin(std::future::ready(Ok(None)))
    }
}

/// The token of an `Authorization: Bearer <token>` header (RFC 6750 §2.1; the scheme is
/// case-insensitive). `None` when there is no such header or it uses another scheme.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    bearer_in(headers.get(AUTHORIZATION)?.to_str().ok()?)
}

/// The token of one `Authorization` value, when its scheme is `Bearer`.
pub fn bearer_in(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// Whether an `Authorization` header carries wxgate's bearer scheme; such headers are wxgate's
/// credentials and are never forwarded.
pub fn is_bearer(value: &http::HeaderValue) -> bool {
    value
        .as_bytes()
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case(b"bearer "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with_auth(value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn bearer_tokens_are_found_case_insensitively() {
        assert_eq!(bearer_token(&with_auth("Bearer abc.def")), Some("abc.def"));
        assert_eq!(bearer_token(&with_auth("bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&with_auth("Basic dXNlcjpwdw==")), None);
        assert_eq!(bearer_token(&with_auth("Bearer ")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
        assert!(is_bearer(&HeaderValue::from_static("BEARER x")));
        assert!(!is_bearer(&HeaderValue::from_static("Basic x")));
    }
}
