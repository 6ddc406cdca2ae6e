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
