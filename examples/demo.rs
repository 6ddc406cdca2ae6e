//! The offline demo: the mock WeChat, a sample backend and wxgate (with the shipped `config.toml`) on
//! loopback, and a scripted mini program that browses, logs in, calls its backend, refreshes and logs
//! out, printing what each side saw.
//!
//! ```text
//! cargo run --example demo            # play the script and exit
//! cargo run --example demo -- --serve # then keep running on 127.0.0.1:8080, for curl or for the
//!                                     # sample mini program in WeChat DevTools (any wx.login() code
//!                                     # is accepted by the mock in this mode)
//! ```

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use wxgate::body::{self, Body};
use wxgate::sample_backend::{Options, SampleBackend};
use wxgate::wechat::mock::{MockWechat, OauthKind};
use wxgate::{Config, Listeners, Server};

const APPID: &str = "wx0123456789abcdef";
const SECRET: &str = "demo-app-secret";
const MOBILE_APPID: &str = "wx00000000000000a1";
const MOBILE_SECRET: &str = "demo-mobile-secret";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let serve = std::env::args().any(|a| a == "--serve");
    let backend =
        SampleBackend::start(TcpListener::bind("127.0.0.1:0").await?, Options::default())?;
    let wechat = MockWechat::start(TcpListener::bind("127.0.0.1:0").await?)?;
    wechat.add_app(APPID, SECRET, true);
    wechat.add_app(MOBILE_APPID, MOBILE_SECRET, true);
    let data = tempfile::tempdir()?;

    // The shipped config.toml, with the values it reads from the environment supplied here.
    let (upstream, api) = (backend.url(), wechat.url());
    let store = format!("sqlite://{}", data.path().join("wxgate.db").display());
    let env = move |var: &str| match var {
        "WXGATE_UPSTREAM" => Some(upstream.clone()),
        "WXGATE_WECHAT_API" => Some(api.clone()),
        "WXGATE_SHOP_APPID" => Some(APPID.to_owned()),
        "WXGATE_SHOP_SECRET" => Some(SECRET.to_owned()),
        "WXGATE_SIGNING_KEY" => Some("demo-signing-key-at-least-32-bytes-long".to_owned()),
        "WXGATE_IDENTITY_STORE" => Some(store.clone()),
        _ => None,
    };
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    // The company's mobile app too (commented out in config.toml, which ships with the mini program only).
    let text = std::fs::read_to_string(path)?
        + &format!(
            "\n[[apps]]\nname = \"mobile\"\nkind = \"app\"\nappid = \"{MOBILE_APPID}\"\nsecret = \"{MOBILE_SECRET}\"\n"
        );
    let config = Config::parse("config.toml", &text, &env)?;
    // --serve listens where examples/miniprogram/api.js looks for it; the scripted run takes any port.
    let main_addr = if serve {
        "127.0.0.1:8080"
    } else {
        "127.0.0.1:0"
    };
    let listeners = Listeners {
        main: TcpListener::bind(main_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {main_addr}: {e}"))?,
        admin: TcpListener::bind("127.0.0.1:0").await?,
    };
    let (gate, admin) = (listeners.main.local_addr()?, listeners.admin.local_addr()?);
    let server = Server::new(config).await?;
    let readiness = server.readiness();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server.serve(listeners, async {
        let _ = stopped.await;
    }));
    while !readiness.is_ready() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    println!("wxgate demo: a mini program, wxgate, the backend and (mock) WeChat, all on loopback");
    println!(
        "  wxgate          http://{gate}   (config.toml: /api/public/ public, /api/feed optional, / required)"
    );
    println!("  backend         {}", backend.url());
    println!("  mock WeChat     {}", wechat.url());
    println!("  admin           http://{admin}/metrics");

    let app = MiniProgram {
        client: Client::builder(TokioExecutor::new()).build_http(),
        base: format!("http://{gate}"),
        backend: &backend,
    };

    step(
        1,
        "Browse a public route, trying to forge an identity header",
    );
    app.call(
        Method::GET,
        "/api/public/products",
        &[("X-User-Id", "admin")],
        None,
    )
    .await?;

    step(2, "Open a protected page without logging in");
    app.call(Method::GET, "/api/orders", &[], None).await?;

    step(3, "Sneak in through the public prefix with an encoded ../");
    app.call(Method::GET, "/api/public/%2e%2e/orders", &[], None)
        .await?;

    step(
        4,
        "The client SDK reacts to the 401: wx.login() gives a one-time code, posted to wxgate",
    );
    let code = wechat.login_code(APPID, "demo-user");
    println!(
        "   wx.login() -> code ({} characters, single use, 5 minutes)",
        code.len()
    );
    let login = app
        .call(
            Method::POST,
            "/auth/login",
            &[],
            Some(json!({ "code": code })),
        )
        .await?;
    println!(
        "   wxgate asked WeChat's jscode2session, linked the ids to a user, kept the session_key to itself"
    );

    step(5, "Retry the protected page with the access token");
    let access = login["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let bearer = format!("Bearer {access}");
    app.call(
        Method::GET,
        "/api/orders",
        &[("Authorization", &bearer)],
        None,
    )
    .await?;

    step(6, "Ask wxgate who we are");
    app.call(
        Method::GET,
        "/auth/session",
        &[("Authorization", &bearer)],
        None,
    )
    .await?;

    step(
        7,
        "The access token expires after 2 h: refresh (the refresh token rotates)",
    );
    let refresh = json!({ "refresh_token": login["refresh_token"] });
    let renewed = app
        .call(Method::POST, "/auth/refresh", &[], Some(refresh.clone()))
        .await?;

    step(
        8,
        "Someone replays the old refresh token: the whole session is revoked",
    );
    app.call(Method::POST, "/auth/refresh", &[], Some(refresh))
        .await?;
    let renewed_bearer = format!(
        "Bearer {}",
        renewed["access_token"].as_str().unwrap_or_default()
    );
    app.call(
        Method::GET,
        "/api/orders",
        &[("Authorization", &renewed_bearer)],
        None,
    )
    .await?;

    step(
        9,
        "Log in again, then log out: the token stops working at once",
    );
    let code = wechat.login_code(APPID, "demo-user");
    let login = app
        .call(
            Method::POST,
            "/auth/login",
            &[],
            Some(json!({ "code": code })),
        )
        .await?;
    let bearer = format!(
        "Bearer {}",
        login["access_token"].as_str().unwrap_or_default()
    );
    app.call(
        Method::POST,
        "/auth/logout",
        &[("Authorization", &bearer)],
        None,
    )
    .await?;
    app.call(
        Method::GET,
        "/api/orders",
        &[("Authorization", &bearer)],
        None,
    )
    .await?;

    step(
        10,
        "The same person opens the company's mobile app (WeChat SDK SendAuth): the same user_id",
    );
    let code = wechat.oauth_code(MOBILE_APPID, "demo-user", OauthKind::App);
    app.call(
        Method::POST,
        "/auth/oauth/login",
        &[],
        Some(json!({ "app": "mobile", "code": code })),
    )
    .await?;

    if serve {
        // WeChat DevTools' wx.login() gives codes the mock never minted: accept them as fresh logins.
        wechat.accept_any_code();
        println!("\nServing until Ctrl-C. Try: curl -i http://{gate}/api/public/hello");
        println!(
            "Mint a login code: curl -s -XPOST {}/__mock/login -d '{{\"appid\":\"{APPID}\",\"user\":\"me\"}}'",
            wechat.url()
        );
        tokio::signal::ctrl_c().await?;
    }
    let _ = stop.send(());
    server.await??;
    Ok(())
}

fn step(n: u32, title: &str) {
    println!("\n{n}. {title}");
}

/// The scripted client: sends a request and prints what the client and the backend saw.
struct MiniProgram<'a> {
    client: Client<HttpConnector, Body>,
    base: String,
    backend: &'a SampleBackend,
}

impl MiniProgram<'_> {
    async fn call(
        &self,
        method: Method,
        target: &str,
        headers: &[(&str, &str)],
        json: Option<Value>,
    ) -> anyhow::Result<Value> {
        let before = self.backend.requests().len();
        let mut request = Request::builder()
            .method(method.clone())
            .uri(format!("{}{target}", self.base));
        for (name, value) in headers {
            request = request.header(
                HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(value)?,
            );
        }
        let body = match &json {
            Some(value) => body::full(value.to_string()),
            None => body::empty(),
        };
        let response = self.client.request(request.body(body)?).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let shown: Vec<String> = headers
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}: {}",
                    if k.eq_ignore_ascii_case("authorization") {
                        "Bearer eyJ…"
                    } else {
                        v
                    }
                )
            })
            .collect();
        println!("   {method} {target}  {}", shown.join("  "));
        println!("   <- {status} {}", summarize(status, &value));
        if let Some(seen) = self.backend.requests().get(before) {
            let identity: Vec<String> = seen
                .headers
                .iter()
                .filter(|(k, _)| {
                    k.as_str().starts_with("x-user") || k.as_str().starts_with("x-wechat")
                })
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                .collect();
            let identity = if identity.is_empty() {
                "no identity headers".to_owned()
            } else {
                identity.join(", ")
            };
            println!(
                "   backend saw {} {} with {identity}",
                seen.method, seen.path
            );
        } else if !target.starts_with("/auth/") {
            println!("   backend saw nothing");
        }
        Ok(value)
    }
}

/// The response body as a client developer would want to see it, tokens shortened.
fn summarize(status: StatusCode, value: &Value) -> String {
    let Value::Object(map) = value else {
        return String::new();
    };
    if status.is_success() && map.contains_key("method") {
        return "(the backend's echo)".to_owned();
    }
    let fields: Vec<String> = map
        .iter()
        .map(|(k, v)| match v {
            // The tail: a refresh token starts with its session id, the same across rotations.
            Value::String(s) if k.ends_with("_token") => {
                format!("{k}: …{}", &s[s.len().saturating_sub(8)..])
            }
            other => format!("{k}: {other}"),
        })
        .collect();
    fields.join(", ")
}
