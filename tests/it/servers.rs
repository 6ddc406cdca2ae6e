//! Real PostgreSQL and Redis servers for the cluster tests, and a TCP relay that plays a network
//! failure between wxgate and one of them.
//!
//! - PostgreSQL: `.ci/run` starts Debian's server and sets `WXGATE_TEST_POSTGRES_URL` (a role allowed
//!   to create databases); each test gets a database of its own, dropped afterwards.
//! - Redis: each test starts its own `redis-server` on a free loopback port, so it can stop and
//!   restart it without disturbing the other tests.
//!
//! Without them, a test is skipped with a loud message; under CI (`CI` set) it fails instead, so a
//! broken CI setup cannot pass by skipping.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::Connection;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

fn missing(what: &str, how: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{what} is required under CI: {how}");
    }
    eprintln!("\n!!! SKIPPED: {what} is not available ({how}). `bash .ci/run` sets it up.\n");
}

/// A database of its own on the test PostgreSQL server, dropped when this is dropped.
pub struct TestDatabase {
    pub url: String,
    admin_url: String,
    name: String,
}

impl TestDatabase {
    /// A new empty database, or `None` (after a loud message) when no server is configured.
    pub async fn create() -> Option<TestDatabase> {
        let Ok(admin_url) = std::env::var("WXGATE_TEST_POSTGRES_URL") else {
            missing(
                "PostgreSQL",
                "set WXGATE_TEST_POSTGRES_URL=postgres://USER:PASSWORD@127.0.0.1:5432/postgres for a role with CREATEDB",
            );
            return None;
        };
        let name = format!("wxgate_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("connect to WXGATE_TEST_POSTGRES_URL");
        // The name is ours: `wxgate_test_` and hex digits.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create a test database");
        let (base, _) = admin_url
            .rsplit_once('/')
            .expect("WXGATE_TEST_POSTGRES_URL ends with /DATABASE");
        Some(TestDatabase {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        })
    }

    /// The database's URL as reached through `relay` instead of directly.
    pub fn url_via(&self, relay: &Relay) -> String {
        let scheme_and_user = self.url.rsplit_once('@').expect("URL has user@host").0;
        format!("{scheme_and_user}@{}/{}", relay.addr, self.name)
    }

    /// The server's address, for a relay in front of it.
    pub fn server(&self) -> SocketAddr {
        let host = self
            .url
            .rsplit_once('@')
            .and_then(|(_, rest)| rest.split_once('/'))
            .expect("URL has @HOST:PORT/")
            .0;
        let host = host.replace("localhost", "127.0.0.1");
        if host.contains(':') {
            host.parse().expect("HOST:PORT")
        } else {
            format!("{host}:5432").parse().expect("HOST")
        }
    }

    /// A connection for assertions on the tables.
    pub async fn connect(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.url)
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot block on itself: use a thread of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                }
            });
        })
        .join();
    }
}

fn redis_binary() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
            .map(|dir| dir.join("redis-server"))
            .find(|candidate| candidate.is_file())
    })
}

/// A `redis-server` of this test's own, without persistence, on a free loopback port. Killed when
/// dropped.
pub struct RedisServer {
    pub port: u16,
    binary: PathBuf,
    /// Arguments besides the port: a data server's, or a Sentinel's.
    args: Vec<String>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// A running server, or `None` (after a loud message) when `redis-server` is not installed.
    pub async fn start() -> Option<RedisServer> {
        RedisServer::start_with(&[]).await
    }

    /// A data server with `extra` arguments, e.g. `["--replicaof", "127.0.0.1 6379"]`.
    pub async fn start_with(extra: &[&str]) -> Option<RedisServer> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args: Vec<String> = ["--save", "", "--appendonly", "no", "--dir"]
            .map(str::to_owned)
            .to_vec();
        args.push(dir.path().to_str().expect("utf-8 path").to_owned());
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        RedisServer::launch(args, dir).await
    }

    /// A Sentinel watching the primary on `primary_port` as `main`, quick to declare it down.
    pub async fn sentinel(primary_port: u16) -> Option<RedisServer> {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor main 127.0.0.1 {primary_port} 1\n\
                 sentinel down-after-milliseconds main 500\n\
                 sentinel failover-timeout main 3000\n"
            ),
        )
        .expect("write sentinel.conf");
        // The configuration file comes first; Sentinel rewrites it as it learns.
        let args = vec![
            conf.to_str().expect("utf-8 path").to_owned(),
            "--sentinel".to_owned(),
        ];
        RedisServer::launch(args, dir).await
    }

    async fn launch(args: Vec<String>, dir: tempfile::TempDir) -> Option<RedisServer> {
        let Some(binary) = redis_binary() else {
            missing("redis-server", "install Debian's redis-server package");
            return None;
        };
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
            probe.local_addr().expect("probe address").port()
        };
        let mut server = RedisServer {
            port,
            binary,
            args,
            child: None,
            dir,
        };
        server.resume().await;
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL: everything it held is gone, like a crashed Redis without
    /// persistence).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty, and waits until it answers.
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        let child = Command::new(&self.binary)
            .args(&self.args)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut reply = [0u8; 7];
                if stream.write_all(b"PING\r\n").await.is_ok()
                    && stream.read_exact(&mut reply).await.is_ok()
                    && &reply == b"+PONG\r\n"
                {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not answer within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP relay on a loopback port in front of `target`. `cut()` drops every connection and refuses
/// new ones (a network failure, the server itself untouched); `restore()` lets them through again.
pub struct Relay {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    connections: Arc<std::sync::Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let open = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(std::sync::Mutex::new(JoinSet::new()));
        let accept = tokio::spawn({
            let open = open.clone();
            let connections = connections.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees its connection closed at once
                    }
                    connections.lock().unwrap().spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            }
        });
        Relay {
            addr,
            open,
            connections,
            accept,
        }
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.connections.lock().unwrap().abort_all();
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.connections.lock().unwrap().abort_all();
    }
}
