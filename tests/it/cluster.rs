//! Three wxgate instances on one Redis (sessions) and one PostgreSQL (identities), as behind a load
//! balancer: they must behave as one. Real servers, see `servers.rs`.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::servers::{RedisServer, Relay, TestDatabase};
use wxgate::wechat::mock::{Fault, JSCODE2SESSION, OauthKind, PHONE_NUMBER, STABLE_TOKEN};

use crate::oauth::Browser;
use crate::support::{
    Gate, H5_APPID, H5_SECRET, Http, LOGIN, MOBILE_APPID, MOBILE_SECRET, SHOP_APPID,
};

/// A cluster: three gates sharing one mock WeChat, one Redis and one database.
pub struct Cluster {
    pub gates: Vec<Gate>,
    pub redis: RedisServer,
    pub db: TestDatabase,
}

/// [`LOGIN`] plus the company's mobile app, with the shared stores; `postgres` is the URL wxgate
/// uses (directly or via a relay).
pub fn cluster_config(redis: &RedisServer, postgres: &str) -> String {
    LOGIN
        .replace("sqlite://DATADIR/identities.db", postgres)
        .replace(
            "[session]\n",
            &format!("[session]\nstore = \"{}\"\n", redis.url()),
        )
        .replace("[wechat]\n", "[wechat]\nopen_base = \"WECHAT\"\n")
        .replacen(
            "[[routes]]",
            "[headers]\nphone = \"X-WeChat-Phone\"\n\n[[routes]]",
            1,
        )
        .replace(
            "[identity]\n",
            &format!(
                "[[apps]]\nname = \"mobile\"\nkind = \"app\"\nappid = \"{MOBILE_APPID}\"\nsecret = \"{MOBILE_SECRET}\"\n\n\
                 [[apps]]\nname = \"h5\"\nkind = \"oa\"\nappid = \"{H5_APPID}\"\nsecret = \"{H5_SECRET}\"\npublic_url = \"GATEURL\"\n\n\
                 [identity]\n"
            ),
        )
}

impl Cluster {
    /// Three instances, or `None` when the servers are not available (the skip is announced).
    pub async fn start() -> Option<Cluster> {
        let redis = RedisServer::start().await?;
        let db = TestDatabase::create().await?;
        let toml = cluster_config(&redis, &db.url);
        Some(Cluster::with(redis, db, toml).await)
    }

    pub async fn with(redis: RedisServer, db: TestDatabase, toml: String) -> Cluster {
        let first = Gate::with_config(&toml).real_auth().start().await;
        let mut gates = vec![];
        for _ in 0..2 {
            gates.push(first.restart_builder(&toml).start().await);
        }
        gates.insert(0, first);
        for gate in &gates {
            // Each instance subscribes to invalidations in the background; it reports ready on /readyz
            // once Redis answers.
            wait_ready(gate).await;
        }
        Cluster { gates, redis, db }
    }
}

impl Cluster {
    /// The three instances, as A, B and C.
    pub fn three(&self) -> (&Gate, &Gate, &Gate) {
        (&self.gates[0], &self.gates[1], &self.gates[2])
    }
}

pub async fn readyz(gate: &Gate) -> (u16, serde_json::Value) {
    let reply = Http::h1()
        .get(&format!("http://{}/readyz", gate.admin), &[])
        .await;
    (reply.status.as_u16(), reply.json())
}

async fn wait_ready(gate: &Gate) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while readyz(gate).await.0 != 200 {
        assert!(Instant::now() < deadline, "instance not ready within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` every 10 ms until it holds, failing after `limit`; returns how long it took.
async fn within<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn token(body: &serde_json::Value, name: &str) -> String {
    body[name].as_str().expect(name).to_owned()
}

#[tokio::test]
async fn logins_spread_over_instances_give_one_user_per_person_and_one_session() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let mut users = std::collections::HashMap::new();
    for round in 0..3 {
        for (i, person) in ["ann", "ben", "cat", "dan", "eve"].iter().enumerate() {
            let gate = &cluster.gates[(i + round) % 3];
            let login = gate.logged_in(person).await;
            let user_id = token(&login, "user_id");
            assert_eq!(
                users.entry(*person).or_insert_with(|| user_id.clone()),
                &user_id,
                "{person} is one user whichever instance they log in at"
            );
            // The session made on one instance works on the others.
            let access = token(&login, "access_token");
            for other in &cluster.gates {
                let reply = other.get_with_token("/api/orders", &access).await;
                assert_eq!(reply.status, 200);
                let seen = other.seen().pop().expect("the backend saw it");
                assert_eq!(seen.headers["x-user-id"], user_id.as_str());
            }
        }
    }
    let distinct: std::collections::HashSet<_> = users.values().collect();
    assert_eq!(distinct.len(), 5);
    let mut conn = cluster.db.connect().await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, 5, "one row per person in PostgreSQL");
}

#[tokio::test]
async fn a_logout_on_one_instance_is_refused_on_the_others_within_a_second() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let (a, b, c) = cluster.three();
    let login = a.logged_in("fay").await;
    let access = token(&login, "access_token");
    // B and C have the session in their local caches.
    for gate in [b, c] {
        assert_eq!(
            gate.get_with_token("/api/orders", &access).await.status,
            200
        );
    }
    let logout = Http::h1()
        .send(
            http::Method::POST,
            &a.url("/auth/logout"),
            &[("Authorization", &format!("Bearer {access}"))],
            wxgate::body::empty(),
        )
        .await;
    assert_eq!(logout.status, 204);
    for gate in [b, c] {
        let took = within(Duration::from_secs(1), "logout seen", || async {
            gate.get_with_token("/api/orders", &access).await.status == 401
        })
        .await;
        eprintln!("logout on A refused on another instance after {took:?}");
    }
    // Once refused, always refused, and nothing more reached the backends. (Until the logout
    // reaches an instance, up to a second, its requests are still forwarded: the count starts
    // once both have refused.)
    let before = [b.seen().len(), c.seen().len()];
    for gate in [a, b, c] {
        let reply = gate.get_with_token("/api/orders", &access).await;
        assert_eq!(
            (reply.status.as_u16(), reply.error().as_str()),
            (401, "invalid_token")
        );
    }
    assert_eq!([b.seen().len(), c.seen().len()], before);
}

#[tokio::test]
async fn a_refresh_token_rotates_once_across_instances_and_a_replay_revokes_everywhere() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let (a, b, c) = cluster.three();
    let login = a.logged_in("gus").await;
    let first = token(&login, "refresh_token");
    // The same refresh token presented to two instances at once: exactly one wins.
    let body = json!({ "refresh_token": first });
    let (on_b, on_c) = tokio::join!(
        b.post_json("/auth/refresh", &body),
        c.post_json("/auth/refresh", &body),
    );
    let statuses = [on_b.status.as_u16(), on_c.status.as_u16()];
    assert!(
        statuses == [200, 401] || statuses == [401, 200],
        "exactly one rotation: {statuses:?}"
    );
    // The loser's presentation was a replay: the whole session is gone, on every instance.
    let winner = if on_b.status == 200 { on_b } else { on_c }.json();
    let access = token(&winner, "access_token");
    for gate in [a, b, c] {
        within(Duration::from_secs(1), "replay revokes", || async {
            gate.get_with_token("/api/orders", &access).await.status == 401
        })
        .await;
    }
}

#[tokio::test]
async fn a_hundred_concurrent_first_logins_of_one_person_across_instances_make_one_user() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let logins = (0..100).map(|i| {
        let gate = &cluster.gates[i % 3];
        async move { gate.logged_in("hal").await }
    });
    let replies = futures_util::future::join_all(logins).await;
    let users: std::collections::HashSet<_> = replies.iter().map(|r| token(r, "user_id")).collect();
    assert_eq!(users.len(), 1, "{users:?}");
    let mut conn = cluster.db.connect().await;
    let (rows, links): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM users), (SELECT COUNT(*) FROM app_openids WHERE appid = $1)",
    )
    .bind(SHOP_APPID)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!((rows, links), (1, 1));
}

#[tokio::test]
async fn with_redis_gone_nothing_is_forwarded_without_identity_and_service_comes_back() {
    let Some(mut cluster) = Cluster::start().await else {
        return;
    };
    let login = cluster.gates[0].logged_in("ivy").await;
    let access = token(&login, "access_token");
    let user_id = token(&login, "user_id");
    for gate in &cluster.gates {
        assert_eq!(
            gate.get_with_token("/api/orders", &access).await.status,
            200
        );
    }
    let forwarded_before: Vec<usize> = cluster.gates.iter().map(|g| g.seen().len()).collect();

    cluster.redis.kill();
    for gate in &cluster.gates {
        // Within a second every instance answers 503 for protected routes: the local cache is
        // dropped as soon as the invalidation channel is lost.
        within(Duration::from_secs(1), "503 with Redis down", || async {
            gate.get_with_token("/api/orders", &access).await.status == 503
        })
        .await;
        let reply = gate.get_with_token("/api/orders", &access).await;
        assert_eq!(
            (reply.status.as_u16(), reply.error().as_str()),
            (503, "auth_unavailable")
        );
        // Public routes do not need a session.
        assert_eq!(
            gate.get_with_token("/api/public/x", &access).await.status,
            200
        );
        let (status, ready) = readyz(gate).await;
        assert_eq!(
            (status, &ready["checks"]["sessions"]),
            (503, &json!("down"))
        );
    }
    let forwarded: Vec<usize> = cluster
        .gates
        .iter()
        .map(|g| {
            g.seen()
                .iter()
                .filter(|r| r.path.starts_with("/api/orders"))
                .count()
        })
        .collect();
    assert_eq!(
        forwarded, forwarded_before,
        "no protected request forwarded"
    );
    // Logins fail closed too: a session cannot be stored.
    let login = cluster.gates[1].login_as("ivy").await;
    assert_eq!(
        (login.status.as_u16(), login.error().as_str()),
        (503, "auth_unavailable")
    );

    // Redis comes back empty (no persistence): the old session is gone, and wxgate recovers by
    // itself: new logins work on every instance.
    cluster.redis.resume().await;
    for gate in &cluster.gates {
        within(Duration::from_secs(5), "ready again", || async {
            readyz(gate).await.0 == 200
        })
        .await;
        let reply = gate.get_with_token("/api/orders", &access).await;
        assert_eq!(
            reply.status, 401,
            "the session did not survive a Redis without persistence"
        );
        let again = gate.logged_in("ivy").await;
        assert_eq!(
            token(&again, "user_id"),
            user_id,
            "the identity is in PostgreSQL"
        );
        let access = token(&again, "access_token");
        assert_eq!(
            gate.get_with_token("/api/orders", &access).await.status,
            200
        );
    }
}

#[tokio::test]
async fn with_postgres_gone_logins_fail_and_issued_sessions_keep_working() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let relay = Relay::start(db.server()).await;
    let toml = cluster_config(&redis, &db.url_via(&relay));
    let cluster = Cluster::with(redis, db, toml).await;
    let login = cluster.gates[0].logged_in("joe").await;
    let access = token(&login, "access_token");

    relay.cut();
    for gate in &cluster.gates {
        let reply = gate.login_as("kim").await;
        assert_eq!(
            (reply.status.as_u16(), reply.error().as_str()),
            (503, "identity_unavailable")
        );
        assert_eq!(
            gate.get_with_token("/api/orders", &access).await.status,
            200
        );
        let (status, ready) = readyz(gate).await;
        assert_eq!(status, 200, "{ready}");
        assert_eq!(ready["status"], "degraded");
        assert_eq!(
            ready["checks"],
            json!({"sessions": "up", "identities": "down"})
        );
    }

    relay.restore();
    for gate in &cluster.gates {
        within(Duration::from_secs(10), "logins work again", || async {
            gate.login_as("kim").await.status == 200
        })
        .await;
        assert_eq!(readyz(gate).await.1["status"], "ready");
    }
}

#[tokio::test]
async fn a_merge_on_one_instance_repoints_live_sessions_on_the_others() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let (a, b, c) = cluster.three();
    // An older account: the mini program's login carries no unionid, so the person is a user of
    // their own for now.
    let code = a.wechat.login_code_without_unionid(SHOP_APPID, "lea");
    let first = a
        .post_json("/auth/login", &json!({ "code": code }))
        .await
        .json();
    let mini_user = token(&first, "user_id");
    let access = token(&first, "access_token");
    assert_eq!(b.get_with_token("/api/orders", &access).await.status, 200);
    assert_eq!(
        b.seen().last().unwrap().headers["x-user-id"],
        mini_user.as_str()
    );

    // The mobile app knows the unionid (a second user, for now), then the mini program's next
    // login carries it too: one person, merged into the app's user, on instance A.
    let oauth = c.wechat.oauth_code(MOBILE_APPID, "lea", OauthKind::App);
    let app_user = c
        .post_json(
            "/auth/oauth/login",
            &json!({ "app": "mobile", "code": oauth }),
        )
        .await
        .json();
    let app_user = token(&app_user, "user_id");
    assert_ne!(app_user, mini_user);
    assert_eq!(token(&a.logged_in("lea").await, "user_id"), app_user);

    // B had the first session cached as the old user; within a second it acts as the survivor.
    within(Duration::from_secs(1), "merge seen on B", || async {
        b.get_with_token("/api/orders", &access).await.status == 200
            && b.seen().last().unwrap().headers["x-user-id"] == app_user.as_str()
    })
    .await;
    assert!(
        b.seen()
            .last()
            .unwrap()
            .headers
            .contains_key("x-wechat-unionid")
    );
}

async fn phone_call(gate: &Gate, access: &str, code: &str) -> crate::support::Reply {
    Http::h1()
        .send(
            http::Method::POST,
            &gate.url("/auth/phone"),
            &[("Authorization", &format!("Bearer {access}"))],
            crate::support::bytes_body(json!({ "code": code }).to_string()),
        )
        .await
}

#[tokio::test]
async fn many_phone_calls_across_instances_share_one_access_token_fetch() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let wechat = &cluster.gates[0].wechat;
    let access = token(&cluster.gates[0].logged_in("max").await, "access_token");
    let calls = (0..60).map(|i| {
        let gate = &cluster.gates[i % 3];
        let code = wechat.phone_code(SHOP_APPID, "max", &format!("1390000{i:04}"));
        let access = access.clone();
        async move { phone_call(gate, &access, &code).await }
    });
    for reply in futures_util::future::join_all(calls).await {
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    assert_eq!(
        wechat.calls(STABLE_TOKEN),
        1,
        "one fetch for all three instances"
    );
    assert_eq!(wechat.calls(PHONE_NUMBER), 60);

    // WeChat revokes the token (someone called cgi-bin/token): the first instance to be refused
    // drops it from Redis and fetches once; the others then use the new one.
    wechat.revoke_access_token(SHOP_APPID);
    for (i, gate) in cluster.gates.iter().enumerate() {
        let code = wechat.phone_code(SHOP_APPID, "max", &format!("1370000{i:04}"));
        let reply = phone_call(gate, &access, &code).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    assert_eq!(
        wechat.calls(STABLE_TOKEN),
        2,
        "one more fetch, not one per instance"
    );
    assert_eq!(
        wechat.calls(PHONE_NUMBER),
        60 + 3 + 1,
        "one refused call, then its retry"
    );

    // The number verified last (on C) is on the session on every instance.
    for gate in &cluster.gates {
        within(Duration::from_secs(1), "phone seen", || async {
            gate.get_with_token("/api/orders", &access).await.status == 200
                && gate.seen().last().unwrap().headers.get("x-wechat-phone")
                    == Some(&http::HeaderValue::from_static("13700000002"))
        })
        .await;
    }
}

#[tokio::test]
async fn one_code_posted_to_every_instance_goes_to_wechat_once() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let wechat = &cluster.gates[0].wechat;
    let code = wechat.login_code(SHOP_APPID, "ned");
    // WeChat is slow: the posts on A, B and C are all in flight together.
    wechat.fail_next(JSCODE2SESSION, Fault::Delay(Duration::from_millis(300)), 1);
    let body = json!({ "code": code });
    let posts = cluster
        .gates
        .iter()
        .cycle()
        .take(9)
        .map(|gate| gate.post_json("/auth/login", &body));
    let replies = futures_util::future::join_all(posts).await;
    let users: std::collections::HashSet<_> = replies
        .iter()
        .map(|reply| {
            assert_eq!(reply.status, 200, "{:?}", reply.body);
            token(&reply.json(), "user_id")
        })
        .collect();
    assert_eq!(users.len(), 1);
    assert_eq!(
        wechat.calls(JSCODE2SESSION),
        1,
        "the code went to WeChat once"
    );
    // A retry a moment later, on any instance, gets the same answer, not code_used.
    for gate in &cluster.gates {
        let retry = gate.post_json("/auth/login", &body).await;
        assert_eq!(retry.status, 200);
        assert!(users.contains(&token(&retry.json(), "user_id")));
    }
    assert_eq!(wechat.calls(JSCODE2SESSION), 1);
}

#[tokio::test]
async fn a_browser_login_started_on_one_instance_finishes_on_another_once() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let (a, b, c) = cluster.three();
    let mut browser = Browser::of(a, "olga");
    let start = browser
        .request(
            http::Method::GET,
            &a.url("/auth/oauth/h5/start?return_to=/h5/home"),
            &[],
        )
        .await;
    assert_eq!(start.status, 302);
    let to_wechat = start.headers["location"]
        .to_str()
        .unwrap()
        .split('#')
        .next()
        .unwrap()
        .to_owned();
    let from_wechat = browser.request(http::Method::GET, &to_wechat, &[]).await;
    assert_eq!(from_wechat.status, 302);
    let callback = from_wechat.headers["location"].to_str().unwrap().to_owned();
    assert!(
        callback.starts_with(&a.url("/auth/oauth/h5/callback?")),
        "{callback}"
    );
    // Behind a load balancer the callback may reach any instance; the browser's cookies are the
    // same there (one site).
    let binding = browser.cookie(&a.url("/"), "__Host-wxgate-state").unwrap();
    let on = |gate: &Gate| callback.replace(&a.url(""), &gate.url(""));
    for gate in [b, c] {
        browser.set(&gate.url("/"), "__Host-wxgate-state", &binding);
    }
    let finished = browser.request(http::Method::GET, &on(b), &[]).await;
    assert_eq!(finished.status, 302, "{:?}", finished.body);
    assert_eq!(finished.headers["location"], "/h5/home");
    let session = browser
        .request(http::Method::GET, &b.url("/auth/session"), &[])
        .await;
    assert_eq!(session.status, 200);
    // The state was used: replayed on a third instance, it is refused.
    let replay = browser.request(http::Method::GET, &on(c), &[]).await;
    assert_eq!(
        (replay.status.as_u16(), replay.error().as_str()),
        (400, "invalid_state")
    );
}

#[tokio::test]
async fn rate_limits_count_across_instances() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let toml = cluster_config(&redis, &db.url)
        + "\n[limits]\nauth_per_minute = 60\nauth_burst = 6\nuser_per_minute = 60\nuser_burst = 9\n";
    let cluster = Cluster::with(redis, db, toml).await;
    // One client address (loopback) spread over the three instances: six /auth requests in all,
    // not six per instance.
    let mut statuses = vec![];
    for i in 0..9 {
        let gate = &cluster.gates[i % 3];
        statuses.push(
            gate.post_json("/auth/login", &json!({}))
                .await
                .status
                .as_u16(),
        );
    }
    assert_eq!(statuses, [400, 400, 400, 400, 400, 400, 429, 429, 429]);

    // Per user on proxied routes, likewise: a login of its own, in a cluster with fresh counters.
    let Cluster { gates, redis, db } = cluster;
    drop(gates);
    let toml = cluster_config(&redis, &db.url)
        + "\n[limits]\nauth_per_minute = 0\nuser_per_minute = 60\nuser_burst = 9\n";
    let cluster = Cluster::with(redis, db, toml).await;
    let access = token(&cluster.gates[0].logged_in("pia").await, "access_token");
    let mut statuses = vec![];
    for i in 0..12 {
        let gate = &cluster.gates[i % 3];
        let reply = gate.get_with_token("/api/orders", &access).await;
        if reply.status == 429 {
            assert!(reply.headers.contains_key("retry-after"));
        }
        statuses.push(reply.status.as_u16());
    }
    assert_eq!(statuses, [[200; 9].as_slice(), &[429; 3]].concat());
}

/// A wxgate process, killed when dropped, so a failing test leaves nothing running.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn an_instance_killed_during_a_login_burst_loses_no_identity_link() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;

    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let wechat = cluster.gates[0].wechat.clone();
    // The victim: the real binary, on the same Redis, PostgreSQL and mock WeChat.
    let (main, admin) = (crate::support::bind().await, crate::support::bind().await);
    let (listen, admin_addr) = (main.local_addr().unwrap(), admin.local_addr().unwrap());
    drop((main, admin));
    let toml = format!(
        "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin_addr}\"\n{}\n[limits]\nauth_per_minute = 0\n",
        cluster_config(&cluster.redis, &cluster.db.url)
            .replace("UPSTREAM", &cluster.gates[0].backend.url())
            .replace("WECHAT", &wechat.url())
            .replace("GATEURL", &format!("http://{listen}"))
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wxgate.toml");
    std::fs::write(&path, toml).unwrap();
    let mut victim = Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_wxgate"))
            .arg("--config")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    within(Duration::from_secs(20), "the victim is ready", || async {
        let ready = Http::h1()
            .client()
            .get(format!("http://{admin_addr}/readyz").parse().unwrap())
            .await;
        ready.is_ok_and(|r| r.status() == 200)
    })
    .await;

    // 200 first logins, 40 in flight at a time, WeChat a little slow so that many are mid-way
    // (between WeChat's answer and the store's commit) when the process dies.
    wechat.fail_next(
        JSCODE2SESSION,
        Fault::Delay(Duration::from_millis(20)),
        1000,
    );
    let people: Vec<String> = (0..200).map(|i| format!("burst{i:03}")).collect();
    let answered = Arc::new(AtomicUsize::new(0));
    let semaphore = Arc::new(tokio::sync::Semaphore::new(40));
    let burst: Vec<_> = people
        .iter()
        .map(|person| {
            let code = wechat.login_code(SHOP_APPID, person);
            let (answered, semaphore) = (answered.clone(), semaphore.clone());
            let url = format!("http://{listen}/auth/login");
            tokio::spawn(async move {
                let _permit = semaphore.acquire_owned().await.unwrap();
                let request = http::Request::post(url)
                    .header("content-type", "application/json")
                    .body(crate::support::bytes_body(
                        json!({ "code": code }).to_string(),
                    ))
                    .unwrap();
                let response = Http::h1().client().request(request).await.ok()?;
                let status = response.status();
                let body = response.into_body().collect().await.ok()?.to_bytes();
                answered.fetch_add(1, Ordering::SeqCst);
                (status == 200).then(|| {
                    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    token(&body, "user_id")
                })
            })
        })
        .collect();
    within(Duration::from_secs(30), "a quarter answered", || async {
        answered.load(Ordering::SeqCst) >= 50
    })
    .await;
    victim.0.kill().unwrap(); // SIGKILL
    let mut confirmed = vec![];
    for (person, task) in people.iter().zip(burst) {
        if let Some(user_id) = task.await.unwrap() {
            confirmed.push((person.clone(), user_id));
        }
    }
    assert!(
        confirmed.len() >= 50 && confirmed.len() < 200,
        "the kill landed mid-burst: {} confirmed",
        confirmed.len()
    );

    // Every login the victim confirmed is in PostgreSQL: the survivors resolve the same person to
    // the same user.
    let a = &cluster.gates[0];
    for (person, user_id) in &confirmed {
        let again = a.logged_in(person).await;
        assert_eq!(
            &token(&again, "user_id"),
            user_id,
            "{person}'s link survived"
        );
    }
    // And nothing half-written: every user has both its links, whatever the kill interrupted.
    let mut conn = cluster.db.connect().await;
    let (users, without_openid, without_unionid): (i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), \
           COUNT(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM app_openids o WHERE o.user_id = u.user_id)), \
           COUNT(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM unionids x WHERE x.user_id = u.user_id)) \
         FROM users u",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!((without_openid, without_unionid), (0, 0), "{users} users");
    eprintln!(
        "killed after {} answers: {} logins confirmed, {users} users in PostgreSQL",
        answered.load(Ordering::SeqCst),
        confirmed.len()
    );
}

#[tokio::test]
async fn session_keys_from_logins_on_any_instance_open_user_info_on_any_other() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let (a, b, c) = cluster.three();
    let first = a.logged_in("quinn").await;
    let old_info = a.wechat.user_info(SHOP_APPID, "quinn").unwrap();
    // A second login, on B, rotates the session_key; data sealed with either key opens on C.
    let second = b.logged_in("quinn").await;
    let new_info = b.wechat.user_info(SHOP_APPID, "quinn").unwrap();
    for (tokens, info) in [
        (&first, &old_info),
        (&second, &new_info),
        (&first, &new_info),
    ] {
        let reply = Http::h1()
            .send(
                http::Method::POST,
                &c.url("/auth/userinfo"),
                &[(
                    "Authorization",
                    &format!("Bearer {}", token(tokens, "access_token")),
                )],
                crate::support::bytes_body(serde_json::to_string(info).unwrap()),
            )
            .await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert_eq!(reply.json()["user_id"], first["user_id"]);
    }
}

#[tokio::test]
async fn with_sentinel_the_cluster_follows_a_redis_failover() {
    let Some(primary) = RedisServer::start().await else {
        return;
    };
    let replica_of = format!("127.0.0.1 {}", primary.port);
    let Some(replica) = RedisServer::start_with(&["--replicaof", &replica_of]).await else {
        return;
    };
    let Some(sentinel) = RedisServer::sentinel(primary.port).await else {
        return;
    };
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let toml = cluster_config(&primary, &db.url).replace(
        &primary.url(),
        &format!("redis+sentinel://127.0.0.1:{}/main", sentinel.port),
    );
    let cluster = Cluster::with(primary, db, toml).await;
    let (a, b, _) = cluster.three();
    let login = a.logged_in("rex").await;
    let access = token(&login, "access_token");
    assert_eq!(b.get_with_token("/api/orders", &access).await.status, 200);
    // The session is on the replica too before the primary dies.
    let on_primary = redis::Client::open(cluster.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    within(Duration::from_secs(10), "replicated", || {
        let mut on_primary = on_primary.clone();
        async move {
            let acked: i64 = redis::cmd("WAIT")
                .arg(1)
                .arg(100)
                .query_async(&mut on_primary)
                .await
                .unwrap();
            acked == 1
        }
    })
    .await;

    let Cluster {
        gates,
        mut redis,
        db: _db,
    } = cluster;
    redis.kill();
    // Sentinel notices (0.5 s), promotes the replica, and every instance follows: the session
    // written before the failover works again, and new logins work, on every instance.
    for gate in &gates {
        within(
            Duration::from_secs(15),
            "the session works after the failover",
            || async { gate.get_with_token("/api/orders", &access).await.status == 200 },
        )
        .await;
        let again = gate.logged_in("rex").await;
        assert_eq!(again["user_id"], login["user_id"]);
        let fresh = token(&again, "access_token");
        assert_eq!(gate.get_with_token("/api/orders", &fresh).await.status, 200);
    }
    // Whatever failed during the failover failed closed: every request the backends saw carried
    // an identity.
    for gate in &gates {
        for seen in gate.seen() {
            assert_eq!(
                seen.headers.get("x-user-id").map(|v| v.to_str().unwrap()),
                login["user_id"].as_str(),
                "{}",
                seen.path
            );
        }
    }
    drop((replica, sentinel));
}
