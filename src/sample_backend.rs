//! A small HTTP backend that records every request and echoes it back as JSON: what the demo shows, what
//! the integration tests assert on, and what the benchmarks forward to. It is never on wxgate's own
//! request path.
//!
//! - Every request is answered with `{"method", "path", "query", "headers", "body_len",
//!   "body_sha256"}`, computed while the body streams in (an upload is never held in memory).
//! - `?download=N` answers with N bytes (`0123456789` repeated), streamed in 64 KiB chunks.
//! - [`Options::delay`] holds every response back, to play a slow backend.
//! - An upgrade request (`Connection: upgrade`, `Upgrade: websocket`, ...) is answered `101` (with the
//!   `Sec-WebSocket-Accept` a WebSocket client expects) and every byte sent afterwards is echoed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::body::{self, Body};

/// How the backend behaves.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Wait this long after reading the body before answering.
    pub delay: Duration,
}

/// One request as the backend saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// `HTTP/1.1`, `HTTP/2.0`.
    pub version: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// `None` until the whole body has arrived.
    pub body: Option<BodyDigest>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyDigest {
    pub len: u64,
    pub sha256: String,
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Recorded>>,
    bytes_received: AtomicU64,
}

/// A running sample backend; it stops when dropped.
pub struct SampleBackend {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SampleBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SampleBackend {
    /// Serves on `listener` until dropped.
    pub fn start(listener: TcpListener, options: Options) -> std::io::Result<SampleBackend> {
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let task_state = state.clone();
        let task = crate::server::spawn_plain(listener, move |request| {
            let state = task_state.clone();
            let options = options.clone();
            async move { answer(request, &state, &options).await }
        });
        Ok(SampleBackend { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order (recorded as soon as its headers arrive).
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().expect("not poisoned").clone()
    }

    /// Body bytes received so far, over all requests.
    pub fn bytes_received(&self) -> u64 {
        self.state.bytes_received.load(Ordering::SeqCst)
    }
}

/// Answers an upgrade request with 101 and echoes the upgraded connection's bytes.
fn upgrade(parts: &mut http::request::Parts) -> Option<Response<Body>> {
    let wants = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = parts.headers.get(header::UPGRADE)?.clone();
    let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()?;
    if !wants {
        return None;
    }
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let (mut reader, mut writer) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut reader, &mut writer).await;
        }
    });
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, protocol);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY) {
        // RFC 6455 §4.2.2: base64(SHA-1(key + the protocol's GUID)).
        use base64::Engine;
        use sha1::Digest as _;
        let mut sha1 = sha1::Sha1::new();
        sha1.update(key.as_bytes());
        sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        let accept = base64::engine::general_purpose::STANDARD.encode(sha1.finalize());
        if let Ok(accept) = HeaderValue::try_from(accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
    }
    Some(response)
}

async fn answer(request: Request<Incoming>, state: &State, options: &Options) -> Response<Body> {
    let (mut parts, mut incoming) = request.into_parts();
    let index = {
        let mut requests = state.requests.lock().expect("not poisoned");
        requests.push(Recorded {
            method: parts.method.to_string(),
            version: format!("{:?}", parts.version),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts.headers.clone(),
            body: None,
        });
        requests.len() - 1
    };
    if let Some(switching) = upgrade(&mut parts) {
        return switching;
    }
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = incoming.frame().await {
        let Ok(frame) = frame else {
            return status(StatusCode::BAD_REQUEST, "request body broken");
        };
        if let Ok(data) = frame.into_data() {
            hasher.update(&data);
            len += data.len() as u64;
            state
                .bytes_received
                .fetch_add(data.len() as u64, Ordering::SeqCst);
        }
    }
    let digest = BodyDigest {
        len,
        sha256: hex::encode(hasher.finalize()),
    };
    state.requests.lock().expect("not poisoned")[index].body = Some(digest.clone());
    if !options.delay.is_zero() {
        tokio::time::sleep(options.delay).await;
    }

    if let Some(n) = download_size(parts.uri.query()) {
        return download(n);
    }
    let mut headers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str())
            .or_default()
            .push(value.to_str().unwrap_or("<binary>"));
    }
    let echo = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_len": digest.len,
        "body_sha256": digest.sha256,
    });
    let mut response = body::json(StatusCode::OK, &echo);
    response
        .headers_mut()
        .insert("x-backend", HeaderValue::from_static("sample"));
    response
}

fn download_size(query: Option<&str>) -> Option<u64> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("download="))
        .and_then(|n| n.parse().ok())
}

/// The byte at `offset` of every download: tests recompute the expected hash from this.
pub fn download_byte(offset: u64) -> u8 {
    b'0' + (offset % 10) as u8
}

fn download(total: u64) -> Response<Body> {
    const CHUNK: u64 = 64 * 1024;
    let chunks = (0..total.div_ceil(CHUNK)).map(move |i| {
        let start = i * CHUNK;
        let end = (start + CHUNK).min(total);
        let data: Vec<u8> = (start..end).map(download_byte).collect();
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(data)))
    });
    let stream = StreamBody::new(futures_util::stream::iter(chunks));
    let mut response = Response::new(body::boxed(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

fn status(code: StatusCode, message: &str) -> Response<Body> {
    body::json(code, &json!({ "error": message }))
}

/// Arguments of `wxgate sample-backend`.
#[derive(Debug, clap::Args)]
pub struct CliArgs {
    /// Address to listen on; port 0 picks a free port (the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
}

/// Runs the sample backend until SIGINT or SIGTERM.
pub fn run_cli(args: CliArgs) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let backend =
            SampleBackend::start(TcpListener::bind(args.listen).await?, Options::default())?;
        println!("sample backend listening on {}", backend.url());
        crate::server::until_signalled().await
    })
}
