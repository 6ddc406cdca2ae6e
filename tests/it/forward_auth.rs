//! Forward authentication: `/auth/verify` judges the requests a front proxy is about to pass, by the
//! same route policy as the proxy mode, and answers only trusted proxies.

use http::Method;

use crate::support::*;

/// [`ROUTES`] with the test's own address (127.0.0.1) as the trusted front proxy.
fn trusted() -> String {
    format!("[server]\ntrusted_proxies = [\"127.0.0.1\"]\n{ROUTES}")
}

async fn verify(gate: &Gate, method: &str, uri: &str, token: Option<&str>) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("X-Forwarded-Method", method), ("X-Forwarded-Uri", uri)];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth));
    }
    Http::h1().get(&gate.url("/auth/verify"), &headers).await
}

#[tokio::test]
async fn verify_answers_by_the_route_policy_with_the_identity_headers() {
    let gate = Gate::with_config(&trusted()).start().await;

    let ok = verify(&gate, "GET", "/api/orders?id=1", Some("good")).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.headers["x-user-id"], USER);
    assert_eq!(ok.headers["x-wechat-appid"], APPID);
    assert_eq!(ok.headers["x-wechat-openid"], OPENID);
    assert_eq!(ok.headers["x-wechat-unionid"], UNIONID);
    assert!(ok.headers.get("x-request-id").is_some());

    for (token, error) in [
        (None, "login_required"),
        (Some("expired"), "token_expired"),
        (Some("forged"), "invalid_token"),
    ] {
        let refused = verify(&gate, "POST", "/api/orders", token).await;
        assert_eq!(refused.status, 401, "{token:?}");
        assert_eq!(refused.error(), error);
        assert!(
            refused.headers["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        assert!(refused.headers.get("x-user-id").is_none());
    }

    // Public routes pass without identity, even with a token; optional ones with it when sent.
    let public = verify(&gate, "GET", "/api/public/list", Some("good")).await;
    assert_eq!(public.status, 200);
    assert!(public.headers.get("x-user-id").is_none());
    let anonymous = verify(&gate, "GET", "/api/feed", None).await;
    assert_eq!(anonymous.status, 200);
    assert!(anonymous.headers.get("x-user-id").is_none());
    let known = verify(&gate, "GET", "/api/feed", Some("good")).await;
    assert_eq!(known.headers["x-user-id"], USER);

    // The original path is normalised before matching, as in proxy mode.
    let sneaky = verify(&gate, "GET", "/api/public/%2e%2e/orders", None).await;
    assert_eq!(sneaky.status, 401);
    // Refusals other than 401 are 403 (nginx turns anything else into a 500), the code in the body.
    let broken = verify(&gate, "GET", "/api/%zz", Some("good")).await;
    assert_eq!(broken.status, 403);
    assert_eq!(broken.error(), "invalid_path");
    let unknown = Http::h1()
        .get(
            &gate.url("/auth/verify"),
            &[("Authorization", "Bearer good")],
        )
        .await;
    assert_eq!(unknown.status, 403);
    assert_eq!(unknown.error(), "bad_request");
    // A store that is down fails closed.
    let outage = verify(&gate, "GET", "/api/orders", Some("outage")).await;
    assert_eq!(outage.status, 503);
    // wxgate's own endpoints are open to all.
    let own = verify(&gate, "POST", "/auth/login", None).await;
    assert_eq!(own.status, 200);

    assert!(gate.seen().is_empty(), "verify never forwards anything");
}

#[tokio::test]
async fn verify_reads_nginx_and_envoy_styles() {
    let gate = Gate::with_config(&trusted()).start().await;
    let http = Http::h1();
    // nginx auth_request: X-Original-Method and X-Original-URI.
    let nginx = http
        .get(
            &gate.url("/auth/verify"),
            &[
                ("X-Original-Method", "DELETE"),
                ("X-Original-URI", "/api/orders/7"),
                ("Authorization", "Bearer good"),
            ],
        )
        .await;
    assert_eq!(nginx.status, 200);
    assert_eq!(nginx.headers["x-user-id"], USER);
    // Envoy ext_authz (HTTP): the original method, and the original path after the configured prefix.
    for (method, token, status) in [
        (Method::POST, Some("Bearer good"), 200),
        (Method::PUT, None, 401),
    ] {
        let headers: Vec<(&str, &str)> = token.iter().map(|t| ("Authorization", *t)).collect();
        let envoy = http
            .send(
                method.clone(),
                &gate.url("/auth/verify/api/orders?id=1"),
                &headers,
                wxgate::body::empty(),
            )
            .await;
        assert_eq!(envoy.status, status, "{method}");
    }
    let public = http.get(&gate.url("/auth/verify/api/public/x"), &[]).await;
    assert_eq!(public.status, 200);
}

#[tokio::test]
async fn verify_answers_only_trusted_proxies() {
    // The test client is 127.0.0.1, which this gateway does not trust.
    let gate = Gate::start().await;
    let reply = verify(&gate, "GET", "/api/public/x", Some("good")).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.error(), "untrusted_proxy");
    assert!(reply.headers.get("x-user-id").is_none());
}
