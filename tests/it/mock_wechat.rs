//! The mock WeChat itself, over HTTP: it must behave as `shared/docs/wechat-protocol.md` says WeChat
//! does, or tests built on it prove nothing.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use wxgate::wechat::mock::{
    Fault, JSCODE2SESSION, MockWechat, OAUTH_ACCESS_TOKEN, OAUTH_AUTHORIZE, OauthKind, QRCONNECT,
    SNS_AUTH, SNS_USERINFO, openid_of, unionid_of,
};

use crate::support::*;

const APP: &str = "wx3333333333333333";
const SECRET: &str = "mock-secret";

async fn mock() -> MockWechat {
    let wechat = MockWechat::start(bind().await).unwrap();
    wechat.add_app(APP, SECRET, true);
    wechat
}

async fn exchange(wechat: &MockWechat, appid: &str, secret: &str, code: &str) -> Reply {
    let url = format!(
        "{}/sns/jscode2session?appid={appid}&secret={secret}&js_code={code}&grant_type=authorization_code",
        wechat.url()
    );
    Http::h1().get(&url, &[]).await
}

fn errcode(reply: &Reply) -> i64 {
    reply.json()["errcode"].as_i64().unwrap_or(0)
}

#[tokio::test]
async fn a_code_exchanges_once_for_the_documented_fields() {
    let wechat = mock().await;
    let code = wechat.login_code(APP, "olga");
    assert_eq!(code.len(), 32);
    assert!(code.bytes().all(|b| b.is_ascii_alphanumeric()));
    let reply = exchange(&wechat, APP, SECRET, &code).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.headers["content-type"], "text/plain",
        "sns/* JSON comes as text/plain"
    );
    let body = reply.json();
    assert!(body.get("errcode").is_none(), "success has no errcode");
    let openid = body["openid"].as_str().unwrap();
    assert_eq!(openid, openid_of(APP, "olga"));
    assert!(openid.len() == 28 && openid.starts_with('o'));
    assert!(
        openid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    assert_eq!(body["unionid"], unionid_of("olga").as_str());
    let key = body["session_key"].as_str().unwrap();
    assert_eq!(key.len(), 24);
    assert_eq!(STANDARD.decode(key).unwrap().len(), 16);

    let again = exchange(&wechat, APP, SECRET, &code).await;
    assert_eq!(
        (again.status.as_u16(), errcode(&again)),
        (200, 40163),
        "single use"
    );
    assert!(again.json()["errmsg"].as_str().unwrap().contains(", rid: "));
}

#[tokio::test]
async fn every_exchange_issues_a_new_session_key_and_the_old_one_dies() {
    let wechat = mock().await;
    let first = exchange(&wechat, APP, SECRET, &wechat.login_code(APP, "pia"))
        .await
        .json();
    let second = exchange(&wechat, APP, SECRET, &wechat.login_code(APP, "pia"))
        .await
        .json();
    assert_ne!(first["session_key"], second["session_key"]);
    assert_eq!(first["openid"], second["openid"]);
    let current = wechat.session_key(APP, &openid_of(APP, "pia")).unwrap();
    assert_eq!(Value::String(current), second["session_key"]);
}

#[tokio::test]
async fn unbound_apps_get_no_unionid_key_at_all() {
    let wechat = mock().await;
    wechat.add_app("wx4444444444444444", "s2", false);
    let body = exchange(
        &wechat,
        "wx4444444444444444",
        "s2",
        &wechat.login_code("wx4444444444444444", "quinn"),
    )
    .await
    .json();
    assert!(body.get("unionid").is_none(), "{body}");
    assert_eq!(
        body["openid"],
        openid_of("wx4444444444444444", "quinn").as_str()
    );
}

#[tokio::test]
async fn wrong_expired_foreign_and_incomplete_requests_get_their_errcodes() {
    let wechat = mock().await;
    wechat.add_app("wx5555555555555555", "other", true);
    let code = wechat.login_code(APP, "rosa");
    assert_eq!(
        errcode(&exchange(&wechat, APP, "wrong", &code).await),
        40125
    );
    assert_eq!(
        errcode(&exchange(&wechat, "wx0000000000000000", SECRET, &code).await),
        40013
    );
    assert_eq!(
        errcode(&exchange(&wechat, "wx5555555555555555", "other", &code).await),
        40029,
        "another app's code"
    );
    assert_eq!(
        errcode(&exchange(&wechat, APP, SECRET, "no-such-code").await),
        40029
    );
    let base = format!("{}/sns/jscode2session", wechat.url());
    let http = Http::h1();
    for (query, expected) in [
        (
            format!("secret={SECRET}&js_code={code}&grant_type=authorization_code"),
            41002,
        ),
        (
            format!("appid={APP}&js_code={code}&grant_type=authorization_code"),
            41004,
        ),
        (
            format!("appid={APP}&secret={SECRET}&grant_type=authorization_code"),
            41008,
        ),
        (
            format!("appid={APP}&secret={SECRET}&js_code={code}&grant_type=client_credential"),
            40002,
        ),
    ] {
        assert_eq!(
            errcode(&http.get(&format!("{base}?{query}"), &[]).await),
            expected,
            "{query}"
        );
    }
    // None of that consumed the code; letting it age past 5 minutes does.
    wechat.advance(Duration::from_secs(301));
    assert_eq!(
        errcode(&exchange(&wechat, APP, SECRET, &code).await),
        40029,
        "expired"
    );
}

/// Benchmark mode's made-up codes are single use and expire, but the few thousand people they name
/// stand for millions: WeChat's per-user quota would cap a benchmark, so it is not applied to them.
/// Codes minted the ordinary way still are.
#[tokio::test]
async fn benchmark_codes_are_single_use_but_not_held_to_the_per_user_quota() {
    let wechat = mock().await;
    wechat.accept_any_code();
    for i in 0..150 {
        let code = format!("zz{i:030}");
        assert_eq!(
            errcode(&exchange(&wechat, APP, SECRET, &code).await),
            0,
            "login {i}"
        );
        assert_eq!(
            errcode(&exchange(&wechat, APP, SECRET, &code).await),
            40163,
            "a replay of {i}"
        );
    }
    for _ in 0..100 {
        let reply = exchange(&wechat, APP, SECRET, &wechat.login_code(APP, "sam")).await;
        assert_eq!(errcode(&reply), 0);
    }
    let reply = exchange(&wechat, APP, SECRET, &wechat.login_code(APP, "sam")).await;
    assert_eq!(errcode(&reply), 45011, "minted codes keep the quota");
}

#[tokio::test]
async fn a_hundred_logins_a_minute_per_user_then_45011() {
    let wechat = mock().await;
    for _ in 0..100 {
        let reply = exchange(&wechat, APP, SECRET, &wechat.login_code(APP, "sam")).await;
        assert_eq!(errcode(&reply), 0);
    }
    let reply = exchange(&wechat, APP, SECRET, &wechat.login_code(APP, "sam")).await;
    assert_eq!(errcode(&reply), 45011);
    assert_eq!(
        errcode(&exchange(&wechat, APP, SECRET, &wechat.login_code(APP, "tom")).await),
        0,
        "per user"
    );
    wechat.advance(Duration::from_secs(61));
    assert_eq!(
        errcode(&exchange(&wechat, APP, SECRET, &wechat.login_code(APP, "sam")).await),
        0
    );
}

#[tokio::test]
async fn faults_apply_to_the_next_calls_only_and_are_counted() {
    let wechat = mock().await;
    wechat.fail_next(JSCODE2SESSION, Fault::Errcode(-1), 2);
    wechat.fail_next(JSCODE2SESSION, Fault::Status(503), 1);
    let code = wechat.login_code(APP, "uma");
    assert_eq!(errcode(&exchange(&wechat, APP, SECRET, &code).await), -1);
    assert_eq!(errcode(&exchange(&wechat, APP, SECRET, &code).await), -1);
    let unavailable = exchange(&wechat, APP, SECRET, &code).await;
    assert_eq!(unavailable.status, 503);
    assert!(String::from_utf8_lossy(&unavailable.body).contains("<html>"));
    assert_eq!(
        errcode(&exchange(&wechat, APP, SECRET, &code).await),
        0,
        "faults did not consume the code"
    );
    assert_eq!(wechat.calls(JSCODE2SESSION), 4);
}

#[tokio::test]
async fn the_http_control_api_does_what_the_rust_one_does() {
    let wechat = MockWechat::start(bind().await).unwrap();
    let http = Http::h1();
    let control = |path: &str| format!("{}/__mock/{path}", wechat.url());
    let post = |path: &str, body: Value| {
        let url = control(path);
        let http = &http;
        async move {
            http.send(http::Method::POST, &url, &[], bytes_body(body.to_string()))
                .await
        }
    };
    assert_eq!(
        post(
            "apps",
            json!({ "appid": APP, "secret": SECRET, "bound": true })
        )
        .await
        .status,
        200
    );
    let login = post("login", json!({ "appid": APP, "user": "vera" }))
        .await
        .json();
    assert_eq!(login["openid"], openid_of(APP, "vera").as_str());
    assert_eq!(login["unionid"], unionid_of("vera").as_str());
    let code = login["code"].as_str().unwrap();
    assert_eq!(
        post(
            "faults",
            json!({ "endpoint": JSCODE2SESSION, "errcode": 40226 })
        )
        .await
        .status,
        200
    );
    assert_eq!(errcode(&exchange(&wechat, APP, SECRET, code).await), 40226);
    let body = exchange(&wechat, APP, SECRET, code).await.json();
    let key = http
        .get(
            &format!(
                "{}?appid={APP}&openid={}",
                control("session_key"),
                openid_of(APP, "vera")
            ),
            &[],
        )
        .await
        .json();
    assert_eq!(key["session_key"], body["session_key"]);
    assert_eq!(
        http.get(&control("calls"), &[]).await.json()[JSCODE2SESSION],
        2
    );
    assert_eq!(post("advance", json!({ "seconds": 301 })).await.status, 200);
    let late = post("login", json!({ "appid": APP, "user": "vera" }))
        .await
        .json();
    assert_eq!(
        errcode(&exchange(&wechat, APP, SECRET, late["code"].as_str().unwrap()).await),
        0,
        "new codes start from the new clock"
    );
    assert_eq!(
        post("faults", json!({ "endpoint": JSCODE2SESSION }))
            .await
            .status,
        400
    );
}

async fn post(wechat: &MockWechat, path: &str, body: Value) -> Reply {
    Http::h1()
        .send(
            http::Method::POST,
            &format!("{}{path}", wechat.url()),
            &[],
            bytes_body(body.to_string()),
        )
        .await
}

fn stable(appid: &str, secret: &str, force: Value) -> Value {
    json!({ "grant_type": "client_credential", "appid": appid, "secret": secret, "force_refresh": force })
}

#[tokio::test]
async fn stable_token_is_the_same_while_valid_and_rotates_with_an_overlap() {
    let wechat = mock().await;
    let first = post(
        &wechat,
        "/cgi-bin/stable_token",
        stable(APP, SECRET, json!(false)),
    )
    .await;
    assert_eq!(
        first.headers["content-type"],
        "application/json; encoding=utf-8"
    );
    let first = first.json();
    assert_eq!(first["expires_in"], 7200);
    let again = post(
        &wechat,
        "/cgi-bin/stable_token",
        stable(APP, SECRET, json!(false)),
    )
    .await
    .json();
    assert_eq!(
        again["access_token"], first["access_token"],
        "no rotation while valid"
    );
    // Near expiry a new token is issued; the old one stays valid for the overlap.
    wechat.advance(Duration::from_secs(7200 - 200));
    let rotated = post(
        &wechat,
        "/cgi-bin/stable_token",
        stable(APP, SECRET, json!(false)),
    )
    .await
    .json();
    assert_ne!(rotated["access_token"], first["access_token"]);
    let phone_call = |token: &Value| {
        let url = format!(
            "{}/wxa/business/getuserphonenumber?access_token={}",
            wechat.url(),
            token.as_str().unwrap()
        );
        async move {
            Http::h1()
                .send(
                    http::Method::POST,
                    &url,
                    &[],
                    bytes_body("{\"code\":\"x\"}"),
                )
                .await
        }
    };
    assert_eq!(
        errcode(&phone_call(&first["access_token"]).await),
        40029,
        "old token still accepted"
    );
    wechat.advance(Duration::from_secs(301));
    assert_eq!(
        errcode(&phone_call(&first["access_token"]).await),
        40001,
        "old token dead after the overlap"
    );
    assert_eq!(errcode(&phone_call(&rotated["access_token"]).await), 40029);
    let forced = post(
        &wechat,
        "/cgi-bin/stable_token",
        stable(APP, SECRET, json!(true)),
    )
    .await
    .json();
    assert_ne!(forced["access_token"], rotated["access_token"]);
    assert_eq!(
        errcode(
            &post(
                &wechat,
                "/cgi-bin/stable_token",
                stable(APP, "wrong", json!(false))
            )
            .await
        ),
        40125
    );
    assert_eq!(
        errcode(
            &post(
                &wechat,
                "/cgi-bin/stable_token",
                stable(APP, SECRET, json!("false"))
            )
            .await
        ),
        40097
    );
}

#[tokio::test]
async fn checksession_and_resetusersessionkey_follow_the_session_key() {
    let wechat = mock().await;
    exchange(&wechat, APP, SECRET, &wechat.login_code(APP, "wes")).await;
    let token = post(
        &wechat,
        "/cgi-bin/stable_token",
        stable(APP, SECRET, json!(false)),
    )
    .await
    .json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let openid = openid_of(APP, "wes");
    let ask = |path: &str, key: &str| {
        let signature = wxgate::wechat::crypto::session_hmac(key, b"");
        let url = format!(
            "{}{path}?access_token={token}&signature={signature}&openid={openid}&sig_method=hmac_sha256",
            wechat.url()
        );
        async move { Http::h1().get(&url, &[]).await }
    };
    let key = wechat.session_key(APP, &openid).unwrap();
    assert_eq!(errcode(&ask("/wxa/checksession", &key).await), 0);
    assert_eq!(
        errcode(&ask("/wxa/checksession", "AAAAAAAAAAAAAAAAAAAAAA==").await),
        87009
    );
    let reset = ask("/wxa/resetusersessionkey", &key).await.json();
    let fresh = reset["session_key"].as_str().unwrap();
    assert_ne!(fresh, key);
    assert_eq!(
        errcode(&ask("/wxa/checksession", &key).await),
        87009,
        "the old key died"
    );
    assert_eq!(errcode(&ask("/wxa/checksession", fresh).await), 0);
}

async fn oauth_exchange(wechat: &MockWechat, appid: &str, secret: &str, code: &str) -> Reply {
    let url = format!(
        "{}/sns/oauth2/access_token?appid={appid}&secret={secret}&code={code}&grant_type=authorization_code",
        wechat.url()
    );
    Http::h1().get(&url, &[]).await
}

#[tokio::test]
async fn oauth_codes_have_the_lifetime_scope_and_unionid_of_their_kind() {
    let wechat = mock().await;
    for (kind, scope, unionid) in [
        (OauthKind::App, "snsapi_userinfo", true),
        (OauthKind::Web, "snsapi_login", true),
        (OauthKind::Oa { userinfo: true }, "snsapi_userinfo", true),
        (OauthKind::Oa { userinfo: false }, "snsapi_base", false),
    ] {
        let code = wechat.oauth_code(APP, "olga", kind);
        let reply = oauth_exchange(&wechat, APP, SECRET, &code).await;
        assert_eq!(reply.headers["content-type"], "text/plain");
        let body = reply.json();
        assert!(body.get("errcode").is_none(), "{kind:?}: {body}");
        assert_eq!(body["openid"], openid_of(APP, "olga").as_str());
        assert_eq!(body["scope"], scope);
        assert_eq!(body["expires_in"], 7200);
        assert!(body["access_token"].is_string() && body["refresh_token"].is_string());
        assert_eq!(body.get("unionid").is_some(), unionid, "{kind:?}");
        assert!(body.get("is_snapshotuser").is_none());
        let again = oauth_exchange(&wechat, APP, SECRET, &code).await;
        assert_eq!(errcode(&again), 40163, "{kind:?}: single use");
    }

    // App and website codes live 10 minutes, official-account ones 5.
    let app = wechat.oauth_code(APP, "olga", OauthKind::App);
    let web = wechat.oauth_code(APP, "olga", OauthKind::Web);
    let oa = wechat.oauth_code(APP, "olga", OauthKind::Oa { userinfo: true });
    let app_late = wechat.oauth_code(APP, "olga", OauthKind::App);
    wechat.advance(Duration::from_secs(5 * 60 + 1));
    assert_eq!(
        errcode(&oauth_exchange(&wechat, APP, SECRET, &oa).await),
        42003
    );
    assert_eq!(
        errcode(&oauth_exchange(&wechat, APP, SECRET, &app).await),
        0
    );
    assert_eq!(
        errcode(&oauth_exchange(&wechat, APP, SECRET, &web).await),
        0
    );
    wechat.advance(Duration::from_secs(5 * 60));
    assert_eq!(
        errcode(&oauth_exchange(&wechat, APP, SECRET, &app_late).await),
        42003
    );

    // The other errors of the OAuth section.
    let code = wechat.oauth_code(APP, "olga", OauthKind::App);
    assert_eq!(
        errcode(&oauth_exchange(&wechat, APP, "wrong", &code).await),
        40125
    );
    assert_eq!(
        errcode(&oauth_exchange(&wechat, "wx0000000000000000", SECRET, &code).await),
        40013
    );
    assert_eq!(
        errcode(&oauth_exchange(&wechat, APP, SECRET, "nope").await),
        40029
    );
    let bad_grant = Http::h1()
        .get(
            &format!(
                "{}/sns/oauth2/access_token?appid={APP}&secret={SECRET}&code={code}&grant_type=x",
                wechat.url()
            ),
            &[],
        )
        .await;
    assert_eq!(errcode(&bad_grant), 40002);
    wechat.fail_next(OAUTH_ACCESS_TOKEN, Fault::Errcode(-1), 1);
    assert_eq!(
        errcode(&oauth_exchange(&wechat, APP, SECRET, &code).await),
        -1
    );
    // None of the refusals consumed the code.
    assert_eq!(
        errcode(&oauth_exchange(&wechat, APP, SECRET, &code).await),
        0
    );
}

#[tokio::test]
async fn snapshot_users_get_a_virtual_openid_and_no_unionid() {
    let wechat = mock().await;
    let mut openids = Vec::new();
    for _ in 0..2 {
        let code = wechat.oauth_code(APP, "sam", OauthKind::OaSnapshot);
        let body = oauth_exchange(&wechat, APP, SECRET, &code).await.json();
        assert_eq!(body["is_snapshotuser"], 1);
        assert!(body.get("unionid").is_none());
        assert_ne!(body["openid"], openid_of(APP, "sam").as_str());
        openids.push(body["openid"].as_str().unwrap().to_owned());
    }
    assert_ne!(openids[0], openids[1], "virtual ids identify nobody");
}

#[tokio::test]
async fn sns_userinfo_and_sns_auth_need_the_users_token_and_scope() {
    let wechat = mock().await;
    let token_of = |body: Value| {
        (
            body["access_token"].as_str().unwrap().to_owned(),
            body["openid"].as_str().unwrap().to_owned(),
        )
    };
    let code = wechat.oauth_code(APP, "nina", OauthKind::Web);
    let (token, openid) = token_of(oauth_exchange(&wechat, APP, SECRET, &code).await.json());
    let get = |path: &str, token: &str, openid: &str| {
        let url = format!(
            "{}{path}?access_token={token}&openid={openid}",
            wechat.url()
        );
        async move { Http::h1().get(&url, &[]).await }
    };
    let user = get(SNS_USERINFO, &token, &openid).await.json();
    assert_eq!(user["nickname"], "nina");
    assert_eq!(user["unionid"], unionid_of("nina").as_str());
    assert!(user["headimgurl"].as_str().unwrap().starts_with("https://"));
    assert_eq!(get(SNS_AUTH, &token, &openid).await.json()["errcode"], 0);
    assert_eq!(errcode(&get(SNS_USERINFO, "nope", &openid).await), 40001);
    assert_eq!(errcode(&get(SNS_USERINFO, &token, "other").await), 40003);

    let code = wechat.oauth_code(APP, "nina", OauthKind::Oa { userinfo: false });
    let (base, openid) = token_of(oauth_exchange(&wechat, APP, SECRET, &code).await.json());
    assert_eq!(errcode(&get(SNS_USERINFO, &base, &openid).await), 48001);
    wechat.advance(Duration::from_secs(7201));
    assert_eq!(
        errcode(&get(SNS_AUTH, &token, &openid).await),
        42001,
        "expired"
    );
    assert_eq!(errcode(&get(SNS_USERINFO, &base, &openid).await), 42001);
}

#[tokio::test]
async fn authorize_pages_send_the_browser_back_with_a_code_and_the_state() {
    let wechat = mock().await;
    let http = Http::h1();
    let page = |path: &str, scope: &str| {
        format!(
            "{}{path}?appid={APP}&redirect_uri=https%3A%2F%2Fm.example.com%2Fcb%3Fx%3D1&response_type=code&scope={scope}&state=s-1",
            wechat.url()
        )
    };
    // Nobody is signed in to WeChat in this browser yet.
    let anonymous = http.get(&page(OAUTH_AUTHORIZE, "snsapi_base"), &[]).await;
    assert_eq!(anonymous.status, 403);

    let back = http
        .get(
            &page(QRCONNECT, "snsapi_login"),
            &[("cookie", "wx_user=lena")],
        )
        .await;
    assert_eq!(back.status, 302);
    let location = back.headers["location"].to_str().unwrap();
    assert!(
        location.starts_with("https://m.example.com/cb?x=1&code="),
        "{location}"
    );
    assert!(location.ends_with("&state=s-1"), "{location}");
    let code = location
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("code="))
        .unwrap();
    let body = oauth_exchange(&wechat, APP, SECRET, code).await.json();
    assert_eq!(body["scope"], "snsapi_login");
    assert_eq!(body["openid"], openid_of(APP, "lena").as_str());

    wechat.set_browser_user("lena");
    let base = http.get(&page(OAUTH_AUTHORIZE, "snsapi_base"), &[]).await;
    assert_eq!(base.status, 302, "the default browser user");
    let declined = http
        .get(
            &page(OAUTH_AUTHORIZE, "snsapi_userinfo"),
            &[("cookie", "wx_decline=1")],
        )
        .await;
    assert_eq!(
        declined.headers["location"],
        "https://m.example.com/cb?x=1&state=s-1"
    );
    // Wrong scope for the page, or an unknown appid: an error page, no redirect.
    for url in [
        page(QRCONNECT, "snsapi_base"),
        page(OAUTH_AUTHORIZE, "snsapi_login"),
        page(OAUTH_AUTHORIZE, "snsapi_base").replace(APP, "wx0000000000000000"),
    ] {
        let reply = http.get(&url, &[]).await;
        assert!(reply.headers.get("location").is_none(), "{url}");
    }
}

#[tokio::test]
async fn the_http_control_api_mints_oauth_codes_and_hides_unionids() {
    let wechat = mock().await;
    let code = post(
        &wechat,
        "/__mock/oauth_code",
        json!({ "appid": APP, "user": "ugo", "kind": "oa", "scope": "snsapi_base" }),
    )
    .await
    .json()["code"]
        .as_str()
        .unwrap()
        .to_owned();
    let body = oauth_exchange(&wechat, APP, SECRET, &code).await.json();
    assert_eq!(body["scope"], "snsapi_base");
    let bad = post(
        &wechat,
        "/__mock/oauth_code",
        json!({ "appid": APP, "user": "ugo", "kind": "web", "scope": "snsapi_base" }),
    )
    .await;
    assert_eq!(bad.status, 400);

    let login = post(
        &wechat,
        "/__mock/login",
        json!({ "appid": APP, "user": "ugo", "unionid": false }),
    )
    .await
    .json();
    assert!(login.get("unionid").is_none());
    let exchanged = exchange(&wechat, APP, SECRET, login["code"].as_str().unwrap())
        .await
        .json();
    assert!(
        exchanged.get("unionid").is_none(),
        "a bound app, an older account"
    );
    assert_eq!(
        post(&wechat, "/__mock/browser", json!({ "user": "ugo" }))
            .await
            .status,
        200
    );
}
