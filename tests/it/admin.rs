//! The admin listener: health, readiness and metrics, on its own port.

use crate::support::*;

#[tokio::test]
async fn health_and_readiness_answer_on_the_admin_port() {
    let gate = Gate::start().await;
    let http = Http::h1();
    let health = http
        .get(&format!("http://{}/healthz", gate.admin), &[])
        .await;
    assert_eq!(
        (health.status.as_u16(), health.json()["status"].as_str()),
        (200, Some("ok"))
    );
    let ready = http
        .get(&format!("http://{}/readyz", gate.admin), &[])
        .await;
    assert_eq!(ready.status, 200);
    let missing = http.get(&format!("http://{}/nope", gate.admin), &[]).await;
    assert_eq!(missing.status, 404);
    // The admin endpoints are not on the main listener: there /metrics is an ordinary required route.
    let main = http.get(&gate.url("/metrics"), &[]).await;
    assert_eq!(main.status, 401);
}

#[tokio::test]
async fn readiness_goes_false_when_shutdown_begins() {
    let mut gate = Gate::start().await;
    assert!(gate.readiness.is_ready());
    let task = gate.begin_shutdown();
    task.await.unwrap().unwrap();
    assert!(!gate.readiness.is_ready());
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let gate = Gate::start().await;
    let http = Http::h1();
    for _ in 0..3 {
        assert_eq!(http.get(&gate.url("/api/public/x"), &[]).await.status, 200);
    }
    assert_eq!(http.get(&gate.url("/api/orders"), &[]).await.status, 401);
    assert_eq!(
        http.get(&gate.url("/api/public/%zz"), &[]).await.status,
        400
    );
    let reply = http
        .get(&format!("http://{}/metrics", gate.admin), &[])
        .await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    for line in [
        r#"wxgate_http_requests_total{route="public",status="200"} 3"#,
        r#"wxgate_http_requests_total{route="private",status="401"} 1"#,
        r#"wxgate_http_requests_total{route="invalid_path",status="400"} 1"#,
        r#"wxgate_http_request_duration_seconds_count{route="public"} 3"#,
        r#"wxgate_errors_total{error="login_required"} 1"#,
        r#"wxgate_errors_total{error="invalid_path"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
    // Raw paths never become labels.
    assert!(!text.contains("/api/orders") && !text.contains("%zz"));
}

#[tokio::test]
async fn metrics_count_logins_wechat_calls_verifications_and_sessions() {
    let gate = Gate::login().await;
    let tokens = gate.logged_in("mia").await;
    let code = gate.wechat.login_code(SHOP_APPID, "mia");
    gate.wechat.fail_next(
        wxgate::wechat::mock::JSCODE2SESSION,
        wxgate::wechat::mock::Fault::Errcode(40029),
        1,
    );
    let refused = gate
        .post_json("/auth/login", &serde_json::json!({ "code": code }))
        .await;
    assert_eq!(refused.error(), "invalid_code");
    let access = tokens["access_token"].as_str().unwrap();
    assert_eq!(gate.get_with_token("/api/orders", access).await.status, 200);
    assert_eq!(
        gate.get_with_token("/api/orders", "not.a.token")
            .await
            .status,
        401
    );

    let text = String::from_utf8(
        Http::h1()
            .get(&format!("http://{}/metrics", gate.admin), &[])
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    for line in [
        r#"wxgate_logins_total{app="shop",result="ok"} 1"#,
        r#"wxgate_logins_total{app="shop",result="invalid_code"} 1"#,
        r#"wxgate_wechat_requests_total{endpoint="jscode2session",errcode="0"} 1"#,
        r#"wxgate_wechat_requests_total{endpoint="jscode2session",errcode="40029"} 1"#,
        r#"wxgate_wechat_request_duration_seconds_count{endpoint="jscode2session"} 2"#,
        r#"wxgate_token_verifications_total{result="ok"} 1"#,
        r#"wxgate_token_verifications_total{result="invalid"} 1"#,
        "wxgate_sessions_active 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
    assert!(!text.contains(access), "no token in metrics");
}
