//! The client of the WeChat server API. It speaks the protocol as WeChat really behaves
//! (`shared/docs/wechat-protocol.md`): business errors arrive as HTTP 200 with an `errcode` that may be
//! absent, a number or a string; the Content-Type is unreliable; anything that is not a 200 with a JSON
//! body is an infrastructure failure.
//!
//! Secrets travel in query strings (WeChat's design), so no error from this module ever carries a URL:
//! none is ever put in one.
//!
//! The transport ([`super::transport`]) is HTTP/1.1 written and read as text on keep-alive
//! connections, over TLS (rustls, with the Mozilla roots of webpki-roots) or plain HTTP (a mock), in
//! the task that asked: a login's call to WeChat costs a few thousand instructions and no hop between
//! tasks, instead of a general client's URL parsing, redirect and retry layers and connection tasks,
//! and a written request is never sent twice (a code sent twice is a code used).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::transport::{Reply, Tls, Transport};

use crate::config::{Secret, WechatConfig};
use crate::session::MAX_ID_LEN;

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

/// What `sns/oauth2/access_token` returns on success (apps, websites, official accounts).
#[derive(Clone)]
pub struct OauthGrant {
    pub openid: String,
    /// Absent for official-account `snsapi_base` logins and for apps not bound to an Open Platform
    /// account.
    pub unionid: Option<String>,
    /// The scope the user granted (`snsapi_base`, `snsapi_userinfo`, `snsapi_login`).
    pub scope: String,
    /// `is_snapshotuser: 1`: a virtual user of an official-account page opened in snapshot mode; its
    /// ids are fake and must never be linked.
    pub snapshot_user: bool,
    /// The user access token, good for `sns/userinfo`; never stored.
    pub access_token: Secret,
}

impl std::fmt::Debug for OauthGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OauthGrant")
            .field("openid", &self.openid)
            .field("unionid", &self.unionid)
            .field("scope", &self.scope)
            .field("snapshot_user", &self.snapshot_user)
            .finish_non_exhaustive()
    }
}

/// What `sns/userinfo` returns: the profile the user typed in WeChat (gender and region have been
/// empty since 2021, so they are not kept).
#[derive(Debug, Clone, Deserialize)]
pub struct SnsUser {
    #[serde(default)]
    pub nickname: String,
    #[serde(default)]
    pub headimgurl: String,
    pub unionid: Option<String>,
}

/// A phone number as WeChat returns it (legacy decrypted data has the same fields).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PhoneInfo {
    /// With the country code for numbers outside mainland China.
    pub phone_number: String,
    pub pure_phone_number: String,
    /// A string or a number, depending on the day.
    #[serde(deserialize_with = "string_or_number")]
    pub country_code: String,
    pub watermark: Option<Value>,
}

fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(serde::de::Error::custom(
            "countryCode is neither a string nor a number",
        )),
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
    transport: Arc<Transport>,
    /// The path `wechat.api_base` has, without its trailing slash.
    base: String,
    timeout: Duration,
    /// Calls are counted by endpoint and errcode, and timed, when set.
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl WechatClient {
    pub fn new(config: &WechatConfig) -> Result<Self, WechatError> {
        install_crypto_provider();
        let unusable = |why: &str| WechatError::Unavailable(format!("wechat.api_base: {why}"));
        let uri = &config.api_base;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(unusable("not an http or https URL")),
        };
        let host = uri.host().ok_or_else(|| unusable("names no host"))?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = match https {
            true => Some(Tls {
                connector: tls_connector(&config.extra_roots)?,
                server_name: rustls::pki_types::ServerName::try_from(
                    host.trim_matches(['[', ']']).to_owned(),
                )
                .map_err(|_| unusable("its host is not a TLS server name"))?,
            }),
            false => None,
        };
        let authority = uri.authority().map_or(host, |a| a.as_str());
        Ok(WechatClient {
            transport: Arc::new(Transport::new(
                format!("{host}:{port}"),
                authority,
                tls,
                config.timeout.min(Duration::from_secs(5)),
                Duration::from_secs(60),
            )),
            base: uri.path().trim_end_matches('/').to_owned(),
            timeout: config.timeout,
            metrics: None,
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
        let url = format!("{}/sns/jscode2session", self.base);
        let query = [
            ("appid", appid),
            ("secret", secret.expose()),
            ("js_code", code),
            ("grant_type", "authorization_code"),
        ];
        let target = with_query(&url, &query);
        let reply = self
            .call("jscode2session", &target, None, code_session_reply)
            .await?;
        let unionid = reply.unionid.filter(|u| !u.is_empty());
        if !plausible_id(&reply.openid)
            || !unionid.as_deref().is_none_or(plausible_id)
            || decode_session_key(&reply.session_key).is_none()
        {
            return Err(WechatError::Unavailable(
                "jscode2session reply has an openid, unionid or session_key of the wrong shape"
                    .into(),
            ));
        }
        Ok(CodeSession {
            openid: reply.openid,
            session_key: Secret::new(reply.session_key),
            unionid,
        })
    }

    /// `GET /sns/oauth2/access_token`: exchanges an OAuth code (mobile app `SendAuth`, website QR login,
    /// official-account authorize) for the user's openid and, where WeChat gives it, unionid.
    pub async fn oauth_access_token(
        &self,
        appid: &str,
        secret: &Secret,
        code: &str,
    ) -> Result<OauthGrant, WechatError> {
        #[derive(Deserialize)]
        struct Reply {
            openid: String,
            access_token: String,
            unionid: Option<String>,
            #[serde(default)]
            scope: String,
            /// A number; tolerate a string or a boolean too.
            #[serde(default)]
            is_snapshotuser: Value,
        }
        let url = format!("{}/sns/oauth2/access_token", self.base);
        let query = [
            ("appid", appid),
            ("secret", secret.expose()),
            ("code", code),
            ("grant_type", "authorization_code"),
        ];
        let reply: Reply = serde_json::from_value(
            self.get("oauth2/access_token", &url, &query).await?,
        )
        .map_err(|_| {
            WechatError::Unavailable(
                "oauth2/access_token reply lacks openid or access_token".into(),
            )
        })?;
        let unionid = reply.unionid.filter(|u| !u.is_empty());
        if !plausible_id(&reply.openid) || !unionid.as_deref().is_none_or(plausible_id) {
            return Err(WechatError::Unavailable(
                "oauth2/access_token reply has an openid or unionid of the wrong shape".into(),
            ));
        }
        let snapshot_user = match &reply.is_snapshotuser {
            Value::Number(n) => n.as_i64() != Some(0),
            Value::String(s) => !matches!(s.trim(), "" | "0"),
            Value::Bool(b) => *b,
            _ => false,
        };
        Ok(OauthGrant {
            openid: reply.openid,
            unionid,
            scope: reply.scope,
            snapshot_user,
            access_token: Secret::new(reply.access_token),
        })
    }

    /// `GET /sns/userinfo`: the nickname and avatar of the user an OAuth access token belongs to.
    pub async fn sns_userinfo(
        &self,
        access_token: &Secret,
        openid: &str,
    ) -> Result<SnsUser, WechatError> {
        let url = format!("{}/sns/userinfo", self.base);
        let query = [
            ("access_token", access_token.expose()),
            ("openid", openid),
            ("lang", "zh_CN"),
        ];
        serde_json::from_value(self.get("sns/userinfo", &url, &query).await?)
            .map_err(|_| WechatError::Unavailable("sns/userinfo reply is not a profile".into()))
    }

    /// `POST /cgi-bin/stable_token` (normal mode): the app's access_token and its lifetime in seconds.
    /// Repeated calls return the same token while it is valid, so servers sharing an app do not
    /// invalidate each other's tokens (as `cgi-bin/token` would).
    pub async fn stable_token(
        &self,
        appid: &str,
        secret: &Secret,
    ) -> Result<(Secret, u64), WechatError> {
        #[derive(Deserialize)]
        struct Reply {
            access_token: String,
            expires_in: u64,
        }
        let url = format!("{}/cgi-bin/stable_token", self.base);
        let body = serde_json::json!({
            "grant_type": "client_credential",
            "appid": appid,
            "secret": secret.expose(),
            "force_refresh": false,
        });
        let reply: Reply = serde_json::from_value(self.post("stable_token", &url, &body).await?)
            .map_err(|_| {
                WechatError::Unavailable(
                    "stable_token reply lacks access_token or expires_in".into(),
                )
            })?;
        Ok((Secret::new(reply.access_token), reply.expires_in))
    }

    /// `POST /wxa/business/getuserphonenumber`: the phone number behind a phone-button code, bound to
    /// the user's openid.
    pub async fn user_phone_number(
        &self,
        access_token: &Secret,
        code: &str,
        openid: &str,
    ) -> Result<PhoneInfo, WechatError> {
        #[derive(Deserialize)]
        struct Reply {
            phone_info: PhoneInfo,
        }
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("access_token", access_token.expose())
            .finish();
        let url = format!("{}/wxa/business/getuserphonenumber?{query}", self.base);
        let body = serde_json::json!({ "code": code, "openid": openid });
        let reply: Reply =
            serde_json::from_value(self.post("getuserphonenumber", &url, &body).await?).map_err(
                |_| WechatError::Unavailable("getuserphonenumber reply lacks phone_info".into()),
            )?;
        Ok(reply.phone_info)
    }

    /// Counts and times calls to WeChat in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Records one call's outcome.
    fn observe(
        &self,
        endpoint: &'static str,
        started: std::time::Instant,
        error: Option<&WechatError>,
    ) {
        if let Some(metrics) = &self.metrics {
            let errcode = match error {
                None => "0",
                Some(WechatError::Api { errcode }) => crate::metrics::errcode_label(*errcode),
                Some(WechatError::Unavailable(_)) => "unavailable",
                Some(WechatError::Timeout) => "timeout",
            };
            metrics.observe_wechat(endpoint, errcode, started.elapsed());
        }
    }

    async fn post(
        &self,
        endpoint: &'static str,
        url: &str,
        body: &Value,
    ) -> Result<Value, WechatError> {
        let body = body.to_string();
        self.call(endpoint, url, Some(body.as_bytes()), |reply| {
            parse_reply(reply.status, &reply.body)
        })
        .await
    }

    async fn get(
        &self,
        endpoint: &'static str,
        url: &str,
        query: &[(&str, &str)],
    ) -> Result<Value, WechatError> {
        self.call(endpoint, &with_query(url, query), None, |reply| {
            parse_reply(reply.status, &reply.body)
        })
        .await
    }

    /// One call to `endpoint` at `target`: the exchange ([`WechatClient::send`]), its reply read
    /// by `parse`, the outcome and time observed.
    async fn call<T>(
        &self,
        endpoint: &'static str,
        target: &str,
        body: Option<&[u8]>,
        parse: impl FnOnce(&Reply) -> Result<T, WechatError>,
    ) -> Result<T, WechatError> {
        let started = std::time::Instant::now();
        let result = self
            .send(target, body)
            .await
            .and_then(|reply| parse(&reply));
        self.observe(endpoint, started, result.as_ref().err());
        result
    }

    /// One request to `target` (origin form: `wechat.api_base`'s path and percent-encoded pairs),
    /// a POST of `body` or a GET, answered within `wechat.timeout`. The target holds secrets: no
    /// error carries it.
    async fn send(&self, target: &str, body: Option<&[u8]>) -> Result<Reply, WechatError> {
        let exchange = async {
            match body {
                Some(body) => self.transport.post_json(target, body).await,
                None => self.transport.get(target).await,
            }
            .map_err(|e| WechatError::Unavailable(format!("request failed: {e}")))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| WechatError::Timeout)?
    }
}

/// TLS for WeChat's API: the Mozilla roots (and `wechat.ca_file`'s), TLS 1.2 and 1.3, HTTP/1.1.
fn tls_connector(
    extra: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<tokio_rustls::TlsConnector, WechatError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in extra {
        roots.add(cert.clone()).map_err(|e| {
            WechatError::Unavailable(format!("wechat.ca_file: a certificate is unusable: {e}"))
        })?;
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// `url` with the `query` pairs form-encoded, as `form_urlencoded::Serializer` encodes them.
fn with_query(url: &str, query: &[(&str, &str)]) -> String {
    let mut target = String::with_capacity(url.len() + 160);
    target.push_str(url);
    for (i, (name, value)) in query.iter().enumerate() {
        target.push(if i == 0 { '?' } else { '&' });
        push_form_encoded(&mut target, name);
        target.push('=');
        push_form_encoded(&mut target, value);
    }
    target
}

/// Appends `text` form-encoded. Appids, secrets and codes need no encoding, and are then one
/// copy after a check the compiler makes a vector loop; anything else goes through
/// `form_urlencoded`.
fn push_form_encoded(out: &mut String, text: &str) {
    let plain = text.bytes().fold(true, |all, b| {
        all & (b.is_ascii_alphanumeric() | (b == b'*') | (b == b'-') | (b == b'.') | (b == b'_'))
    });
    if plain {
        out.push_str(text);
    } else {
        out.extend(form_urlencoded::byte_serialize(text.as_bytes()));
    }
}

/// The fields of a `jscode2session` reply that wxgate reads.
#[derive(Debug, Deserialize)]
struct CodeSessionReply {
    openid: String,
    session_key: String,
    unionid: Option<String>,
    /// Absent on success; present, it must be 0.
    errcode: Option<Value>,
}

/// A `jscode2session` reply, as [`parse_reply`] and then the typed fields would read it. A success,
/// as nearly every reply is, parses in one typed pass; anything else is read again the general way,
/// which says what is wrong with it.
fn code_session_reply(reply: &Reply) -> Result<CodeSessionReply, WechatError> {
    if reply.status == 200
        && let Ok(typed) = serde_json::from_slice::<CodeSessionReply>(&reply.body)
        && errcode_field(typed.errcode.as_ref()) == Ok(0)
    {
        return Ok(typed);
    }
    serde_json::from_value(parse_reply(reply.status, &reply.body)?).map_err(|_| {
        WechatError::Unavailable("jscode2session reply lacks openid or session_key".into())
    })
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
    errcode_field(value.get("errcode"))
}

/// The `errcode` field's value (`None` when absent) as [`errcode`] reads it.
fn errcode_field(field: Option<&Value>) -> Result<i64, ()> {
    match field {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n.as_i64().ok_or(()),
        Some(Value::String(s)) => s.trim().parse().map_err(|_| ()),
        Some(_) => Err(()),
    }
}

/// Whether WeChat's openid or unionid can be one: 1 to [`MAX_ID_LEN`] visible ASCII characters.
/// (They are 28 characters of `[A-Za-z0-9_-]`; the check is looser so that a format change at WeChat
/// does not lock users out, but strict enough that what is stored can always be sent as a header.)
pub fn plausible_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// A session_key's 16 bytes: it is 24 characters of standard base64.
pub fn decode_session_key(key: &str) -> Option<[u8; 16]> {
    use base64::Engine;
    let mut bytes = [0u8; 18];
    match base64::engine::general_purpose::STANDARD.decode_slice(key, &mut bytes) {
        Ok(16) if key.len() == 24 => bytes[..16].try_into().ok(),
        _ => None,
    }
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
    fn ids_and_session_keys_of_the_wrong_shape_are_recognised() {
        assert!(plausible_id("oVBkZ0aYgDMDIywRdgPW8-joxXc4"));
        for bad in [
            "",
            "o v",
            "o\n",
            "\u{7f}",
            &"o".repeat(MAX_ID_LEN + 1),
            "oé",
        ] {
            assert!(!plausible_id(bad), "{bad:?}");
        }
        assert_eq!(
            decode_session_key("tiihtNczf5v6AKRyjwEUhQ=="),
            hex::decode("b628a1b4d7337f9bfa00a4728f011485")
                .ok()
                .and_then(|b| b.try_into().ok())
        );
        for bad in [
            "",
            "tiihtNczf5v6AKRyjwEUhQ",
            "tiihtNczf5v6AKRyjwEUhQ=",
            "not base64 at all!!!!!!",
        ] {
            assert_eq!(decode_session_key(bad), None, "{bad:?}");
        }
    }

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

    proptest::proptest! {
        /// A query is encoded exactly as `form_urlencoded` encodes it, whatever its text.
        #[test]
        fn queries_are_encoded_as_form_urlencoded_encodes_them(
            pairs in proptest::collection::vec(
                (
                    proptest::prop_oneof!["[a-z_]{1,12}", ".{0,12}"],
                    proptest::prop_oneof!["[A-Za-z0-9*._-]{0,40}", ".{0,40}"],
                ),
                1..5,
            )
        ) {
            let pairs: Vec<(&str, &str)> =
                pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let mut expected = form_urlencoded::Serializer::for_suffix("/sns/x?".to_owned(), 7);
            expected.extend_pairs(&pairs);
            proptest::prop_assert_eq!(with_query("/sns/x", &pairs), expected.finish());
        }
    }

    /// The one-pass reading of a `jscode2session` reply answers what the general reading answers,
    /// success or error, whatever the reply.
    #[test]
    fn a_code_session_reply_reads_as_the_general_way_reads_it() {
        let general = |status: u16, body: &[u8]| {
            parse_reply(status, body).and_then(|v| {
                serde_json::from_value::<CodeSessionReply>(v).map_err(|_| {
                    WechatError::Unavailable(
                        "jscode2session reply lacks openid or session_key".into(),
                    )
                })
            })
        };
        let seen = |result: Result<CodeSessionReply, WechatError>| match result {
            Ok(r) => Ok((r.openid, r.session_key, r.unionid)),
            Err(e) => Err(format!("{e:?}")),
        };
        let ok = r#""openid":"o1","session_key":"k1""#;
        let bodies = [
            format!("{{{ok}}}"),
            format!(r#"{{{ok},"unionid":"u1"}}"#),
            format!(r#"{{{ok},"unionid":null}}"#),
            format!(r#"{{{ok},"errcode":0,"errmsg":"ok"}}"#),
            format!(r#"{{{ok},"errcode":"0"}}"#),
            format!(r#"{{{ok},"errcode":" 0 "}}"#),
            format!(r#"{{{ok},"errcode":null}}"#),
            format!(r#"{{{ok},"errcode":40029}}"#),
            format!(r#"{{{ok},"errcode":"40163"}}"#),
            format!(r#"{{{ok},"errcode":"forty"}}"#),
            format!(r#"{{{ok},"errcode":1.5}}"#),
            format!(r#"{{{ok},"errcode":[]}}"#),
            format!(r#"{{{ok},"openid":"o2"}}"#),
            format!(r#"{{{ok},"unionid":7}}"#),
            r#"{"errcode":40029,"errmsg":"invalid code"}"#.into(),
            r#"{"errcode":"45011","errmsg":"api minute-quota reach limit"}"#.into(),
            r#"{"errcode":0,"errmsg":"ok"}"#.into(),
            r#"{"openid":"o1"}"#.into(),
            r#"{"openid":1,"session_key":"k1"}"#.into(),
            r#"[1,2]"#.into(),
            "".into(),
            "<html>502</html>".into(),
            format!("{{{ok}}} trailing"),
        ];
        for body in &bodies {
            for status in [200, 502] {
                let reply = Reply {
                    status,
                    body: body.as_bytes().to_vec(),
                };
                assert_eq!(
                    seen(code_session_reply(&reply)),
                    seen(general(status, body.as_bytes())),
                    "{status} {body}"
                );
            }
        }
        let reply = |body: &str| Reply {
            status: 200,
            body: body.as_bytes().to_vec(),
        };
        assert!(code_session_reply(&reply(&bodies[1])).is_ok());
        assert!(matches!(
            code_session_reply(&reply(&bodies[8])),
            Err(WechatError::Api { errcode: 40163 })
        ));
    }

    #[test]
    fn country_code_may_be_a_string_or_a_number() {
        for body in [
            r#"{"phoneNumber":"13580006666","purePhoneNumber":"13580006666","countryCode":"86"}"#,
            r#"{"phoneNumber":"13580006666","purePhoneNumber":"13580006666","countryCode":86}"#,
        ] {
            let info: PhoneInfo = serde_json::from_str(body).unwrap();
            assert_eq!(info.country_code, "86");
        }
        assert!(
            serde_json::from_str::<PhoneInfo>(
                r#"{"phoneNumber":"1","purePhoneNumber":"1","countryCode":[]}"#
            )
            .is_err()
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
