//! One person across the company's apps: the mini program, the mobile app (OAuth code posted to
//! `/auth/oauth/login`), the website and the official-account pages (the browser flow with its state
//! and session cookie). Browsers are simulated: they follow redirects between wxgate and the mock's
//! authorize pages and keep cookies per host, as a real browser would.

use std::collections::HashMap;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use wxgate::wechat::mock::{OAUTH_ACCESS_TOKEN, OauthKind, SNS_USERINFO, openid_of, unionid_of};

use crate::support::*;

/// The shop mini program, the mobile app, the website and the official account; `/h5/` pages send
/// browsers without a session to the official account's login.
const COMPANY: &str = r#"
[upstream]
url = "UPSTREAM"
timeout = "2s"

[wechat]
api_base = "WECHAT"
open_base = "WECHAT"
timeout = "1s"

[[apps]]
name = "shop"
kind = "miniprogram"
appid = "wx1111111111111111"
secret = "shop-secret-0123456789"

[[apps]]
name = "mobile"
kind = "app"
appid = "wx3333333333333333"
secret = "mobile-secret-0123456789"
fetch_userinfo = true

[[apps]]
name = "site"
kind = "web"
appid = "wx4444444444444444"
secret = "site-secret-0123456789"
public_url = "GATEURL"

[[apps]]
name = "h5"
kind = "oa"
appid = "wx5555555555555555"
secret = "h5-secret-0123456789"
public_url = "GATEURL"

[identity]
store = "sqlite://DATADIR/identities.db"

[session]
signing_key = "test-signing-key-0123456789abcdef-0123"

[[routes]]
prefix = "/api/public/"
auth = "public"
name = "public"

[[routes]]
prefix = "/h5/"
auth = "required"
name = "h5"
browser_login = "h5"

[[routes]]
prefix = "/"
auth = "required"
name = "private"
"#;

async fn company() -> Gate {
    Gate::with_config(COMPANY).real_auth().start().await
}

/// A browser: cookies per `host:port` (simpler than real browsers, which share cookies across ports
/// of one host; here wxgate and the mock WeChat must not see each other's), following redirects.
#[derive(Default)]
pub(crate) struct Browser {
    jars: HashMap<String, Vec<(String, String)>>,
}

impl Browser {
    /// A browser whose WeChat is signed in as `user` (the mock's authorize pages read this cookie).
    pub(crate) fn of(gate: &Gate, user: &str) -> Browser {
        let mut browser = Browser::default();
        browser.set(&gate.wechat.url(), "wx_user", user);
        browser
    }

    pub(crate) fn host(url: &str) -> String {
        url.trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_owned()
    }

    pub(crate) fn set(&mut self, url: &str, name: &str, value: &str) {
        let jar = self.jars.entry(Browser::host(url)).or_default();
        jar.retain(|(n, _)| n != name);
        jar.push((name.to_owned(), value.to_owned()));
    }

    pub(crate) fn cookie(&self, url: &str, name: &str) -> Option<String> {
        self.jars
            .get(&Browser::host(url))?
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    pub(crate) fn cookie_header(&self, url: &str) -> Option<String> {
        let jar = self.jars.get(&Browser::host(url))?;
        (!jar.is_empty()).then(|| {
            jar.iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    /// One request, with this browser's cookies for the host; stores what the response sets.
    pub(crate) async fn request(
        &mut self,
        method: Method,
        url: &str,
        extra: &[(&str, &str)],
    ) -> Reply {
        let cookies = self.cookie_header(url);
        let mut headers: Vec<(&str, &str)> = vec![("accept", "text/html,application/xhtml+xml")];
        if let Some(cookies) = &cookies {
            headers.push(("cookie", cookies));
        }
        headers.extend_from_slice(extra);
        let reply = Http::h1()
            .send(method, url, &headers, wxgate::body::empty())
            .await;
        for set in reply.headers.get_all("set-cookie") {
            let set = set.to_str().unwrap();
            let (pair, attributes) = set.split_once(';').unwrap_or((set, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if attributes.contains("Max-Age=0") {
                if let Some(jar) = self.jars.get_mut(&Browser::host(url)) {
                    jar.retain(|(n, _)| n != name);
                }
            } else {
                self.set(url, name, value);
            }
        }
        reply
    }

    /// GETs `url` and follows redirects (at most 10); returns the last reply and every URL visited.
    pub(crate) async fn visit(&mut self, url: &str) -> (Reply, Vec<String>) {
        let mut url = url.to_owned();
        let mut trail = vec![url.clone()];
        for _ in 0..10 {
            let reply = self.request(Method::GET, &url, &[]).await;
            if !reply.status.is_redirection() {
                return (reply, trail);
            }
            let location = reply.headers["location"].to_str().unwrap();
            let location = location.split('#').next().unwrap();
            url = if location.starts_with('/') {
                format!("http://{}{location}", Browser::host(&url))
            } else {
                location.to_owned()
            };
            trail.push(url.clone());
        }
        panic!("redirect loop: {trail:?}");
    }
}

/// Logs `user` in to the browser app `app` (`site` or `h5`) and returns the user id wxgate's
/// `/auth/session` reports for the session cookie.
async fn browser_login(gate: &Gate, app: &str, user: &str) -> String {
    let mut browser = Browser::of(gate, user);
    let start = gate.url(&format!(
        "/auth/oauth/{app}/start?return_to=/api/public/home"
    ));
    let (reply, trail) = browser.visit(&start).await;
    assert_eq!(reply.status, 200, "{trail:?} {:?}", reply.body);
    assert!(
        trail.last().unwrap().ends_with("/api/public/home"),
        "back where the login started: {trail:?}"
    );
    assert!(browser.cookie(&gate.url("/"), "__Host-wxgate").is_some());
    let session = browser
        .request(Method::GET, &gate.url("/auth/session"), &[])
        .await;
    assert_eq!(session.status, 200, "{:?}", session.body);
    assert_eq!(session.json()["app"], app);
    session.json()["user_id"].as_str().unwrap().to_owned()
}

/// Posts an OAuth code of the mobile app for `user`; returns the login response.
async fn app_login(gate: &Gate, user: &str) -> Value {
    let code = gate.wechat.oauth_code(MOBILE_APPID, user, OauthKind::App);
    let reply = gate
        .post_json(
            "/auth/oauth/login",
            &json!({ "app": "mobile", "code": code }),
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.json()
}

#[derive(Debug, Clone, Copy)]
enum Via {
    MiniProgram,
    App,
    Web,
    Oa,
}

async fn login_via(gate: &Gate, via: Via, user: &str) -> String {
    match via {
        Via::MiniProgram => gate.logged_in(user).await["user_id"]
            .as_str()
            .unwrap()
            .to_owned(),
        Via::App => app_login(gate, user).await["user_id"]
            .as_str()
            .unwrap()
            .to_owned(),
        Via::Web => browser_login(gate, "site", user).await,
        Via::Oa => browser_login(gate, "h5", user).await,
    }
}

fn permutations(items: &[Via]) -> Vec<Vec<Via>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..items.len() {
        let mut rest = items.to_vec();
        let first = rest.remove(i);
        for mut tail in permutations(&rest) {
            tail.insert(0, first);
            out.push(tail);
        }
    }
    out
}

#[tokio::test]
async fn one_person_is_one_user_from_every_app_in_every_order() {
    let gate = company().await;
    let orders = permutations(&[Via::MiniProgram, Via::App, Via::Web, Via::Oa]);
    assert_eq!(orders.len(), 24);
    let mut users = Vec::new();
    for (i, order) in orders.iter().enumerate() {
        let person = format!("person{i}");
        let mut ids = Vec::new();
        for via in order {
            ids.push(login_via(&gate, *via, &person).await);
        }
        assert!(ids.iter().all(|id| *id == ids[0]), "{order:?} gave {ids:?}");
        // A second round from every app is still the same user.
        for via in order {
            assert_eq!(login_via(&gate, *via, &person).await, ids[0], "{via:?}");
        }
        let record = Http::h1()
            .get(
                &format!(
                    "http://{}/users?unionid={}",
                    gate.admin,
                    unionid_of(&person)
                ),
                &[],
            )
            .await;
        assert_eq!(record.status, 200);
        let record = record.json();
        assert_eq!(record["user_id"], ids[0].as_str());
        let mut appids: Vec<&str> = record["openids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["appid"].as_str().unwrap())
            .collect();
        appids.sort();
        assert_eq!(
            appids,
            [SHOP_APPID, MOBILE_APPID, SITE_APPID, H5_APPID],
            "every app's openid is linked"
        );
        users.push(ids[0].clone());
    }
    users.sort();
    users.dedup();
    assert_eq!(users.len(), 24, "different people stay different users");
}

#[tokio::test]
async fn a_person_first_seen_without_unionid_is_merged_when_it_appears() {
    let gate = company().await;
    // An older account: the bound mini program's login returned no unionid.
    let code = gate.wechat.login_code_without_unionid(SHOP_APPID, "vera");
    let first = gate
        .post_json("/auth/login", &json!({ "code": code }))
        .await
        .json();
    assert_eq!(first["unionid_known"], false);
    let mini_user = first["user_id"].as_str().unwrap().to_owned();

    // The app knows the unionid, but nothing yet ties it to the mini program's openid.
    let from_app = app_login(&gate, "vera").await;
    assert_eq!(from_app["unionid_known"], true);
    let app_user = from_app["user_id"].as_str().unwrap().to_owned();
    assert_ne!(
        app_user, mini_user,
        "no evidence yet that they are one person"
    );

    // The next mini-program login carries the unionid: the two are one person, the app's user.
    let again = gate.logged_in("vera").await;
    assert_eq!(again["user_id"], app_user.as_str());

    let merged = Http::h1()
        .get(&format!("http://{}/users/{mini_user}", gate.admin), &[])
        .await
        .json();
    assert_eq!(merged["merged_into"], app_user.as_str());
    let survivor = Http::h1()
        .get(&format!("http://{}/users/{app_user}", gate.admin), &[])
        .await
        .json();
    assert_eq!(survivor["merged_from"], json!([mini_user]));
    assert_eq!(survivor["openids"].as_array().unwrap().len(), 2);

    // The first mini-program session now acts as the surviving user.
    let reply = gate
        .get_with_token("/orders", first["access_token"].as_str().unwrap())
        .await;
    assert_eq!(reply.status, 200);
    let seen = gate.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.headers["x-user-id"], app_user.as_str());
    assert_eq!(
        last.headers["x-wechat-unionid"],
        unionid_of("vera").as_str()
    );
}

#[tokio::test]
async fn snapshot_users_are_refused_and_never_linked() {
    let gate = company().await;
    let code = gate
        .wechat
        .oauth_code(H5_APPID, "sam", OauthKind::OaSnapshot);
    let reply = gate
        .post_json("/auth/oauth/login", &json!({ "app": "h5", "code": code }))
        .await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.error(), "snapshot_user");

    let mut browser = Browser::of(&gate, "sam");
    browser.set(&gate.wechat.url(), "wx_snapshot", "1");
    let (reply, _) = browser
        .visit(&gate.url("/auth/oauth/h5/start?return_to=/h5/"))
        .await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.error(), "snapshot_user");
    assert!(browser.cookie(&gate.url("/"), "__Host-wxgate").is_none());

    // Nothing was created for them: their real ids are unknown to the store.
    for query in [
        format!("openid={}", openid_of(H5_APPID, "sam")),
        format!("unionid={}", unionid_of("sam")),
    ] {
        let lookup = Http::h1()
            .get(&format!("http://{}/users?{query}", gate.admin), &[])
            .await;
        assert_eq!(lookup.status, 404, "{query}");
    }
    // Opened in full, the same person logs in normally.
    browser.set(&gate.wechat.url(), "wx_snapshot", "0");
    let (reply, _) = browser
        .visit(&gate.url("/auth/oauth/h5/start?return_to=/h5/"))
        .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn the_state_is_single_use_and_bound_to_its_browser_and_app() {
    let gate = company().await;
    let mut browser = Browser::of(&gate, "tom");
    let start = browser
        .request(
            Method::GET,
            &gate.url("/auth/oauth/site/start?return_to=/orders"),
            &[],
        )
        .await;
    assert_eq!(start.status, 302);
    let to_wechat = start.headers["location"].to_str().unwrap().to_owned();
    assert!(
        to_wechat.starts_with(&format!(
            "{}/connect/qrconnect?appid={SITE_APPID}&redirect_uri=",
            gate.wechat.url()
        )),
        "{to_wechat}"
    );
    assert!(to_wechat.contains("scope=snsapi_login") && to_wechat.ends_with("#wechat_redirect"));
    let from_wechat = browser
        .request(Method::GET, to_wechat.split('#').next().unwrap(), &[])
        .await;
    let callback = from_wechat.headers["location"].to_str().unwrap().to_owned();
    assert!(callback.starts_with(&gate.url("/auth/oauth/site/callback?code=")));

    // Another browser (an attacker's link opened by a victim) cannot finish this login...
    let mut victim = Browser::of(&gate, "vic");
    let stolen = victim.request(Method::GET, &callback, &[]).await;
    assert_eq!(stolen.status, 400);
    assert_eq!(stolen.error(), "invalid_state");
    assert!(victim.cookie(&gate.url("/"), "__Host-wxgate").is_none());
    // ...and the attempt consumed the state: not even the right browser can use it now.
    let replay = browser.request(Method::GET, &callback, &[]).await;
    assert_eq!(replay.error(), "invalid_state");

    // A normal finish, then a replay of the same callback.
    let start = browser
        .request(Method::GET, &gate.url("/auth/oauth/site/start"), &[])
        .await;
    let to_wechat = start.headers["location"].to_str().unwrap();
    let from_wechat = browser
        .request(Method::GET, to_wechat.split('#').next().unwrap(), &[])
        .await;
    let callback = from_wechat.headers["location"].to_str().unwrap().to_owned();
    let done = browser.request(Method::GET, &callback, &[]).await;
    assert_eq!(done.status, 302, "{:?}", done.body);
    assert_eq!(done.headers["location"], "/");
    let replay = browser.request(Method::GET, &callback, &[]).await;
    assert_eq!(replay.status, 400);
    assert_eq!(replay.error(), "invalid_state");

    // A state started for the website is refused on the official account's callback.
    let start = browser
        .request(Method::GET, &gate.url("/auth/oauth/site/start"), &[])
        .await;
    let to_wechat = start.headers["location"].to_str().unwrap();
    let state = to_wechat
        .split(['?', '&', '#'])
        .find_map(|p| p.strip_prefix("state="))
        .unwrap()
        .to_owned();
    let code = gate
        .wechat
        .oauth_code(H5_APPID, "tom", OauthKind::Oa { userinfo: true });
    let crossed = browser
        .request(
            Method::GET,
            &gate.url(&format!(
                "/auth/oauth/h5/callback?code={code}&state={state}"
            )),
            &[],
        )
        .await;
    assert_eq!(crossed.error(), "invalid_state");

    for query in ["", "?code=abc", "?code=abc&state=made-up"] {
        let reply = browser
            .request(
                Method::GET,
                &gate.url(&format!("/auth/oauth/site/callback{query}")),
                &[],
            )
            .await;
        assert_eq!(reply.status, 400, "{query}");
        assert_eq!(reply.error(), "invalid_state", "{query}");
    }

    // Declining consent comes back without a code.
    browser.set(&gate.wechat.url(), "wx_decline", "1");
    let (declined, _) = browser.visit(&gate.url("/auth/oauth/site/start")).await;
    assert_eq!(declined.status, 403);
    assert_eq!(declined.error(), "login_declined");

    // Unknown apps, and apps without a browser flow, have no start.
    for app in ["nope", "mobile", "shop"] {
        let reply = browser
            .request(
                Method::GET,
                &gate.url(&format!("/auth/oauth/{app}/start")),
                &[],
            )
            .await;
        assert_eq!(reply.status, 404, "{app}");
    }
}

#[tokio::test]
async fn return_to_must_stay_on_this_site() {
    let gate = company().await;
    let mut browser = Browser::of(&gate, "rita");
    for evil in [
        "//evil.example/x",
        "/\\evil.example",
        "https://evil.example/",
        "https:evil.example",
        "evil.example",
        "/%09/evil.example",
        "%2F%2Fevil.example",
        "/\t/evil.example",
    ] {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("return_to", evil)
            .finish();
        let reply = browser
            .request(
                Method::GET,
                &gate.url(&format!("/auth/oauth/site/start?{query}")),
                &[],
            )
            .await;
        if evil == "/%09/evil.example" {
            // Percent-encoded, the tab stays a literal "%09" segment: a harmless local path.
            assert_eq!(reply.status, 302, "{evil}");
            continue;
        }
        assert_eq!(reply.status, 400, "{evil:?}");
        assert_eq!(reply.error(), "invalid_return_to", "{evil:?}");
        assert!(reply.headers.get("location").is_none());
    }
    let (reply, trail) = browser
        .visit(&gate.url("/auth/oauth/site/start?return_to=%2Fapi%2Fpublic%2Fitem%3Fid%3D7"))
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        trail.last().unwrap(),
        &gate.url("/api/public/item?id=7"),
        "{trail:?}"
    );
}

#[tokio::test]
async fn the_session_cookie_authenticates_but_never_reaches_the_backend() {
    let gate = company().await;
    let mut browser = Browser::of(&gate, "cora");
    let user_id = browser_login_with(&gate, &mut browser, "h5").await;
    browser.set(&gate.url("/"), "theme", "dark");

    let reply = browser
        .request(Method::GET, &gate.url("/h5/orders"), &[])
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let seen = gate.seen();
    let forwarded = &seen.last().unwrap().headers;
    assert_eq!(forwarded["x-user-id"], user_id.as_str());
    assert_eq!(forwarded["x-wechat-appid"], H5_APPID);
    assert_eq!(
        forwarded["x-wechat-openid"],
        openid_of(H5_APPID, "cora").as_str()
    );
    let cookies: Vec<&str> = forwarded
        .get_all("cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies, ["theme=dark"], "only the site's own cookies pass");

    // State changes from the site's own pages pass; from another origin they are refused.
    let own = browser
        .request(
            Method::POST,
            &gate.url("/h5/orders"),
            &[("origin", &gate.url(""))],
        )
        .await;
    assert_eq!(own.status, 200);
    let before = gate.seen().len();
    let cross = browser
        .request(
            Method::POST,
            &gate.url("/h5/orders"),
            &[("origin", "https://evil.example")],
        )
        .await;
    assert_eq!(cross.status, 403);
    assert_eq!(cross.error(), "cross_origin");
    assert_eq!(gate.seen().len(), before, "not forwarded");

    // Logout with the cookie ends the session and clears the cookie.
    let logout = browser
        .request(Method::POST, &gate.url("/auth/logout"), &[])
        .await;
    assert_eq!(logout.status, 204);
    assert!(browser.cookie(&gate.url("/"), "__Host-wxgate").is_none());
}

async fn browser_login_with(gate: &Gate, browser: &mut Browser, app: &str) -> String {
    let (reply, trail) = browser
        .visit(&gate.url(&format!("/auth/oauth/{app}/start")))
        .await;
    assert!(
        reply.status.is_success() || reply.status == 401,
        "{trail:?}"
    );
    let session = browser
        .request(Method::GET, &gate.url("/auth/session"), &[])
        .await;
    assert_eq!(session.status, 200, "{:?}", session.body);
    session.json()["user_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn pages_are_sent_to_login_and_api_calls_get_401() {
    let gate = company().await;
    let http = Http::h1();
    let page = http
        .get(
            &gate.url("/h5/orders?tab=open"),
            &[("accept", "text/html,application/xhtml+xml,*/*;q=0.8")],
        )
        .await;
    assert_eq!(page.status, StatusCode::FOUND);
    assert_eq!(
        page.headers["location"],
        "/auth/oauth/h5/start?return_to=%2Fh5%2Forders%3Ftab%3Dopen"
    );
    for (method, accept) in [
        (Method::GET, "application/json"),
        (Method::GET, "*/*"),
        (Method::POST, "text/html"),
    ] {
        let reply = http
            .send(
                method.clone(),
                &gate.url("/h5/orders"),
                &[("accept", accept)],
                wxgate::body::empty(),
            )
            .await;
        assert_eq!(reply.status, 401, "{method} {accept}");
        assert_eq!(reply.error(), "login_required");
    }
    // Routes without browser_login answer pages with 401 too.
    let other = http
        .get(&gate.url("/orders"), &[("accept", "text/html")])
        .await;
    assert_eq!(other.status, 401);

    // A browser follows the redirect through WeChat and lands on the page it asked for, logged in.
    let mut browser = Browser::of(&gate, "pia");
    let (reply, trail) = browser.visit(&gate.url("/h5/orders?tab=open")).await;
    assert_eq!(reply.status, 200, "{trail:?}");
    assert_eq!(trail.last().unwrap(), &gate.url("/h5/orders?tab=open"));
    assert!(
        trail
            .iter()
            .any(|u| u.contains("/connect/oauth2/authorize?"))
    );
    let echoed = reply.json();
    assert_eq!(echoed["path"], "/h5/orders");

    // A cookie that is no longer valid is cleared, and the page goes through login again.
    browser.set(
        &gate.url("/"),
        "__Host-wxgate",
        "eyJhbGciOiJIUzI1NiJ9.e30.bad",
    );
    let refused = browser
        .request(Method::GET, &gate.url("/h5/orders"), &[])
        .await;
    assert_eq!(refused.status, 302);
    assert!(browser.cookie(&gate.url("/"), "__Host-wxgate").is_none());
}

#[tokio::test]
async fn the_app_is_named_or_the_only_one_of_its_kind_and_each_uses_its_own_secret() {
    let gate = company().await;
    // Three OAuth apps are configured, so the client must name one.
    let code = gate.wechat.oauth_code(MOBILE_APPID, "ida", OauthKind::App);
    let unnamed = gate
        .post_json("/auth/oauth/login", &json!({ "code": code }))
        .await;
    assert_eq!(unnamed.status, 400);
    assert_eq!(unnamed.error(), "bad_request");
    // A code of the mobile app presented as the website's: WeChat refuses it for that appid.
    let crossed = gate
        .post_json("/auth/oauth/login", &json!({ "app": "site", "code": code }))
        .await;
    assert_eq!(crossed.error(), "invalid_code");
    let shop = gate
        .post_json("/auth/oauth/login", &json!({ "app": "shop", "code": code }))
        .await;
    assert_eq!(
        shop.error(),
        "bad_request",
        "a mini program has no OAuth login"
    );

    // The mobile app fetches the profile (fetch_userinfo = true).
    let ok = app_login(&gate, "ida").await;
    assert_eq!(ok["profile"]["nickName"], "ida");
    assert_eq!(gate.wechat.calls(SNS_USERINFO), 1);

    // With a single OAuth app configured, the name may be left out.
    let single = COMPANY
        .split("[[apps]]\nname = \"site\"")
        .next()
        .unwrap()
        .to_owned()
        + "[identity]\nstore = \"sqlite://DATADIR/ids.db\"\n[session]\nsigning_key = \"test-signing-key-0123456789abcdef-0123\"\n";
    let gate = Gate::with_config(&single).real_auth().start().await;
    let code = gate.wechat.oauth_code(MOBILE_APPID, "ida", OauthKind::App);
    let reply = gate
        .post_json("/auth/oauth/login", &json!({ "code": code }))
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
}

#[tokio::test]
async fn oauth_codes_are_exchanged_once_and_wechat_errors_are_mapped() {
    let gate = company().await;
    let code = gate.wechat.oauth_code(MOBILE_APPID, "max", OauthKind::App);
    let body = json!({ "app": "mobile", "code": code });
    let (a, b) = tokio::join!(
        gate.post_json("/auth/oauth/login", &body),
        gate.post_json("/auth/oauth/login", &body)
    );
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
    assert_eq!(a.json()["user_id"], b.json()["user_id"]);
    assert_eq!(
        gate.wechat.calls(OAUTH_ACCESS_TOKEN),
        1,
        "one exchange per code"
    );

    // Official-account codes live 5 minutes, app codes 10.
    let oa = gate
        .wechat
        .oauth_code(H5_APPID, "max", OauthKind::Oa { userinfo: true });
    let app = gate.wechat.oauth_code(MOBILE_APPID, "max", OauthKind::App);
    gate.wechat.advance(Duration::from_secs(6 * 60));
    let late = gate
        .post_json("/auth/oauth/login", &json!({ "app": "h5", "code": oa }))
        .await;
    assert_eq!(late.error(), "invalid_code");
    let in_time = gate
        .post_json(
            "/auth/oauth/login",
            &json!({ "app": "mobile", "code": app }),
        )
        .await;
    assert_eq!(in_time.status, 200);

    gate.wechat.fail_next(
        OAUTH_ACCESS_TOKEN,
        wxgate::wechat::mock::Fault::Errcode(-1),
        1,
    );
    let code = gate.wechat.oauth_code(MOBILE_APPID, "max", OauthKind::App);
    let busy = gate
        .post_json(
            "/auth/oauth/login",
            &json!({ "app": "mobile", "code": code }),
        )
        .await;
    assert_eq!(busy.status, 503);
    assert_eq!(busy.error(), "wechat_unavailable");
    let malformed = gate
        .post_json("/auth/oauth/login", &json!({ "app": "mobile" }))
        .await;
    assert_eq!(malformed.error(), "bad_request");
    let garbage = gate
        .post_json(
            "/auth/oauth/login",
            &json!({ "app": "mobile", "code": "a b" }),
        )
        .await;
    assert_eq!(garbage.error(), "invalid_code");
}

#[tokio::test]
async fn mini_program_endpoints_refuse_oauth_sessions() {
    let gate = company().await;
    let tokens = app_login(&gate, "noa").await;
    let auth = format!("Bearer {}", tokens["access_token"].as_str().unwrap());
    for path in ["/auth/userinfo", "/auth/phone"] {
        let reply = Http::h1()
            .send(
                Method::POST,
                &gate.url(path),
                &[("authorization", &auth)],
                bytes_body(
                    json!({ "code": "0".repeat(64), "encryptedData": "AAAA", "iv": "AAAA" })
                        .to_string(),
                ),
            )
            .await;
        assert_eq!(reply.status, 400, "{path}");
        assert_eq!(reply.error(), "bad_request", "{path}");
    }
    // The OAuth session works everywhere else: it refreshes like a mini-program one.
    let refreshed = gate
        .post_json(
            "/auth/refresh",
            &json!({ "refresh_token": tokens["refresh_token"] }),
        )
        .await;
    assert_eq!(refreshed.status, 200);
}
