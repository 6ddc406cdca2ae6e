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

/// [`ROUTES`] with `[limits]` set to `limits` (the auth rate limit off).
fn limited(limits: &str) -> String {
    format!("{ROUTES}\n[limits]\nauth_per_minute = 0\n{limits}\n")
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_and_are_not_forwarded() {
    let gate = Gate::with_config(&limited("max_body = \"1KiB\""))
        .start()
        .await;
    let http = Http::h1();
    let url = gate.url("/api/public/upload");
    let post = |body: wxgate::body::Body| http.send(http::Method::POST, &url, &[], body);
    let declared = post(bytes_body(vec![b'x'; 2048])).await;
    assert_eq!(declared.status, 413);
    assert_eq!(declared.error(), "payload_too_large");
    assert!(gate.seen().is_empty(), "refused before forwarding");

    let frames = futures_util::stream::iter((0..4).map(|_| {
        Ok::<_, std::io::Error>(http_body::Frame::data(bytes::Bytes::from(vec![b'y'; 512])))
    }));
    let chunked = post(wxgate::body::boxed(http_body_util::StreamBody::new(frames))).await;
    assert_eq!(
        chunked.status, 413,
        "a chunked body is cut where it passes the limit"
    );
    assert_eq!(chunked.error(), "payload_too_large");

    let fits = post(bytes_body(vec![b'z'; 1024])).await;
    assert_eq!(fits.status, 200);
    assert_eq!(fits.json()["body_len"], 1024);
}

#[tokio::test]
async fn heads_over_the_limits_get_431() {
    let gate = Gate::with_config(&limited("max_header_bytes = \"8KiB\"\nmax_headers = 20"))
        .start()
        .await;
    let http = Http::h1();
    let big = "v".repeat(10 * 1024);
    let too_big = http
        .get(&gate.url("/api/public/x"), &[("x-big", &big)])
        .await;
    assert_eq!(too_big.status, 431);
    let names: Vec<String> = (0..30).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    let too_many = http.get(&gate.url("/api/public/x"), &many).await;
    assert_eq!(too_many.status, 431);
    let fine = http.get(&gate.url("/api/public/x"), &many[..10]).await;
    assert_eq!(fine.status, 200);
    assert_eq!(gate.seen().len(), 1);
}

/// Reads from `stream` until the server closes it; `None` if it is still open after `within`.
async fn closed_within(
    stream: &mut tokio::net::TcpStream,
    within: std::time::Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    match tokio::time::timeout(within, stream.read_to_end(&mut out)).await {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn slow_heads_and_idle_connections_are_cut_off() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    let gate = Gate::with_config(&limited("header_timeout = \"300ms\""))
        .start()
        .await;
    // Slowloris: a head that never ends.
    let mut slow = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    slow.write_all(b"GET /api/public/x HTTP/1.1\r\nHost: a\r\nX-Slow: 1\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut slow, Duration::from_secs(5))
            .await
            .is_some(),
        "a client that never finishes its head is cut off"
    );
    // A keep-alive connection that goes quiet after a request is closed too.
    let mut idle = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    idle.write_all(b"GET /api/public/x HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let answered = closed_within(&mut idle, Duration::from_secs(5))
        .await
        .expect("closed after going idle");
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
}

#[tokio::test]
async fn a_stalled_upload_gets_408() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    let gate = Gate::with_config(&limited("idle_timeout = \"300ms\""))
        .start()
        .await;
    let mut stream = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    stream
        .write_all(
            b"POST /api/public/upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789",
        )
        .await
        .unwrap();
    let answer = closed_within(&mut stream, Duration::from_secs(10))
        .await
        .expect("answered and closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gate = Gate::with_config(&limited("max_connections = 2"))
        .start()
        .await;
    let request = b"GET /api/public/x HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut buf = [0u8; 12];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(stream);
    }
    let mut third = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    third.write_all(request).await.unwrap();
    let mut buf = [0u8; 12];
    let waited = tokio::time::timeout(Duration::from_millis(500), third.read_exact(&mut buf)).await;
    assert!(
        waited.is_err(),
        "the third connection is not served while two are open"
    );
    drop(held.pop());
    tokio::time::timeout(Duration::from_secs(5), third.read_exact(&mut buf))
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
}

#[tokio::test]
async fn auth_bodies_are_capped_at_64_kib() {
    let gate = Gate::login().await;
    let padding = "x".repeat(70 * 1024);
    let reply = gate
        .post_json(
            "/auth/login",
            &json!({ "code": "abc", "encryptedData": padding }),
        )
        .await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.error(), "payload_too_large");
    assert_eq!(
        gate.wechat.calls(wxgate::wechat::mock::JSCODE2SESSION),
        0,
        "refused before WeChat is asked"
    );
}
