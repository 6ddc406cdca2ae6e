//! Secrets stay secret: the real binary, logging at `trace` (every library's logs included), goes
//! through login, authenticated calls, refresh, a replay, logout and WeChat errors; its whole log is
//! then searched for every secret that passed through it.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use wxgate::sample_backend::{Options, SampleBackend};
use wxgate::wechat::mock::{Fault, JSCODE2SESSION, MockWechat, OauthKind, openid_of};

use crate::support::*;

#[tokio::test]
async fn no_secret_code_token_or_session_key_is_ever_logged() {
    let backend = SampleBackend::start(bind().await, Options::default()).unwrap();
    let wechat = MockWechat::start(bind().await).unwrap();
    wechat.add_app(SHOP_APPID, SHOP_SECRET, true);
    wechat.add_app(MOBILE_APPID, MOBILE_SECRET, true);
    wechat.add_app(H5_APPID, H5_SECRET, true);
    let data = tempfile::tempdir().unwrap();
    let (main, admin) = (bind().await, bind().await);
    let (addr, admin_addr) = (main.local_addr().unwrap(), admin.local_addr().unwrap());
    drop((main, admin));
    let config = LOGIN
        .replace("UPSTREAM", &backend.url())
        .replace("WECHAT", &wechat.url())
        .replace("DATADIR", data.path().to_str().unwrap())
        .replace(
            "[identity]",
            &format!(
                "[[apps]]\nname = \"mobile\"\nkind = \"app\"\nappid = \"{MOBILE_APPID}\"\nsecret = \"{MOBILE_SECRET}\"\nfetch_userinfo = true\n\n[[apps]]\nname = \"h5\"\nkind = \"oa\"\nappid = \"{H5_APPID}\"\nsecret = \"{H5_SECRET}\"\npublic_url = \"http://{addr}\"\n\n[identity]"
            ),
        )
        .replace(
            "[wechat]",
            &format!("[wechat]\nopen_base = \"{}\"", wechat.url()),
        )
        .replace(
            "[upstream]",
            &format!(
                "[server]\nlisten = \"{addr}\"\nadmin_listen = \"{admin_addr}\"\n\n[upstream]"
            ),
        );
    let config_file = data.path().join("wxgate.toml");
    std::fs::write(&config_file, config).unwrap();
    let log_file = data.path().join("wxgate.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .arg("--config")
        .arg(&config_file)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_file).unwrap())
        .spawn()
        .unwrap();
    let http = Http::h1();
    let ready = format!("http://{admin_addr}/readyz");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(admin_addr).await.is_err()
        || http.get(&ready, &[]).await.status != 200
    {
        assert!(Instant::now() < deadline, "wxgate did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let post = |path: &str, body: serde_json::Value, auth: Option<String>| {
        let url = format!("http://{addr}{path}");
        let http = &http;
        async move {
            let auth = auth.map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("Authorization", a.as_str())).collect();
            http.send(
                http::Method::POST,
                &url,
                &headers,
                bytes_body(body.to_string()),
            )
            .await
        }
    };
    let mut secrets = vec![
        SHOP_SECRET.to_owned(),
        MOBILE_SECRET.to_owned(),
        H5_SECRET.to_owned(),
        SIGNING_KEY.to_owned(),
    ];

    // The mobile app's OAuth login, with the profile fetched by the user access token.
    let code = wechat.oauth_code(MOBILE_APPID, "nina", OauthKind::App);
    secrets.push(code.clone());
    let app_login = post(
        "/auth/oauth/login",
        json!({ "app": "mobile", "code": code }),
        None,
    )
    .await;
    assert_eq!(app_login.status, 200);
    for key in ["access_token", "refresh_token"] {
        secrets.push(app_login.json()[key].as_str().unwrap().to_owned());
    }
    // The official account's browser flow: the state, its binding cookie, the code and the session
    // cookie all pass through wxgate.
    let start = http
        .get(
            &format!("http://{addr}/auth/oauth/h5/start?return_to=/api/me"),
            &[],
        )
        .await;
    assert_eq!(start.status, 302);
    let binding = start.headers["set-cookie"].to_str().unwrap();
    let binding = binding.split(';').next().unwrap().to_owned();
    let to_wechat = start.headers["location"].to_str().unwrap();
    let back = http
        .get(
            to_wechat.split('#').next().unwrap(),
            &[("cookie", "wx_user=nina")],
        )
        .await;
    let callback = back.headers["location"].to_str().unwrap().to_owned();
    for param in callback.split(['?', '&']).skip(1) {
        secrets.push(param.split_once('=').unwrap().1.to_owned());
    }
    secrets.push(binding.split_once('=').unwrap().1.to_owned());
    let done = http.get(&callback, &[("cookie", &binding)]).await;
    assert_eq!(done.status, 302);
    let session_cookie = done.headers["set-cookie"].to_str().unwrap();
    let session_cookie = session_cookie.split(';').next().unwrap().to_owned();
    secrets.push(session_cookie.split_once('=').unwrap().1.to_owned());
    let page = http
        .get(
            &format!("http://{addr}/api/me"),
            &[("cookie", &session_cookie)],
        )
        .await;
    assert_eq!(page.status, 200);
    secrets.extend(wechat.user_access_tokens());

    let code = wechat.login_code(SHOP_APPID, "nina");
    secrets.push(code.clone());
    let login = post("/auth/login", json!({ "code": code }), None).await;
    assert_eq!(login.status, 200);
    let login_request = login.headers["x-request-id"].to_str().unwrap().to_owned();
    let tokens = login.json();
    let access = tokens["access_token"].as_str().unwrap().to_owned();
    let refresh = tokens["refresh_token"].as_str().unwrap().to_owned();
    secrets.push(
        wechat
            .session_key(SHOP_APPID, &openid_of(SHOP_APPID, "nina"))
            .unwrap(),
    );
    let auth = format!("Bearer {access}");
    assert_eq!(
        http.get(
            &format!("http://{addr}/api/orders"),
            &[("Authorization", &auth)]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        http.get(
            &format!("http://{addr}/auth/session"),
            &[("Authorization", &auth)]
        )
        .await
        .status,
        200
    );
    let refreshed = post("/auth/refresh", json!({ "refresh_token": refresh }), None)
        .await
        .json();
    let replay = post("/auth/refresh", json!({ "refresh_token": refresh }), None).await;
    assert_eq!(replay.status, 401);
    let code2 = wechat.login_code(SHOP_APPID, "nina");
    secrets.push(code2.clone());
    let login2 = post("/auth/login", json!({ "code": code2 }), None)
        .await
        .json();
    secrets.push(
        wechat
            .session_key(SHOP_APPID, &openid_of(SHOP_APPID, "nina"))
            .unwrap(),
    );
    let access2 = login2["access_token"].as_str().unwrap().to_owned();
    // Open data and a phone number: the access_token travels in a query string to WeChat.
    let info = wechat.user_info(SHOP_APPID, "nina").unwrap();
    let info_json = serde_json::to_value(&info).unwrap();
    assert_eq!(
        post("/auth/userinfo", info_json, Some(access2.clone()))
            .await
            .status,
        200
    );
    secrets.push(info.encrypted_data.clone());
    secrets.push(info.signature.clone());
    let phone_code = wechat.phone_code(SHOP_APPID, "nina", "13580006666");
    secrets.push(phone_code.clone());
    assert_eq!(
        post(
            "/auth/phone",
            json!({ "code": phone_code }),
            Some(access2.clone())
        )
        .await
        .status,
        200
    );
    secrets.push(wechat.current_access_token(SHOP_APPID).unwrap());
    assert_eq!(
        post("/auth/logout", json!({}), Some(access2.clone()))
            .await
            .status,
        204
    );
    assert_eq!(
        http.get(
            &format!("http://{addr}/api/x"),
            &[("Authorization", "Bearer forged.token.here")]
        )
        .await
        .status,
        401
    );
    for fault in [Fault::Errcode(40029), Fault::Html, Fault::Errcode(40125)] {
        wechat.fail_next(JSCODE2SESSION, fault, 1);
        let code = wechat.login_code(SHOP_APPID, "nina");
        secrets.push(code.clone());
        assert_ne!(
            post("/auth/login", json!({ "code": code }), None)
                .await
                .status,
            200
        );
    }
    for value in [
        &tokens["access_token"],
        &tokens["refresh_token"],
        &refreshed["access_token"],
        &refreshed["refresh_token"],
        &login2["refresh_token"],
    ] {
        secrets.push(value.as_str().unwrap().to_owned());
    }
    secrets.push(access2);

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "wxgate did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut log = String::new();
    std::fs::File::open(&log_file)
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("login"), "the log was captured");
    assert!(log.lines().count() > 50, "trace logging was on");
    // The login's line names the request it was logged for, as every line of an /auth request does.
    let named = format!(
        " INFO request{{method=POST request_id=\"{login_request}\" path=\"/auth/login\"}}: \
         wxgate::auth::login: login app=shop user_id="
    );
    let logins: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("wxgate::auth::login: login "))
        .collect();
    assert!(
        logins.iter().any(|l| l.contains(&named)),
        "{named} in {logins:#?}"
    );
    for secret in &secrets {
        // Tokens could be logged in part, too: look for any long piece of each.
        let probe = &secret[..secret.len().min(16)];
        assert!(!log.contains(probe), "a secret reached the log: {probe}...");
    }
}
