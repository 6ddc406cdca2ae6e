//! Access and refresh tokens.
//!
//! - Access token: a JWT (RFC 7519), HS256 with `session.signing_key`. It only names a session: whether
//!   the session is still alive is asked on every request, so a logout takes effect at once.
//! - Refresh token: 16 bytes of session id and 32 random bytes, base64url. Only the SHA-256 of the random
//!   part is stored; it is rotated on every use.
//!
//! wxgate both mints and verifies its access tokens, so verification accepts exactly the shape it
//! mints and nothing else: the header segment must be byte-for-byte the one wxgate writes
//! (`{"typ":"JWT","alg":"HS256"}`), which pins the algorithm more tightly than parsing `alg` could (no
//! `none`, no RS/HS confusion, no `kid`, `jku` or `crit` to interpret). The signature is checked
//! before the claims are even decoded, in constant time, with the key's HMAC state prepared once.
//! This is a few hundred nanoseconds on the request path where a general JWT library, which parses
//! the header and re-keys the HMAC for every token, takes microseconds. The tests check the format
//! against the `jsonwebtoken` crate in both directions.

use std::borrow::Cow;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::Secret;

/// Seconds of clock difference accepted on `exp` and `iat` (between instances of a cluster).
pub const LEEWAY_SECS: u64 = 5;

/// The header segment of every access token: base64url of `{"typ":"JWT","alg":"HS256"}`.
const HEADER: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9";
/// An HS256 signature in base64url: 32 bytes, 43 characters.
const SIGNATURE_LEN: usize = 43;
/// The longest claims segment accepted. wxgate's claims are about 130 characters; anything much
/// longer is not ours, and is refused before it is decoded.
const MAX_CLAIMS_LEN: usize = 512;

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
        // 22 characters hold exactly 16 bytes; the decoder refuses non-canonical trailing bits, so
        // one session id has one spelling. (The buffer has room for the decoder's estimate.)
        let mut bytes = [0u8; 18];
        if text.len() != 22 || URL_SAFE_NO_PAD.decode_slice(text, &mut bytes).ok()? != 16 {
            return None;
        }
        Some(SessionId(bytes[..16].try_into().ok()?))
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

/// Unpredictable bytes for session ids and refresh tokens: rand's thread-local ChaCha12 generator,
/// seeded from (and periodically reseeded by) the operating system. It is a CSPRNG, and answers
/// without the two `getrandom` system calls a login would otherwise make.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use rand::Rng;
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// The claims as read back: borrowed from the decoded segment where no JSON escape forces a copy.
#[derive(Deserialize)]
struct Claims<'a> {
    #[serde(borrow)]
    sub: Cow<'a, str>,
    #[serde(borrow)]
    sid: Cow<'a, str>,
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
    /// HMAC-SHA256 already keyed: cloning it skips the two key-schedule compressions per token.
    mac: Hmac<Sha256>,
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
        Tokens {
            mac: Hmac::new_from_slice(signing_key.expose().as_bytes())
                .expect("HMAC takes keys of any length"),
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
        // The claims' JSON written by hand, as `MintedClaims` would serialise (a test holds them
        // equal): serde's escaping pass over every character cost more than the rest together.
        let mut claims = Vec::with_capacity(user_id.len() + 96);
        let mut number = itoa::Buffer::new();
        claims.extend_from_slice(b"{\"sub\":");
        crate::body::push_json_str(&mut claims, user_id);
        claims.extend_from_slice(b",\"sid\":");
        crate::body::push_json_str(&mut claims, &sid.encode());
        claims.extend_from_slice(b",\"iat\":");
        claims.extend_from_slice(number.format(now).as_bytes());
        claims.extend_from_slice(b",\"exp\":");
        claims.extend_from_slice(number.format(expires_at).as_bytes());
        claims.push(b'}');
        let mut token = String::with_capacity(HEADER.len() + claims.len() * 4 / 3 + 48);
        token.push_str(HEADER);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&claims, &mut token);
        let mut mac = self.mac.clone();
        mac.update(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(mac.finalize().into_bytes(), &mut token);
        token
    }

    /// Verifies the header, the signature and the expiry, in that order. `now` is passed in so expiry
    /// can be tested.
    pub fn verify_access(&self, token: &str, now: u64) -> Result<AccessClaims, TokenError> {
        let claims = self.verified_claims(token)?;
        let mut buf = [0u8; MAX_CLAIMS_LEN * 3 / 4 + 3];
        let len = URL_SAFE_NO_PAD
            .decode_slice(claims, &mut buf)
            .map_err(|_| TokenError::Invalid)?;
        let claims: Claims<'_> =
            serde_json::from_slice(&buf[..len]).map_err(|_| TokenError::Invalid)?;
        if claims.exp.saturating_add(LEEWAY_SECS) <= now {
            return Err(TokenError::Expired);
        }
        if claims.iat > now + LEEWAY_SECS || claims.iat > claims.exp {
            return Err(TokenError::Invalid);
        }
        let sid = SessionId::decode(&claims.sid).ok_or(TokenError::Invalid)?;
        Ok(AccessClaims {
            sid,
            user_id: claims.sub.into_owned(),
            expires_at: claims.exp,
        })
    }

    /// The claims segment of `token`, once its header is wxgate's and its signature is right.
    fn verified_claims<'t>(&self, token: &'t str) -> Result<&'t str, TokenError> {
        let rest = token
            .strip_prefix(HEADER)
            .and_then(|rest| rest.strip_prefix('.'))
            .ok_or(TokenError::Invalid)?;
        // The signature is the last 43 characters, after a dot.
        let split = rest
            .len()
            .checked_sub(SIGNATURE_LEN + 1)
            .ok_or(TokenError::Invalid)?;
        let claims = rest.get(..split).ok_or(TokenError::Invalid)?;
        let signature = &rest.as_bytes()[split..];
        if claims.is_empty() || claims.len() > MAX_CLAIMS_LEN || signature[0] != b'.' {
            return Err(TokenError::Invalid);
        }
        let signed = &token[..HEADER.len() + 1 + claims.len()];
        let mut mac = self.mac.clone();
        mac.update(signed.as_bytes());
        // The right signature, spelled as wxgate spells it, against the one presented: base64url
        // without padding spells 32 bytes one way only, so this is the comparison of the bytes
        // with no decoding of what the client sent. Constant time: how much of a forged signature
        // matched must not show in the timing.
        let mut expected = [0u8; SIGNATURE_LEN];
        let written = URL_SAFE_NO_PAD
            .encode_slice(mac.finalize().into_bytes(), &mut expected)
            .map_err(|_| TokenError::Invalid)?;
        debug_assert_eq!(written, SIGNATURE_LEN);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            &expected[..],
            &signature[1..],
        )) {
            return Err(TokenError::Invalid);
        }
        Ok(claims)
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

    /// The format is JWT as the `jsonwebtoken` crate reads and writes it, both ways, so tokens minted
    /// before and after this implementation stay valid and any JWT library can inspect them.
    #[test]
    fn tokens_are_the_jwts_a_jwt_library_makes_and_reads() {
        use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
        let key = "k".repeat(40);
        let t = tokens();
        let sid = SessionId::random();
        let now = jsonwebtoken::get_current_timestamp();
        let ours = t.mint_access(sid, "u_1", now);
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "iat", "sub"]);
        let read = jsonwebtoken::decode::<serde_json::Value>(
            &ours,
            &DecodingKey::from_secret(key.as_bytes()),
            &validation,
        )
        .unwrap();
        assert_eq!(read.claims["sub"], "u_1");
        assert_eq!(read.claims["sid"], sid.encode());
        assert_eq!(read.claims["exp"], now + 7200);

        let theirs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "u_2", "sid": sid.encode(), "iat": now, "exp": now + 60}),
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap();
        let claims = t.verify_access(&theirs, now).unwrap();
        assert_eq!((claims.sid, claims.user_id.as_str()), (sid, "u_2"));
    }

    /// Only the exact header wxgate writes is accepted: the same algorithm spelled another way, or
    /// with more fields for a verifier to interpret, is not a wxgate token even when signed with
    /// the right key.
    #[test]
    fn any_other_header_is_refused_even_when_properly_signed() {
        let key = "k".repeat(40);
        let t = tokens();
        let sid = SessionId::random();
        let claims = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"sub":"u_1","sid":"{}","iat":{NOW},"exp":{}}}"#,
            sid.encode(),
            NOW + 60
        ));
        let sign = |header: &str| {
            let signed = format!("{}.{claims}", URL_SAFE_NO_PAD.encode(header));
            let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
            mac.update(signed.as_bytes());
            format!(
                "{signed}.{}",
                URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
            )
        };
        assert!(
            t.verify_access(&sign(r#"{"typ":"JWT","alg":"HS256"}"#), NOW)
                .is_ok()
        );
        for header in [
            r#"{"alg":"HS256","typ":"JWT"}"#,
            r#"{"alg":"HS256"}"#,
            r#"{"typ":"JWT","alg":"HS256","kid":"../../key"}"#,
            r#"{"typ":"JWT","alg":"HS256","crit":["exp"]}"#,
            r#"{"typ":"JWT","alg":"hs256"}"#,
        ] {
            assert_eq!(
                t.verify_access(&sign(header), NOW),
                Err(TokenError::Invalid),
                "{header}"
            );
        }
    }

    #[test]
    fn a_signature_spelled_with_other_trailing_bits_is_refused() {
        let t = tokens();
        let token = t.mint_access(SessionId::random(), "u_1", NOW);
        // The last of 43 characters carries 4 bits of signature and 2 unused ones: flipping an unused
        // bit decodes to the same bytes in a lenient decoder. One token has one spelling here.
        let last = token.chars().last().unwrap();
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let index = alphabet.find(last).unwrap();
        let twin = alphabet.chars().nth(index ^ 1).unwrap();
        let respelled = format!("{}{twin}", &token[..token.len() - 1]);
        assert_eq!(t.verify_access(&respelled, NOW), Err(TokenError::Invalid));
    }

    #[test]
    fn multibyte_text_where_the_signature_would_start_is_refused_not_a_panic() {
        let t = tokens();
        let token = t.mint_access(SessionId::random(), "u_1", NOW);
        // A two-byte character across the boundary between claims and signature.
        let cut = token.len() - SIGNATURE_LEN - 1;
        let odd = format!("{}é{}", &token[..cut], &token[cut + 1..]);
        assert_eq!(t.verify_access(&odd, NOW), Err(TokenError::Invalid));
        let short = format!("{HEADER}.é");
        assert_eq!(t.verify_access(&short, NOW), Err(TokenError::Invalid));
    }

    /// The claims as serde would write them: what the hand-written claims must equal.
    #[derive(serde::Serialize)]
    struct MintedClaims<'a> {
        sub: &'a str,
        sid: &'a str,
        iat: u64,
        exp: u64,
    }

    proptest::proptest! {
        /// The claims written by hand are the bytes serde writes, for any user id and times.
        #[test]
        fn minted_claims_are_what_serde_writes(
            user_id in proptest::prop_oneof![".{0,60}", "u_[0-9a-f]{32}"],
            now in 0u64..u64::MAX / 2,
            ttl in 0u64..u64::MAX / 2,
        ) {
            let t = tokens();
            let sid = SessionId::random();
            let token = t.mint_access_until(sid, &user_id, now, now + ttl);
            let segment = token.split('.').nth(1).unwrap();
            let claims = URL_SAFE_NO_PAD.decode(segment).unwrap();
            let serde = serde_json::to_vec(&MintedClaims {
                sub: &user_id,
                sid: &sid.encode(),
                iat: now,
                exp: now + ttl,
            })
            .unwrap();
            proptest::prop_assert_eq!(claims, serde);
        }
    }

    proptest::proptest! {
        /// Whatever arrives as a token, verification answers without panicking, and a valid token
        /// changed in any one place is refused.
        #[test]
        fn arbitrary_input_and_any_one_change_are_refused(
            junk in ".{0,300}",
            position in 0usize..200,
            replacement in proptest::char::range('!', '~'),
        ) {
            let t = tokens();
            proptest::prop_assert!(t.verify_access(&junk, NOW).is_err());
            let token = t.mint_access(SessionId::random(), "u_1", NOW);
            let position = position % token.len();
            let original = token.as_bytes()[position] as char;
            proptest::prop_assume!(original != replacement);
            let mut changed = token.clone();
            changed.replace_range(position..position + 1, &replacement.to_string());
            proptest::prop_assert!(t.verify_access(&changed, NOW).is_err(), "{changed}");
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
