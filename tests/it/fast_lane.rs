//! The fast lane (gateway/fast.rs) over raw sockets: what it forwards itself (Content-Length bodies,
//! pipelined requests, the backend's framings), and what it hands to hyper, which must still be
//! served exactly as before.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Reads one HTTP/1.1 response (head and a Content-Length body) from `stream`.
async fn read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut data = Vec::new();
    let mut byte = [0u8; 1];
    while !data.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("an answer in time")
            .expect("read");
        assert_eq!(
            n,
            1,
            "the connection closed mid-head: {:?}",
            String::from_utf8_lossy(&data)
        );
        data.push(byte[0]);
    }
    let head = String::from_utf8(data).unwrap();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    (head, body)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn a_content_length_upload_arriving_in_pieces_reaches_the_backend_whole() {
    let gate = Gate::start().await;
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream
        .write_all(
            format!(
                "POST /api/public/upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    for part in body.chunks(70_000) {
        stream.write_all(part).await.unwrap();
        stream.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    let (head, answer) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["body_len"], body.len());
    assert_eq!(answer["body_sha256"], hex::encode(Sha256::digest(&body)));
    // And the connection goes on.
    stream
        .write_all(b"GET /api/public/after HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(gate.seen().len(), 2);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let gate = Gate::start().await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream
        .write_all(
            b"GET /api/public/one HTTP/1.1\r\nHost: a\r\n\r\n\
              POST /api/public/two HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
              GET /api/private HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer good\r\n\r\n",
        )
        .await
        .unwrap();
    let mut paths = Vec::new();
    for _ in 0..3 {
        let (head, body) = read_response(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        paths.push(answer["path"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        paths,
        ["/api/public/one", "/api/public/two", "/api/private"]
    );
    let seen = gate.seen();
    assert_eq!(seen[1].body.as_ref().unwrap().len, 3);
    assert_eq!(seen[2].headers["x-user-id"], USER);
}

#[tokio::test]
async fn a_client_that_asks_to_close_is_answered_then_closed() {
    let gate = Gate::start().await;
    let answer = raw(
        gate.addr,
        "GET /api/public/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(header(&answer, "connection"), Some("close"));
}

#[tokio::test]
async fn requests_the_lane_does_not_take_are_served_by_hyper_as_before() {
    let gate = Gate::start().await;
    // HTTP/1.0: answered, and the connection closed after it.
    let answer = raw(gate.addr, "GET /api/public/old HTTP/1.0\r\nHost: a\r\n\r\n").await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    // A chunked upload.
    let answer = raw(
        gate.addr,
        "POST /api/public/chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    assert!(answer.contains("\"body_len\":5"), "{answer}");
    // Expect: 100-continue gets its interim answer from hyper.
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream
        .write_all(
            b"POST /api/public/expect HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\
              Expect: 100-continue\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).await.unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"ok").await.unwrap();
    let (head, body) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("\"body_len\":2"));
    // A request that follows a handed-over one on the same connection is still judged: hyper's
    // path applies the same policy.
    let answer = raw(
        gate.addr,
        "GET /api/public/a HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n\
         GET /api/private HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.contains("HTTP/1.1 401"), "{answer}");
    assert!(
        gate.seen().iter().all(|r| r.path != "/api/private"),
        "the unauthenticated request was not forwarded"
    );
}

#[tokio::test]
async fn headers_reach_the_backend_as_the_client_spelled_them_less_the_forged() {
    let gate = Gate::start().await;
    // Lines that pass unchanged are copied as they arrived, several at a time: every spelling a
    // client may use must still arrive as one header with its value, and nothing dropped between
    // copied lines may come along.
    let answer = raw(
        gate.addr,
        "GET /api/public/spelling HTTP/1.1\r\nHost: a\r\nX-Tabbed:\t one\r\nX-Tight:two\r\n\
         X-User-Id: forged\r\nX-Trailing: three  \r\nX-Bare: four\nX-Empty:\r\n\
         X_WeChat_OpenId: forged\r\nX-Last: five\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    let seen = gate.seen();
    let request = seen
        .iter()
        .find(|r| r.path == "/api/public/spelling")
        .expect("forwarded");
    let got = |name: &str| -> Vec<&str> {
        request
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    };
    assert_eq!(got("x-tabbed"), ["one"]);
    assert_eq!(got("x-tight"), ["two"]);
    assert_eq!(got("x-trailing"), ["three"]);
    assert_eq!(got("x-bare"), ["four"]);
    assert_eq!(got("x-empty"), [""]);
    assert_eq!(got("x-last"), ["five"]);
    assert!(got("x-user-id").is_empty());
    assert!(!request.headers.keys().any(|k| k.as_str().contains('_')));
}

/// A backend that answers every request on every connection with the next of `answers`, then
/// closes the connection when the answer's second element says so.
async fn scripted_backend(answers: Vec<(&'static [u8], bool)>) -> String {
    let listener = bind().await;
    let url = format!("http://{}", listener.local_addr().unwrap());
    let answers = std::sync::Arc::new(std::sync::Mutex::new(answers.into_iter()));
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let answers = answers.clone();
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
                    let Some((answer, close)) = answers.lock().unwrap().next() else {
                        return;
                    };
                    if stream.write_all(answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    url
}

#[tokio::test]
async fn the_backends_header_lines_reach_the_client_as_spelled_less_hop_by_hop() {
    let upstream = scripted_backend(vec![(
        b"HTTP/1.1 200 OK\r\nServer:tight\r\nX-Tab:\t1\r\nConnection: keep-alive, X-Hop\r\n\
          X-Hop: secret\r\nX-Trail: 2  \r\nKeep-Alive: timeout=5\r\nX-Bare: 3\n\
          Content-Length: 2\r\n\r\nok",
        false,
    )])
    .await;
    let gate = Gate::with_config(ROUTES).upstream(&upstream).start().await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream
        .write_all(b"GET /api/public/lines HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"ok");
    assert!(
        !head.replace("\r\n", "").contains('\n'),
        "every line ends in CRLF: {head:?}"
    );
    assert_eq!(header(&head, "server"), Some("tight"));
    assert_eq!(header(&head, "x-tab"), Some("1"));
    assert_eq!(header(&head, "x-trail"), Some("2"));
    assert_eq!(header(&head, "x-bare"), Some("3"));
    assert_eq!(header(&head, "content-length"), Some("2"));
    for gone in ["x-hop", "keep-alive", "connection"] {
        assert_eq!(header(&head, gone), None, "{gone} in {head}");
    }
}

#[tokio::test]
async fn the_backends_framings_reach_the_client_intact() {
    let upstream = scripted_backend(vec![
        // Chunked, with an extension and a trailer: passed as it comes.
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\nwiki\r\n5\r\npedia\r\n0\r\nx-sum: 1\r\n\r\n",
            false,
        ),
        // An interim answer first: not forwarded.
        (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nafter",
            false,
        ),
        // The backend closes after this one: the client's connection goes on.
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nlast",
            true,
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnew", false),
        // Until the backend closes: the client's connection closes too.
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true),
    ])
    .await;
    let gate = Gate::with_config(ROUTES).upstream(&upstream).start().await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");

    stream
        .write_all(get("/api/public/1").as_bytes())
        .await
        .unwrap();
    let mut chunked = Vec::new();
    let expected = b"4;x=y\r\nwiki\r\n5\r\npedia\r\n0\r\nx-sum: 1\r\n\r\n";
    while !chunked.ends_with(expected) {
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0);
        chunked.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(chunked).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(header(&text, "transfer-encoding"), Some("chunked"));

    stream
        .write_all(get("/api/public/2").as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"after");

    stream
        .write_all(get("/api/public/3").as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(&mut stream).await;
    assert_eq!(body, b"last");
    assert_eq!(
        header(&head, "connection"),
        None,
        "the backend's close is its own"
    );

    stream
        .write_all(get("/api/public/4").as_bytes())
        .await
        .unwrap();
    let (_, body) = read_response(&mut stream).await;
    assert_eq!(body, b"new");

    stream
        .write_all(get("/api/public/5").as_bytes())
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .unwrap();
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.ends_with("\r\n\r\nuntil the end"), "{rest}");
    assert_eq!(header(&rest, "connection"), Some("close"));
}

#[tokio::test]
async fn an_ambiguous_answer_from_the_backend_is_502_never_forwarded() {
    let upstream = scripted_backend(vec![(
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        true,
    )])
    .await;
    let gate = Gate::with_config(ROUTES).upstream(&upstream).start().await;
    let answer = raw(
        gate.addr,
        "GET /api/public/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&answer), 502, "{answer}");
    assert!(answer.contains("upstream_unavailable"), "{answer}");
    assert!(!answer.contains("GET /"), "{answer}");
}

#[tokio::test]
async fn a_head_request_gets_no_body_whatever_the_backend_says() {
    let upstream = scripted_backend(vec![
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
    ])
    .await;
    let gate = Gate::with_config(ROUTES).upstream(&upstream).start().await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream
        .write_all(b"HEAD /api/public/x HTTP/1.1\r\nHost: a\r\n\r\nGET /api/public/y HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert_eq!(header(&head, "content-length"), Some("5"), "{head}");
    // What follows is the GET's answer, not five bytes of a body.
    let (second, body) = read_response(&mut stream).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert_eq!(body, b"ok");
}
