//! Upgrades (WebSocket): authenticated like any request, then tunnelled byte for byte, and given the
//! shutdown grace period.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Sends a WebSocket handshake for `path` and returns the stream and the response head.
async fn handshake(gate: &Gate, path: &str, token: Option<&str>) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         X-User-Id: u_forged\r\n{auth}\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("a response head in time")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed before the head ended: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    (stream, String::from_utf8(head).unwrap())
}

async fn echo(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .expect("echoed in time")
        .unwrap();
    assert_eq!(back, message);
}

#[tokio::test]
async fn a_websocket_behind_a_required_route_is_authenticated_then_tunnelled() {
    let gate = Gate::start().await;
    let (mut stream, head) = handshake(&gate, "/chat", Some("good")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    // RFC 6455's own example key and answer: the backend's handshake reached the client intact.
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    echo(&mut stream, b"hello over the tunnel").await;
    echo(&mut stream, &[0x81, 0x05, b'h', b'e', b'l', b'l', b'o']).await;

    let seen = gate.seen();
    assert_eq!(seen.len(), 1);
    let forwarded = &seen[0].headers;
    assert_eq!(folded(forwarded, "x-user-id"), [("x-user-id", USER)]);
    assert!(forwarded.get("authorization").is_none());
    assert_eq!(forwarded["upgrade"], "websocket");
}

#[tokio::test]
async fn an_upgrade_without_credentials_is_refused_and_never_reaches_the_backend() {
    let gate = Gate::start().await;
    let (mut stream, head) = handshake(&gate, "/chat", None).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let (_, expired) = handshake(&gate, "/chat", Some("expired")).await;
    assert!(expired.starts_with("HTTP/1.1 401"), "{expired}");
    assert!(gate.seen().is_empty());
    // The connection stays plain HTTP: no tunnel to the backend was opened.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read_to_end(&mut rest)).await;
    assert!(!String::from_utf8_lossy(&rest).contains("101"));
}

#[tokio::test]
async fn upgraded_connections_get_the_shutdown_grace_period_then_are_cut() {
    let config = ROUTES.replacen(
        "[upstream]",
        "[server]\nshutdown_timeout = \"1s\"\n\n[upstream]",
        1,
    );
    let mut gate = Gate::with_config(&config).start().await;
    let (mut stream, head) = handshake(&gate, "/api/public/chat", None).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let server = gate.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!gate.readiness.is_ready(), "not ready once shutdown begins");
    echo(&mut stream, b"still talking during the grace period").await;
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server returns at the shutdown timeout")
        .unwrap()
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the tunnel was closed when the grace period ended"
    );
}
