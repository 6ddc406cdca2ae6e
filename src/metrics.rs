//! Prometheus metrics: every metric wxgate exports is defined here and only here. Labels are bounded
//! by construction — route names come from the config, error codes from [`crate::error::Error::code`],
//! statuses are numbers — so no request can create a new time series at will.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// A route's name as a label value; cheap to clone on the request path.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RouteLabel(pub Arc<str>);

impl EncodeLabelValue for RouteLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.0.as_ref(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: RouteLabel,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: RouteLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoginLabels {
    app: RouteLabel,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WechatLabels {
    endpoint: &'static str,
    errcode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: &'static str,
}

/// How many series of each kind [`Kept`] holds handles to.
const RECENT_SERIES: usize = 64;

/// Handles to the series used so far, found by the labels as the caller holds them (compared, not
/// hashed into a label set as a family lookup does) so that the counting on every request or login
/// hashes nothing. At most [`RECENT_SERIES`]; others are counted through their family each time.
struct Kept<K, M>(RwLock<Vec<(K, M)>>);

impl<K, M> Kept<K, M> {
    fn new() -> Self {
        Kept(RwLock::new(Vec::new()))
    }

    /// `count`s into the series whose key `is` says is the one: a kept handle, or the one `make`
    /// finds in the family (kept with its key, when there is room).
    fn count(
        &self,
        is: impl Fn(&K) -> bool,
        make: impl FnOnce() -> (K, M),
        count: impl FnOnce(&M),
    ) {
        {
            let kept = self.0.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, handles)) = kept.iter().find(|(k, _)| is(k)) {
                count(handles);
                return;
            }
        }
        let (key, handles) = make();
        count(&handles);
        let mut kept = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if kept.len() < RECENT_SERIES && !kept.iter().any(|(k, _)| is(k)) {
            kept.push((key, handles));
        }
    }
}

/// How checking a request's credential ended: the `result` label of `token_verifications`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    Ok,
    Expired,
    Invalid,
    UnknownSession,
}

impl Verification {
    const ALL: [Verification; 4] = [
        Verification::Ok,
        Verification::Expired,
        Verification::Invalid,
        Verification::UnknownSession,
    ];

    fn label(self) -> &'static str {
        match self {
            Verification::Ok => "ok",
            Verification::Expired => "expired",
            Verification::Invalid => "invalid",
            Verification::UnknownSession => "unknown_session",
        }
    }
}

/// WeChat's error codes as label values: the documented ones by number, anything else as `other`,
/// so a misbehaving server cannot create series at will.
pub fn errcode_label(errcode: i64) -> &'static str {
    match errcode {
        0 => "0",
        -1 => "-1",
        40001 => "40001",
        40002 => "40002",
        40003 => "40003",
        40013 => "40013",
        40014 => "40014",
        40029 => "40029",
        40097 => "40097",
        40125 => "40125",
        40163 => "40163",
        40164 => "40164",
        40226 => "40226",
        41002 => "41002",
        41004 => "41004",
        41008 => "41008",
        42001 => "42001",
        42003 => "42003",
        45009 => "45009",
        45011 => "45011",
        48001 => "48001",
        87009 => "87009",
        _ => "other",
    }
}

/// The metrics of one wxgate instance (no global registry: two servers in one process, as in the
/// tests, count separately).
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
    errors: Family<ErrorLabels, Counter>,
    in_flight: Gauge,
    merges: Counter,
    logins: Family<LoginLabels, Counter>,
    wechat_calls: Family<WechatLabels, Counter>,
    wechat_duration: Family<EndpointLabels, Histogram>,
    /// `requests` and `duration` by (route, status). A route or app is known by its label's
    /// allocation, compared by address: the same allocation is the same name, and the clone kept
    /// with the handles keeps it from being freed and reused for another.
    recent: Kept<(Arc<str>, u16), (Counter, Histogram)>,
    /// `logins` by (app, result).
    recent_logins: Kept<(Arc<str>, &'static str), Counter>,
    /// `wechat_calls` and `wechat_duration` by (endpoint, errcode).
    recent_wechat: Kept<(&'static str, &'static str), (Counter, Histogram)>,
    /// `token_verifications` by [`Verification`], resolved once: every authenticated request counts
    /// one, without hashing its label.
    verified: [Counter; 4],
    sessions: Gauge,
    store_errors: Family<StoreLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~13 s: proxying on loopback sits at the bottom, slow backends at the top.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 18,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wxgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Requests answered on the main listener, by route and status",
            requests.clone(),
        );
        let duration = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time from request received to response headers sent, by route",
            Unit::Seconds,
            duration.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "errors",
            "Requests answered with an error, by error code",
            errors.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "http_requests_in_flight",
            "Requests being handled right now",
            in_flight.clone(),
        );
        let merges = Counter::default();
        registry.register(
            "identity_merges",
            "Users merged into another because a unionid showed they are the same person",
            merges.clone(),
        );
        let logins = Family::<LoginLabels, Counter>::default();
        registry.register(
            "logins",
            "Login attempts (all kinds: mini program, OAuth, browser callback), by app and result (ok or the error code)",
            logins.clone(),
        );
        let wechat_calls = Family::<WechatLabels, Counter>::default();
        registry.register(
            "wechat_requests",
            "Calls to the WeChat API, by endpoint and errcode (0 ok; unavailable, timeout)",
            wechat_calls.clone(),
        );
        let wechat_duration = Family::<EndpointLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "wechat_request_duration",
            "Time of one call to the WeChat API, by endpoint",
            Unit::Seconds,
            wechat_duration.clone(),
        );
        let verifications = Family::<ResultLabels, Counter>::default();
        registry.register(
            "token_verifications",
            "Credentials checked on requests (ok, expired, invalid, unknown_session)",
            verifications.clone(),
        );
        let sessions = Gauge::default();
        registry.register(
            "sessions_active",
            "Live sessions in this instance's session store (approximate)",
            sessions.clone(),
        );
        let store_errors = Family::<StoreLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Failures of a store that made a request fail closed, by store (identity, session)",
            store_errors.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            errors,
            in_flight,
            merges,
            logins,
            wechat_calls,
            wechat_duration,
            recent: Kept::new(),
            recent_logins: Kept::new(),
            recent_wechat: Kept::new(),
            verified: Verification::ALL.map(|result| {
                verifications
                    .get_or_create(&ResultLabels {
                        result: result.label(),
                    })
                    .clone()
            }),
            sessions,
            store_errors,
        }
    }

    /// Records one answered request.
    pub fn observe_request(&self, route: &Arc<str>, status: u16, elapsed: Duration) {
        let make = || {
            let label = RouteLabel(route.clone());
            let duration = self
                .duration
                .get_or_create(&RouteLabels {
                    route: label.clone(),
                })
                .clone();
            let requests = self
                .requests
                .get_or_create(&RequestLabels {
                    route: label,
                    status,
                })
                .clone();
            ((route.clone(), status), (requests, duration))
        };
        self.recent.count(
            |(r, s)| *s == status && Arc::ptr_eq(r, route),
            make,
            |(requests, duration)| {
                requests.inc();
                duration.observe(elapsed.as_secs_f64());
            },
        );
    }

    pub fn count_error(&self, code: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { error: code })
            .inc();
    }

    /// One login attempt of `app`: `result` is `ok` or the error code.
    pub fn count_login(&self, app: &Arc<str>, result: &'static str) {
        let make = || {
            let logins = self
                .logins
                .get_or_create(&LoginLabels {
                    app: RouteLabel(app.clone()),
                    result,
                })
                .clone();
            ((app.clone(), result), logins)
        };
        self.recent_logins.count(
            |(a, r)| *r == result && Arc::ptr_eq(a, app),
            make,
            |logins| {
                logins.inc();
            },
        );
    }

    /// One call to WeChat's `endpoint` that ended with `errcode` (see [`errcode_label`]).
    pub fn observe_wechat(&self, endpoint: &'static str, errcode: &'static str, elapsed: Duration) {
        let make = || {
            let calls = self
                .wechat_calls
                .get_or_create(&WechatLabels { endpoint, errcode })
                .clone();
            let duration = self
                .wechat_duration
                .get_or_create(&EndpointLabels { endpoint })
                .clone();
            ((endpoint, errcode), (calls, duration))
        };
        self.recent_wechat.count(
            |k| *k == (endpoint, errcode),
            make,
            |(calls, duration)| {
                calls.inc();
                duration.observe(elapsed.as_secs_f64());
            },
        );
    }

    /// One credential checked on a request.
    pub fn count_verification(&self, result: Verification) {
        self.verified[result as usize].inc();
    }

    pub fn set_sessions(&self, n: u64) {
        self.sessions.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn count_store_error(&self, store: &'static str) {
        self.store_errors
            .get_or_create(&StoreLabels { store })
            .inc();
    }

    pub fn count_merges(&self, n: usize) {
        self.merges.inc_by(n as u64);
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Decrements the in-flight gauge when dropped, however the request ends.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_exported_by_route_and_status() {
        let metrics = Metrics::new();
        let route: Arc<str> = Arc::from("/api/public/");
        metrics.observe_request(&route, 200, Duration::from_millis(3));
        metrics.observe_request(&route, 200, Duration::from_millis(4));
        metrics.count_error("login_required");
        let text = metrics.render();
        assert!(
            text.contains(r#"wxgate_http_requests_total{route="/api/public/",status="200"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"wxgate_http_request_duration_seconds_count{route="/api/public/"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"wxgate_errors_total{error="login_required"} 1"#),
            "{text}"
        );
    }

    /// Logins and WeChat calls counted again and again, through the kept handles, land in their
    /// series, and each outcome in its own.
    #[test]
    fn logins_and_wechat_calls_count_into_their_series() {
        let metrics = Metrics::new();
        let shop: Arc<str> = Arc::from("shop");
        let also_shop: Arc<str> = Arc::from("shop");
        for _ in 0..3 {
            metrics.count_login(&shop, "ok");
            metrics.observe_wechat("jscode2session", "0", Duration::from_millis(2));
        }
        metrics.count_login(&also_shop, "ok");
        metrics.count_login(&shop, "invalid_code");
        metrics.observe_wechat("jscode2session", "40029", Duration::from_millis(2));
        metrics.observe_wechat("stable_token", "0", Duration::from_millis(2));
        let text = metrics.render();
        for line in [
            r#"wxgate_logins_total{app="shop",result="ok"} 4"#,
            r#"wxgate_logins_total{app="shop",result="invalid_code"} 1"#,
            r#"wxgate_wechat_requests_total{endpoint="jscode2session",errcode="0"} 3"#,
            r#"wxgate_wechat_requests_total{endpoint="jscode2session",errcode="40029"} 1"#,
            r#"wxgate_wechat_request_duration_seconds_count{endpoint="jscode2session"} 4"#,
            r#"wxgate_wechat_request_duration_seconds_count{endpoint="stable_token"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in:\n{text}"
            );
        }
    }

    /// Counting through the kept handles lands in the same series as through the families: a
    /// label spelled by another allocation, a new status, and more series than are kept.
    #[test]
    fn kept_series_handles_count_into_the_exported_series() {
        let metrics = Metrics::new();
        let route: Arc<str> = Arc::from("api");
        let same_name: Arc<str> = Arc::from("api");
        for _ in 0..3 {
            metrics.observe_request(&route, 200, Duration::from_millis(1));
        }
        metrics.observe_request(&same_name, 200, Duration::from_millis(1));
        metrics.observe_request(&route, 401, Duration::from_millis(1));
        for status in 0..(RECENT_SERIES as u16 + 10) {
            metrics.observe_request(&route, 1000 + status, Duration::from_millis(1));
            metrics.observe_request(&route, 1000 + status, Duration::from_millis(1));
        }
        let text = metrics.render();
        let has = |line: &str| text.lines().any(|l| l == line);
        assert!(
            has(r#"wxgate_http_requests_total{route="api",status="200"} 4"#),
            "{text}"
        );
        assert!(
            has(r#"wxgate_http_requests_total{route="api",status="401"} 1"#),
            "{text}"
        );
        assert!(
            has(r#"wxgate_http_requests_total{route="api",status="1073"} 2"#),
            "{text}"
        );
        let count = 5 + 2 * (RECENT_SERIES + 10);
        assert!(
            has(&format!(
                r#"wxgate_http_request_duration_seconds_count{{route="api"}} {count}"#
            )),
            "{text}"
        );
        assert_eq!(metrics.recent.0.read().unwrap().len(), RECENT_SERIES);
    }
}
