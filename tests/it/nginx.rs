//! The forward-auth example, `examples/nginx/wxgate-forward-auth.conf`, run by a real nginx (Debian's
//! package; `.ci/run` installs it) in front of the sample backend, with wxgate as its authentication
//! service. Outside CI the test is skipped, loudly, when nginx is not installed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

const EXAMPLE: &str = include_str!("../../examples/nginx/wxgate-forward-auth.conf");

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A running nginx, stopped when dropped.
struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the master stops its workers; killed outright, it would orphan them.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Nginx {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

async fn start_nginx(binary: &Path, server_block: &str) -> (Nginx, String) {
    let dir = tempfile::tempdir().unwrap();
    let port = bind().await.local_addr().unwrap().port();
    let server_block = server_block.replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
    let tmp = dir.path().display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n  \
         fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n\
         {server_block}\n}}\n"
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new(binary)
        .arg("-p")
        .arg(dir.path())
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx starts");
    let nginx = Nginx { child, dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "nginx did not listen: {}",
            nginx.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (nginx, format!("http://127.0.0.1:{port}"))
}

#[tokio::test]
async fn nginx_with_auth_request_in_front_of_the_backend() {
    let Some(binary) = nginx_binary() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install nginx (see .ci/run)"
        );
        eprintln!(
            "SKIPPED nginx_with_auth_request_in_front_of_the_backend: nginx is not installed"
        );
        return;
    };
    let config = LOGIN.replace(
        "[upstream]",
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n\n[upstream]",
    );
    let gate = Gate::with_config(&config).real_auth().start().await;
    let server_block = EXAMPLE
        .replace("127.0.0.1:8080", &gate.addr.to_string())
        .replace(
            "127.0.0.1:3000",
            gate.backend.url().trim_start_matches("http://"),
        );
    let (nginx, front) = start_nginx(&binary, &server_block).await;
    let http = Http::h1();

    // Login goes through nginx to wxgate's own endpoint.
    let code = gate.wechat.login_code(SHOP_APPID, "nora");
    let login = http
        .send(
            http::Method::POST,
            &format!("{front}/auth/login"),
            &[("content-type", "application/json")],
            bytes_body(json!({ "code": code }).to_string()),
        )
        .await;
    assert_eq!(login.status, 200, "{:?} {}", login.body, nginx.log());
    let tokens = login.json();
    let user_id = tokens["user_id"].as_str().unwrap();
    let auth = format!("Bearer {}", tokens["access_token"].as_str().unwrap());

    // An authenticated call: the backend gets wxgate's identity, not the client's forgeries, and
    // none of wxgate's credentials.
    let ok = http
        .get(
            &format!("{front}/api/orders?id=1"),
            &[
                ("Authorization", &auth),
                ("X-User-Id", "u_forged"),
                ("X_User_Id", "u_forged"),
                (
                    "Cookie",
                    "theme=dark; __Host-wxgate=abc; __Host-wxgate-state=s; lang=zh",
                ),
            ],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", nginx.log());
    let seen = gate.seen();
    let forwarded = &seen.last().unwrap().headers;
    assert_eq!(folded(forwarded, "x-user-id"), [("x-user-id", user_id)]);
    assert_eq!(forwarded["x-wechat-appid"], SHOP_APPID);
    assert!(forwarded.get("authorization").is_none());
    let cookie = forwarded["cookie"].to_str().unwrap();
    assert!(!cookie.contains("wxgate"), "{cookie}");
    assert!(
        cookie.contains("theme=dark") && cookie.contains("lang=zh"),
        "{cookie}"
    );

    // Without a token: refused by nginx with wxgate's 401, never reaching the backend.
    let before = gate.seen().len();
    let refused = http
        .get(&format!("{front}/api/orders"), &[("X-User-Id", "u_forged")])
        .await;
    assert_eq!(refused.status, 401);
    let expired = http
        .get(
            &format!("{front}/api/orders"),
            &[("Authorization", "Bearer not.a.token")],
        )
        .await;
    assert_eq!(expired.status, 401);
    assert_eq!(gate.seen().len(), before);

    // A public route passes without identity, whatever the client claims.
    let public = http
        .get(
            &format!("{front}/api/public/list"),
            &[("X-User-Id", "u_forged"), ("Authorization", &auth)],
        )
        .await;
    assert_eq!(public.status, 200);
    let seen = gate.seen();
    assert!(folded(&seen.last().unwrap().headers, "x-user-id").is_empty());
}
