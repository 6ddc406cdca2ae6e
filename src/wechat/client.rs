//! The client of the WeChat server API. It speaks the protocol as WeChat really behaves
//! (`shared/docs/wechat-protocol.md`): business errors arrive as HTTP 200 with an `errcode` that may be
//! absent, a number or a string; the Content-Type is unreliable; anything that is not a 200 with a JSON
//! body is an infrastructure failure.
//!
//! Secrets travel in query strings (WeChat's design), so no error from this module ever carries a URL:
//! transport errors are stripped of theirs before they are kept.

use std::time::Duration;

use http::Uri;
use serde::Deserialize;
use serde_json::Value;

use crate::config::{Secret, WechatConfig};

/// What `jscode2session` returns on success.
#[derive(Clone)]
pub struct CodeSession {
    pub openid: String,
    pub session_key: Secret,
    /// Present only when the mini program is bound to an Open Platform account.
    pub unionid: Option<String>,
}

impl std::fmt::Debug for CodeSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeSession")
            .field("openid", &self.openid)
            .field("session_key", &self.session_key)
            .field("unionid", &self.unionid)
            .finish()
    }
}

/// Why a WeChat call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WechatError {
    /// WeChat answered with a business error. `errcode` is kept as a number: unknown codes must parse.
    #[error("WeChat answered errcode {errcode}")]
    Api { errcode: i64 },
    /// WeChat could not be asked or gave no usable answer (refused, reset, non-200, HTML, bad JSON).
    #[error("WeChat unavailable: {0}")]
    Unavailable(String),
    /// WeChat did not answer in time. The request may or may not have been processed.
    #[error("WeChat timed out")]
    Timeout,
}

/// The WeChat API client; cheap to clone.
#[derive(Clone)]
pub struct WechatClient {
    http: reqwest::Client,
    base: String,
}

impl WechatClient {
    pub fn new(config: &WechatConfig) -> Result<Self, WechatError> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("wxgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                WechatError::Unavailable(format!(
                    "cannot build the HTTP client: {}",
                    e.without_url()
                ))
            })?;
        Ok(WechatClient {
            http,
            base: base_url(&config.api_base),
        })
    }

    /// `GET /sns/jscode2session`: exchanges a `wx.login()` code for the user's openid, session_key and,
    /// for bound apps, unionid.
    pub async fn jscode2session(
        &self,
        appid: &str,
        secret: &Secret,
        code: &str,
    ) -> Result<CodeSession, WechatError> {
        #[derive(Deserialize)]
        struct Reply {
            openid: String,
            session_key: String,
            unionid: Option<String>,
        }
        let url = format!("{}/sns/jscode2session", self.base);
        let query = [
            ("appid", appid),
            ("secret", secret.expose()),
            ("js_code", code),
            ("grant_type", "authorization_code"),
        ];
        let body = self.get(&url, &query).await?;
        let reply: Reply = serde_json::from_value(body).map_err(|_| {
            WechatError::Unavailable("jscode2session reply lacks openid or session_key".into())
        })?;
        if reply.openid.is_empty() || reply.session_key.is_empty() {
            return Err(WechatError::Unavailable(
                "jscode2session reply has an empty openid or session_key".into(),
            ));
        }
        Ok(CodeSession {
            openid: reply.openid,
            session_key: Secret::new(reply.session_key),
            unionid: reply.unionid.filter(|u| !u.is_empty()),
        })
    }

    /// Sends a GET and returns the JSON body of a successful (errcode absent or 0) reply.
    async fn get(&self, url: &str, query: &[(&str, &str)]) -> Result<Value, WechatError> {
        let mut target = String::with_capacity(url.len() + 128);
        target.push_str(url);
        target.push('?');
        target.push_str(
            &form_urlencoded::Serializer::new(String::new())
                .extend_pairs(query)
                .finish(),
        );
        let response = self
            .http
            .get(&target)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(transport_error)?;
        parse_reply(status.as_u16(), &bytes)
    }
}

/// Interprets a WeChat reply: a non-200 status or a body that is not a JSON object is an infrastructure
/// failure; a non-zero `errcode` (number or string) is a business error; anything else is success,
/// whatever the Content-Type said.
pub fn parse_reply(status: u16, body: &[u8]) -> Result<Value, WechatError> {
    if status != 200 {
        return Err(WechatError::Unavailable(format!("HTTP status {status}")));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| WechatError::Unavailable("reply is not JSON".into()))?;
    if !value.is_object() {
        return Err(WechatError::Unavailable(
            "reply is not a JSON object".into(),
        ));
    }
    match errcode(&value) {
        Ok(0) => Ok(value),
        Ok(errcode) => Err(WechatError::Api { errcode }),
        Err(()) => Err(WechatError::Unavailable(
            "errcode is neither a number nor a numeric string".into(),
        )),
    }
}

/// `errcode` as WeChat sends it: absent (success), a number, or a numeric string.
fn errcode(value: &Value) -> Result<i64, ()> {
    match value.get("errcode") {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n.as_i64().ok_or(()),
        Some(Value::String(s)) => s.trim().parse().map_err(|_| ()),
        Some(_) => Err(()),
    }
}

/// A transport error without its URL (which holds the secret and the code).
fn transport_error(e: reqwest::Error) -> WechatError {
    if e.is_timeout() {
        return WechatError::Timeout;
    }
    let kind = if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "reply body broken"
    } else {
        "request failed"
    };
    WechatError::Unavailable(format!("{kind}: {}", e.without_url()))
}

fn base_url(uri: &Uri) -> String {
    uri.to_string().trim_end_matches('/').to_owned()
}

/// rustls needs a process-wide crypto provider; wxgate uses ring (no C toolchain beyond cc needed).
/// Installing twice is harmless: the first one stays.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errcode_absent_or_zero_is_success() {
        assert!(parse_reply(200, br#"{"openid":"o","session_key":"k"}"#).is_ok());
        assert!(parse_reply(200, br#"{"errcode":0,"errmsg":"ok","x":1}"#).is_ok());
        assert!(parse_reply(200, br#"{"errcode":"0","errmsg":"ok"}"#).is_ok());
    }

    #[test]
    fn errcode_as_number_or_string_and_unknown_codes_parse() {
        let code = |body: &[u8]| match parse_reply(200, body) {
            Err(WechatError::Api { errcode }) => errcode,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            code(br#"{"errcode":40029,"errmsg":"invalid code, rid: 6129ee10-272863a4-64d75414"}"#),
            40029
        );
        assert_eq!(
            code(br#"{"errcode":"40163","errmsg":"code been used"}"#),
            40163
        );
        assert_eq!(code(br#"{"errcode":-1,"errmsg":"system error"}"#), -1);
        assert_eq!(
            code(br#"{"errcode":99999,"errmsg":"something new"}"#),
            99999
        );
    }

    #[test]
    fn non_200_html_and_garbage_are_unavailable() {
        for (status, body) in [
            (502, &br#"{"errcode":0}"#[..]),
            (200, b"<html><body>502 Bad Gateway</body></html>"),
            (200, b""),
            (200, b"[1,2]"),
            (200, br#"{"errcode":"forty"}"#),
            (200, br#"{"errcode":1.5}"#),
        ] {
            assert!(
                matches!(parse_reply(status, body), Err(WechatError::Unavailable(_))),
                "{status} {:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
