//! Route policy over real sockets: what is forwarded, with which identity, and what is refused.

use crate::support::*;

#[tokio::test]
async fn public_route_is_forwarded_without_identity_even_when_forged() {
    let gate = Gate::start().await;
    let reply = Http::h1()
        .get(
            &gate.url("/api/public/products?page=2"),
            &[
                ("X-User-Id", "admin"),
                ("x_user_id", "admin"),
                ("X.User.Id", "admin"),
                ("X-WeChat-OpenId", "forged"),
                ("x-wechat_unionid", "forged"),
                ("Authorization", "Bearer good"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let seen = gate.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/api/public/products");
    assert_eq!(seen[0].query.as_deref(), Some("page=2"));
    for canonical in [
        "x-user-id",
        "x-wechat-appid",
        "x-wechat-openid",
        "x-wechat-unionid",
    ] {
        assert_eq!(
            folded(&seen[0].headers, canonical),
            [],
            "{canonical} reached the backend"
        );
    }
    // A public route ignores the token entirely, and wxgate's bearer token is never forwarded.
    assert!(!seen[0].headers.contains_key("authorization"));
}

#[tokio::test]
async fn required_route_without_token_is_401_and_not_forwarded() {
    let gate = Gate::start().await;
    let reply = Http::h1()
        .get(&gate.url("/api/orders"), &[("X-User-Id", "admin")])
        .await;
    assert_eq!(reply.status, 401);
    assert!(
        reply.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert_eq!(reply.headers["content-type"], "application/json");
    assert_eq!(reply.error(), "login_required");
    assert!(reply.json()["message"].as_str().unwrap().len() > 10);
    assert!(
        gate.seen().is_empty(),
        "a required route was forwarded without identity"
    );
}

#[tokio::test]
async fn required_route_with_a_valid_token_carries_only_our_identity() {
    let gate = Gate::start().await;
    let reply = Http::h1()
        .get(
            &gate.url("/api/orders"),
            &[
                ("Authorization", "Bearer good"),
                ("X-User-Id", "admin"),
                ("x_wechat_openid", "forged"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    let headers = &gate.seen()[0].headers;
    assert_eq!(folded(headers, "x-user-id"), [("x-user-id", USER)]);
    assert_eq!(
        folded(headers, "x-wechat-appid"),
        [("x-wechat-appid", APPID)]
    );
    assert_eq!(
        folded(headers, "x-wechat-openid"),
        [("x-wechat-openid", OPENID)]
    );
    assert_eq!(
        folded(headers, "x-wechat-unionid"),
        [("x-wechat-unionid", UNIONID)]
    );
    assert!(
        !headers.contains_key("authorization"),
        "the bearer token reached the backend"
    );
}

#[tokio::test]
async fn bad_tokens_get_the_matching_401_and_an_outage_fails_closed() {
    let gate = Gate::start().await;
    let http = Http::h1();
    for (token, status, code) in [
        ("expired", 401, "token_expired"),
        ("forged", 401, "invalid_token"),
        ("outage", 503, "auth_unavailable"),
    ] {
        let auth = format!("Bearer {token}");
        for path in ["/api/orders", "/api/feed"] {
            let reply = http.get(&gate.url(path), &[("Authorization", &auth)]).await;
            assert_eq!(
                (reply.status.as_u16(), reply.error().as_str()),
                (status, code),
                "{token} on {path}"
            );
        }
    }
    let reply = http
        .get(
            &gate.url("/api/orders"),
            &[("Authorization", "Bearer forged")],
        )
        .await;
    assert!(
        reply.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    assert!(gate.seen().is_empty());
}

#[tokio::test]
async fn optional_route_forwards_with_or_without_identity() {
    let gate = Gate::start().await;
    let http = Http::h1();
    let anonymous = http
        .get(&gate.url("/api/feed"), &[("X-User-Id", "admin")])
        .await;
    assert_eq!(anonymous.status, 200);
    let known = http
        .get(
            &gate.url("/api/feed/today"),
            &[("Authorization", "Bearer good")],
        )
        .await;
    assert_eq!(known.status, 200);
    let seen = gate.seen();
    assert_eq!(folded(&seen[0].headers, "x-user-id"), []);
    assert_eq!(folded(&seen[1].headers, "x-user-id"), [("x-user-id", USER)]);
}

#[tokio::test]
async fn dot_segments_are_resolved_before_matching() {
    let gate = Gate::start().await;
    for path in [
        "/api/public/../private",
        "/api/public/%2e%2e/private",
        "/api/public/%2E%2e/private",
        "/api/public/./../private",
        "/api/public/x/../../private",
    ] {
        let response = raw(
            gate.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(
            raw_status(&response),
            401,
            "{path} was not treated as /api/private"
        );
    }
    assert!(gate.seen().is_empty());

    // With a token the backend receives the resolved path: what was authorised is what is served.
    let reply = Http::h1()
        .get(
            &gate.url("/api/public/%2e%2e/private?x=1"),
            &[("Authorization", "Bearer good")],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(gate.seen()[0].path, "/api/private");
    assert_eq!(gate.seen()[0].query.as_deref(), Some("x=1"));
}

#[tokio::test]
async fn climbing_into_a_public_prefix_is_public_and_forwarded_resolved() {
    let gate = Gate::start().await;
    let reply = Http::h1()
        .get(&gate.url("/api/private/../public/x"), &[])
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(gate.seen()[0].path, "/api/public/x");
}

#[tokio::test]
async fn a_public_prefix_in_the_query_does_not_make_a_route_public() {
    let gate = Gate::start().await;
    let http = Http::h1();
    for target in [
        "/api/private?next=/api/public/x",
        "/api/private?/api/public/",
        "/api/private?%2Fapi%2Fpublic%2F",
    ] {
        let reply = http.get(&gate.url(target), &[]).await;
        assert_eq!(reply.status, 401, "{target}");
    }
    let response = raw(
        gate.addr,
        "GET /api/private#/api/public/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_ne!(raw_status(&response), 200);
    assert!(gate.seen().is_empty());
}

#[tokio::test]
async fn queries_are_passed_through_unchanged() {
    let gate = Gate::start().await;
    let query = "a=1&b=%2F..%2F&c=%E4%BD%A0&d=/api/x?y";
    let reply = Http::h1()
        .get(&gate.url(&format!("/api/public/search?{query}")), &[])
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(gate.seen()[0].query.as_deref(), Some(query));
}

#[tokio::test]
async fn duplicate_slashes_are_merged() {
    let gate = Gate::start().await;
    let reply = Http::h1().get(&gate.url("//api//public///x"), &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(gate.seen()[0].path, "/api/public/x");
}

#[tokio::test]
async fn unnormalisable_paths_are_400_and_never_forwarded() {
    let gate = Gate::start().await;
    for path in [
        "/api/public/..%2Fprivate",
        "/api/public/..%2fprivate",
        "/api/public/..%5Cprivate",
        "/api/public/%zz",
        "/api/public/%",
        "/api/public/..;/private",
    ] {
        let response = raw(
            gate.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(raw_status(&response), 400, "{path}: {response}");
        assert!(
            response.contains("\"error\":\"invalid_path\""),
            "{response}"
        );
    }
    assert!(gate.seen().is_empty());
}

#[tokio::test]
async fn encoded_slashes_can_be_allowed_and_stay_encoded() {
    let toml = ROUTES.replacen(
        "[upstream]",
        "[server]\nallow_encoded_slashes = true\n\n[upstream]",
        1,
    );
    let gate = Gate::with_config(&toml).start().await;
    let reply = Http::h1().get(&gate.url("/api/public/a%2fb"), &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(gate.seen()[0].path, "/api/public/a%2Fb");
    // Still cannot climb out of a public prefix: the encoded slash is not a separator.
    let reply = Http::h1()
        .get(&gate.url("/api/public/..%2F..%2Fprivate"), &[])
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(gate.seen()[1].path, "/api/public/..%2F..%2Fprivate");
}

#[tokio::test]
async fn a_path_matching_no_route_is_required() {
    let toml =
        "[upstream]\nurl = \"UPSTREAM\"\n[[routes]]\nprefix = \"/open\"\nauth = \"public\"\n";
    let gate = Gate::with_config(toml).start().await;
    let http = Http::h1();
    assert_eq!(http.get(&gate.url("/open/x"), &[]).await.status, 200);
    assert_eq!(
        http.get(&gate.url("/opener"), &[]).await.status,
        401,
        "prefixes match whole segments"
    );
    assert_eq!(http.get(&gate.url("/elsewhere"), &[]).await.status, 401);
    assert_eq!(gate.seen().len(), 1);
}

#[tokio::test]
async fn methods_narrow_a_rule_and_the_rest_falls_through() {
    let toml = r#"
[upstream]
url = "UPSTREAM"
[[routes]]
prefix = "/catalog"
methods = ["GET", "HEAD"]
auth = "public"
"#;
    let gate = Gate::with_config(toml).start().await;
    let http = Http::h1();
    assert_eq!(http.get(&gate.url("/catalog/1"), &[]).await.status, 200);
    let post = http
        .send(
            http::Method::POST,
            &gate.url("/catalog/1"),
            &[],
            bytes_body("x"),
        )
        .await;
    assert_eq!(post.status, 401);
}

#[tokio::test]
async fn the_auth_prefix_is_never_forwarded() {
    let gate = Gate::start().await;
    let http = Http::h1();
    for path in [
        "/auth/login",
        "/auth",
        "/auth/",
        "/api/../auth/login",
        "/auth/x/y?z=1",
    ] {
        let reply = http
            .get(&gate.url(path), &[("Authorization", "Bearer good")])
            .await;
        assert_eq!(reply.status, 404, "{path}");
        assert_eq!(reply.error(), "not_found");
    }
    let response = raw(
        gate.addr,
        "GET /api/public/%2e%2e/%2e%2e/auth/login HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&response), 404);
    // A sibling that only starts with the same letters is an ordinary route.
    assert_eq!(http.get(&gate.url("/authors"), &[]).await.status, 401);
    assert!(gate.seen().is_empty());
}
