//! Phone numbers and the app access_token over real sockets.

use serde_json::{Value, json};
use wxgate::wechat::mock::{PHONE_NUMBER, STABLE_TOKEN};

use crate::support::*;

async fn phone(gate: &Gate, access: &str, body: &Value) -> Reply {
    let auth = format!("Bearer {access}");
    Http::h1()
        .send(
            http::Method::POST,
            &gate.url("/auth/phone"),
            &[("Authorization", &auth)],
            bytes_body(body.to_string()),
        )
        .await
}

fn with_phone_header() -> String {
    LOGIN.replacen(
        "[[routes]]",
        "[headers]\nphone = \"X-WeChat-Phone\"\n\n[[routes]]",
        1,
    )
}

#[tokio::test]
async fn a_phone_code_gives_the_verified_number_stored_and_sent_upstream() {
    let gate = Gate::with_config(&with_phone_header())
        .real_auth()
        .start()
        .await;
    let tokens = gate.logged_in("gus").await;
    let access = tokens["access_token"].as_str().unwrap();
    let code = gate.wechat.phone_code(SHOP_APPID, "gus", "13580006666");
    assert_eq!(code.len(), 64);
    let reply = phone(&gate, access, &json!({ "code": code })).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.headers["cache-control"], "no-store");
    assert_eq!(
        reply.json(),
        json!({ "phone_number": "13580006666", "pure_phone_number": "13580006666", "country_code": "86" })
    );
    // Sent upstream (the header is configured), and a forged one is not.
    let auth = format!("Bearer {access}");
    let call = Http::h1()
        .get(
            &gate.url("/api/orders"),
            &[("Authorization", &auth), ("x_wechat_phone", "110")],
        )
        .await;
    assert_eq!(call.status, 200);
    assert_eq!(
        folded(&gate.seen()[0].headers, "x-wechat-phone"),
        [("x-wechat-phone", "13580006666")]
    );
    // Stored on the user, and known to the next login's session too.
    let record = Http::h1()
        .get(
            &format!(
                "http://{}/users/{}",
                gate.admin,
                tokens["user_id"].as_str().unwrap()
            ),
            &[],
        )
        .await
        .json();
    assert_eq!(record["phone"]["phone_number"], "13580006666");
    let again = gate.logged_in("gus").await;
    assert_eq!(
        gate.get_with_token("/api/orders", again["access_token"].as_str().unwrap())
            .await
            .status,
        200
    );
    assert_eq!(gate.seen()[1].headers["x-wechat-phone"], "13580006666");
    // The code was single use.
    let reply = phone(&gate, access, &json!({ "code": code })).await;
    assert_eq!(
        (reply.status.as_u16(), reply.error().as_str()),
        (400, "invalid_code")
    );
}

#[tokio::test]
async fn the_phone_header_is_not_sent_unless_configured() {
    let gate = Gate::login().await;
    let tokens = gate.logged_in("hal").await;
    let access = tokens["access_token"].as_str().unwrap();
    let code = gate.wechat.phone_code(SHOP_APPID, "hal", "13800138000");
    assert_eq!(
        phone(&gate, access, &json!({ "code": code })).await.status,
        200
    );
    assert_eq!(gate.get_with_token("/api/orders", access).await.status, 200);
    assert_eq!(folded(&gate.seen()[0].headers, "x-wechat-phone"), []);
}

#[tokio::test]
async fn the_legacy_encrypted_form_and_bad_requests() {
    let gate = Gate::login().await;
    let tokens = gate.logged_in("ivy").await;
    let access = tokens["access_token"].as_str().unwrap();
    let (encrypted, iv) = gate
        .wechat
        .legacy_phone_data(SHOP_APPID, "ivy", "13900000000")
        .unwrap();
    let reply = phone(
        &gate,
        access,
        &json!({ "encryptedData": encrypted, "iv": iv }),
    )
    .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.json()["phone_number"], "13900000000");
    assert_eq!(
        gate.wechat.calls(STABLE_TOKEN),
        0,
        "the legacy form needs no access_token"
    );

    let reply = phone(&gate, access, &json!({})).await;
    assert_eq!(
        (reply.status.as_u16(), reply.error().as_str()),
        (400, "bad_request")
    );
    let reply = phone(
        &gate,
        access,
        &json!({ "encryptedData": encrypted, "iv": "AAAA" }),
    )
    .await;
    assert_eq!(
        (reply.status.as_u16(), reply.error().as_str()),
        (400, "decrypt_failed")
    );
    // Another user's phone code is refused: the code is bound to the caller's openid.
    let foreign = gate
        .wechat
        .phone_code(SHOP_APPID, "someone-else", "13000000000");
    let reply = phone(&gate, access, &json!({ "code": foreign })).await;
    assert_eq!(
        (reply.status.as_u16(), reply.error().as_str()),
        (400, "invalid_code")
    );
    assert_eq!(
        phone(&gate, "not-a-token", &json!({ "code": foreign }))
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn fifty_concurrent_phone_calls_fetch_one_access_token() {
    let gate = Gate::login().await;
    let tokens = gate.logged_in("jade").await;
    let access = tokens["access_token"].as_str().unwrap().to_owned();
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let code = gate
                .wechat
                .phone_code(SHOP_APPID, "jade", &format!("1380000{i:04}"));
            let (url, auth) = (gate.url("/auth/phone"), format!("Bearer {access}"));
            tokio::spawn(async move {
                Http::h1()
                    .send(
                        http::Method::POST,
                        &url,
                        &[("Authorization", &auth)],
                        bytes_body(json!({ "code": code }).to_string()),
                    )
                    .await
            })
        })
        .collect();
    for call in calls {
        let reply = call.await.unwrap();
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    assert_eq!(
        gate.wechat.calls(STABLE_TOKEN),
        1,
        "one fetch, shared by all"
    );
    assert_eq!(gate.wechat.calls(PHONE_NUMBER), 50);
}

#[tokio::test]
async fn a_token_revoked_at_wechat_is_replaced_once_and_the_call_succeeds() {
    let gate = Gate::login().await;
    let access = gate.logged_in("kai").await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let first = gate.wechat.phone_code(SHOP_APPID, "kai", "13111111111");
    assert_eq!(
        phone(&gate, &access, &json!({ "code": first }))
            .await
            .status,
        200
    );
    let old_token = gate.wechat.current_access_token(SHOP_APPID).unwrap();
    // Another server called cgi-bin/token: our cached token is dead.
    gate.wechat.revoke_access_token(SHOP_APPID);
    let second = gate.wechat.phone_code(SHOP_APPID, "kai", "13122222222");
    let reply = phone(&gate, &access, &json!({ "code": second })).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.json()["phone_number"], "13122222222");
    assert_eq!(
        gate.wechat.calls(STABLE_TOKEN),
        2,
        "fetched once more, not in a loop"
    );
    assert_eq!(
        gate.wechat.calls(PHONE_NUMBER),
        3,
        "one refused call, one retry"
    );
    assert_ne!(
        gate.wechat.current_access_token(SHOP_APPID).unwrap(),
        old_token
    );
}
