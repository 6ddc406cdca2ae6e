//! Start-up, configuration checking and shutdown: in process through `Server::serve`, and as the real
//! `wxgate` binary with real signals.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use wxgate::sample_backend::{Options, SampleBackend};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_wxgate");

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish_and_stops_accepting() {
    let toml = ROUTES.replacen(
        "[upstream]",
        "[server]\nshutdown_timeout = \"10s\"\n\n[upstream]",
        1,
    );
    let mut gate = Gate::with_config(&toml)
        .backend(Options {
            delay: Duration::from_millis(800),
        })
        .start()
        .await;
    let url = gate.url("/api/public/slow");
    let in_flight = tokio::spawn(async move { Http::h1().get(&url, &[]).await });
    wait_until("the backend has the request", || !gate.seen().is_empty()).await;
    let server = gate.begin_shutdown();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200, "the in-flight request completed");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server returned after draining")
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(gate.addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn shutdown_cuts_off_requests_that_outlive_the_deadline() {
    let toml = ROUTES.replacen(
        "[upstream]",
        "[server]\nshutdown_timeout = \"300ms\"\n\n[upstream]",
        1,
    );
    let toml = toml.replace("timeout = \"2s\"", "timeout = \"60s\"");
    let mut gate = Gate::with_config(&toml)
        .backend(Options {
            delay: Duration::from_secs(60),
        })
        .start()
        .await;
    let addr = gate.addr;
    let in_flight = tokio::spawn(async move {
        raw(
            addr,
            "GET /api/public/forever HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .await
    });
    wait_until("the backend has the request", || !gate.seen().is_empty()).await;
    let started = Instant::now();
    gate.begin_shutdown().await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let response = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the client saw the connection close")
        .unwrap();
    assert!(!response.starts_with("HTTP/1.1 200"), "{response}");
}

fn write_config(body: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, body.as_bytes()).unwrap();
    file
}

#[test]
fn check_accepts_a_valid_config() {
    let file = write_config("[upstream]\nurl = \"http://127.0.0.1:3000\"\n");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(file.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok\n"));
}

#[test]
fn check_refuses_a_bad_config_with_exit_64_and_one_line() {
    let file = write_config(
        "[server]\nlistn = \"0.0.0.0:80\"\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(file.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("server.listn: unknown key `listn`"),
        "{stderr}"
    );
}

#[test]
fn the_config_path_can_come_from_the_environment() {
    let file = write_config("[upstream]\nurl = \"http://127.0.0.1:3000/?q\"\n");
    let out = Command::new(BIN)
        .arg("check")
        .env("WXGATE_CONFIG", file.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.url: must not have a query"));
}

#[test]
fn running_with_a_bad_config_exits_64_before_binding() {
    let file = write_config(
        "[upstream]\nurl = \"http://127.0.0.1:3000\"\n[session]\nsigning_key = \"${NO_SUCH_VAR_FOR_WXGATE_TEST}\"\n",
    );
    let out = Command::new(BIN)
        .arg("--config")
        .arg(file.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains(
        "session.signing_key: environment variable NO_SUCH_VAR_FOR_WXGATE_TEST is not set"
    ));
}

#[test]
fn version_is_printed() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("wxgate {}", env!("CARGO_PKG_VERSION"))
    );
}

/// The child's stderr, line by line, read on a thread of its own (the receiver ends with the process).
fn log_lines(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().expect("stderr is piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// The real binary: a request in flight when SIGTERM arrives is answered, then the process exits 0.
#[tokio::test]
async fn sigterm_drains_an_in_flight_request_and_exits_zero() {
    let backend = SampleBackend::start(
        bind().await,
        Options {
            delay: Duration::from_millis(800),
        },
    )
    .unwrap();
    let file = write_config(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_timeout = \"10s\"\n\
         [upstream]\nurl = \"{}\"\n[[routes]]\nprefix = \"/\"\nauth = \"public\"\n",
        backend.url()
    ));
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(file.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the log on a thread; the ready line says where it listens.
    let rx = log_lines(&mut child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let listen = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("wxgate logged its ready line");
        if line.contains("wxgate ready") {
            let addr = line
                .split_whitespace()
                .find_map(|word| word.strip_prefix("listen="))
                .expect("ready line names the address");
            break addr.parse::<std::net::SocketAddr>().unwrap();
        }
    };

    let url = format!("http://{listen}/slow");
    let in_flight = tokio::spawn(async move { Http::h1().get(&url, &[]).await });
    wait_until("the backend has the request", || {
        !backend.requests().is_empty()
    })
    .await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let reply = in_flight.await.unwrap();
    assert_eq!(
        reply.status, 200,
        "the in-flight request was answered after SIGTERM"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "wxgate did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
    // Every line up to the last, logged just before exit, was written out (lines leave through a
    // thread that batches them).
    let mut log = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => log.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("stderr still open: {log:#?}"),
        }
    }
    assert!(
        log.iter().any(|l| l.contains("SIGTERM received")),
        "{log:#?}"
    );
    assert!(
        log.last()
            .is_some_and(|l| l.contains("all connections drained")),
        "{log:#?}"
    );
}

/// Runs the binary with `[log]` set to `log`, sends `/page?code=SECRETCODE` through it, stops it, and
/// returns its log lines.
async fn run_and_log(log: &str) -> Vec<String> {
    let backend = SampleBackend::start(bind().await, Options::default()).unwrap();
    // Chosen here, not read from the ready line: a quiet level does not print it.
    let (main, admin) = (bind().await, bind().await);
    let (listen, admin_addr) = (main.local_addr().unwrap(), admin.local_addr().unwrap());
    drop((main, admin));
    let file = write_config(&format!(
        "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin_addr}\"\n\
         [upstream]\nurl = \"{}\"\n[[routes]]\nprefix = \"/\"\nauth = \"public\"\nname = \"all\"\n[log]\n{log}\n",
        backend.url()
    ));
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(file.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = log_lines(&mut child);
    let ready = format!("http://{admin_addr}/readyz");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(admin_addr).await.is_err()
        || Http::h1().get(&ready, &[]).await.status != 200
    {
        assert!(Instant::now() < deadline, "wxgate did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = Http::h1()
        .get(
            &format!("http://{listen}/page?code=SECRETCODE"),
            &[("x-request-id", "req-1")],
        )
        .await;
    assert_eq!(reply.status, 200);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // The reader thread ends with the process's stderr.
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        lines.push(line);
    }
    lines
}

#[tokio::test]
async fn json_logs_have_one_access_line_per_request_without_query_strings() {
    let lines = run_and_log("format = \"json\"").await;
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let access: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["target"] == "wxgate::access")
        .collect();
    assert_eq!(access.len(), 1, "{lines:#?}");
    let line = access[0];
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/page");
    assert_eq!(line["route"], "all");
    assert_eq!(line["status"], 200);
    assert_eq!(line["request_id"], "req-1");
    assert_eq!(line["user_id"], "-");
    assert!(line["duration_us"].is_u64());
    assert!(
        lines.iter().all(|l| !l.contains("SECRETCODE")),
        "query strings are never logged"
    );
}

#[tokio::test]
async fn the_access_log_can_be_turned_off_and_the_level_set() {
    let lines = run_and_log("access = false\nlevel = \"info\"").await;
    assert!(lines.iter().any(|l| l.contains("wxgate ready")));
    assert!(
        lines.iter().all(|l| !l.contains("wxgate::access")),
        "{lines:#?}"
    );
    let quiet = run_and_log("level = \"warn\"").await;
    assert!(
        quiet.iter().all(|l| !l.contains("wxgate ready")),
        "info lines are off at warn: {quiet:#?}"
    );
}
