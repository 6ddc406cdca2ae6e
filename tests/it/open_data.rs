//! User info over real sockets: decryption with the session's keys, the one-round-trip login, unionid
//! linking, and the merge of two users who turn out to be one person.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use wxgate::wechat::crypto;
use wxgate::wechat::mock::{UserInfo, openid_of, unionid_of};

use crate::support::*;

/// Both mini programs: `shop` (bound: logins carry unionid) and `legacy` (unbound: they do not).
fn both_apps() -> String {
    LOGIN.replace(
        "[identity]",
        &format!(
            "[[apps]]\nname = \"legacy\"\nkind = \"miniprogram\"\nappid = \"{LEGACY_APPID}\"\nsecret = \"{LEGACY_SECRET}\"\n\n[identity]"
        ),
    )
}

async fn login(gate: &Gate, app: &str, appid: &str, user: &str) -> Value {
    let code = gate.wechat.login_code(appid, user);
    let reply = gate
        .post_json("/auth/login", &json!({ "code": code, "app": app }))
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.json()
}

async fn userinfo(gate: &Gate, access: &Value, body: &Value) -> Reply {
    let auth = format!("Bearer {}", access.as_str().unwrap());
    Http::h1()
        .send(
            http::Method::POST,
            &gate.url("/auth/userinfo"),
            &[("Authorization", &auth)],
            bytes_body(body.to_string()),
        )
        .await
}

fn as_json(info: &UserInfo) -> Value {
    serde_json::to_value(info).unwrap()
}

#[tokio::test]
async fn an_unbound_user_gets_the_unionid_linked_from_user_info() {
    let gate = Gate::with_config(&both_apps()).real_auth().start().await;
    let tokens = login(&gate, "legacy", LEGACY_APPID, "ann").await;
    assert_eq!(tokens["unionid_known"], false);
    let info = gate.wechat.user_info(LEGACY_APPID, "ann").unwrap();
    let reply = userinfo(&gate, &tokens["access_token"], &as_json(&info)).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let body = reply.json();
    assert_eq!(
        body["user_id"], tokens["user_id"],
        "the same user, now with a unionid"
    );
    assert_eq!(body["unionid"], unionid_of("ann").as_str());
    assert_eq!(body["profile"]["nickName"], "微信用户");
    assert!(body["profile"].get("openId").is_none() && body["profile"].get("watermark").is_none());

    let next = gate
        .get_with_token("/api/orders", tokens["access_token"].as_str().unwrap())
        .await;
    assert_eq!(next.status, 200);
    assert_eq!(
        gate.seen()[0].headers["x-wechat-unionid"],
        unionid_of("ann").as_str()
    );
    // The same person from the bound app is now this user too.
    let from_shop = login(&gate, "shop", SHOP_APPID, "ann").await;
    assert_eq!(from_shop["user_id"], tokens["user_id"]);
}

#[tokio::test]
async fn two_users_who_are_one_person_are_merged_and_the_session_follows() {
    let gate = Gate::with_config(&both_apps()).real_auth().start().await;
    let legacy = login(&gate, "legacy", LEGACY_APPID, "ben").await;
    let shop = login(&gate, "shop", SHOP_APPID, "ben").await;
    assert_ne!(
        legacy["user_id"], shop["user_id"],
        "two users until a unionid joins them"
    );

    let info = gate.wechat.user_info(LEGACY_APPID, "ben").unwrap();
    let reply = userinfo(&gate, &legacy["access_token"], &as_json(&info)).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(
        reply.json()["user_id"],
        shop["user_id"],
        "the unionid's user survives"
    );

    // The legacy session's very next request carries the surviving id.
    let next = gate
        .get_with_token("/api/orders", legacy["access_token"].as_str().unwrap())
        .await;
    assert_eq!(next.status, 200);
    assert_eq!(
        gate.seen()[0].headers["x-user-id"],
        shop["user_id"].as_str().unwrap()
    );
    assert_eq!(
        gate.seen()[0].headers["x-wechat-openid"],
        openid_of(LEGACY_APPID, "ben").as_str()
    );
    // Nothing lost: both apps' logins now land on the survivor.
    assert_eq!(
        login(&gate, "legacy", LEGACY_APPID, "ben").await["user_id"],
        shop["user_id"]
    );
    assert_eq!(
        login(&gate, "shop", SHOP_APPID, "ben").await["user_id"],
        shop["user_id"]
    );
    let metrics = Http::h1()
        .get(&format!("http://{}/metrics", gate.admin), &[])
        .await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.lines().any(|l| l == "wxgate_identity_merges_total 1"),
        "{text}"
    );
}

#[tokio::test]
async fn user_info_in_the_login_itself_links_the_unionid_at_once() {
    let gate = Gate::with_config(&both_apps()).real_auth().start().await;
    // wx.login() then wx.getUserInfo(): the data is encrypted with the key this code's exchange returns.
    let code = gate.wechat.login_code(LEGACY_APPID, "cleo");
    let info = as_json(&gate.wechat.user_info(LEGACY_APPID, "cleo").unwrap());
    let mut body = info.clone();
    body["code"] = json!(code);
    body["app"] = json!("legacy");
    let reply = gate.post_json("/auth/login", &body).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let tokens = reply.json();
    assert_eq!(tokens["unionid_known"], true);
    assert_eq!(tokens["profile"]["nickName"], "微信用户");
    assert_eq!(
        login(&gate, "shop", SHOP_APPID, "cleo").await["user_id"],
        tokens["user_id"]
    );
}

#[tokio::test]
async fn the_previous_session_key_still_opens_data_the_current_one_too() {
    let gate = Gate::with_config(&both_apps()).real_auth().start().await;
    let first = login(&gate, "legacy", LEGACY_APPID, "dora").await;
    let old_info = gate.wechat.user_info(LEGACY_APPID, "dora").unwrap();
    // Logging in again rotates the session_key; the old data was encrypted with the previous one.
    let second = login(&gate, "legacy", LEGACY_APPID, "dora").await;
    let new_info = gate.wechat.user_info(LEGACY_APPID, "dora").unwrap();
    for (tokens, info) in [
        (&second, &old_info),
        (&second, &new_info),
        (&first, &new_info),
    ] {
        let reply = userinfo(&gate, &tokens["access_token"], &as_json(info)).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
}

#[tokio::test]
async fn bad_open_data_gets_a_precise_400_and_links_nothing() {
    let gate = Gate::with_config(&both_apps()).real_auth().start().await;
    let tokens = login(&gate, "legacy", LEGACY_APPID, "eve").await;
    let access = &tokens["access_token"];
    let good = as_json(&gate.wechat.user_info(LEGACY_APPID, "eve").unwrap());
    let key = gate
        .wechat
        .session_key(LEGACY_APPID, &openid_of(LEGACY_APPID, "eve"))
        .unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    let sealed = |plain: Value| {
        let iv = [5u8; 16];
        json!({ "encryptedData": crypto::encrypt(&key, &iv, plain.to_string().as_bytes()).unwrap(), "iv": STANDARD.encode(iv) })
    };
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body
    };
    let openid = openid_of(LEGACY_APPID, "eve");
    let cases = [
        (
            with("encryptedData", json!("%%%not base64")),
            "decrypt_failed",
        ),
        (with("iv", json!("AAAA")), "decrypt_failed"),
        (
            with("encryptedData", json!("AAAAAAAAAAAAAAAAAAAAAA==")),
            "decrypt_failed",
        ),
        (
            with("encryptedData", json!(STANDARD.encode([0u8; 32]))),
            "decrypt_failed",
        ),
        (
            with("signature", json!("0".repeat(40))),
            "signature_mismatch",
        ),
        (
            with("rawData", json!("{\"nickName\":\"someone else\"}")),
            "signature_mismatch",
        ),
        (sealed(json!("not an object")), "decrypt_failed"),
        (
            sealed(
                json!({"openId": openid, "unionId": "oX", "watermark": {"appid": SHOP_APPID, "timestamp": now}}),
            ),
            "watermark_mismatch",
        ),
        (
            sealed(
                json!({"openId": openid, "unionId": "oX", "watermark": {"appid": LEGACY_APPID, "timestamp": now - 3600}}),
            ),
            "watermark_mismatch",
        ),
        (
            sealed(
                json!({"openId": openid_of(LEGACY_APPID, "mallory"), "unionId": "oX", "watermark": {"appid": LEGACY_APPID, "timestamp": now}}),
            ),
            "watermark_mismatch",
        ),
        (
            sealed(json!({"openId": openid, "unionId": "oX"})),
            "watermark_mismatch",
        ),
    ];
    for (body, code) in cases {
        let reply = userinfo(&gate, access, &body).await;
        assert_eq!(
            (reply.status.as_u16(), reply.error().as_str()),
            (400, code),
            "{body}"
        );
    }
    let mut unsigned = good.clone();
    unsigned.as_object_mut().unwrap().remove("signature");
    let reply = userinfo(&gate, access, &unsigned).await;
    assert_eq!(
        (reply.status.as_u16(), reply.error().as_str()),
        (400, "bad_request")
    );
    let reply = userinfo(&gate, access, &json!({ "iv": good["iv"] })).await;
    assert_eq!(
        (reply.status.as_u16(), reply.error().as_str()),
        (400, "bad_request")
    );
    // Nothing was linked by any of that: the session still has no unionid.
    let session = gate
        .get_with_token("/auth/session", access.as_str().unwrap())
        .await
        .json();
    assert!(session.get("unionid").is_none(), "{session}");
    // And without rawData/signature the good data is accepted.
    let mut bare = good.clone();
    bare.as_object_mut()
        .unwrap()
        .retain(|k, _| k == "encryptedData" || k == "iv");
    assert_eq!(userinfo(&gate, access, &bare).await.status, 200);
    assert_eq!(userinfo(&gate, &json!("forged"), &good).await.status, 401);
}

#[tokio::test]
async fn operators_can_ask_who_a_user_is_and_see_merges() {
    let gate = Gate::with_config(&both_apps()).real_auth().start().await;
    let legacy = login(&gate, "legacy", LEGACY_APPID, "finn").await;
    let shop = login(&gate, "shop", SHOP_APPID, "finn").await;
    let info = gate.wechat.user_info(LEGACY_APPID, "finn").unwrap();
    assert_eq!(
        userinfo(&gate, &legacy["access_token"], &as_json(&info))
            .await
            .status,
        200
    );
    let admin = |path: String| {
        let url = format!("http://{}{path}", gate.admin);
        async move { Http::h1().get(&url, &[]).await }
    };
    let survivor = shop["user_id"].as_str().unwrap();
    let merged = legacy["user_id"].as_str().unwrap();

    let record = admin(format!("/users/{survivor}")).await;
    assert_eq!(record.status, 200);
    let record = record.json();
    assert_eq!(record["unionid"], unionid_of("finn").as_str());
    assert_eq!(record["merged_from"], json!([merged]));
    let apps: Vec<&str> = record["openids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["appid"].as_str().unwrap())
        .collect();
    assert_eq!(apps, [SHOP_APPID, LEGACY_APPID]);

    let old = admin(format!("/users/{merged}")).await.json();
    assert_eq!(old["merged_into"], survivor);
    assert_eq!(old["openids"], json!([]));

    let by_openid = admin(format!(
        "/users?openid={}&appid={LEGACY_APPID}",
        openid_of(LEGACY_APPID, "finn")
    ))
    .await;
    assert_eq!(by_openid.json()["user_id"], survivor);
    let by_openid_alone = admin(format!("/users?openid={}", openid_of(SHOP_APPID, "finn"))).await;
    assert_eq!(by_openid_alone.json()["user_id"], survivor);
    let by_unionid = admin(format!("/users?unionid={}", unionid_of("finn"))).await;
    assert_eq!(by_unionid.json()["user_id"], survivor);
    assert_eq!(admin("/users/u_nobody".to_owned()).await.status, 404);
    assert_eq!(admin("/users?unionid=nobody".to_owned()).await.status, 404);
    assert_eq!(admin("/users".to_owned()).await.status, 400);
    // Not on the public port.
    assert_eq!(
        Http::h1()
            .get(&gate.url(&format!("/users/{survivor}")), &[])
            .await
            .status,
        401
    );
}
