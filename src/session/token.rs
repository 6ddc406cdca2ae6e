//! Access and refresh tokens.
//!
//! - Access token: a JWT, HS256 with `session.signing_key`. The algorithm is pinned (a token naming
//!   `none`, `RS256` or anything else is refused before any key is used), `exp`, `iat`, `sub` and `sid`
//!   are required, and expiry is checked with an explicit leeway. It only names a session: whether the
//!   session is still alive is asked on every request, so a logout takes effect at once.
//! - Refresh token: 16 bytes of session id and 32 random bytes, base64url. Only the SHA-256 of the random
//!   part is stored; it is rotated on every use.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Secret;

/// Seconds of clock difference accepted on `exp` and `iat` (between instances of a cluster).
pub const LEEWAY_SECS: u64 = 5;

/// A session id: 16 random bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    pub fn random() -> Self {
        SessionId(random_bytes())
    }

    /// The id as it appears in tokens: base64url, 22 characters.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    pub fn decode(text: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        Some(SessionId(bytes.try_into().ok()?))
    }
}

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A session id is not a credential on its own, but keep logs free of it all the same.
        f.write_str("SessionId(..)")
    }
}

/// SHA-256 of a refresh token's random part: what the session store keeps.
pub type RefreshHash = [u8; 32];

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the operating system provides randomness");
    bytes
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    sid: String,
    iat: u64,
    exp: u64,
}

/// Why an access token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("token invalid")]
    Invalid,
}

/// Mints and verifies tokens with the configured key.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    header: Header,
    access_ttl: u64,
}

/// A verified access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessClaims {
    pub sid: SessionId,
    pub user_id: String,
    pub expires_at: u64,
}

impl Tokens {
    pub fn new(signing_key: &Secret, access_ttl_secs: u64) -> Self {
        let key = signing_key.expose().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "iat", "sub"]);
        Tokens {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            validation,
            header: Header::new(Algorithm::HS256),
            access_ttl: access_ttl_secs,
        }
    }

    pub fn access_ttl(&self) -> u64 {
        self.access_ttl
    }

    /// An access token for `user_id` in session `sid`, valid from `now` for the access TTL.
    pub fn mint_access(&self, sid: SessionId, user_id: &str, now: u64) -> String {
        self.mint_access_until(sid, user_id, now, now + self.access_ttl)
    }

    /// An access token that lives until `expires_at` (the browser session cookie, which lives as long
    /// as its session).
    pub fn mint_access_until(
        &self,
        sid: SessionId,
        user_id: &str,
        now: u64,
        expires_at: u64,
    ) -> String {
        let claims = Claims {
            sub: user_id.to_owned(),
            sid: sid.encode(),
            iat: now,
            exp: expires_at,
        };
        jsonwebtoken::encode(&self.header, &claims, &self.encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// Verifies signature, algorithm and expiry. `now` is passed in so expiry can be tested.
    pub fn verify_access(&self, token: &str, now: u64) -> Result<AccessClaims, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?;
        let claims = data.claims;
        // jsonwebtoken checks `exp` against the system clock; check both bounds against `now` too, so
        // the decision does not depend on which clock is asked.
        if claims.exp + LEEWAY_SECS <= now {
            return Err(TokenError::Expired);
        }
        if claims.iat > now + LEEWAY_SECS {
            return Err(TokenError::Invalid);
        }
        let sid = SessionId::decode(&claims.sid).ok_or(TokenError::Invalid)?;
        Ok(AccessClaims {
            sid,
            user_id: claims.sub,
            expires_at: claims.exp,
        })
    }
}

/// A new refresh token for `sid`, and the hash to store.
pub fn new_refresh_token(sid: SessionId) -> (String, RefreshHash) {
    let secret: [u8; 32] = random_bytes();
    let mut raw = [0u8; 48];
    raw[..16].copy_from_slice(&sid.0);
    raw[16..].copy_from_slice(&secret);
    (URL_SAFE_NO_PAD.encode(raw), Sha256::digest(secret).into())
}

/// The session and hash a refresh token names; `None` for anything that is not one of ours.
pub fn parse_refresh_token(token: &str) -> Option<(SessionId, RefreshHash)> {
    if token.len() != 64 {
        return None;
    }
    let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
    let raw: [u8; 48] = raw.try_into().ok()?;
    let sid = SessionId(raw[..16].try_into().ok()?);
    Some((sid, Sha256::digest(&raw[16..]).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn tokens() -> Tokens {
        Tokens::new(&Secret::new("k".repeat(40)), 7200)
    }

    #[test]
    fn a_minted_token_verifies_until_it_expires() {
        let t = tokens();
        let sid = SessionId::random();
        let token = t.mint_access(sid, "u_1", NOW);
        let claims = t.verify_access(&token, NOW).unwrap();
        assert_eq!(
            (claims.sid, claims.user_id.as_str(), claims.expires_at),
            (sid, "u_1", NOW + 7200)
        );
        assert!(
            t.verify_access(&token, NOW + 7200 + LEEWAY_SECS - 1)
                .is_ok(),
            "leeway applies"
        );
        assert_eq!(
            t.verify_access(&token, NOW + 7200 + LEEWAY_SECS),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn a_token_from_the_future_is_refused() {
        let t = tokens();
        let token = t.mint_access(SessionId::random(), "u_1", NOW + 60);
        assert_eq!(t.verify_access(&token, NOW), Err(TokenError::Invalid));
    }

    #[test]
    fn wrong_key_wrong_algorithm_and_tampering_are_refused() {
        let t = tokens();
        let sid = SessionId::random();
        let now = jsonwebtoken::get_current_timestamp();
        let good = t.mint_access(sid, "u_1", now);
        let other_key =
            Tokens::new(&Secret::new("x".repeat(40)), 7200).mint_access(sid, "u_1", now);
        assert_eq!(t.verify_access(&other_key, now), Err(TokenError::Invalid));

        let claims = format!(
            r#"{{"sub":"u_1","sid":"{}","iat":{now},"exp":{}}}"#,
            sid.encode(),
            now + 60
        );
        let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
        // alg "none" with no signature.
        let none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&claims));
        assert_eq!(t.verify_access(&none, now), Err(TokenError::Invalid));
        // HS/RS confusion: an RS256 header, signed with HMAC over the key as if it were a public key.
        let rs = format!(
            "{}.{}.{}",
            b64(r#"{"alg":"RS256","typ":"JWT"}"#),
            b64(&claims),
            good.rsplit('.').next().unwrap()
        );
        assert_eq!(t.verify_access(&rs, now), Err(TokenError::Invalid));
        // Another user's claims under this signature.
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged_claims = b64(&claims.replace("u_1", "u_2"));
        parts[1] = &forged_claims;
        assert_eq!(
            t.verify_access(&parts.join("."), now),
            Err(TokenError::Invalid)
        );
        for junk in ["", "abc", "a.b.c", "Bearer x"] {
            assert_eq!(
                t.verify_access(junk, now),
                Err(TokenError::Invalid),
                "{junk}"
            );
        }
    }

    #[test]
    fn refresh_tokens_name_their_session_and_hash_their_secret() {
        let sid = SessionId::random();
        let (token, hash) = new_refresh_token(sid);
        assert_eq!(token.len(), 64);
        assert_eq!(parse_refresh_token(&token), Some((sid, hash)));
        let (other, other_hash) = new_refresh_token(sid);
        assert_ne!((other, other_hash), (token.clone(), hash));
        assert_eq!(parse_refresh_token(&token[1..]), None);
        assert_eq!(parse_refresh_token(&"!".repeat(64)), None);
    }
}
