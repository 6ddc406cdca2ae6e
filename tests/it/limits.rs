//! `[limits]`: rate limits per client address on `/auth/*` and per user on proxied routes, and what
//! a client may send.

use serde_json::json;

use crate::support::*;

/// Posts a code nobody minted (a new one each time, so each would be a WeChat call).
async fn post_login(gate: &Gate, forwarded_for: Option<&str>) -> Reply {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let code = format!(
        "nosuchcode{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut headers = vec![("content-type", "application/json")];
    if let Some(ip) = forwarded_for {
        headers.push(("x-forwarded-for", ip));
    }
    Http::h1()
        .send(
            http::Method::POST,
            &gate.url("/auth/login"),
            &headers,
            bytes_body(json!({ "code": code }).to_string()),
        )
        .await
}

#[tokio::test]
async fn auth_requests_are_limited_per_client_address() {
    let config = LOGIN.replace(
        "[upstream]",
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n\n[upstream]",
    ) + "\n[limits]\nauth_per_minute = 60\nauth_burst = 3\n";
    let gate = Gate::with_config(&config).real_auth().start().await;
    for _ in 0..3 {
        let reply = post_login(&gate, Some("203.0.113.5")).await;
        assert_eq!(reply.error(), "invalid_code", "within the burst");
    }
    let limited = post_login(&gate, Some("203.0.113.5")).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.error(), "too_many_requests");
    assert_eq!(limited.headers["retry-after"], "1");
    let calls = gate.wechat.calls(wxgate::wechat::mock::JSCODE2SESSION);

    // Another client behind the same trusted proxy has its own allowance.
    let other = post_login(&gate, Some("203.0.113.6")).await;
    assert_eq!(other.error(), "invalid_code");
    // The rightmost untrusted address counts: a forged entry to its left changes nothing.
    let forged = post_login(&gate, Some("198.51.100.1, 203.0.113.5")).await;
    assert_eq!(forged.status, 429);
    assert_eq!(
        gate.wechat.calls(wxgate::wechat::mock::JSCODE2SESSION),
        calls + 1,
        "limited requests never reach WeChat"
    );
    // Proxied routes are not limited by the auth limit.
    let public = Http::h1()
        .get(
            &gate.url("/api/public/x"),
            &[("x-forwarded-for", "203.0.113.5")],
        )
        .await;
    assert_eq!(public.status, 200);
}

#[tokio::test]
async fn untrusted_clients_cannot_escape_the_limit_with_forwarded_for() {
    let config = format!("{LOGIN}\n[limits]\nauth_per_minute = 60\nauth_burst = 2\n");
    let gate = Gate::with_config(&config).real_auth().start().await;
    let statuses: Vec<u16> = futures_util::future::join_all(
        ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
            .into_iter()
            .map(|ip| post_login(&gate, Some(ip))),
    )
    .await
    .iter()
    .map(|r| r.status.as_u16())
    .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        2,
        "{statuses:?}"
    );
}

#[tokio::test]
async fn users_can_be_limited_on_proxied_routes() {
    let config = format!("{ROUTES}\n[limits]\nuser_per_minute = 60\nuser_burst = 2\n");
    let gate = Gate::with_config(&config).start().await;
    for _ in 0..2 {
        assert_eq!(gate.get_with_token("/api/orders", "good").await.status, 200);
    }
    let limited = gate.get_with_token("/api/orders", "good").await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.error(), "too_many_requests");
    assert!(limited.headers.contains_key("retry-after"));
    assert_eq!(
        gate.seen().len(),
        2,
        "the limited request was not forwarded"
    );
    // Anonymous requests to public routes are not per-user limited.
    for _ in 0..3 {
        let public = Http::h1().get(&gate.url("/api/public/x"), &[]).await;
        assert_eq!(public.status, 200);
    }
}
