//! Header hygiene: the only place identity headers are written. Every rule is a small function so that
//! each can be tested alone, and [`HeaderRules::prepare_request`] applies them in a fixed order:
//! hop-by-hop headers out, forgeable headers out, then ours in.

use std::net::IpAddr;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;

use crate::auth::{self, Identity};
use crate::config::Config;
use crate::error::Error;

/// Hop-by-hop headers (RFC 9110 §7.6.1), plus the non-standard ones that act as such. They describe
/// one connection and must not be forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that say where a request came from. Believed only from trusted proxies.
const FORWARDING: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-real-ip",
];

/// Whether two header names are the same once case is ignored and `_` and `.` are read as `-`:
/// the way common backends (CGI, WSGI, Rack, PHP, some Java frameworks) fold them.
pub fn same_header(name: &str, canonical: &str) -> bool {
    name.len() == canonical.len()
        && name.bytes().zip(canonical.bytes()).all(|(a, b)| {
            let a = match a {
                b'_' | b'.' => b'-',
                a => a.to_ascii_lowercase(),
            };
            a == b.to_ascii_lowercase()
        })
}

/// What the request to the backend must look like, derived once from the config.
#[derive(Debug, Clone)]
pub struct HeaderRules {
    user_id: HeaderName,
    appid: HeaderName,
    openid: HeaderName,
    unionid: HeaderName,
    phone: Option<HeaderName>,
    /// Every header name wxgate writes with identity: client values for them never pass.
    identity_names: Vec<HeaderName>,
    allow_underscores: bool,
    trusted_proxies: Vec<IpNet>,
}

/// Facts about the client connection that the forwarding headers report.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    pub peer: IpAddr,
    /// `"http"` or `"https"`: how the client reached wxgate.
    pub scheme: &'static str,
}

impl HeaderRules {
    pub fn from_config(config: &Config) -> Self {
        let h = &config.headers;
        Self::new(
            [
                h.user_id.clone(),
                h.appid.clone(),
                h.openid.clone(),
                h.unionid.clone(),
            ],
            h.phone.clone(),
            h.allow_underscores,
            config.server.trusted_proxies.clone(),
        )
    }

    fn new(
        names: [HeaderName; 4],
        phone: Option<HeaderName>,
        allow_underscores: bool,
        trusted_proxies: Vec<IpNet>,
    ) -> Self {
        let [user_id, appid, openid, unionid] = names;
        let identity_names = [&user_id, &appid, &openid, &unionid]
            .into_iter()
            .chain(phone.as_ref())
            .cloned()
            .collect();
        HeaderRules {
            user_id,
            appid,
            openid,
            unionid,
            phone,
            identity_names,
            allow_underscores,
            trusted_proxies,
        }
    }

    /// The client's address: the peer, or, when the peer is a trusted proxy, the nearest address in
    /// `X-Forwarded-For` that is not itself a trusted proxy (the rightmost such: entries further left
    /// were written by the client and may be forged).
    pub fn client_ip(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        if !self.is_trusted(peer) {
            return canonical_ip(peer);
        }
        let mut client = canonical_ip(peer);
        let chain: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for hop in chain.iter().rev() {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = canonical_ip(ip);
                    if !self.is_trusted(ip) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        client
    }

    /// Whether the client at `peer` is a proxy whose forwarding headers are believed.
    pub fn is_trusted(&self, peer: IpAddr) -> bool {
        let peer = canonical_ip(peer);
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }

    /// Turns the client's headers into the headers the backend receives.
    ///
    /// 1. hop-by-hop headers and those the client named in `Connection` go;
    /// 2. wxgate's own bearer credentials go;
    /// 3. every header that folds (see [`same_header`]) to an identity header goes, and so does every
    ///    name with `_` unless allowed; forwarding headers go unless the peer is a trusted proxy, and
    ///    even then only their exact spelling stays;
    /// 4. `X-Forwarded-*` are set, then the identity headers when there is an identity.
    pub fn prepare_request(
        &self,
        headers: &mut HeaderMap,
        identity: Option<&Identity>,
        client: ClientInfo,
    ) -> Result<(), Error> {
        remove_hop_by_hop(headers);
        remove_bearer_credentials(headers);
        remove_own_cookies(headers);
        let trusted = self.is_trusted(client.peer);
        self.remove_forgeable(headers, trusted);
        self.set_forwarding(headers, client, trusted);
        if let Some(identity) = identity {
            self.insert_identity(headers, identity)?;
        }
        Ok(())
    }

    fn remove_forgeable(&self, headers: &mut HeaderMap, trusted: bool) {
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|name| {
                let name = name.as_str();
                if name.contains('_') && !self.allow_underscores {
                    return true;
                }
                if self
                    .identity_names
                    .iter()
                    .any(|id| same_header(name, id.as_str()))
                {
                    return true;
                }
                FORWARDING
                    .iter()
                    .any(|f| same_header(name, f) && !(trusted && name == *f))
            })
            .cloned()
            .collect();
        for name in doomed {
            headers.remove(&name);
        }
    }

    fn set_forwarding(&self, headers: &mut HeaderMap, client: ClientInfo, trusted: bool) {
        let peer = canonical_ip(client.peer).to_string();
        // X-Forwarded-For: a trusted proxy's list is extended with the proxy itself; anyone else's
        // was removed above and starts again with the real peer.
        let chain: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let xff = if chain.is_empty() {
            peer
        } else {
            format!("{}, {peer}", chain.join(", "))
        };
        if let Ok(value) = HeaderValue::try_from(xff) {
            headers.insert(X_FORWARDED_FOR, value);
        }
        if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(client.scheme));
        }
        if !(trusted && headers.contains_key(&X_FORWARDED_HOST))
            && let Some(host) = headers.get(header::HOST).cloned()
        {
            headers.insert(X_FORWARDED_HOST, host);
        }
    }

    /// Writes the identity headers (replacing any of the same name).
    pub fn insert_identity(
        &self,
        headers: &mut HeaderMap,
        identity: &Identity,
    ) -> Result<(), Error> {
        let value = |v: &str| {
            HeaderValue::try_from(v)
                .map_err(|_| Error::Internal("identity value is not a valid header value".into()))
        };
        headers.insert(self.user_id.clone(), value(&identity.user_id)?);
        headers.insert(self.appid.clone(), value(&identity.appid)?);
        headers.insert(self.openid.clone(), value(&identity.openid)?);
        if let Some(unionid) = &identity.unionid {
            headers.insert(self.unionid.clone(), value(unionid)?);
        }
        if let (Some(name), Some(phone)) = (&self.phone, &identity.phone) {
            headers.insert(name.clone(), value(phone)?);
        }
        Ok(())
    }
}

/// Removes the hop-by-hop headers and every header the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// The protocol a request asks to switch to: `Upgrade`'s value when `Connection` names `upgrade`
/// (a WebSocket handshake, for one). Such requests keep those two headers on the way to the backend,
/// and so does its `101` on the way back.
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let protocol = headers.get(header::UPGRADE)?;
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
        .then(|| protocol.clone())
}

/// Puts back `Connection: upgrade` and `Upgrade` after the hop-by-hop headers were removed.
pub fn restore_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// Removes `Authorization: Bearer ...`: those are wxgate's tokens, meaningless and dangerous to a
/// backend. Other schemes (Basic, a backend's own) pass through.
fn remove_bearer_credentials(headers: &mut HeaderMap) {
    if headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .any(auth::is_bearer)
    {
        headers.remove(header::AUTHORIZATION);
    }
}

/// The prefix of wxgate's cookie names (the session and the login-state binding), compared without
/// case so no spelling of them reaches a backend.
const OWN_COOKIE_PREFIX: &[u8] = b"__host-wxgate";

fn mentions_own_cookie(value: &[u8]) -> bool {
    value
        .windows(OWN_COOKIE_PREFIX.len())
        .any(|w| w.eq_ignore_ascii_case(OWN_COOKIE_PREFIX))
}

/// Removes wxgate's own cookies from `Cookie` headers and keeps the others in order; a header left
/// empty goes. Cookies are credentials for wxgate only, like bearer tokens.
fn remove_own_cookies(headers: &mut HeaderMap) {
    if !headers
        .get_all(header::COOKIE)
        .iter()
        .any(|v| mentions_own_cookie(v.as_bytes()))
    {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| {
            if !mentions_own_cookie(value.as_bytes()) {
                return Some(value.clone());
            }
            // Unreadable text that mentions our cookie cannot be filtered safely, so it goes whole.
            let text = value.to_str().ok()?;
            let others: Vec<&str> = text
                .split(';')
                .map(str::trim)
                .filter(|pair| {
                    let name = pair.split_once('=').map_or(*pair, |(n, _)| n).trim();
                    !pair.is_empty() && !mentions_own_cookie(name.as_bytes())
                })
                .collect();
            (!others.is_empty())
                .then(|| HeaderValue::from_str(&others.join("; ")).ok())
                .flatten()
        })
        .collect();
    headers.remove(header::COOKIE);
    for value in kept {
        headers.append(header::COOKIE, value);
    }
}

/// `::ffff:1.2.3.4` is `1.2.3.4`: a dual-stack listener reports IPv4 clients that way.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules(trusted: &[&str], allow_underscores: bool) -> HeaderRules {
        HeaderRules::new(
            [
                HeaderName::from_static("x-user-id"),
                HeaderName::from_static("x-wechat-appid"),
                HeaderName::from_static("x-wechat-openid"),
                HeaderName::from_static("x-wechat-unionid"),
            ],
            None,
            allow_underscores,
            trusted.iter().map(|t| t.parse().unwrap()).collect(),
        )
    }

    fn client(peer: &str) -> ClientInfo {
        ClientInfo {
            peer: peer.parse().unwrap(),
            scheme: "http",
        }
    }

    fn identity() -> Identity {
        Identity {
            user_id: "u_1".into(),
            appid: "wx0123456789abcdef".into(),
            openid: "oVBkZ0aYgDMDIywRdgPW8-joxXc4".into(),
            unionid: None,
            phone: None,
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn names_fold_case_underscore_and_dot() {
        for forged in [
            "X-User-Id",
            "x_user_id",
            "X.User.Id",
            "x-USER_id",
            "X_User.Id",
        ] {
            assert!(same_header(forged, "x-user-id"), "{forged}");
        }
        assert!(!same_header("x-user-idx", "x-user-id"));
        assert!(!same_header("x-userid", "x-user-id"));
    }

    #[test]
    fn forged_identity_headers_are_removed_even_with_underscores_allowed() {
        for allow in [false, true] {
            let mut h = map(&[
                ("x-user-id", "admin"),
                ("x_user_id", "admin"),
                ("x.user.id", "admin"),
                ("x-wechat-unionid", "forged"),
                ("x-other", "kept"),
            ]);
            rules(&[], allow)
                .prepare_request(&mut h, None, client("203.0.113.9"))
                .unwrap();
            assert!(
                !h.keys().any(|k| same_header(k.as_str(), "x-user-id")),
                "{h:?}"
            );
            assert!(!h.contains_key("x-wechat-unionid"));
            assert_eq!(h["x-other"], "kept");
        }
    }

    #[test]
    fn underscore_names_are_dropped_unless_allowed() {
        let mut h = map(&[("my_header", "v")]);
        rules(&[], false)
            .prepare_request(&mut h, None, client("203.0.113.9"))
            .unwrap();
        assert!(!h.contains_key("my_header"));
        let mut h = map(&[("my_header", "v")]);
        rules(&[], true)
            .prepare_request(&mut h, None, client("203.0.113.9"))
            .unwrap();
        assert_eq!(h["my_header"], "v");
    }

    #[test]
    fn identity_headers_are_ours_alone() {
        let mut h = map(&[("x-user-id", "admin"), ("x-wechat-unionid", "forged")]);
        rules(&[], false)
            .prepare_request(&mut h, Some(&identity()), client("203.0.113.9"))
            .unwrap();
        assert_eq!(h.get_all("x-user-id").iter().collect::<Vec<_>>(), ["u_1"]);
        assert_eq!(h["x-wechat-openid"], "oVBkZ0aYgDMDIywRdgPW8-joxXc4");
        // No unionid known: the header is absent, not empty, and the forged one is gone.
        assert!(!h.contains_key("x-wechat-unionid"));
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic eA=="),
            ("x-end-to-end", "1"),
        ]);
        remove_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-end-to-end"]);
    }

    #[test]
    fn bearer_credentials_are_not_forwarded_but_other_schemes_are() {
        let mut h = map(&[("authorization", "Bearer eyJ.abc.def")]);
        rules(&[], false)
            .prepare_request(&mut h, None, client("203.0.113.9"))
            .unwrap();
        assert!(!h.contains_key("authorization"));
        let mut h = map(&[("authorization", "Basic dXNlcjpwdw==")]);
        rules(&[], false)
            .prepare_request(&mut h, None, client("203.0.113.9"))
            .unwrap();
        assert_eq!(h["authorization"], "Basic dXNlcjpwdw==");
    }

    #[test]
    fn own_cookies_are_not_forwarded_but_others_are() {
        let mut h = HeaderMap::new();
        for value in [
            "theme=dark; __Host-wxgate=eyJ.abc.def; lang=zh",
            "__Host-wxgate-state=abc",
            "__HOST-WXGATE=forged;cart=3",
            "only=this",
        ] {
            h.append(header::COOKIE, HeaderValue::from_static(value));
        }
        rules(&[], false)
            .prepare_request(&mut h, None, client("203.0.113.9"))
            .unwrap();
        let cookies: Vec<&str> = h
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(cookies, ["theme=dark; lang=zh", "cart=3", "only=this"]);
        let mut untouched = map(&[("cookie", "a=1;b=2")]);
        rules(&[], false)
            .prepare_request(&mut untouched, None, client("203.0.113.9"))
            .unwrap();
        assert_eq!(untouched["cookie"], "a=1;b=2");
    }

    #[test]
    fn forwarding_headers_from_untrusted_clients_are_replaced() {
        let mut h = map(&[
            ("host", "shop.example.com"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x_forwarded_for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("x-real-ip", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
        ]);
        rules(&[], true)
            .prepare_request(&mut h, None, client("203.0.113.9"))
            .unwrap();
        assert_eq!(h["x-forwarded-for"], "203.0.113.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example.com");
        assert!(!h.contains_key("x_forwarded_for"));
        assert!(!h.contains_key("x-real-ip"));
        assert!(!h.contains_key("forwarded"));
    }

    #[test]
    fn forwarding_headers_from_trusted_proxies_are_extended() {
        let mut h = map(&[
            ("host", "internal:8080"),
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example.com"),
        ]);
        rules(&["10.0.0.0/8"], false)
            .prepare_request(&mut h, None, client("::ffff:10.1.2.3"))
            .unwrap();
        assert_eq!(h["x-forwarded-for"], "198.51.100.7, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "shop.example.com");
    }

    /// Header names a forger would try: each identity header in every mix of case and separators,
    /// plus unrelated names.
    fn header_name() -> impl Strategy<Value = String> {
        let forged = prop::sample::select(vec![
            "x-user-id",
            "x-wechat-appid",
            "x-wechat-openid",
            "x-wechat-unionid",
        ])
        .prop_flat_map(|canonical| {
            let len = canonical.len();
            (
                Just(canonical),
                prop::collection::vec((any::<bool>(), 0u8..3), len),
            )
        })
        .prop_map(|(canonical, choices)| {
            canonical
                .chars()
                .zip(choices)
                .map(|(c, (upper, sep))| match (c, sep) {
                    ('-', 0) => '-',
                    ('-', 1) => '_',
                    ('-', _) => '.',
                    (c, _) if upper => c.to_ascii_uppercase(),
                    (c, _) => c,
                })
                .collect()
        });
        prop_oneof![forged, "[a-zA-Z][a-zA-Z0-9_.-]{0,20}"]
    }

    proptest! {
        #[test]
        fn no_client_value_for_an_identity_header_reaches_the_backend(
            pairs in prop::collection::vec((header_name(), "[ -~]{0,30}"), 0..20),
            allow_underscores in any::<bool>(),
            with_identity in any::<bool>(),
        ) {
            let mut h = HeaderMap::new();
            for (name, value) in &pairs {
                h.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            let id = identity();
            rules(&[], allow_underscores)
                .prepare_request(&mut h, with_identity.then_some(&id), client("203.0.113.9"))
                .unwrap();
            for canonical in ["x-user-id", "x-wechat-appid", "x-wechat-openid", "x-wechat-unionid"] {
                let present: Vec<(&HeaderName, &HeaderValue)> =
                    h.iter().filter(|(k, _)| same_header(k.as_str(), canonical)).collect();
                let expected: Vec<&str> = match (with_identity, canonical) {
                    (false, _) | (true, "x-wechat-unionid") => vec![],
                    (true, "x-user-id") => vec!["u_1"],
                    (true, "x-wechat-appid") => vec!["wx0123456789abcdef"],
                    (true, _) => vec!["oVBkZ0aYgDMDIywRdgPW8-joxXc4"],
                };
                let got: Vec<&str> = present.iter().map(|(_, v)| v.to_str().unwrap()).collect();
                prop_assert_eq!(got, expected);
                for (name, _) in present {
                    prop_assert_eq!(name.as_str(), canonical);
                }
            }
            if !allow_underscores {
                prop_assert!(!h.keys().any(|k| k.as_str().contains('_')));
            }
        }
    }
}
