//! The offline demo: a sample backend and wxgate (with the shipped `config.toml`) on loopback, and a
//! scripted client that shows what wxgate does to each request.
//!
//! ```text
//! cargo run --example demo            # play the script and exit
//! cargo run --example demo -- --serve # then keep running, for your own curl requests
//! ```

use std::time::Duration;

use http::{HeaderName, HeaderValue, Request};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use wxgate::body;
use wxgate::sample_backend::{Options, SampleBackend};
use wxgate::{Config, Listeners, Server};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let serve = std::env::args().any(|a| a == "--serve");
    let backend =
        SampleBackend::start(TcpListener::bind("127.0.0.1:0").await?, Options::default())?;

    // The shipped config.toml, with the values it reads from the environment supplied here.
    let upstream = backend.url();
    let env = move |var: &str| match var {
        "WXGATE_UPSTREAM" => Some(upstream.clone()),
        "WXGATE_SHOP_SECRET" => Some("demo-secret-not-used-until-login".to_owned()),
        "WXGATE_SIGNING_KEY" => Some("demo-signing-key-at-least-32-bytes-long".to_owned()),
        _ => None,
    };
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let config = Config::parse("config.toml", &std::fs::read_to_string(path)?, &env)?;
    let listeners = Listeners {
        main: TcpListener::bind("127.0.0.1:0").await?,
        admin: TcpListener::bind("127.0.0.1:0").await?,
    };
    let (gate, admin) = (listeners.main.local_addr()?, listeners.admin.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = Server::new(config).await?;
    let readiness = server.readiness();
    let server = tokio::spawn(server.serve(listeners, async {
        let _ = stopped.await;
    }));
    while !readiness.is_ready() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    println!("wxgate demo");
    println!("  sample backend  {}", backend.url());
    println!(
        "  wxgate          http://{gate}   (routes from config.toml: /api/public/ public, /api/feed optional, / required)"
    );
    println!("  admin           http://{admin}/metrics");

    let client = Client::builder(TokioExecutor::new()).build_http::<body::Body>();
    let steps = [
        Step {
            title: "Browse a public route, trying to forge an identity",
            target: "/api/public/products",
            headers: &[("X-User-Id", "admin"), ("x_user_id", "admin")],
        },
        Step::plain("Call a protected route without logging in", "/api/orders"),
        Step::plain(
            "Sneak into it through a public prefix with ../",
            "/api/public/../orders",
        ),
        Step::plain(
            "The same, with the dots percent-encoded",
            "/api/public/%2e%2e/orders",
        ),
        Step::plain("Hide a slash in the path as %2F", "/api/public/..%2Forders"),
        Step::plain("wxgate's own endpoints are never forwarded", "/auth/login"),
    ];
    for (
        n,
        Step {
            title,
            target,
            headers,
        },
    ) in steps.iter().enumerate()
    {
        let before = backend.requests().len();
        let mut request = Request::get(format!("http://{gate}{target}"));
        for (name, value) in headers.iter() {
            request = request.header(
                HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(value)?,
            );
        }
        let response = client.request(request.body(body::empty())?).await?;
        let status = response.status();
        let text =
            String::from_utf8_lossy(&response.into_body().collect().await?.to_bytes()).into_owned();
        println!("\n{}. {title}", n + 1);
        let sent: Vec<String> = headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        println!("   GET {target}  {}", sent.join("  "));
        println!("   <- {status}");
        match backend.requests().get(before) {
            Some(seen) => {
                let identity: Vec<String> = seen
                    .headers
                    .iter()
                    .filter(|(k, _)| {
                        k.as_str().contains("user") || k.as_str().starts_with("x-wechat")
                    })
                    .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                    .collect();
                println!(
                    "   backend saw GET {} with identity headers: {}",
                    seen.path,
                    if identity.is_empty() {
                        "none".to_owned()
                    } else {
                        identity.join(", ")
                    }
                );
            }
            None => println!("   backend saw nothing; the client got {text}"),
        }
    }

    if serve {
        println!("\nServing until Ctrl-C. Try: curl -i http://{gate}/api/public/hello");
        tokio::signal::ctrl_c().await?;
    }
    let _ = stop.send(());
    server.await??;
    Ok(())
}

/// One request of the scripted client.
struct Step {
    title: &'static str,
    target: &'static str,
    headers: &'static [(&'static str, &'static str)],
}

impl Step {
    fn plain(title: &'static str, target: &'static str) -> Self {
        Step {
            title,
            target,
            headers: &[],
        }
    }
}
