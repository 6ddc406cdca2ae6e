//! Prometheus metrics: every metric wxgate exports is defined here and only here. Labels are bounded
//! by construction — route names come from the config, error codes from [`crate::error::Error::code`],
//! statuses are numbers — so no request can create a new time series at will.

use std::sync::Arc;
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

/// The metrics of one wxgate instance (no global registry: two servers in one process, as in the
/// tests, count separately).
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
    errors: Family<ErrorLabels, Counter>,
    in_flight: Gauge,
    merges: Counter,
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
        Metrics {
            registry,
            requests,
            duration,
            errors,
            in_flight,
            merges,
        }
    }

    /// Records one answered request.
    pub fn observe_request(&self, route: &Arc<str>, status: u16, elapsed: Duration) {
        let route = RouteLabel(route.clone());
        self.duration
            .get_or_create(&RouteLabels {
                route: route.clone(),
            })
            .observe(elapsed.as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
    }

    pub fn count_error(&self, code: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { error: code })
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
}
