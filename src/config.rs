//! Configuration: the TOML file as written ([`FileConfig`]) and the checked, typed [`Config`] the server
//! runs on. This is the only module that reads the config file or the environment for settings.
//!
//! Loading happens in two steps (as sozu and pingora do): the file is parsed into `FileConfig`, which
//! mirrors the TOML exactly and rejects unknown keys; then `Config::try_from_file` turns strings into
//! typed values and checks the rules that span several fields. Every failure is one line that names the
//! key and says how to fix it, because the person reading it is an operator at a terminal.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::{Method, Uri};
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::routes::{self, Policy, Route, RouteTable};

/// A configuration failure, written for the operator who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// `${VAR}` names a variable that is not set and has no `:-default`.
    #[error(
        "{key}: environment variable {var} is not set; export it, or write ${{{var}:-default}} to give a default"
    )]
    UnsetVariable { key: String, var: String },
    /// A `${...}` that cannot be read.
    #[error("{key}: {detail}")]
    BadInterpolation { key: String, detail: String },
    /// A key that is unknown, missing or of the wrong type.
    #[error("{key}: {detail}")]
    Schema { key: String, detail: String },
    /// A value that has the right type but is not acceptable; the message says what to write instead.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A value that must never be printed: WeChat secrets, signing keys, store URLs with passwords.
/// `Debug` and `Display` show `***`; the value is wiped from memory when dropped.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretString::from(value.into()))
    }

    /// The value itself, for the one place that has to use it (a request to WeChat, a key schedule).
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

// ---------------------------------------------------------------------------------------------------
// The file as written. The `///` text on each field is the configuration reference.
// ---------------------------------------------------------------------------------------------------

/// The whole `config.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Listeners and process-wide settings.
    #[serde(default)]
    pub server: FileServer,
    /// The backend that receives every request wxgate forwards.
    pub upstream: FileUpstream,
    /// Where and how wxgate talks to the WeChat API.
    #[serde(default)]
    pub wechat: FileWechat,
    /// The WeChat apps (mini programs, mobile apps, websites, official accounts) of this company.
    #[serde(default)]
    pub apps: Vec<FileApp>,
    /// How WeChat ids become a `user_id`, and where that mapping is stored.
    #[serde(default)]
    pub identity: FileIdentity,
    /// Sessions and tokens.
    #[serde(default)]
    pub session: FileSession,
    /// Route policies, first match wins; a path that matches none is `required`.
    #[serde(default)]
    pub routes: Vec<FileRoute>,
    /// What a client may send and how fast: sizes, timeouts, connections, rate limits.
    #[serde(default)]
    pub limits: FileLimits,
    /// Logging.
    #[serde(default)]
    pub log: FileLog,
    /// Names of the identity headers injected upstream, and header hygiene switches.
    #[serde(default)]
    pub headers: FileHeaders,
}

/// `[server]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileServer {
    /// Address of the main listener for clients, `IP:PORT`. Default `0.0.0.0:8080`.
    pub listen: Option<String>,
    /// Address of the admin listener (`/healthz`, `/readyz`, `/metrics`). Keep it off the public
    /// network. Default `127.0.0.1:9090`.
    pub admin_listen: Option<String>,
    /// Runtime worker threads. `1` runs everything on one thread (often fastest on small machines);
    /// default: one per CPU core.
    pub workers: Option<u64>,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT before they are cut off.
    /// Default `"30s"`.
    pub shutdown_timeout: Option<String>,
    /// Addresses (`10.0.0.7`) or networks (`10.0.0.0/8`) of proxies in front of wxgate whose
    /// `X-Forwarded-For/Proto/Host` are believed. Default: none, so client-sent ones are replaced.
    pub trusted_proxies: Option<Vec<String>>,
    /// Path prefix of wxgate's own endpoints (`/auth/login`, ...). Never forwarded. Default `"/auth"`.
    pub auth_prefix: Option<String>,
    /// Accept `%2F` and `%5C` (encoded `/` and `\`) in paths. They are kept encoded and matched as
    /// ordinary characters. Off by default: backends decode them differently, which is how
    /// route rules get bypassed.
    pub allow_encoded_slashes: Option<bool>,
    /// TLS on the main listener. Absent: plain HTTP (behind a TLS-terminating proxy).
    pub tls: Option<FileTls>,
}

/// `[server.tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// PEM file with the certificate chain, the server's certificate first.
    pub cert: String,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1). Reloaded with the chain on SIGHUP.
    pub key: String,
}

/// `[upstream]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    /// Base URL of the backend, `http://HOST:PORT` with an optional base path. No query.
    pub url: String,
    /// How long to wait for the backend's response headers before answering 504. Default `"60s"`.
    pub timeout: Option<String>,
    /// How long to wait for a TCP connection to the backend. Default `"5s"`.
    pub connect_timeout: Option<String>,
    /// How long an idle pooled connection to the backend is kept. Default `"90s"`.
    pub pool_idle_timeout: Option<String>,
    /// Pass the client's `Host` header to the backend (`true`, default) or use the upstream's host.
    pub preserve_host: Option<bool>,
    /// Speak HTTP/2 (cleartext, prior knowledge) to the backend instead of HTTP/1.1. Default false.
    /// Upgrades (WebSocket) need HTTP/1.1.
    pub http2: Option<bool>,
}

/// `[wechat]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWechat {
    /// Base URL of the WeChat API. Default `"https://api.weixin.qq.com"`; point it at the mock locally.
    pub api_base: Option<String>,
    /// Timeout of one call to WeChat. Default `"5s"`.
    pub timeout: Option<String>,
    /// How old decrypted open data (user info, legacy phone data) may be, by its watermark timestamp.
    /// Default `"10m"`.
    pub watermark_max_age: Option<String>,
    /// Base URL of WeChat's OAuth pages (website QR login, official-account authorize), where browsers
    /// are sent to log in. Default `"https://open.weixin.qq.com"`; point it at the mock locally.
    pub open_base: Option<String>,
    /// A PEM file of CA certificates trusted for `api_base` besides the usual public ones (Mozilla's),
    /// for an egress proxy that re-signs TLS. Default none.
    pub ca_file: Option<String>,
}

/// One `[[apps]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileApp {
    /// Short name clients send as `{"app": "..."}`; optional for them when it is the only app of its kind.
    pub name: String,
    /// `miniprogram`, `app` (mobile app), `web` (website QR login) or `oa` (official account H5).
    pub kind: String,
    /// The app's AppID, `wx` followed by 16 characters.
    pub appid: String,
    /// The app's AppSecret. Write `${VAR}` and keep it in the environment.
    pub secret: String,
    /// `oa` only: the OAuth scope asked for, `snsapi_userinfo` (default: a consent page, and the
    /// unionid) or `snsapi_base` (silent, but no unionid, so no linking to the person's other apps).
    pub scope: Option<String>,
    /// `app`, `web`, `oa`: after an OAuth login, also fetch `sns/userinfo` and return the nickname and
    /// avatar as `profile`. Default false (one WeChat call less per login).
    pub fetch_userinfo: Option<bool>,
    /// `web`, `oa`: the origin browsers reach wxgate at for this app, e.g. `"https://m.example.com"`
    /// (the domain registered with WeChat). Enables the browser flow
    /// (`/auth/oauth/NAME/start` and `/callback`); the callback URL is this plus
    /// `/auth/oauth/NAME/callback`.
    pub public_url: Option<String>,
}

/// `[identity]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIdentity {
    /// What `X-User-Id` carries: `internal` (a stable id issued by wxgate, default), `unionid` or `openid`.
    pub user_id: Option<String>,
    /// Where identity links live: `sqlite://PATH` (default `sqlite://wxgate.db`) or `postgres://...`.
    pub store: Option<String>,
}

/// `[session]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSession {
    /// Where sessions live: `memory` (default, one node) or `redis://...` (a cluster).
    pub store: Option<String>,
    /// Lifetime of an access token. Default `"2h"`.
    pub access_ttl: Option<String>,
    /// Lifetime of a refresh token and of an unused session. Default `"30d"`.
    pub refresh_ttl: Option<String>,
    /// HMAC key for access tokens, at least 32 bytes. Write `${VAR}` and keep it in the environment.
    /// Required once `[[apps]]` are configured.
    pub signing_key: Option<String>,
    /// Most sessions kept in memory (`store = "memory"`); beyond it the least used are dropped and
    /// their users log in again. Default 1000000.
    pub max_sessions: Option<u64>,
}

/// One `[[routes]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    /// Path prefix, matched segment by segment against the normalised path: `/api/public` matches
    /// `/api/public` and `/api/public/x` but not `/api/publicity`; `/api/public/` matches only below it.
    pub prefix: String,
    /// Methods this rule applies to (e.g. `["GET", "HEAD"]`); all methods when absent.
    pub methods: Option<Vec<String>>,
    /// `public` (forwarded without identity), `optional` (identity when the client has one) or
    /// `required` (401 without a valid identity).
    pub auth: String,
    /// Name used in metrics and logs. Default: the prefix.
    pub name: Option<String>,
    /// The name of a `web` or `oa` app (with `public_url`): a page request (GET or HEAD accepting
    /// `text/html`) that this rule refuses for want of a valid session is redirected to that app's
    /// WeChat login instead of answered 401, and comes back here after it. API requests still get 401.
    pub browser_login: Option<String>,
}

/// `[log]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLog {
    /// `text` (default; one human-readable line per event) or `json` (one JSON object per line, for
    /// log shippers).
    pub format: Option<String>,
    /// Level or filter, e.g. `"info"` (default) or `"info,wxgate::access=off"`; `RUST_LOG`, when
    /// set, takes precedence.
    pub level: Option<String>,
    /// One `wxgate::access` line per request. Default true.
    pub access: Option<bool>,
}

/// `[limits]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    /// Requests per minute to `/auth/*` from one client IP. Default 600; 0 turns the limit off.
    pub auth_per_minute: Option<u32>,
    /// Requests one client IP may send to `/auth/*` at once before the rate applies. Default 100.
    pub auth_burst: Option<u32>,
    /// Requests per minute one user may send to proxied routes. Default 0 (no limit).
    pub user_per_minute: Option<u32>,
    /// Burst of one user's proxied requests. Default: a tenth of a minute's worth, at least 1.
    pub user_burst: Option<u32>,
    /// Largest request body forwarded to the backend, e.g. `"10MiB"`; bigger ones get 413. Default
    /// `"10MiB"`.
    pub max_body: Option<String>,
    /// Largest request head (request line and headers). Default `"64KiB"`.
    pub max_header_bytes: Option<String>,
    /// Most request headers. Default 100.
    pub max_headers: Option<usize>,
    /// Time a client has to send a complete request head, and the longest an HTTP/1 keep-alive
    /// connection waits idle for its next request; slower clients (slowloris) are cut off.
    /// Default `"20s"`.
    pub header_timeout: Option<String>,
    /// A connection with no request for this long is closed, and so is a request or response body
    /// that moves no byte for this long. Default `"60s"`.
    pub idle_timeout: Option<String>,
    /// Most client connections open at once on the main listener; more wait to be accepted.
    /// Default 10000.
    pub max_connections: Option<usize>,
}

/// `[headers]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHeaders {
    /// Header carrying the user id upstream. Default `X-User-Id`.
    pub user_id: Option<String>,
    /// Header carrying the app's AppID upstream. Default `X-WeChat-AppId`.
    pub appid: Option<String>,
    /// Header carrying the user's openid in that app. Default `X-WeChat-OpenId`.
    pub openid: Option<String>,
    /// Header carrying the user's unionid, when known. Default `X-WeChat-UnionId`.
    pub unionid: Option<String>,
    /// Header carrying the user's verified phone number (from `/auth/phone`), when known. Not sent
    /// unless configured, e.g. `phone = "X-WeChat-Phone"`.
    pub phone: Option<String>,
    /// Forward client headers whose names contain `_`. Off by default (as in nginx), because some
    /// frameworks read `X_User_Id` as `X-User-Id`.
    pub allow_underscores: Option<bool>,
}

// ---------------------------------------------------------------------------------------------------
// The checked configuration.
// ---------------------------------------------------------------------------------------------------

/// The validated configuration the server runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub wechat: WechatConfig,
    pub apps: Vec<AppConfig>,
    pub identity: IdentityConfig,
    pub session: SessionConfig,
    pub routes: RouteTable,
    pub headers: HeadersConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive string, checked.
    pub level: String,
    pub access: bool,
}

/// A rate: so many per minute, with a burst allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_minute: std::num::NonZeroU32,
    pub burst: std::num::NonZeroU32,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// `None`: unlimited.
    pub auth: Option<Rate>,
    /// `None`: unlimited.
    pub user: Option<Rate>,
    pub max_body: u64,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// `None`: one worker per core.
    pub workers: Option<usize>,
    pub shutdown_timeout: Duration,
    pub trusted_proxies: Vec<IpNet>,
    /// Normalised, without a trailing slash, e.g. `/auth`.
    pub auth_prefix: String,
    pub allow_encoded_slashes: bool,
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: files checked to hold a usable chain and its key.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `http`.
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// Prepended to every forwarded path; empty or `/base` (no trailing slash).
    pub base_path: String,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub preserve_host: bool,
    pub http2: bool,
}

#[derive(Debug, Clone)]
pub struct WechatConfig {
    pub api_base: Uri,
    /// Where browsers log in: `https://open.weixin.qq.com` or the mock; no trailing slash.
    pub open_base: String,
    pub timeout: Duration,
    pub watermark_max_age: Duration,
    /// `wechat.ca_file`'s certificates.
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppKind {
    MiniProgram,
    App,
    Web,
    Oa,
}

#[derive(Debug, Clone)]
pub struct AppConfig {
    pub name: String,
    pub kind: AppKind,
    pub appid: String,
    pub secret: Secret,
    /// The OAuth scope: `snsapi_login` for `web`, `snsapi_userinfo` or `snsapi_base` for `oa`,
    /// `snsapi_userinfo` for `app` (asked by the app itself); empty for mini programs.
    pub scope: &'static str,
    pub fetch_userinfo: bool,
    /// `web` and `oa`: origin of the browser flow, no trailing slash.
    pub public_url: Option<String>,
}

impl AppKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AppKind::MiniProgram => "miniprogram",
            AppKind::App => "app",
            AppKind::Web => "web",
            AppKind::Oa => "oa",
        }
    }

    /// Apps whose users log in in a browser page, redirected to WeChat and back.
    pub fn is_browser(self) -> bool {
        matches!(self, AppKind::Web | AppKind::Oa)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserIdMode {
    Internal,
    UnionId,
    OpenId,
}

#[derive(Debug, Clone)]
pub enum IdentityStoreConfig {
    Sqlite {
        path: PathBuf,
    },
    /// The full URL; it may hold a password.
    Postgres {
        url: Secret,
    },
}

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub user_id: UserIdMode,
    pub store: IdentityStoreConfig,
}

#[derive(Debug, Clone)]
pub enum SessionStoreConfig {
    Memory,
    /// The full URL; it may hold a password.
    Redis {
        url: Secret,
    },
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub store: SessionStoreConfig,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    pub signing_key: Option<Secret>,
    pub max_sessions: u64,
}

#[derive(Debug, Clone)]
pub struct HeadersConfig {
    pub user_id: HeaderName,
    pub appid: HeaderName,
    pub openid: HeaderName,
    pub unionid: HeaderName,
    /// `None`: the phone number is not sent upstream.
    pub phone: Option<HeaderName>,
    pub allow_underscores: bool,
}

/// Minimum length of `session.signing_key`: HS256 wants a key at least as long as its output.
pub const MIN_SIGNING_KEY_BYTES: usize = 32;

impl Config {
    /// `[limits]` as they are when the section is left out.
    pub fn default_limits() -> LimitsConfig {
        limits_config(FileLimits::default()).expect("the defaults are valid")
    }

    /// Reads, interpolates and validates the file at `path`, taking `${VAR}` from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file = path.display().to_string();
        Config::parse(&file, &text, &|var| std::env::var(var).ok())
    }

    /// Parses `text` (named `file` in messages), taking `${VAR}` from `env`. Tests pass their own `env`
    /// instead of changing the process environment.
    pub fn parse(
        file: &str,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| syntax_error(file, text, &e))?;
        for (key, value) in table.iter_mut() {
            interpolate_value(key, value, env)?;
        }
        let parsed: FileConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                let detail = e.inner().message().replace("unknown field", "unknown key");
                ConfigError::Schema { key, detail }
            })?;
        Config::try_from_file(parsed)
    }

    /// Turns the file's strings into typed values and checks cross-field rules.
    pub fn try_from_file(file: FileConfig) -> Result<Config, ConfigError> {
        let server = server_config(file.server)?;
        let upstream = upstream_config(file.upstream)?;
        let wechat = wechat_config(file.wechat)?;
        let apps = apps_config(file.apps)?;
        let identity = identity_config(file.identity)?;
        let session = session_config(file.session)?;
        let headers = headers_config(file.headers)?;
        let routes = routes_config(file.routes, &server, &apps)?;
        let limits = limits_config(file.limits)?;
        let log = log_config(file.log)?;
        if !apps.is_empty() && session.signing_key.is_none() {
            return Err(ConfigError::invalid(
                "session.signing_key",
                "is required once [[apps]] are configured; set it to at least 32 random bytes, e.g. signing_key = \"${WXGATE_SIGNING_KEY}\"",
            ));
        }
        Ok(Config {
            server,
            upstream,
            wechat,
            apps,
            identity,
            session,
            routes,
            headers,
            limits,
            log,
        })
    }
}

fn syntax_error(file: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            (line, column)
        }
        None => (1, 1),
    };
    ConfigError::Syntax {
        file: file.to_owned(),
        line,
        column,
        message: e.message().trim().replace('\n', " "),
    }
}

// ---------------------------------------------------------------------------------------------------
// ${VAR} and ${VAR:-default}
// ---------------------------------------------------------------------------------------------------

fn interpolate_value(
    key: &str,
    value: &mut toml::Value,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.contains('$') => {
            *s = interpolate(key, s, env)?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_value(&format!("{key}[{i}]"), item, env)?;
            }
        }
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                interpolate_value(&format!("{key}.{k}"), v, env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Expands `${VAR}` and `${VAR:-default}` (the default is used when VAR is unset or empty, as in the
/// shell). `$$` is a literal `$`; a `$` not followed by `{` or `$` is kept as it is.
pub fn interpolate(
    key: &str,
    input: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').ok_or_else(|| ConfigError::BadInterpolation {
                key: key.to_owned(),
                detail: "`${` without a closing `}`; write ${VAR} or ${VAR:-default}, or $$ for a literal $"
                    .to_owned(),
            })?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (expr, None),
            };
            let valid_name = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                return Err(ConfigError::BadInterpolation {
                    key: key.to_owned(),
                    detail: format!(
                        "`${{{expr}}}` is not a variable reference; names are letters, digits and _, e.g. ${{WXGATE_SECRET}}"
                    ),
                });
            }
            match (env(name), default) {
                (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(ConfigError::UnsetVariable {
                        key: key.to_owned(),
                        var: name.to_owned(),
                    });
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------
// Section by section.
// ---------------------------------------------------------------------------------------------------

fn duration(key: &str, value: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    let Some(text) = value else {
        return Ok(default);
    };
    let parsed = humantime::parse_duration(text.trim()).map_err(|_| {
        ConfigError::invalid(
            key,
            format!("\"{text}\" is not a duration; write a number and a unit, like \"500ms\", \"30s\", \"2h\" or \"30d\""),
        )
    })?;
    if parsed.is_zero() {
        return Err(ConfigError::invalid(
            key,
            "must be longer than zero, like \"30s\"",
        ));
    }
    Ok(parsed)
}

fn socket_addr(key: &str, value: Option<String>, default: &str) -> Result<SocketAddr, ConfigError> {
    let text = value.unwrap_or_else(|| default.to_owned());
    text.trim().parse().map_err(|_| {
        ConfigError::invalid(
            key,
            format!("\"{text}\" is not an IP:PORT address; write e.g. \"0.0.0.0:8080\" or \"[::]:8080\" (host names are not resolved)"),
        )
    })
}

fn server_config(file: FileServer) -> Result<ServerConfig, ConfigError> {
    let listen = socket_addr("server.listen", file.listen, "0.0.0.0:8080")?;
    let admin_listen = socket_addr("server.admin_listen", file.admin_listen, "127.0.0.1:9090")?;
    if listen.port() != 0 && listen == admin_listen {
        return Err(ConfigError::invalid(
            "server.admin_listen",
            format!(
                "is the same address as server.listen ({listen}); the admin endpoints must never be on the public port, use e.g. \"127.0.0.1:9090\""
            ),
        ));
    }
    let workers = match file.workers {
        None => None,
        Some(n @ 1..=1024) => Some(n as usize),
        Some(n) => {
            return Err(ConfigError::invalid(
                "server.workers",
                format!("{n} is out of range; use 1 to 1024, or leave it out for one per core"),
            ));
        }
    };
    let shutdown_timeout = duration(
        "server.shutdown_timeout",
        file.shutdown_timeout,
        Duration::from_secs(30),
    )?;
    let mut trusted_proxies = Vec::new();
    for (i, entry) in file.trusted_proxies.unwrap_or_default().iter().enumerate() {
        let entry = entry.trim();
        let net = entry
            .parse::<IpNet>()
            .or_else(|_| entry.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| {
                ConfigError::invalid(
                    format!("server.trusted_proxies[{i}]"),
                    format!("\"{entry}\" is neither an IP address nor a network; write e.g. \"10.0.0.7\" or \"10.0.0.0/8\""),
                )
            })?;
        trusted_proxies.push(net);
    }
    let auth_prefix = file.auth_prefix.unwrap_or_else(|| "/auth".to_owned());
    let auth_prefix = auth_prefix.trim_end_matches('/').to_owned();
    let normal = routes::normalize_path(&auth_prefix, false).ok();
    if auth_prefix.is_empty() || normal.as_deref() != Some(auth_prefix.as_str()) {
        return Err(ConfigError::invalid(
            "server.auth_prefix",
            format!(
                "\"{auth_prefix}\" is not a plain absolute path; write e.g. \"/auth\" (it cannot be \"/\")"
            ),
        ));
    }
    Ok(ServerConfig {
        listen,
        admin_listen,
        workers,
        shutdown_timeout,
        trusted_proxies,
        auth_prefix,
        allow_encoded_slashes: file.allow_encoded_slashes.unwrap_or(false),
        tls: file.tls.map(tls_config).transpose()?,
    })
}

fn tls_config(file: FileTls) -> Result<TlsConfig, ConfigError> {
    let tls = TlsConfig {
        cert: PathBuf::from(file.cert.trim()),
        key: PathBuf::from(file.key.trim()),
    };
    // Read now, so that `wxgate check` and a start both refuse unusable files with the reason.
    crate::tls::load(&tls.cert, &tls.key).map_err(|e| {
        let (key, detail) = match &e {
            crate::tls::TlsError::Cert { path, detail } => (
                "server.tls.cert",
                format!("cannot read certificates from {}: {detail}", path.display()),
            ),
            crate::tls::TlsError::Key { path, detail } => (
                "server.tls.key",
                format!(
                    "cannot read a private key from {}: {detail}",
                    path.display()
                ),
            ),
            crate::tls::TlsError::Mismatch(detail) => ("server.tls", detail.clone()),
        };
        ConfigError::invalid(key, detail)
    })?;
    Ok(tls)
}

fn upstream_config(file: FileUpstream) -> Result<UpstreamConfig, ConfigError> {
    const KEY: &str = "upstream.url";
    let text = file.url.trim();
    let uri: Uri = text.parse().map_err(|_| {
        ConfigError::invalid(
            KEY,
            format!("\"{text}\" is not a URL; write e.g. \"http://127.0.0.1:3000\""),
        )
    })?;
    let scheme = match uri.scheme_str() {
        Some("http") => http::uri::Scheme::HTTP,
        Some("https") => {
            return Err(ConfigError::invalid(
                KEY,
                "https upstreams are not supported yet; reach the backend over plain http on a private network, e.g. \"http://10.0.0.5:3000\"",
            ));
        }
        _ => {
            return Err(ConfigError::invalid(
                KEY,
                format!("\"{text}\" needs the http:// scheme, e.g. \"http://127.0.0.1:3000\""),
            ));
        }
    };
    let authority = uri.authority().cloned().ok_or_else(|| {
        ConfigError::invalid(KEY, "has no host; write e.g. \"http://127.0.0.1:3000\"")
    })?;
    if authority.as_str().contains('@') {
        return Err(ConfigError::invalid(
            KEY,
            "must not carry user:password; backends get identity from wxgate's headers",
        ));
    }
    if uri.query().is_some() || text.contains('#') {
        return Err(ConfigError::invalid(
            KEY,
            "must not have a query or fragment; the client's query is passed through, so give only scheme, host, port and an optional base path",
        ));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    if !base_path.is_empty()
        && routes::normalize_path(&base_path, false).ok().as_deref() != Some(base_path.as_str())
    {
        return Err(ConfigError::invalid(
            KEY,
            format!(
                "base path \"{base_path}\" is not a plain path; write e.g. \"http://127.0.0.1:3000/api\""
            ),
        ));
    }
    Ok(UpstreamConfig {
        scheme,
        authority,
        base_path,
        timeout: duration("upstream.timeout", file.timeout, Duration::from_secs(60))?,
        connect_timeout: duration(
            "upstream.connect_timeout",
            file.connect_timeout,
            Duration::from_secs(5),
        )?,
        pool_idle_timeout: duration(
            "upstream.pool_idle_timeout",
            file.pool_idle_timeout,
            Duration::from_secs(90),
        )?,
        preserve_host: file.preserve_host.unwrap_or(true),
        http2: file.http2.unwrap_or(false),
    })
}

fn wechat_config(file: FileWechat) -> Result<WechatConfig, ConfigError> {
    const KEY: &str = "wechat.api_base";
    let text = file
        .api_base
        .unwrap_or_else(|| "https://api.weixin.qq.com".to_owned());
    let text = text.trim().trim_end_matches('/');
    let api_base: Uri = text.parse().map_err(|_| {
        ConfigError::invalid(
            KEY,
            format!("\"{text}\" is not a URL; write \"https://api.weixin.qq.com\" or the mock's http://127.0.0.1:PORT"),
        )
    })?;
    if !matches!(api_base.scheme_str(), Some("http" | "https")) || api_base.authority().is_none() {
        return Err(ConfigError::invalid(
            KEY,
            format!("\"{text}\" needs an http:// or https:// scheme and a host"),
        ));
    }
    if api_base.query().is_some() {
        return Err(ConfigError::invalid(KEY, "must not have a query"));
    }
    // The authority is sent as `Host`; credentials there would reach WeChat, and this error must
    // not repeat them.
    if api_base
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
    {
        return Err(ConfigError::invalid(
            KEY,
            "must not carry user:password; WeChat's API takes the appid and secret of [[apps]]",
        ));
    }
    let open_base = file
        .open_base
        .unwrap_or_else(|| "https://open.weixin.qq.com".to_owned());
    let open_base = open_base.trim().trim_end_matches('/').to_owned();
    let parsed: Option<Uri> = open_base.parse().ok();
    if !parsed.as_ref().is_some_and(|u| {
        matches!(u.scheme_str(), Some("http" | "https"))
            && u.authority().is_some()
            && u.query().is_none()
    }) {
        return Err(ConfigError::invalid(
            "wechat.open_base",
            format!(
                "\"{open_base}\" is not a base URL; write \"https://open.weixin.qq.com\" or the mock's http://127.0.0.1:PORT"
            ),
        ));
    }
    let extra_roots = match &file.ca_file {
        None => Vec::new(),
        Some(path) => {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let invalid = |why: String| ConfigError::invalid("wechat.ca_file", why);
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| invalid(format!("cannot read {path}: {e}")))?
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(format!("{path} is not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(invalid(format!("{path} holds no certificate")));
            }
            certs
        }
    };
    Ok(WechatConfig {
        api_base,
        open_base,
        extra_roots,
        timeout: duration("wechat.timeout", file.timeout, Duration::from_secs(5))?,
        watermark_max_age: duration(
            "wechat.watermark_max_age",
            file.watermark_max_age,
            Duration::from_secs(600),
        )?,
    })
}

fn apps_config(files: Vec<FileApp>) -> Result<Vec<AppConfig>, ConfigError> {
    let mut apps: Vec<AppConfig> = Vec::with_capacity(files.len());
    for (i, file) in files.into_iter().enumerate() {
        let key = |field: &str| format!("apps[{i}].{field}");
        let name = file.name.trim().to_owned();
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !name_ok {
            return Err(ConfigError::invalid(
                key("name"),
                format!(
                    "\"{name}\" is not a usable app name; use 1 to 64 of a-z, 0-9, - and _, e.g. \"shop\""
                ),
            ));
        }
        if let Some(j) = apps.iter().position(|a| a.name == name) {
            return Err(ConfigError::invalid(
                key("name"),
                format!("\"{name}\" is already the name of apps[{j}]; give every app its own name"),
            ));
        }
        let kind = match file.kind.trim() {
            "miniprogram" => AppKind::MiniProgram,
            "app" => AppKind::App,
            "web" => AppKind::Web,
            "oa" => AppKind::Oa,
            other => {
                return Err(ConfigError::invalid(
                    key("kind"),
                    format!(
                        "\"{other}\" is not an app kind; use \"miniprogram\", \"app\", \"web\" or \"oa\""
                    ),
                ));
            }
        };
        let appid = file.appid.trim().to_owned();
        let appid_ok = appid.len() == 18
            && appid.starts_with("wx")
            && appid.chars().all(|c| c.is_ascii_alphanumeric());
        if !appid_ok {
            return Err(ConfigError::invalid(
                key("appid"),
                format!(
                    "\"{appid}\" is not a WeChat AppID; it is \"wx\" and 16 letters or digits, as shown in the WeChat console"
                ),
            ));
        }
        if let Some(j) = apps.iter().position(|a| a.appid == appid) {
            return Err(ConfigError::invalid(
                key("appid"),
                format!("{appid} is already the appid of apps[{j}]; each AppID is configured once"),
            ));
        }
        if file.secret.trim().is_empty() {
            return Err(ConfigError::invalid(
                key("secret"),
                "is empty; set it to the AppSecret, e.g. secret = \"${WXGATE_SHOP_SECRET}\"",
            ));
        }
        let scope = match (kind, file.scope.as_deref().map(str::trim)) {
            (AppKind::Oa, None | Some("snsapi_userinfo")) => "snsapi_userinfo",
            (AppKind::Oa, Some("snsapi_base")) => "snsapi_base",
            (AppKind::Oa, Some(other)) => {
                return Err(ConfigError::invalid(
                    key("scope"),
                    format!(
                        "\"{other}\" is not an official-account scope; use \"snsapi_userinfo\" or \"snsapi_base\""
                    ),
                ));
            }
            (_, Some(_)) => {
                return Err(ConfigError::invalid(
                    key("scope"),
                    "applies only to kind = \"oa\"; remove it (apps ask snsapi_userinfo, websites snsapi_login)",
                ));
            }
            (AppKind::App, None) => "snsapi_userinfo",
            (AppKind::Web, None) => "snsapi_login",
            (AppKind::MiniProgram, None) => "",
        };
        let fetch_userinfo = file.fetch_userinfo.unwrap_or(false);
        if fetch_userinfo && (kind == AppKind::MiniProgram || scope == "snsapi_base") {
            return Err(ConfigError::invalid(
                key("fetch_userinfo"),
                "needs an OAuth app with a user-info scope (kind \"app\", \"web\", or \"oa\" with snsapi_userinfo); remove it",
            ));
        }
        let public_url = match file.public_url {
            None => None,
            Some(_) if !kind.is_browser() => {
                return Err(ConfigError::invalid(
                    key("public_url"),
                    "applies only to kind = \"web\" or \"oa\", whose users log in in a browser; remove it",
                ));
            }
            Some(url) => Some(public_url(&key("public_url"), &url)?),
        };
        apps.push(AppConfig {
            name,
            kind,
            appid,
            secret: Secret::new(file.secret.trim()),
            scope,
            fetch_userinfo,
            public_url,
        });
    }
    Ok(apps)
}

/// An origin (`https://host[:port]`, nothing after it), without a trailing slash.
fn public_url(key: &str, text: &str) -> Result<String, ConfigError> {
    let text = text.trim().trim_end_matches('/');
    let uri: Option<Uri> = text.parse().ok();
    let ok = uri.as_ref().is_some_and(|u| {
        let local = u
            .host()
            .is_some_and(|h| h == "localhost" || h == "127.0.0.1" || h == "[::1]");
        (u.scheme_str() == Some("https") || (u.scheme_str() == Some("http") && local))
            && u.authority().is_some()
            && u.path_and_query()
                .is_none_or(|p| p.as_str().is_empty() || p.as_str() == "/")
            && !u.authority().is_some_and(|a| a.as_str().contains('@'))
    });
    if !ok {
        return Err(ConfigError::invalid(
            key,
            format!(
                "\"{text}\" is not an origin; write https://HOST (http only for localhost), the domain registered with WeChat, with no path"
            ),
        ));
    }
    Ok(text.to_owned())
}

fn log_config(file: FileLog) -> Result<LogConfig, ConfigError> {
    let format = match file.format.as_deref().map(str::trim) {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            return Err(ConfigError::invalid(
                "log.format",
                format!("\"{other}\" is not a log format; use \"text\" or \"json\""),
            ));
        }
    };
    let level = file.level.unwrap_or_else(|| "info".to_owned());
    let level = level.trim().to_owned();
    if tracing_subscriber::EnvFilter::builder()
        .parse(&level)
        .is_err()
    {
        return Err(ConfigError::invalid(
            "log.level",
            format!(
                "\"{level}\" is not a level or filter; write e.g. \"info\", \"debug\" or \"info,wxgate=debug\""
            ),
        ));
    }
    Ok(LogConfig {
        format,
        level,
        access: file.access.unwrap_or(true),
    })
}

fn limits_config(file: FileLimits) -> Result<LimitsConfig, ConfigError> {
    use std::num::NonZeroU32;
    let rate = |key: &str, per_minute: u32, burst: Option<u32>, default_burst: u32| {
        let Some(per_minute) = NonZeroU32::new(per_minute) else {
            return Ok(None);
        };
        let burst = NonZeroU32::new(burst.unwrap_or(default_burst)).ok_or_else(|| {
            ConfigError::invalid(
                format!("limits.{key}_burst"),
                "must be at least 1 (set the rate to 0 to turn the limit off)",
            )
        })?;
        Ok(Some(Rate { per_minute, burst }))
    };
    let auth = rate(
        "auth",
        file.auth_per_minute.unwrap_or(600),
        file.auth_burst,
        100,
    )?;
    let user_rate = file.user_per_minute.unwrap_or(0);
    let user = rate("user", user_rate, file.user_burst, (user_rate / 10).max(1))?;
    let max_headers = file.max_headers.unwrap_or(100);
    if !(1..=1000).contains(&max_headers) {
        return Err(ConfigError::invalid(
            "limits.max_headers",
            format!("{max_headers} is out of range; use 1 to 1000"),
        ));
    }
    let max_connections = file.max_connections.unwrap_or(10_000);
    if max_connections == 0 {
        return Err(ConfigError::invalid(
            "limits.max_connections",
            "must be at least 1",
        ));
    }
    let max_header_bytes = size("limits.max_header_bytes", file.max_header_bytes, 64 * 1024)?;
    if !(8 * 1024..=1024 * 1024).contains(&max_header_bytes) {
        return Err(ConfigError::invalid(
            "limits.max_header_bytes",
            "is out of range; use \"8KiB\" to \"1MiB\"",
        ));
    }
    Ok(LimitsConfig {
        auth,
        user,
        max_body: size("limits.max_body", file.max_body, 10 * 1024 * 1024)?,
        max_header_bytes: max_header_bytes as usize,
        max_headers,
        header_timeout: duration(
            "limits.header_timeout",
            file.header_timeout,
            Duration::from_secs(20),
        )?,
        idle_timeout: duration(
            "limits.idle_timeout",
            file.idle_timeout,
            Duration::from_secs(60),
        )?,
        max_connections,
    })
}

/// A size: bytes, or a number with `B`, `KiB`, `MiB`, `GiB` (or `KB`, `MB`, `GB`, read as the same
/// binary multiples, as most people mean them).
fn size(key: &str, value: Option<String>, default: u64) -> Result<u64, ConfigError> {
    let Some(text) = value else {
        return Ok(default);
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let multiplier: Option<u64> = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => Some(1),
        "k" | "kb" | "kib" => Some(1 << 10),
        "m" | "mb" | "mib" => Some(1 << 20),
        "g" | "gb" | "gib" => Some(1 << 30),
        _ => None,
    };
    match (number.parse::<u64>().ok(), multiplier) {
        (Some(n), Some(m)) if n > 0 => n
            .checked_mul(m)
            .ok_or_else(|| ConfigError::invalid(key, format!("\"{text}\" is too large"))),
        _ => Err(ConfigError::invalid(
            key,
            format!(
                "\"{text}\" is not a size; write e.g. \"10MiB\", \"64KiB\" or a number of bytes"
            ),
        )),
    }
}

fn identity_config(file: FileIdentity) -> Result<IdentityConfig, ConfigError> {
    let user_id = match file.user_id.as_deref().map(str::trim) {
        None | Some("internal") => UserIdMode::Internal,
        Some("unionid") => UserIdMode::UnionId,
        Some("openid") => UserIdMode::OpenId,
        Some(other) => {
            return Err(ConfigError::invalid(
                "identity.user_id",
                format!("\"{other}\" is not a mode; use \"internal\", \"unionid\" or \"openid\""),
            ));
        }
    };
    let text = file
        .store
        .unwrap_or_else(|| "sqlite://wxgate.db".to_owned());
    let text = text.trim();
    let store = if let Some(path) = text.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(ConfigError::invalid(
                "identity.store",
                "names no file; write e.g. \"sqlite:///var/lib/wxgate/wxgate.db\"",
            ));
        }
        IdentityStoreConfig::Sqlite {
            path: PathBuf::from(path),
        }
    } else if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        if let Err(why) = crate::identity::postgres::parse_url(text) {
            return Err(ConfigError::invalid("identity.store", why));
        }
        IdentityStoreConfig::Postgres {
            url: Secret::new(text),
        }
    } else {
        return Err(ConfigError::invalid(
            "identity.store",
            "must start with sqlite:// or postgres://, e.g. \"sqlite://wxgate.db\"",
        ));
    };
    Ok(IdentityConfig { user_id, store })
}

fn session_config(file: FileSession) -> Result<SessionConfig, ConfigError> {
    let text = file.store.unwrap_or_else(|| "memory".to_owned());
    let text = text.trim();
    let store = if text == "memory" {
        SessionStoreConfig::Memory
    } else if [
        "redis://",
        "rediss://",
        "redis+unix://",
        "unix://",
        "redis+sentinel://",
    ]
    .iter()
    .any(|p| text.starts_with(p))
    {
        // Parsed (not connected) here, so `wxgate check` catches a bad URL; the error names the
        // problem, never the URL, which may hold a password.
        if let Err(why) = crate::shared::check_url(text) {
            return Err(ConfigError::invalid("session.store", why));
        }
        SessionStoreConfig::Redis {
            url: Secret::new(text),
        }
    } else {
        return Err(ConfigError::invalid(
            "session.store",
            "must be \"memory\" or a redis:// URL, e.g. \"redis://127.0.0.1:6379/0\"",
        ));
    };
    let access_ttl = duration(
        "session.access_ttl",
        file.access_ttl,
        Duration::from_secs(2 * 3600),
    )?;
    let refresh_ttl = duration(
        "session.refresh_ttl",
        file.refresh_ttl,
        Duration::from_secs(30 * 86400),
    )?;
    if refresh_ttl < access_ttl {
        return Err(ConfigError::invalid(
            "session.refresh_ttl",
            "is shorter than session.access_ttl; a refresh token must outlive the access token it renews",
        ));
    }
    let signing_key = match file.signing_key {
        None => None,
        Some(key) if key.len() < MIN_SIGNING_KEY_BYTES => {
            return Err(ConfigError::invalid(
                "session.signing_key",
                format!(
                    "is {} bytes; use at least {MIN_SIGNING_KEY_BYTES} random bytes, e.g. the output of `openssl rand -base64 48`",
                    key.len()
                ),
            ));
        }
        Some(key) => Some(Secret::new(key)),
    };
    let max_sessions = match file.max_sessions {
        None => 1_000_000,
        Some(n @ 1..) => n,
        Some(_) => {
            return Err(ConfigError::invalid(
                "session.max_sessions",
                "must be at least 1, e.g. 1000000",
            ));
        }
    };
    Ok(SessionConfig {
        store,
        access_ttl,
        refresh_ttl,
        signing_key,
        max_sessions,
    })
}

/// Request headers that have a meaning of their own and so cannot be used as identity headers.
const NOT_IDENTITY_HEADERS: &[&str] = &[
    "host",
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "content-length",
    "content-type",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
];

fn headers_config(file: FileHeaders) -> Result<HeadersConfig, ConfigError> {
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut header = |field: &str, value: Option<String>, default: &str| {
        let key = format!("headers.{field}");
        let text = value.unwrap_or_else(|| default.to_owned());
        let text = text.trim();
        let name = HeaderName::from_bytes(text.as_bytes()).map_err(|_| {
            ConfigError::invalid(
                &key,
                format!("\"{text}\" is not a valid header name; use letters, digits and -, e.g. \"{default}\""),
            )
        })?;
        if text.contains('_') || text.contains('.') {
            return Err(ConfigError::invalid(
                &key,
                format!(
                    "\"{text}\" contains _ or .; proxies drop or rewrite such names, use dashes, e.g. \"{default}\""
                ),
            ));
        }
        if NOT_IDENTITY_HEADERS.contains(&name.as_str()) {
            return Err(ConfigError::invalid(
                &key,
                format!(
                    "\"{text}\" is a standard header with its own meaning; pick a name of your own, e.g. \"{default}\""
                ),
            ));
        }
        if let Some((other, _)) = seen.iter().find(|(_, n)| n == name.as_str()) {
            return Err(ConfigError::invalid(
                &key,
                format!(
                    "\"{text}\" is already used by {other}; each identity header needs its own name"
                ),
            ));
        }
        seen.push((key, name.as_str().to_owned()));
        Ok(name)
    };
    let user_id = header("user_id", file.user_id, "X-User-Id")?;
    let appid = header("appid", file.appid, "X-WeChat-AppId")?;
    let openid = header("openid", file.openid, "X-WeChat-OpenId")?;
    let unionid = header("unionid", file.unionid, "X-WeChat-UnionId")?;
    let phone = match file.phone {
        Some(name) => Some(header("phone", Some(name), "X-WeChat-Phone")?),
        None => None,
    };
    Ok(HeadersConfig {
        user_id,
        appid,
        openid,
        unionid,
        phone,
        allow_underscores: file.allow_underscores.unwrap_or(false),
    })
}

fn routes_config(
    files: Vec<FileRoute>,
    server: &ServerConfig,
    apps: &[AppConfig],
) -> Result<RouteTable, ConfigError> {
    let mut routes = Vec::with_capacity(files.len());
    let mut names: HashMap<String, String> = HashMap::new();
    for (i, file) in files.into_iter().enumerate() {
        let key = |field: &str| format!("routes[{i}].{field}");
        let prefix = file.prefix.trim().to_owned();
        let normal = routes::normalize_path(&prefix, server.allow_encoded_slashes).ok();
        if !prefix.starts_with('/') || normal.as_deref() != Some(prefix.as_str()) {
            return Err(ConfigError::invalid(
                key("prefix"),
                format!(
                    "\"{prefix}\" is not a normalised absolute path; write it as requests are matched, e.g. \"{}\"",
                    normal
                        .filter(|n| n.starts_with('/'))
                        .unwrap_or_else(|| "/api/public/".to_owned())
                ),
            ));
        }
        // Routes below the auth prefix could never match: those paths are wxgate's own and never forwarded.
        if routes::has_prefix(&prefix, &server.auth_prefix) {
            return Err(ConfigError::invalid(
                key("prefix"),
                format!(
                    "\"{prefix}\" is under {}, which wxgate reserves for its own endpoints and never forwards; choose another prefix or change server.auth_prefix",
                    server.auth_prefix
                ),
            ));
        }
        let auth = match file.auth.trim() {
            "public" => Policy::Public,
            "optional" => Policy::Optional,
            "required" => Policy::Required,
            other => {
                return Err(ConfigError::invalid(
                    key("auth"),
                    format!(
                        "\"{other}\" is not a policy; use \"public\", \"optional\" or \"required\""
                    ),
                ));
            }
        };
        let methods = match file.methods {
            None => None,
            Some(list) if list.is_empty() => {
                return Err(ConfigError::invalid(
                    key("methods"),
                    "is empty, so the rule would never match; list methods like [\"GET\", \"HEAD\"] or leave the key out for all",
                ));
            }
            Some(list) => {
                let mut methods = Vec::with_capacity(list.len());
                for m in list {
                    let upper = m.trim().to_ascii_uppercase();
                    let method = Method::from_bytes(upper.as_bytes())
                        .ok()
                        .filter(|_| !upper.is_empty())
                        .ok_or_else(|| {
                            ConfigError::invalid(
                                key("methods"),
                                format!("\"{m}\" is not an HTTP method; write e.g. \"GET\""),
                            )
                        })?;
                    methods.push(method);
                }
                Some(methods)
            }
        };
        let name = file
            .name
            .map(|n| n.trim().to_owned())
            .unwrap_or_else(|| prefix.clone());
        if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
            return Err(ConfigError::invalid(
                key("name"),
                "must be 1 to 64 printable characters; it labels metrics and logs",
            ));
        }
        // One name may label several rules of the same prefix (split by method); two different prefixes
        // under one name would add unrelated traffic together in the metrics.
        if let Some(other) = names.get(&name).filter(|p: &&String| **p != prefix) {
            return Err(ConfigError::invalid(
                key("name"),
                format!(
                    "\"{name}\" already names the route for \"{other}\"; give each route its own name"
                ),
            ));
        }
        names.insert(name.clone(), prefix.clone());
        let browser_login = match file.browser_login.as_deref().map(str::trim) {
            None => None,
            Some(app) => {
                if !apps
                    .iter()
                    .any(|a| a.name == app && a.kind.is_browser() && a.public_url.is_some())
                {
                    return Err(ConfigError::invalid(
                        key("browser_login"),
                        format!(
                            "\"{app}\" is not a configured app of kind \"web\" or \"oa\" with a public_url; name one"
                        ),
                    ));
                }
                if auth == Policy::Public {
                    return Err(ConfigError::invalid(
                        key("browser_login"),
                        "has no effect on a public route; remove it or make the route \"optional\" or \"required\"",
                    ));
                }
                Some(Arc::from(format!(
                    "{}/oauth/{app}/start",
                    server.auth_prefix
                )))
            }
        };
        routes.push(Route {
            name: name.as_str().into(),
            prefix,
            methods,
            policy: auth,
            browser_login,
        });
    }
    Ok(RouteTable::new(routes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n";

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |var| {
            pairs
                .iter()
                .find(|(k, _)| *k == var)
                .map(|(_, v)| v.to_string())
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse("test.toml", text, &env_of(&[]))
    }

    /// The message an operator would see for `text`.
    fn error(text: &str) -> String {
        parse(text)
            .expect_err("config should be refused")
            .to_string()
    }

    #[test]
    fn the_shipped_config_parses_with_its_variables_set() {
        let env = env_of(&[
            ("WXGATE_SHOP_SECRET", "0123456789abcdef0123456789abcdef"),
            (
                "WXGATE_SIGNING_KEY",
                "an-hmac-key-that-is-long-enough-for-hs256",
            ),
        ]);
        let config = Config::parse("config.toml", include_str!("../config.toml"), &env).unwrap();
        assert_eq!(config.server.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(
            config.server.admin_listen,
            "127.0.0.1:9090".parse().unwrap()
        );
        assert_eq!(config.upstream.authority.as_str(), "127.0.0.1:3000");
        assert_eq!(config.wechat.api_base, "https://api.weixin.qq.com");
        assert_eq!(config.apps.len(), 1);
        assert_eq!(config.apps[0].kind, AppKind::MiniProgram);
        assert_eq!(
            config.apps[0].secret.expose(),
            "0123456789abcdef0123456789abcdef"
        );
        assert_eq!(config.session.access_ttl, Duration::from_secs(7200));
        assert_eq!(config.session.refresh_ttl, Duration::from_secs(30 * 86400));
        assert!(matches!(
            config.identity.store,
            IdentityStoreConfig::Sqlite { .. }
        ));
        let policies: Vec<_> = config
            .routes
            .routes()
            .iter()
            .map(|r| (r.prefix.as_str(), r.policy))
            .collect();
        assert_eq!(
            policies,
            [
                ("/api/public/", Policy::Public),
                ("/api/feed", Policy::Optional),
                ("/", Policy::Required)
            ]
        );
        assert_eq!(config.headers.user_id.as_str(), "x-user-id");
    }

    #[test]
    fn the_shipped_config_names_a_missing_secret() {
        let err =
            Config::parse("config.toml", include_str!("../config.toml"), &env_of(&[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "apps[0].secret: environment variable WXGATE_SHOP_SECRET is not set; export it, or write ${WXGATE_SHOP_SECRET:-default} to give a default"
        );
    }

    #[test]
    fn defaults_fill_everything_but_the_upstream() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.server.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.server.auth_prefix, "/auth");
        assert_eq!(config.upstream.timeout, Duration::from_secs(60));
        assert!(config.routes.routes().is_empty());
        assert_eq!(config.headers.unionid.as_str(), "x-wechat-unionid");
        assert!(!config.headers.allow_underscores);
        assert!(error("").contains("missing field `upstream`"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err =
            error("[server]\nlistn = \"0.0.0.0:1\"\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n");
        assert!(
            err.starts_with("server.listn: unknown key `listn`, expected one of `listen`"),
            "{err}"
        );
        let err = error(&format!(
            "{MINIMAL}[[routes]]\nprefix = \"/\"\nauth = \"public\"\npolicy = \"x\"\n"
        ));
        assert!(
            err.starts_with("routes[0].policy: unknown key `policy`"),
            "{err}"
        );
        let err = error(&format!("{MINIMAL}[logging]\nlevel = \"info\"\n"));
        assert!(err.starts_with("logging: unknown key `logging`"), "{err}");
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let err = error("[upstream]\nurl = \"http://127.0.0.1:3000\n");
        assert!(err.starts_with("test.toml:2:"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn interpolation_reads_the_environment() {
        let env = env_of(&[("HOST", "10.0.0.5"), ("EMPTY", "")]);
        let get = |s: &str| interpolate("k", s, &env).map_err(|e| e.to_string());
        assert_eq!(get("http://${HOST}:3000").unwrap(), "http://10.0.0.5:3000");
        assert_eq!(get("${MISSING:-fallback}").unwrap(), "fallback");
        assert_eq!(get("${EMPTY:-fallback}").unwrap(), "fallback");
        assert_eq!(get("${HOST:-fallback}").unwrap(), "10.0.0.5");
        assert_eq!(get("${EMPTY}").unwrap(), "");
        assert_eq!(get("cost: $$5 and $x").unwrap(), "cost: $5 and $x");
        assert_eq!(get("${MISSING:-}").unwrap(), "");
        assert!(
            get("${MISSING}")
                .unwrap_err()
                .contains("MISSING is not set")
        );
        assert!(get("${HOST").unwrap_err().contains("without a closing"));
        assert!(
            get("${9X}")
                .unwrap_err()
                .contains("not a variable reference")
        );
        // The value of a variable is not interpolated again.
        let env = env_of(&[("A", "${B}")]);
        assert_eq!(interpolate("k", "${A}", &env).unwrap(), "${B}");
    }

    #[test]
    fn interpolation_applies_inside_arrays_and_names_the_key() {
        let text = "[server]\ntrusted_proxies = [\"10.0.0.1\", \"${PROXY}\"]\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n";
        let err = error(text);
        assert!(
            err.starts_with("server.trusted_proxies[1]: environment variable PROXY"),
            "{err}"
        );
        let config = Config::parse("t", text, &env_of(&[("PROXY", "192.168.0.0/16")])).unwrap();
        assert_eq!(config.server.trusted_proxies.len(), 2);
    }

    #[test]
    fn durations_are_human() {
        let text =
            |d: &str| format!("[upstream]\nurl = \"http://127.0.0.1:3000\"\ntimeout = \"{d}\"\n");
        assert_eq!(
            parse(&text("500ms")).unwrap().upstream.timeout,
            Duration::from_millis(500)
        );
        assert_eq!(
            parse(&text("2h")).unwrap().upstream.timeout,
            Duration::from_secs(7200)
        );
        assert_eq!(
            parse(&text("30d")).unwrap().upstream.timeout,
            Duration::from_secs(30 * 86400)
        );
        assert!(error(&text("30")).starts_with("upstream.timeout: \"30\" is not a duration"));
        assert!(error(&text("0s")).starts_with("upstream.timeout: must be longer than zero"));
        let wrong_type = error("[upstream]\nurl = \"http://127.0.0.1:3000\"\ntimeout = 30\n");
        assert!(
            wrong_type.starts_with("upstream.timeout: invalid type"),
            "{wrong_type}"
        );
    }

    #[test]
    fn cross_field_rules_name_the_key_and_the_fix() {
        let cases: &[(&str, &str)] = &[
            (
                "[server]\nlisten = \"localhost:80\"\n",
                "server.listen: \"localhost:80\" is not an IP:PORT address",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:9090\"\nadmin_listen = \"127.0.0.1:9090\"\n",
                "server.admin_listen: is the same address as server.listen",
            ),
            (
                "[server]\nworkers = 0\n",
                "server.workers: 0 is out of range",
            ),
            (
                "[wechat]\nca_file = \"/nonexistent/ca.pem\"\n",
                "wechat.ca_file: cannot read /nonexistent/ca.pem",
            ),
            (
                "[wechat]\nca_file = \"Cargo.toml\"\n",
                "wechat.ca_file: Cargo.toml holds no certificate",
            ),
            (
                "[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
                "server.trusted_proxies[0]: \"10.0.0.0/33\" is neither",
            ),
            ("[server]\nauth_prefix = \"/\"\n", "server.auth_prefix:"),
            (
                "[[apps]]\nname = \"shop\"\nkind = \"miniprogram\"\nappid = \"wx0123456789abcdef\"\nsecret = \"s\"\n[[apps]]\nname = \"shop\"\nkind = \"app\"\nappid = \"wx0123456789abcde0\"\nsecret = \"s\"\n",
                "apps[1].name: \"shop\" is already the name of apps[0]",
            ),
            (
                "[[apps]]\nname = \"a\"\nkind = \"miniprogram\"\nappid = \"wx0123456789abcdef\"\nsecret = \"s\"\n[[apps]]\nname = \"b\"\nkind = \"app\"\nappid = \"wx0123456789abcdef\"\nsecret = \"s\"\n",
                "apps[1].appid: wx0123456789abcdef is already the appid of apps[0]",
            ),
            (
                "[[apps]]\nname = \"a\"\nkind = \"mini\"\nappid = \"wx0123456789abcdef\"\nsecret = \"s\"\n",
                "apps[0].kind: \"mini\" is not an app kind",
            ),
            (
                "[[apps]]\nname = \"a\"\nkind = \"app\"\nappid = \"0123\"\nsecret = \"s\"\n",
                "apps[0].appid: \"0123\" is not a WeChat AppID",
            ),
            (
                "[[apps]]\nname = \"a\"\nkind = \"app\"\nappid = \"wx0123456789abcdef\"\nsecret = \"\"\n",
                "apps[0].secret: is empty",
            ),
            (
                "[identity]\nuser_id = \"email\"\n",
                "identity.user_id: \"email\" is not a mode",
            ),
            (
                "[identity]\nstore = \"mysql://x\"\n",
                "identity.store: must start with sqlite:// or postgres://",
            ),
            (
                "[session]\nstore = \"memcached://x\"\n",
                "session.store: must be \"memory\" or a redis:// URL",
            ),
            (
                "[session]\nsigning_key = \"short\"\n",
                "session.signing_key: is 5 bytes; use at least 32",
            ),
            (
                "[session]\naccess_ttl = \"2d\"\nrefresh_ttl = \"1d\"\n",
                "session.refresh_ttl: is shorter than session.access_ttl",
            ),
            (
                "[headers]\nuser_id = \"X User\"\n",
                "headers.user_id: \"X User\" is not a valid header name",
            ),
            (
                "[headers]\nuser_id = \"X_User_Id\"\n",
                "headers.user_id: \"X_User_Id\" contains _ or .",
            ),
            (
                "[headers]\nuser_id = \"Authorization\"\n",
                "headers.user_id: \"Authorization\" is a standard header",
            ),
            (
                "[headers]\nopenid = \"X-User-Id\"\n",
                "headers.openid: \"X-User-Id\" is already used by headers.user_id",
            ),
            (
                "[[routes]]\nprefix = \"api\"\nauth = \"public\"\n",
                "routes[0].prefix: \"api\" is not a normalised absolute path",
            ),
            (
                "[[routes]]\nprefix = \"/api/../x\"\nauth = \"public\"\n",
                "routes[0].prefix: \"/api/../x\" is not a normalised absolute path; write it as requests are matched, e.g. \"/x\"",
            ),
            (
                "[[routes]]\nprefix = \"/auth/login\"\nauth = \"public\"\n",
                "routes[0].prefix: \"/auth/login\" is under /auth",
            ),
            (
                "[[routes]]\nprefix = \"/x\"\nauth = \"open\"\n",
                "routes[0].auth: \"open\" is not a policy",
            ),
            (
                "[[routes]]\nprefix = \"/x\"\nauth = \"public\"\nmethods = []\n",
                "routes[0].methods: is empty",
            ),
            (
                "[[routes]]\nprefix = \"/x\"\nauth = \"public\"\nmethods = [\"GE T\"]\n",
                "routes[0].methods: \"GE T\" is not an HTTP method",
            ),
            (
                "[[routes]]\nprefix = \"/x\"\nauth = \"public\"\nname = \"n\"\n[[routes]]\nprefix = \"/y\"\nauth = \"public\"\nname = \"n\"\n",
                "routes[1].name: \"n\" already names the route for \"/x\"",
            ),
            (
                "[wechat]\nopen_base = \"open.weixin.qq.com\"\n",
                "wechat.open_base: \"open.weixin.qq.com\" is not a base URL",
            ),
            (
                "[[apps]]\nname = \"a\"\nkind = \"web\"\nappid = \"wx0123456789abcdef\"\nsecret = \"s\"\nscope = \"snsapi_base\"\n",
                "apps[0].scope: applies only to kind = \"oa\"",
            ),
            (
                "[[apps]]\nname = \"a\"\nkind = \"oa\"\nappid = \"wx0123456789abcdef\"\nsecret = \"s\"\nscope = \"snsapi_login\"\n",
                "apps[0].scope: \"snsapi_login\" is not an official-account scope",
            ),
            (
                "[[apps]]\nname = \"a\"\nkind = \"oa\"\nappid = \"wx0123456789abcdef\"\nsecret = \"s\"\nscope = \"snsapi_base\"\nfetch_userinfo = true\n",
                "apps[0].fetch_userinfo: needs an OAuth app with a user-info scope",
            ),
            (
                "[[apps]]\nname = \"a\"\nkind = \"miniprogram\"\nappid = \"wx0123456789abcdef\"\nsecret = \"s\"\npublic_url = \"https://m.example.com\"\n",
                "apps[0].public_url: applies only to kind = \"web\" or \"oa\"",
            ),
            (
                "[[apps]]\nname = \"a\"\nkind = \"oa\"\nappid = \"wx0123456789abcdef\"\nsecret = \"s\"\npublic_url = \"http://m.example.com\"\n",
                "apps[0].public_url: \"http://m.example.com\" is not an origin",
            ),
            (
                "[[apps]]\nname = \"a\"\nkind = \"oa\"\nappid = \"wx0123456789abcdef\"\nsecret = \"s\"\npublic_url = \"https://m.example.com/h5\"\n",
                "apps[0].public_url: \"https://m.example.com/h5\" is not an origin",
            ),
            (
                "[[routes]]\nprefix = \"/h5/\"\nauth = \"required\"\nbrowser_login = \"h5\"\n",
                "routes[0].browser_login: \"h5\" is not a configured app of kind \"web\" or \"oa\" with a public_url",
            ),
        ];
        for (section, expected) in cases {
            let err = error(&format!("{MINIMAL}{section}"));
            assert!(
                err.starts_with(expected),
                "\nexpected: {expected}\n     got: {err}"
            );
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn oauth_apps_get_their_scopes_and_browser_routes_their_login() {
        let config = parse(&format!(
            "{MINIMAL}[wechat]\nopen_base = \"http://127.0.0.1:9/\"\n[[apps]]\nname = \"mobile\"\nkind = \"app\"\nappid = \"wx0123456789abcde1\"\nsecret = \"s\"\nfetch_userinfo = true\n[[apps]]\nname = \"site\"\nkind = \"web\"\nappid = \"wx0123456789abcde2\"\nsecret = \"s\"\npublic_url = \"https://www.example.com/\"\n[[apps]]\nname = \"h5\"\nkind = \"oa\"\nappid = \"wx0123456789abcde3\"\nsecret = \"s\"\nscope = \"snsapi_base\"\npublic_url = \"https://m.example.com\"\n[session]\nsigning_key = \"signing-key-signing-key-signing-key!\"\n[[routes]]\nprefix = \"/h5/\"\nauth = \"required\"\nbrowser_login = \"h5\"\n"
        ))
        .unwrap();
        assert_eq!(config.wechat.open_base, "http://127.0.0.1:9");
        let scopes: Vec<&str> = config.apps.iter().map(|a| a.scope).collect();
        assert_eq!(scopes, ["snsapi_userinfo", "snsapi_login", "snsapi_base"]);
        assert!(config.apps[0].fetch_userinfo);
        assert_eq!(
            config.apps[1].public_url.as_deref(),
            Some("https://www.example.com")
        );
        assert_eq!(
            config.routes.routes()[0].browser_login.as_deref(),
            Some("/auth/oauth/h5/start")
        );
    }

    #[test]
    fn upstream_urls_are_checked() {
        let cases = [
            (
                "http://127.0.0.1:3000/?x=1",
                "upstream.url: must not have a query",
            ),
            (
                "https://10.0.0.1",
                "upstream.url: https upstreams are not supported yet",
            ),
            (
                "ftp://10.0.0.1",
                "upstream.url: \"ftp://10.0.0.1\" needs the http:// scheme",
            ),
            (
                "127.0.0.1:3000",
                "upstream.url: \"127.0.0.1:3000\" needs the http:// scheme",
            ),
            (
                "http://user:pw@10.0.0.1",
                "upstream.url: must not carry user:password",
            ),
            ("not a url", "upstream.url: \"not a url\" is not a URL"),
        ];
        for (url, expected) in cases {
            let err = error(&format!("[upstream]\nurl = \"{url}\"\n"));
            assert!(
                err.starts_with(expected),
                "\nexpected: {expected}\n     got: {err}"
            );
        }
        let config = parse("[upstream]\nurl = \"http://10.0.0.1:3000/base/\"\n").unwrap();
        assert_eq!(config.upstream.base_path, "/base");
    }

    #[test]
    fn wechat_api_base_is_checked_without_repeating_credentials() {
        for (url, expected) in [
            (
                "https://user:hunter2@api.weixin.qq.com",
                "wechat.api_base: must not carry user:password",
            ),
            (
                "http://127.0.0.1:9/?x=1",
                "wechat.api_base: must not have a query",
            ),
            (
                "ftp://127.0.0.1",
                "wechat.api_base: \"ftp://127.0.0.1\" needs an http:// or https:// scheme",
            ),
        ] {
            let err = error(&format!("{MINIMAL}[wechat]\napi_base = \"{url}\"\n"));
            assert!(
                err.starts_with(expected),
                "\nexpected: {expected}\n     got: {err}"
            );
            assert!(!err.contains("hunter2"), "{err}");
        }
        let config = parse(&format!(
            "{MINIMAL}[wechat]\napi_base = \"http://127.0.0.1:9/base/\"\n"
        ))
        .unwrap();
        assert_eq!(config.wechat.api_base, "http://127.0.0.1:9/base");
    }

    #[test]
    fn secrets_never_print() {
        let text = format!(
            "{MINIMAL}[[apps]]\nname = \"a\"\nkind = \"app\"\nappid = \"wx0123456789abcdef\"\nsecret = \"topsecretvalue\"\n[session]\nsigning_key = \"signing-key-signing-key-signing-key!\"\nstore = \"redis://:hunter2@10.0.0.9/0\"\n"
        );
        let config = parse(&text).unwrap();
        let printed = format!("{config:?} {}", config.apps[0].secret);
        for secret in ["topsecretvalue", "signing-key-signing", "hunter2"] {
            assert!(!printed.contains(secret), "{secret} leaked");
        }
        assert!(printed.contains("***"));
    }

    #[test]
    fn store_urls_are_checked_without_repeating_them() {
        for (store, key) in [
            (
                "[session]\nsigning_key = \"signing-key-signing-key-signing-key!\"\nstore = \"redis://:hunter2@10.0.0.9:notaport/0\"\n",
                "session.store",
            ),
            (
                "[identity]\nstore = \"postgres://u:hunter2@10.0.0.9:notaport/db\"\n",
                "identity.store",
            ),
        ] {
            let error = parse(&format!("{MINIMAL}{store}")).unwrap_err().to_string();
            assert!(error.contains(key), "{error}");
            assert!(!error.contains("hunter2"), "{error}");
        }
    }
}
