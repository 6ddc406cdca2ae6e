//! Test harness: a sample backend and a wxgate on 127.0.0.1:0, a raw HTTP client that sends paths
//! exactly as written, and a test authenticator with a few fixed tokens.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use wxgate::admin::Readiness;
use wxgate::auth::{AuthFuture, Authenticator, Identity};
use wxgate::body::{self, Body};
use wxgate::error::Error;
use wxgate::sample_backend::{Options, Recorded, SampleBackend};
use wxgate::session::SessionIds;
use wxgate::wechat::mock::MockWechat;
use wxgate::{Config, Listeners, Server};

/// Routes most tests use; `UPSTREAM` is replaced with the backend's URL.
pub const ROUTES: &str = r#"
[upstream]
url = "UPSTREAM"
timeout = "2s"

[[routes]]
prefix = "/api/public/"
auth = "public"
name = "public"

[[routes]]
prefix = "/api/feed"
auth = "optional"
name = "feed"

[[routes]]
prefix = "/"
auth = "required"
name = "private"
"#;

pub const USER: &str = "u_42";
pub const APPID: &str = "wx0123456789abcdef";
pub const OPENID: &str = "oVBkZ0aYgDMDIywRdgPW8-joxXc4";
pub const UNIONID: &str = "ocMvos6NjeKLIBqg5Mr9QjxrP1FA";

/// Fixed tokens: `good` proves [`USER`], `expired` and `forged` are refused, `outage` plays a store
/// that is down.
pub struct TestAuthenticator;

impl Authenticator for TestAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        let result = match token {
            "good" => Ok(Identity::new(
                APPID,
                SessionIds {
                    user_id: USER,
                    openid: OPENID,
                    unionid: Some(UNIONID),
                    phone: None,
                },
            )),
            "expired" => Err(Error::TokenExpired),
            "outage" => Err(Error::AuthUnavailable("session store down".into())),
            _ => Err(Error::InvalidToken),
        };
        Box::pin(std::future::ready(result))
    }
}

/// The mini program of [`LOGIN`]: bound to an Open Platform account, so logins carry unionid.
pub const SHOP_APPID: &str = "wx1111111111111111";
pub const SHOP_SECRET: &str = "shop-secret-0123456789";
/// A second mini program, not bound: its logins carry no unionid.
pub const LEGACY_APPID: &str = "wx2222222222222222";
pub const LEGACY_SECRET: &str = "legacy-secret-0123456789";
/// The company's mobile app, website and official account, all bound to the same Open Platform
/// account as the shop mini program.
pub const MOBILE_APPID: &str = "wx3333333333333333";
pub const MOBILE_SECRET: &str = "mobile-secret-0123456789";
pub const SITE_APPID: &str = "wx4444444444444444";
pub const SITE_SECRET: &str = "site-secret-0123456789";
pub const H5_APPID: &str = "wx5555555555555555";
pub const H5_SECRET: &str = "h5-secret-0123456789";
pub const SIGNING_KEY: &str = "test-signing-key-0123456789abcdef-0123";

/// [`ROUTES`] plus login: the mock WeChat (`WECHAT`), one bound mini program, SQLite in `DATADIR`.
pub const LOGIN: &str = r#"
[upstream]
url = "UPSTREAM"
timeout = "2s"

[wechat]
api_base = "WECHAT"
timeout = "1s"

[[apps]]
name = "shop"
kind = "miniprogram"
appid = "wx1111111111111111"
secret = "shop-secret-0123456789"

[identity]
store = "sqlite://DATADIR/identities.db"

[session]
signing_key = "test-signing-key-0123456789abcdef-0123"

[[routes]]
prefix = "/api/public/"
auth = "public"
name = "public"

[[routes]]
prefix = "/"
auth = "required"
name = "private"
"#;

/// A running wxgate in front of a running sample backend, with a mock WeChat beside it.
pub struct Gate {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub backend: SampleBackend,
    pub wechat: Arc<MockWechat>,
    /// Where the identity store lives (`DATADIR`); kept alive with the gate.
    pub data: Arc<tempfile::TempDir>,
    pub readiness: Readiness,
    /// Reloads the certificate when `[server.tls]` is set.
    pub tls: Option<wxgate::tls::TlsReloader>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

pub struct GateBuilder {
    toml: String,
    backend: Options,
    upstream: Option<String>,
    fixed_tokens: bool,
    wechat: Option<Arc<MockWechat>>,
    data: Option<Arc<tempfile::TempDir>>,
}

impl Gate {
    /// wxgate with [`ROUTES`] and the test authenticator's fixed tokens.
    pub async fn start() -> Gate {
        Gate::with_config(ROUTES).start().await
    }

    /// wxgate with real login ([`LOGIN`]) against a fresh mock WeChat.
    pub async fn login() -> Gate {
        Gate::with_config(LOGIN).real_auth().start().await
    }

    /// wxgate with `toml`, in which `UPSTREAM` is the backend's URL, `WECHAT` the mock WeChat's and
    /// `DATADIR` a temporary directory. Proxied requests are authenticated by the fixed tokens of
    /// [`TestAuthenticator`] unless [`GateBuilder::real_auth`] is called.
    pub fn with_config(toml: &str) -> GateBuilder {
        GateBuilder {
            toml: toml.to_owned(),
            backend: Options::default(),
            upstream: None,
            fixed_tokens: true,
            wechat: None,
            data: None,
        }
    }

    /// The same configuration, mock WeChat and data directory again: a restart of this gate.
    pub fn restart_builder(&self, toml: &str) -> GateBuilder {
        GateBuilder {
            toml: toml.to_owned(),
            backend: Options::default(),
            upstream: None,
            fixed_tokens: false,
            wechat: Some(self.wechat.clone()),
            data: Some(self.data.clone()),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Requests the backend has seen so far.
    pub fn seen(&self) -> Vec<Recorded> {
        self.backend.requests()
    }

    /// Sends shutdown and hands back the server task, for tests that watch it end.
    pub fn begin_shutdown(&mut self) -> tokio::task::JoinHandle<std::io::Result<()>> {
        let _ = self.shutdown.take().expect("running").send(());
        self.task.take().expect("running")
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl GateBuilder {
    pub fn backend(mut self, options: Options) -> Self {
        self.backend = options;
        self
    }

    /// Points the upstream somewhere other than the sample backend.
    pub fn upstream(mut self, url: &str) -> Self {
        self.upstream = Some(url.to_owned());
        self
    }

    /// Authenticate proxied requests with the login service's real tokens.
    pub fn real_auth(mut self) -> Self {
        self.fixed_tokens = false;
        self
    }

    pub async fn start(self) -> Gate {
        let backend = SampleBackend::start(bind().await, self.backend).expect("backend starts");
        let wechat = match self.wechat {
            Some(wechat) => wechat,
            None => {
                let wechat = MockWechat::start(bind().await).expect("mock WeChat starts");
                wechat.add_app(SHOP_APPID, SHOP_SECRET, true);
                wechat.add_app(LEGACY_APPID, LEGACY_SECRET, false);
                for (appid, secret) in [
                    (MOBILE_APPID, MOBILE_SECRET),
                    (SITE_APPID, SITE_SECRET),
                    (H5_APPID, H5_SECRET),
                ] {
                    wechat.add_app(appid, secret, true);
                }
                Arc::new(wechat)
            }
        };
        let data = match self.data {
            Some(data) => data,
            None => Arc::new(tempfile::tempdir().expect("temporary directory")),
        };
        let upstream = self.upstream.unwrap_or_else(|| backend.url());
        let listeners = Listeners {
            main: bind().await,
            admin: bind().await,
        };
        let addr = listeners.main.local_addr().unwrap();
        let admin = listeners.admin.local_addr().unwrap();
        let text = self
            .toml
            .replace("GATEURL", &format!("http://{addr}"))
            .replace("UPSTREAM", &upstream)
            .replace("WECHAT", &wechat.url())
            .replace("DATADIR", data.path().to_str().expect("utf-8 temp path"));
        // Tests log in far faster than any one client should; the rate limit has tests of its own.
        let text = match text.contains("[limits]") {
            true => text,
            false => text + "\n[limits]\nauth_per_minute = 0\n",
        };
        let config = Config::parse("test.toml", &text, &|_| None).expect("test config is valid");
        let mut server = Server::new(config).await.expect("server starts");
        if self.fixed_tokens {
            server = server.with_authenticator(Arc::new(TestAuthenticator));
        }
        let readiness = server.readiness();
        let tls = server.tls_reloader();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listeners, async {
            let _ = rx.await;
        }));
        wait_until("wxgate ready", || readiness.is_ready()).await;
        Gate {
            addr,
            admin,
            backend,
            wechat,
            data,
            readiness,
            tls,
            shutdown: Some(tx),
            task: Some(task),
        }
    }
}

pub async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0")
}

/// Polls `condition` every 10 ms until it holds; fails the test after 10 s.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error` code of a JSON error body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .expect("an error code")
            .to_owned()
    }
}

/// An HTTP/1.1 (or HTTP/2 prior-knowledge) client that sends the request target exactly as given.
pub struct Http {
    client: Client<HttpConnector, Body>,
}

impl Http {
    pub fn h1() -> Self {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn h2() -> Self {
        Http {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(Method::GET, url, headers, body::empty()).await
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let request = request.body(body).expect("valid request");
        let response = tokio::time::timeout(Duration::from_secs(30), self.client.request(request))
            .await
            .expect("response in time")
            .expect("request sent");
        let (parts, incoming) = response.into_parts();
        let body = incoming.collect().await.expect("body read").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub fn client(&self) -> &Client<HttpConnector, Body> {
        &self.client
    }
}

pub fn bytes_body(data: impl Into<Bytes>) -> Body {
    body::boxed(Full::new(data.into()))
}

/// Writes `request` as raw bytes on a new connection and reads until the server closes it; for
/// request targets an HTTP library would refuse or rewrite.
pub async fn raw(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("server answered in time")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw HTTP/1.1 response.
pub fn raw_status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

/// The values of every header of `recorded` whose name folds to `canonical` (case, `_`, `.`).
pub fn folded<'a>(headers: &'a HeaderMap, canonical: &str) -> Vec<(&'a str, &'a str)> {
    headers
        .iter()
        .filter(|(k, _)| wxgate::proxy::headers::same_header(k.as_str().as_bytes(), canonical))
        .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or("")))
        .collect()
}

impl Gate {
    /// POSTs `body` as JSON to `path`.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> Reply {
        Http::h1()
            .send(
                Method::POST,
                &self.url(path),
                &[("content-type", "application/json")],
                bytes_body(body.to_string()),
            )
            .await
    }

    /// Plays `wx.login()` for `user` in the shop mini program and posts the code; returns the reply.
    pub async fn login_as(&self, user: &str) -> Reply {
        let code = self.wechat.login_code(SHOP_APPID, user);
        self.post_json("/auth/login", &serde_json::json!({ "code": code }))
            .await
    }

    /// Logs `user` in and returns the login response body.
    pub async fn logged_in(&self, user: &str) -> serde_json::Value {
        let reply = self.login_as(user).await;
        assert_eq!(
            reply.status,
            200,
            "login failed: {:?}",
            String::from_utf8_lossy(&reply.body)
        );
        reply.json()
    }

    /// GETs `path` with `Authorization: Bearer token`.
    pub async fn get_with_token(&self, path: &str, token: &str) -> Reply {
        let auth = format!("Bearer {token}");
        Http::h1()
            .get(&self.url(path), &[("Authorization", &auth)])
            .await
    }
}
