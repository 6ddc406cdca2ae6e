//! TLS termination: certificates made at run time (rcgen), HTTPS with HTTP/1.1 and HTTP/2 by ALPN,
//! TLS 1.2 and 1.3, the handshake timeout, and a certificate reload that leaves open connections be.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::support::*;

/// A self-signed certificate for localhost, written as PEM to `dir/cert.pem` and `dir/key.pem`.
fn write_certificate(dir: &Path) -> CertificateDer<'static> {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("cert.pem"), made.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), made.signing_key.serialize_pem()).unwrap();
    made.cert.der().clone()
}

async fn tls_gate(dir: &Path, limits: &str) -> Gate {
    let config = ROUTES.replace(
        "[upstream]",
        &format!(
            "[server.tls]\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\n\n[upstream]",
            dir.display()
        ),
    ) + &format!("\n[limits]\nauth_per_minute = 0\n{limits}\n");
    Gate::with_config(&config).start().await
}

async fn connect(
    gate: &impl Addressed,
    trusted: &[&CertificateDer<'static>],
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add((*cert).clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(gate.address()).await.unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

/// Something listening: a [`Gate`], or a wxgate process at an address.
trait Addressed {
    fn address(&self) -> std::net::SocketAddr;
}

impl Addressed for Gate {
    fn address(&self) -> std::net::SocketAddr {
        self.addr
    }
}

/// A wxgate process's main address.
struct At(std::net::SocketAddr);

impl Addressed for At {
    fn address(&self) -> std::net::SocketAddr {
        self.0
    }
}

const ALL: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// One HTTP/1.1 request per call on an open TLS connection.
struct H1(hyper::client::conn::http1::SendRequest<wxgate::body::Body>);

impl H1 {
    async fn open(tls: TlsStream<TcpStream>) -> H1 {
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(connection);
        H1(sender)
    }

    async fn get(&mut self, path: &str) -> u16 {
        let request = Request::get(path)
            .header("host", "localhost")
            .header("authorization", "Bearer good")
            .body(wxgate::body::empty())
            .unwrap();
        self.0
            .send_request(request)
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

#[tokio::test]
async fn https_serves_http1_and_http2_by_alpn_with_tls_12_and_13() {
    let dir = tempfile::tempdir().unwrap();
    let cert = write_certificate(dir.path());
    let gate = tls_gate(dir.path(), "").await;

    let tls = connect(&gate, &[&cert], &[b"http/1.1"], ALL).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let mut h1 = H1::open(tls).await;
    assert_eq!(h1.get("/api/orders").await, 200);
    let seen = gate.seen();
    assert_eq!(seen[0].headers["x-forwarded-proto"], "https");
    assert_eq!(seen[0].headers["x-user-id"], USER);

    let tls = connect(&gate, &[&cert], &[b"h2", b"http/1.1"], ALL).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::get("https://localhost/api/public/h2")
        .body(wxgate::body::empty())
        .unwrap();
    let response = h2.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);

    let tls12 = connect(&gate, &[&cert], &[b"http/1.1"], &[&rustls::version::TLS12]).await;
    assert_eq!(
        tls12.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(H1::open(tls12).await.get("/api/public/x").await, 200);
}

#[tokio::test]
async fn silent_and_plaintext_clients_are_dropped_at_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    write_certificate(dir.path());
    let gate = tls_gate(dir.path(), "header_timeout = \"300ms\"").await;
    let mut silent = TcpStream::connect(gate.addr).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut buf))
        .await
        .expect("a client that never starts the handshake is cut off")
        .unwrap();
    let plain = raw(gate.addr, "GET /api/public/x HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(!plain.contains("200 OK"), "{plain}");
    assert!(gate.seen().is_empty());
}

#[tokio::test]
async fn a_reloaded_certificate_serves_new_connections_and_open_ones_continue() {
    let dir = tempfile::tempdir().unwrap();
    let first = write_certificate(dir.path());
    let gate = tls_gate(dir.path(), "").await;
    let tls = connect(&gate, &[&first], &[b"http/1.1"], ALL).await;
    let mut open = H1::open(tls).await;
    assert_eq!(open.get("/api/public/1").await, 200);

    let second = write_certificate(dir.path());
    gate.tls
        .as_ref()
        .unwrap()
        .reload()
        .expect("the new files load");
    let fresh = connect(&gate, &[&first, &second], &[b"http/1.1"], ALL).await;
    assert_eq!(
        fresh.get_ref().1.peer_certificates().unwrap()[0],
        second,
        "new connections get the new certificate"
    );
    assert_eq!(
        open.get("/api/public/2").await,
        200,
        "the open connection goes on"
    );

    // A broken file is refused and the current certificate stays.
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    assert!(gate.tls.as_ref().unwrap().reload().is_err());
    let still = connect(&gate, &[&second], &[b"http/1.1"], ALL).await;
    assert_eq!(still.get_ref().1.peer_certificates().unwrap()[0], second);
}

#[test]
fn unusable_certificate_files_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    write_certificate(dir.path());
    let other = tempfile::tempdir().unwrap();
    write_certificate(other.path());
    let config = |cert: &Path, key: &Path| {
        format!(
            "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n",
            cert.display(),
            key.display()
        )
    };
    let error = |text: String| {
        wxgate::Config::parse("t.toml", &text, &|_| None)
            .unwrap_err()
            .to_string()
    };
    let missing = error(config(
        &dir.path().join("nope.pem"),
        &dir.path().join("key.pem"),
    ));
    assert!(
        missing.contains("server.tls.cert: cannot read certificates"),
        "{missing}"
    );
    let mismatch = error(config(
        &dir.path().join("cert.pem"),
        &other.path().join("key.pem"),
    ));
    assert!(mismatch.contains("does not belong"), "{mismatch}");
    assert!(
        wxgate::Config::parse(
            "t.toml",
            &config(&dir.path().join("cert.pem"), &dir.path().join("key.pem")),
            &|_| None
        )
        .is_ok()
    );
}

/// The real binary: `wxgate healthcheck` reports readiness, and SIGHUP reloads the certificate.
#[tokio::test]
async fn the_binary_reloads_its_certificate_on_sighup_and_answers_healthcheck() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let first = write_certificate(dir.path());
    let backend =
        wxgate::sample_backend::SampleBackend::start(bind().await, Default::default()).unwrap();
    let (main, admin) = (bind().await, bind().await);
    let (listen, admin_addr) = (main.local_addr().unwrap(), admin.local_addr().unwrap());
    drop((main, admin));
    let config = dir.path().join("wxgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin_addr}\"\n[server.tls]\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\n\
             [upstream]\nurl = \"{1}\"\n[[routes]]\nprefix = \"/\"\nauth = \"public\"\n",
            dir.path().display(),
            backend.url()
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_wxgate");
    let healthcheck = || {
        Command::new(bin)
            .args(["healthcheck", "--config"])
            .arg(&config)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(healthcheck(), Some(1), "nothing is listening yet");
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while healthcheck() != Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "wxgate did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gate_like = At(listen);
    let tls = connect(&gate_like, &[&first], &[b"http/1.1"], ALL).await;
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], first);

    let second = write_certificate(dir.path());
    kill(Pid::from_raw(child.id() as i32), Signal::SIGHUP).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tls = connect(&gate_like, &[&first, &second], &[b"http/1.1"], ALL).await;
        if tls.get_ref().1.peer_certificates().unwrap()[0] == second {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload the certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGHUP did not stop it; SIGTERM did, cleanly"
    );
    assert_eq!(healthcheck(), Some(1), "stopped");
}

/// A TLS front for the mock WeChat (which speaks plain HTTP): what `wechat.api_base = "https://…"`
/// reaches. It forwards to the address set in `target` once the gate (and its mock) are up, and
/// counts the connections it accepted.
async fn tls_front(
    dir: &Path,
) -> (
    u16,
    Arc<std::sync::OnceLock<std::net::SocketAddr>>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let (acceptor, _) = wxgate::tls::acceptor(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap();
    let listener = bind().await;
    let port = listener.local_addr().unwrap().port();
    let target = Arc::new(std::sync::OnceLock::<std::net::SocketAddr>::new());
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (to, count) = (target.clone(), accepted.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (acceptor, to) = (acceptor.clone(), to.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut plain = TcpStream::connect(*to.get().unwrap()).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (port, target, accepted)
}

#[tokio::test]
async fn wechat_is_called_over_tls_trusting_the_configured_ca_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    write_certificate(dir.path());
    let (port, target, accepted) = tls_front(dir.path()).await;
    let https = format!("api_base = \"https://localhost:{port}\"");
    let trusting = LOGIN.replace(
        "api_base = \"WECHAT\"",
        &format!("{https}\nca_file = \"{}/cert.pem\"", dir.path().display()),
    );
    let gate = Gate::with_config(&trusting).real_auth().start().await;
    let mock: std::net::SocketAddr = gate
        .wechat
        .url()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    target.set(mock).unwrap();
    let login = gate.logged_in("tina").await;
    assert!(login["access_token"].is_string());
    assert_eq!(gate.wechat.calls(wxgate::wechat::mock::JSCODE2SESSION), 1);
    // Later logins reuse the one TLS connection.
    for user in ["tom", "tess"] {
        gate.logged_in(user).await;
    }
    assert_eq!(gate.wechat.calls(wxgate::wechat::mock::JSCODE2SESSION), 3);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Without the CA, the mock's certificate is nobody's: no login, and nothing reaches it.
    let untrusting = LOGIN.replace("api_base = \"WECHAT\"", &https);
    let other = Gate::with_config(&untrusting).real_auth().start().await;
    let refused = other.login_as("tina").await;
    assert_eq!(
        (refused.status.as_u16(), refused.error().as_str()),
        (502, "wechat_unavailable")
    );
    assert_eq!(other.wechat.calls(wxgate::wechat::mock::JSCODE2SESSION), 0);
}
