//! Mini-program login over real sockets: wxgate, the mock WeChat, the sample backend and a SQLite file.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use wxgate::wechat::mock::{Fault, JSCODE2SESSION, openid_of, unionid_of};

use crate::support::*;

#[tokio::test]
async fn a_login_makes_every_request_arrive_as_the_user() {
    let gate = Gate::login().await;
    let reply = gate.login_as("alice").await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.headers["cache-control"], "no-store");
    assert_eq!(reply.headers["content-type"], "application/json");
    let tokens = reply.json();
    let mut fields: Vec<&str> = tokens
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "access_token",
            "expires_in",
            "refresh_expires_in",
            "refresh_token",
            "token_type",
            "unionid_known",
            "user_id"
        ]
    );
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 7200);
    assert_eq!(tokens["refresh_expires_in"], 30 * 24 * 3600);
    assert_eq!(tokens["unionid_known"], true);
    let user_id = tokens["user_id"].as_str().unwrap().to_owned();
    assert!(user_id.starts_with("u_"), "{user_id}");
    let text = reply.body.escape_ascii().to_string();
    let session_key = gate
        .wechat
        .session_key(SHOP_APPID, &openid_of(SHOP_APPID, "alice"))
        .unwrap();
    assert!(
        !text.contains(&session_key),
        "the session_key left the server"
    );

    let access = tokens["access_token"].as_str().unwrap();
    let reply = gate.get_with_token("/api/orders", access).await;
    assert_eq!(reply.status, 200);
    let headers = &gate.seen()[0].headers;
    assert_eq!(headers["x-user-id"], user_id.as_str());
    assert_eq!(headers["x-wechat-appid"], SHOP_APPID);
    assert_eq!(
        headers["x-wechat-openid"],
        openid_of(SHOP_APPID, "alice").as_str()
    );
    assert_eq!(headers["x-wechat-unionid"], unionid_of("alice").as_str());
    assert!(
        !headers.contains_key("authorization"),
        "the bearer token reached the backend"
    );

    let session = gate.get_with_token("/auth/session", access).await;
    assert_eq!(session.status, 200);
    let session = session.json();
    assert_eq!(session["user_id"], user_id.as_str());
    assert_eq!(session["app"], "shop");
    assert_eq!(session["openid"], openid_of(SHOP_APPID, "alice").as_str());
    assert_eq!(session["unionid"], unionid_of("alice").as_str());
    assert!(session["expires_at"].as_u64().unwrap() > 1_700_000_000);
}

#[tokio::test]
async fn the_same_user_logging_in_again_is_the_same_user_and_others_are_not() {
    let gate = Gate::login().await;
    let first = gate.logged_in("alice").await["user_id"].clone();
    let again = gate.logged_in("alice").await["user_id"].clone();
    let bob = gate.logged_in("bob").await["user_id"].clone();
    assert_eq!(first, again);
    assert_ne!(first, bob);
}

#[tokio::test]
async fn an_unbound_app_logs_in_by_openid_and_says_unionid_is_unknown() {
    let toml = LOGIN
        .replace("wx1111111111111111", LEGACY_APPID)
        .replace("shop-secret-0123456789", LEGACY_SECRET);
    let gate = Gate::with_config(&toml).real_auth().start().await;
    let code = gate.wechat.login_code(LEGACY_APPID, "carol");
    let reply = gate
        .post_json("/auth/login", &json!({ "code": code }))
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["unionid_known"], false);
    let access = reply.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        gate.get_with_token("/api/orders", &access).await.status,
        200
    );
    let headers = &gate.seen()[0].headers;
    assert_eq!(
        headers["x-wechat-openid"],
        openid_of(LEGACY_APPID, "carol").as_str()
    );
    assert!(
        !headers.contains_key("x-wechat-unionid"),
        "absent, not empty"
    );
}

#[tokio::test]
async fn each_wechat_error_gets_its_documented_answer() {
    let gate = Gate::login().await;
    let cases: Vec<(Fault, u16, &str)> = vec![
        (Fault::Errcode(40029), 400, "invalid_code"),
        (Fault::Errcode(40163), 400, "code_used"),
        (Fault::Errcode(40226), 403, "login_blocked"),
        (Fault::Errcode(45011), 429, "rate_limited"),
        (Fault::Errcode(-1), 503, "wechat_unavailable"),
        (Fault::Errcode(40125), 502, "wechat_unavailable"),
        (Fault::Errcode(48001), 502, "wechat_unavailable"),
        (Fault::Status(502), 502, "wechat_unavailable"),
        (Fault::Html, 502, "wechat_unavailable"),
        (Fault::Garbage, 502, "wechat_unavailable"),
        (
            Fault::Delay(Duration::from_secs(3)),
            504,
            "wechat_unavailable",
        ),
    ];
    for (fault, status, code) in cases {
        gate.wechat.fail_next(JSCODE2SESSION, fault.clone(), 1);
        let reply = gate.login_as("dave").await;
        assert_eq!(
            (reply.status.as_u16(), reply.error().as_str()),
            (status, code),
            "{fault:?}"
        );
        if code == "rate_limited" {
            assert_eq!(reply.headers["retry-after"], "60");
        }
    }
    assert!(gate.seen().is_empty());
}

#[tokio::test]
async fn wechat_down_is_an_answer_not_a_hang() {
    let closed = bind().await.local_addr().unwrap();
    let toml = LOGIN.replace("\"WECHAT\"", &format!("\"http://{closed}\""));
    let gate = Gate::with_config(&toml).real_auth().start().await;
    let reply = gate
        .post_json(
            "/auth/login",
            &json!({ "code": "0a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P" }),
        )
        .await;
    assert_eq!(
        (reply.status.as_u16(), reply.error().as_str()),
        (502, "wechat_unavailable")
    );
}

#[tokio::test]
async fn real_code_errors_from_the_mock() {
    let gate = Gate::login().await;
    // A code of another app.
    let foreign = gate.wechat.login_code(LEGACY_APPID, "erin");
    let reply = gate
        .post_json("/auth/login", &json!({ "code": foreign }))
        .await;
    assert_eq!(reply.error(), "invalid_code");
    // An expired code.
    let code = gate.wechat.login_code(SHOP_APPID, "erin");
    gate.wechat.advance(Duration::from_secs(301));
    let reply = gate
        .post_json("/auth/login", &json!({ "code": code }))
        .await;
    assert_eq!(reply.error(), "invalid_code");
    // Not a code at all: refused without asking WeChat.
    let before = gate.wechat.calls(JSCODE2SESSION);
    let reply = gate
        .post_json("/auth/login", &json!({ "code": "not a code!" }))
        .await;
    assert_eq!(
        (reply.status.as_u16(), reply.error().as_str()),
        (400, "invalid_code")
    );
    assert_eq!(gate.wechat.calls(JSCODE2SESSION), before);
}

#[tokio::test]
async fn one_code_posted_ten_times_at_once_is_one_exchange_and_one_user() {
    let gate = Gate::login().await;
    let code = gate.wechat.login_code(SHOP_APPID, "frank");
    // Slow WeChat down so that all ten posts are in flight together.
    gate.wechat
        .fail_next(JSCODE2SESSION, Fault::Delay(Duration::from_millis(300)), 1);
    let posts: Vec<_> = (0..10)
        .map(|_| {
            let (url, code) = (gate.url("/auth/login"), code.clone());
            tokio::spawn(async move {
                Http::h1()
                    .send(
                        http::Method::POST,
                        &url,
                        &[],
                        bytes_body(json!({ "code": code }).to_string()),
                    )
                    .await
            })
        })
        .collect();
    let mut users = HashSet::new();
    for post in posts {
        let reply = post.await.unwrap();
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        users.insert(reply.json()["user_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(users.len(), 1);
    assert_eq!(
        gate.wechat.calls(JSCODE2SESSION),
        1,
        "the code went to WeChat once"
    );

    // A retry a moment later is served from the same exchange, not answered with code_used.
    let retry = gate
        .post_json("/auth/login", &json!({ "code": code }))
        .await;
    assert_eq!(retry.status, 200);
    assert!(users.contains(retry.json()["user_id"].as_str().unwrap()));
    assert_eq!(gate.wechat.calls(JSCODE2SESSION), 1);
}

#[tokio::test]
async fn a_code_wechat_refused_is_not_sent_again() {
    let gate = Gate::login().await;
    let code = gate.wechat.login_code(SHOP_APPID, "gina");
    gate.wechat.fail_next(JSCODE2SESSION, Fault::Errcode(-1), 1);
    let first = gate
        .post_json("/auth/login", &json!({ "code": code }))
        .await;
    assert_eq!(first.error(), "wechat_unavailable");
    let second = gate
        .post_json("/auth/login", &json!({ "code": code }))
        .await;
    assert_eq!(
        second.error(),
        "wechat_unavailable",
        "the same answer, not a second exchange"
    );
    assert_eq!(gate.wechat.calls(JSCODE2SESSION), 1);
}

#[tokio::test]
async fn twenty_concurrent_first_logins_of_one_person_make_one_user() {
    let gate = Gate::login().await;
    let codes: Vec<String> = (0..20)
        .map(|_| gate.wechat.login_code(SHOP_APPID, "henry"))
        .collect();
    let posts: Vec<_> = codes
        .into_iter()
        .map(|code| {
            let url = gate.url("/auth/login");
            tokio::spawn(async move {
                Http::h1()
                    .send(
                        http::Method::POST,
                        &url,
                        &[],
                        bytes_body(json!({ "code": code }).to_string()),
                    )
                    .await
            })
        })
        .collect();
    let mut users = HashSet::new();
    for post in posts {
        let reply = post.await.unwrap();
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        users.insert(reply.json()["user_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(users.len(), 1, "{users:?}");
    assert_eq!(gate.wechat.calls(JSCODE2SESSION), 20);
}

#[tokio::test]
async fn identities_survive_a_restart() {
    let gate = Gate::login().await;
    let before = gate.logged_in("iris").await["user_id"].clone();
    let mut first = gate;
    first.begin_shutdown().await.unwrap().unwrap();
    let second = first.restart_builder(LOGIN).start().await;
    let after = second.logged_in("iris").await["user_id"].clone();
    assert_eq!(before, after);
}

#[tokio::test]
async fn refresh_rotates_and_a_replayed_refresh_token_revokes_the_session() {
    let gate = Gate::login().await;
    let first = gate.logged_in("jack").await;
    let refreshed = gate
        .post_json(
            "/auth/refresh",
            &json!({ "refresh_token": first["refresh_token"] }),
        )
        .await;
    assert_eq!(refreshed.status, 200);
    assert_eq!(refreshed.headers["cache-control"], "no-store");
    let second = refreshed.json();
    assert_eq!(second["user_id"], first["user_id"]);
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    let access = second["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        gate.get_with_token("/api/orders", &access).await.status,
        200
    );

    // The first refresh token is dead; presenting it again means a copy exists: the session ends.
    let replay = gate
        .post_json(
            "/auth/refresh",
            &json!({ "refresh_token": first["refresh_token"] }),
        )
        .await;
    assert_eq!(
        (replay.status.as_u16(), replay.error().as_str()),
        (401, "invalid_token")
    );
    let after = gate.get_with_token("/api/orders", &access).await;
    assert_eq!(
        (after.status.as_u16(), after.error().as_str()),
        (401, "invalid_token")
    );
    let again = gate
        .post_json(
            "/auth/refresh",
            &json!({ "refresh_token": second["refresh_token"] }),
        )
        .await;
    assert_eq!(again.status, 401, "the whole session is revoked");
}

#[tokio::test]
async fn refresh_refuses_what_is_not_a_current_token() {
    let gate = Gate::login().await;
    for body in [
        json!({ "refresh_token": "nope" }),
        json!({ "refresh_token": "A".repeat(64) }),
    ] {
        let reply = gate.post_json("/auth/refresh", &body).await;
        assert_eq!(
            (reply.status.as_u16(), reply.error().as_str()),
            (401, "invalid_token")
        );
    }
    let reply = gate.post_json("/auth/refresh", &json!({})).await;
    assert_eq!(
        (reply.status.as_u16(), reply.error().as_str()),
        (400, "bad_request")
    );
}

#[tokio::test]
async fn logout_stops_the_access_and_refresh_tokens_at_once() {
    let gate = Gate::login().await;
    let tokens = gate.logged_in("kate").await;
    let access = tokens["access_token"].as_str().unwrap();
    let auth = format!("Bearer {access}");
    let logout = Http::h1()
        .send(
            http::Method::POST,
            &gate.url("/auth/logout"),
            &[("Authorization", &auth)],
            wxgate::body::empty(),
        )
        .await;
    assert_eq!(logout.status, 204);
    for path in ["/api/orders", "/auth/session"] {
        let reply = gate.get_with_token(path, access).await;
        assert_eq!(
            (reply.status.as_u16(), reply.error().as_str()),
            (401, "invalid_token"),
            "{path}"
        );
    }
    let refresh = gate
        .post_json(
            "/auth/refresh",
            &json!({ "refresh_token": tokens["refresh_token"] }),
        )
        .await;
    assert_eq!(refresh.status, 401);
    assert!(gate.seen().is_empty());
    let anonymous = Http::h1()
        .send(
            http::Method::POST,
            &gate.url("/auth/logout"),
            &[],
            wxgate::body::empty(),
        )
        .await;
    assert_eq!(
        (anonymous.status.as_u16(), anonymous.error().as_str()),
        (401, "login_required")
    );
}

/// Tokens signed like wxgate's but wrong in one way each.
#[tokio::test]
async fn forged_expired_and_confused_tokens_are_refused() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

    let gate = Gate::login().await;
    let good = gate.logged_in("liam").await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let claims: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(good.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    let sign = |claims: &serde_json::Value, key: &str| {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    let mut expired = claims.clone();
    expired["iat"] = json!(now - 7300);
    expired["exp"] = json!(now - 100);
    let mut other_user = claims.clone();
    other_user["sub"] = json!("u_someone_else");
    let mut other_session = claims.clone();
    other_session["sid"] = json!(URL_SAFE_NO_PAD.encode([7u8; 16]));
    let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
    let none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&claims.to_string())
    );
    let rs256 = format!(
        "{}.{}.{}",
        b64(r#"{"alg":"RS256","typ":"JWT"}"#),
        b64(&claims.to_string()),
        good.rsplit('.').next().unwrap()
    );
    let cases = [
        (sign(&expired, SIGNING_KEY), "token_expired"),
        (
            sign(&claims, "a-different-key-0123456789abcdef-0123"),
            "invalid_token",
        ),
        (sign(&other_session, SIGNING_KEY), "invalid_token"),
        (none, "invalid_token"),
        (rs256, "invalid_token"),
        ("garbage".to_owned(), "invalid_token"),
    ];
    for (token, code) in cases {
        let reply = gate.get_with_token("/api/orders", &token).await;
        assert_eq!(
            (reply.status.as_u16(), reply.error().as_str()),
            (401, code),
            "{token}"
        );
    }
    // A token re-signed for another user with the right key names a session: the identity comes from
    // the session, never from the token's claims.
    assert_eq!(
        gate.get_with_token("/api/orders", &sign(&other_user, SIGNING_KEY))
            .await
            .status,
        200
    );
    let seen = gate.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers["x-user-id"],
        claims["sub"].as_str().unwrap()
    );
}

#[tokio::test]
async fn malformed_login_requests_get_precise_errors() {
    let gate = Gate::login().await;
    let http = Http::h1();
    let post = |body: &'static str| {
        let url = gate.url("/auth/login");
        let http = &http;
        async move {
            http.send(http::Method::POST, &url, &[], bytes_body(body))
                .await
        }
    };
    for body in ["", "not json", "[1]", "{\"code\": 5}", "{}"] {
        let reply = post(body).await;
        assert_eq!(
            (reply.status.as_u16(), reply.error().as_str()),
            (400, "bad_request"),
            "{body:?}"
        );
        assert!(reply.json()["message"].as_str().unwrap().contains("code"));
    }
    let huge = format!("{{\"code\": \"{}\"}}", "a".repeat(100 * 1024));
    let reply = http
        .send(
            http::Method::POST,
            &gate.url("/auth/login"),
            &[],
            bytes_body(huge),
        )
        .await;
    assert_eq!(
        (reply.status.as_u16(), reply.error().as_str()),
        (413, "payload_too_large")
    );
    let reply = http.get(&gate.url("/auth/login"), &[]).await;
    assert_eq!(
        (reply.status.as_u16(), reply.error().as_str()),
        (405, "method_not_allowed")
    );
    assert_eq!(reply.headers["allow"], "POST");
    let reply = gate
        .post_json("/auth/login", &json!({ "code": "abc", "app": "nope" }))
        .await;
    assert_eq!(
        (reply.status.as_u16(), reply.error().as_str()),
        (400, "bad_request")
    );
    assert_eq!(http.get(&gate.url("/auth/nothing"), &[]).await.status, 404);
    assert_eq!(gate.wechat.calls(JSCODE2SESSION), 0);
}

#[tokio::test]
async fn with_several_mini_programs_the_client_names_its_app() {
    let toml = LOGIN.replace(
        "[identity]",
        &format!("[[apps]]\nname = \"legacy\"\nkind = \"miniprogram\"\nappid = \"{LEGACY_APPID}\"\nsecret = \"{LEGACY_SECRET}\"\n\n[identity]"),
    );
    let gate = Gate::with_config(&toml).real_auth().start().await;
    let code = gate.wechat.login_code(LEGACY_APPID, "mia");
    let unnamed = gate
        .post_json("/auth/login", &json!({ "code": code }))
        .await;
    assert_eq!(unnamed.error(), "bad_request");
    let named = gate
        .post_json("/auth/login", &json!({ "code": code, "app": "legacy" }))
        .await;
    assert_eq!(named.status, 200);
    let access = named.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        gate.get_with_token("/auth/session", &access).await.json()["app"],
        "legacy"
    );
}

#[tokio::test]
async fn unionid_and_openid_modes_put_those_ids_in_x_user_id() {
    for (mode, expected) in [
        ("unionid", unionid_of("omar")),
        ("openid", openid_of(SHOP_APPID, "omar")),
    ] {
        let toml = LOGIN.replace("[identity]", &format!("[identity]\nuser_id = \"{mode}\""));
        let gate = Gate::with_config(&toml).real_auth().start().await;
        let tokens = gate.logged_in("omar").await;
        assert_eq!(tokens["user_id"], expected.as_str(), "{mode}");
        let access = tokens["access_token"].as_str().unwrap();
        assert_eq!(gate.get_with_token("/api/orders", access).await.status, 200);
        assert_eq!(gate.seen()[0].headers["x-user-id"], expected.as_str());
        assert!(
            !gate.data.path().join("identities.db").exists(),
            "{mode} needs no identity store"
        );
    }
    // unionid mode cannot identify a user of an unbound app.
    let toml = LOGIN
        .replace("[identity]", "[identity]\nuser_id = \"unionid\"")
        .replace("wx1111111111111111", LEGACY_APPID)
        .replace("shop-secret-0123456789", LEGACY_SECRET);
    let gate = Gate::with_config(&toml).real_auth().start().await;
    let code = gate.wechat.login_code(LEGACY_APPID, "omar");
    let reply = gate
        .post_json("/auth/login", &json!({ "code": code }))
        .await;
    assert_eq!(
        (reply.status.as_u16(), reply.error().as_str()),
        (403, "unionid_unavailable")
    );
}
