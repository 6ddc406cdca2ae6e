//! Forwarding over real sockets: headers the backend receives, streaming both ways, HTTP/2 from the
//! client, and what the client gets when the backend is down or slow.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use wxgate::body;
use wxgate::sample_backend::{Options, download_byte};

use crate::support::*;

#[tokio::test]
async fn hop_by_hop_headers_are_removed() {
    let gate = Gate::start().await;
    let reply = Http::h1()
        .get(
            &gate.url("/api/public/x"),
            &[
                ("Connection", "keep-alive, X-Private-Hop"),
                ("X-Private-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Proxy-Authorization", "Basic eDp5"),
                ("X-End-To-End", "kept"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    let headers = &gate.seen()[0].headers;
    for gone in ["x-private-hop", "keep-alive", "te", "proxy-authorization"] {
        assert!(!headers.contains_key(gone), "{gone} was forwarded");
    }
    assert_eq!(headers["x-end-to-end"], "kept");
}

#[tokio::test]
async fn underscored_names_are_dropped_by_default() {
    let gate = Gate::start().await;
    let reply = Http::h1()
        .get(
            &gate.url("/api/public/x"),
            &[("Custom_Header", "v"), ("Custom-Header", "w")],
        )
        .await;
    assert_eq!(reply.status, 200);
    let headers = &gate.seen()[0].headers;
    assert!(!headers.contains_key("custom_header"));
    assert_eq!(headers["custom-header"], "w");
}

#[tokio::test]
async fn forwarded_headers_are_set_from_the_connection_not_the_client() {
    let gate = Gate::start().await;
    let reply = Http::h1()
        .get(
            &gate.url("/api/public/x"),
            &[
                ("Host", "shop.example.com"),
                ("X-Forwarded-For", "1.2.3.4"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "evil.example"),
                ("X-Real-IP", "1.2.3.4"),
                ("Forwarded", "for=1.2.3.4"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    let headers = &gate.seen()[0].headers;
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], "shop.example.com");
    assert_eq!(
        headers["host"], "shop.example.com",
        "the client's Host is preserved"
    );
    assert!(!headers.contains_key("x-real-ip"));
    assert!(!headers.contains_key("forwarded"));
}

#[tokio::test]
async fn a_trusted_proxy_extends_the_forwarded_chain() {
    let toml = ROUTES.replacen(
        "[upstream]",
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n\n[upstream]",
        1,
    );
    let gate = Gate::with_config(&toml).start().await;
    let reply = Http::h1()
        .get(
            &gate.url("/api/public/x"),
            &[
                ("X-Forwarded-For", "198.51.100.7"),
                ("X-Forwarded-Proto", "https"),
                ("x_forwarded_for", "6.6.6.6"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    let headers = &gate.seen()[0].headers;
    assert_eq!(headers["x-forwarded-for"], "198.51.100.7, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "https");
    assert!(!headers.contains_key("x_forwarded_for"));
}

#[tokio::test]
async fn request_ids_are_generated_or_kept_and_echoed() {
    let gate = Gate::start().await;
    let http = Http::h1();
    let reply = http.get(&gate.url("/api/public/x"), &[]).await;
    let generated = reply.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    assert_eq!(gate.seen()[0].headers["x-request-id"], generated.as_str());

    let reply = http
        .get(&gate.url("/api/public/x"), &[("X-Request-Id", "trace-123")])
        .await;
    assert_eq!(reply.headers["x-request-id"], "trace-123");
    assert_eq!(gate.seen()[1].headers["x-request-id"], "trace-123");

    // Errors carry the id too, so a client can quote it.
    let reply = http
        .get(&gate.url("/api/private"), &[("X-Request-Id", "trace-401")])
        .await;
    assert_eq!(
        (reply.status.as_u16(), &reply.headers["x-request-id"]),
        (401, &"trace-401".parse().unwrap())
    );
}

#[tokio::test]
async fn http2_clients_are_served_and_forwarded_as_http1() {
    let gate = Gate::start().await;
    let reply = Http::h2()
        .get(&gate.url("/api/public/h2"), &[("X-User-Id", "forged")])
        .await;
    assert_eq!(reply.status, 200);
    let seen = &gate.seen()[0];
    assert_eq!(seen.path, "/api/public/h2");
    assert_eq!(
        seen.headers["host"],
        gate.addr.to_string().as_str(),
        ":authority becomes Host"
    );
    assert_eq!(folded(&seen.headers, "x-user-id"), []);
}

#[tokio::test]
async fn a_large_upload_streams_through_intact() {
    const SIZE: usize = 100 * 1024 * 1024;
    // The backend answers after the whole body: allow the upload time on a loaded machine.
    let config = ROUTES.replace("timeout = \"2s\"", "timeout = \"60s\"");
    let gate = Gate::with_config(&format!("{config}\n[limits]\nmax_body = \"1GiB\"\n"))
        .start()
        .await;
    let chunk = Bytes::from(vec![0xA5u8; 1024 * 1024]);
    let mut expected = Sha256::new();
    for _ in 0..SIZE / chunk.len() {
        expected.update(&chunk);
    }
    let frames = futures_util::stream::iter(
        std::iter::repeat_n(chunk, SIZE / (1024 * 1024))
            .map(|c| Ok::<_, std::io::Error>(Frame::data(c))),
    );
    let reply = Http::h1()
        .send(
            Method::POST,
            &gate.url("/api/public/upload"),
            &[],
            body::boxed(StreamBody::new(frames)),
        )
        .await;
    assert_eq!(reply.status, 200);
    let echo = reply.json();
    assert_eq!(echo["body_len"], SIZE as u64);
    assert_eq!(echo["body_sha256"], hex::encode(expected.finalize()));
}

/// The client sends the next chunk only after the backend has received the previous one. A proxy
/// that buffered the body before forwarding would never deliver the first chunk, and this would hang.
#[tokio::test]
async fn uploads_are_forwarded_while_they_arrive() {
    let gate = Gate::start().await;
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let request_body = body::boxed(StreamBody::new(stream));
    let url = gate.url("/api/public/upload");
    let pending =
        tokio::spawn(async move { Http::h1().send(Method::POST, &url, &[], request_body).await });
    let chunk = Bytes::from(vec![7u8; 256 * 1024]);
    for i in 1..=8u64 {
        tx.send(Ok(Frame::data(chunk.clone())))
            .await
            .expect("upload still open");
        wait_until(
            &format!("backend received chunk {i} before the upload ended"),
            || gate.backend.bytes_received() >= i * chunk.len() as u64,
        )
        .await;
    }
    drop(tx);
    let reply = pending.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["body_len"], 8 * 256 * 1024);
}

#[tokio::test]
async fn a_large_download_streams_through_intact() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let gate = Gate::start().await;
    let request = http::Request::get(gate.url(&format!("/api/public/file?download={SIZE}")))
        .body(body::empty())
        .unwrap();
    let response = Http::h1()
        .client()
        .request(request)
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let (mut got, mut expected, mut offset) = (Sha256::new(), Sha256::new(), 0u64);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body intact").into_data() {
            got.update(&data);
            let reference: Vec<u8> = (offset..offset + data.len() as u64)
                .map(download_byte)
                .collect();
            expected.update(&reference);
            offset += data.len() as u64;
        }
    }
    assert_eq!(offset, SIZE);
    assert_eq!(got.finalize(), expected.finalize());
}

#[tokio::test]
async fn a_backend_that_is_down_gives_502() {
    // A port that was free a moment ago and has nobody listening now.
    let closed = bind().await.local_addr().unwrap();
    let gate = Gate::with_config(ROUTES)
        .upstream(&format!("http://{closed}"))
        .start()
        .await;
    let reply = Http::h1().get(&gate.url("/api/public/x"), &[]).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.error(), "upstream_unavailable");
    assert!(
        !String::from_utf8_lossy(&reply.body).contains(&closed.port().to_string()),
        "no address leaks"
    );
}

#[tokio::test]
async fn a_slow_backend_gives_504_at_the_configured_timeout() {
    let toml = ROUTES.replace("timeout = \"2s\"", "timeout = \"300ms\"");
    let gate = Gate::with_config(&toml)
        .backend(Options {
            delay: Duration::from_secs(5),
        })
        .start()
        .await;
    let started = Instant::now();
    let reply = Http::h1().get(&gate.url("/api/public/slow"), &[]).await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.error(), "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered at the timeout, not after the backend"
    );
}

#[tokio::test]
async fn upstream_base_path_is_prepended() {
    let gate = Gate::with_config(ROUTES).start().await;
    let base = format!("{}/v1/", gate.backend.url());
    let second = Gate::with_config(ROUTES).upstream(&base).start().await;
    let reply = Http::h1().get(&second.url("/api/public/x?q=1"), &[]).await;
    assert_eq!(reply.status, 200);
    // The second gate forwards to the first gate's backend.
    assert_eq!(gate.seen()[0].path, "/v1/api/public/x");
    assert_eq!(gate.seen()[0].query.as_deref(), Some("q=1"));
}

#[tokio::test]
async fn the_backend_can_be_spoken_to_in_http2() {
    let config = ROUTES.replace("timeout = \"2s\"", "timeout = \"2s\"\nhttp2 = true");
    let gate = Gate::with_config(&config).start().await;
    let reply = Http::h1()
        .send(
            Method::POST,
            &gate.url("/api/orders?x=1"),
            &[("authorization", "Bearer good")],
            bytes_body("over h2"),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["body_len"], 7);
    let seen = gate.seen();
    assert_eq!(seen[0].version, "HTTP/2.0");
    assert_eq!(seen[0].headers["x-user-id"], USER);
    assert_eq!(seen[0].query.as_deref(), Some("x=1"));
}

/// A backend written by hand, to control its connections: answers each request with `200 ok` and
/// counts the connections it accepted. With `close_silently`, it closes each connection after one
/// answer without saying so (no `Connection: close`), as a backend's idle timeout does.
async fn counting_backend(close_silently: bool) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = bind().await;
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buffer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buffer.drain(..end);
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(answer).await.is_err() || close_silently {
                        return;
                    }
                }
            });
        }
    });
    (url, accepted)
}

#[tokio::test]
async fn backend_connections_are_kept_alive_and_reused() {
    let (upstream, accepted) = counting_backend(false).await;
    let gate = Gate::with_config(ROUTES).upstream(&upstream).start().await;
    let http = Http::h1();
    for i in 0..20 {
        let reply = http.get(&gate.url(&format!("/api/public/{i}")), &[]).await;
        assert_eq!((reply.status.as_u16(), &reply.body[..]), (200, &b"ok"[..]));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection for all");
}

#[tokio::test]
async fn a_backend_closing_idle_connections_costs_no_request() {
    let (upstream, accepted) = counting_backend(true).await;
    let gate = Gate::with_config(ROUTES).upstream(&upstream).start().await;
    let http = Http::h1();
    for i in 0..20 {
        let reply = http.get(&gate.url(&format!("/api/public/{i}")), &[]).await;
        assert_eq!(
            (reply.status.as_u16(), &reply.body[..]),
            (200, &b"ok"[..]),
            "request {i}"
        );
    }
    // Some closes are noticed before the next request, some only when it finds the connection
    // gone (it is then sent on a new one): either way, one connection per request.
    assert_eq!(accepted.load(Ordering::SeqCst), 20);
}
