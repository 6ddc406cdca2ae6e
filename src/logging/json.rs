//! A JSON log line (`log.format = "json"`) written straight into the line: the same object, key
//! for key, as `tracing-subscriber`'s JSON format with `flatten_event(true)`,
//! `with_current_span(true)` and `with_span_list(false)`, at less than half its cost.
//!
//! That format spent ~17,000 instructions on an access line against ~7,000 for text: every piece
//! serde_json wrote went through a UTF-8 check again, and the request span's fields, stored as a
//! JSON object, were parsed back into a map for every event. [`JsonLine`] writes the event's fields
//! as it visits them, escaped as serde_json escapes strings, and splices the span's stored object in
//! as it is. One difference, as in text lines: an error value with sources is one string, the
//! chain joined by `: `, rather than the top error's message alone.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use super::UtcMicros;

/// `{"timestamp":..,"level":..,<the event's fields>,"target":..,"span":{<its fields>,"name":..}}`.
/// Span fields are formatted by [`JsonFields`], which keeps them as a JSON object. Outside any
/// span, the request being served ([`RequestContext`](super::RequestContext)) is written as the
/// span named `request` holding its fields would be.
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonLine;

impl<S> FormatEvent<S, JsonFields> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        writer.write_str("{\"timestamp\":\"")?;
        UtcMicros.format_time(&mut writer)?;
        writer.write_str("\",\"level\":\"")?;
        writer.write_str(meta.level().as_str())?;
        writer.write_char('"')?;
        let mut fields = JsonVisitor {
            writer: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        string(&mut writer, meta.target())?;
        let span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(span) = span {
            let extensions = span.extensions();
            if let Some(stored) = extensions.get::<FormattedFields<JsonFields>>() {
                // `{"a":1,"b":2}` (or `{}`, or nothing for a span without fields) becomes
                // `{"a":1,"b":2,"name":"request"}`.
                let inner = stored
                    .fields
                    .trim()
                    .strip_prefix('{')
                    .and_then(|rest| rest.strip_suffix('}'))
                    .unwrap_or("");
                writer.write_str(",\"span\":{")?;
                writer.write_str(inner)?;
                writer.write_str(if inner.is_empty() {
                    "\"name\":"
                } else {
                    ",\"name\":"
                })?;
                string(&mut writer, span.name())?;
                writer.write_char('}')?;
            }
        } else {
            // The request being served, as the span named `request` it stands for would be.
            super::request::with_current(|request| {
                writer.write_str(",\"span\":{\"method\":")?;
                string(&mut writer, request.method())?;
                writer.write_str(",\"path\":")?;
                string(&mut writer, request.path())?;
                writer.write_str(",\"request_id\":")?;
                string(&mut writer, request.request_id())?;
                writer.write_str(",\"name\":\"request\"}")
            })?;
        }
        writer.write_str("}\n")
    }
}

struct JsonVisitor<'a, 'writer> {
    writer: &'a mut Writer<'writer>,
    result: fmt::Result,
}

impl JsonVisitor<'_, '_> {
    /// `,"name":`, and whether to go on writing.
    fn key(&mut self, field: &Field) -> bool {
        if self.result.is_ok() {
            self.result = self
                .writer
                .write_char(',')
                .and_then(|()| string(self.writer, field.name()))
                .and_then(|()| self.writer.write_char(':'));
        }
        self.result.is_ok()
    }
}

impl Visit for JsonVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.key(field) {
            self.result = string(self.writer, value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.key(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.key(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.key(field) {
            self.result = self.writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json's form (shortest round trip; `null` for NaN and infinities); rare enough that
        // the allocation does not matter.
        if self.key(field) {
            let number = serde_json::to_string(&value).unwrap_or_else(|_| "null".to_owned());
            self.result = self.writer.write_str(&number);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.key(field) {
            self.result = self
                .writer
                .write_char('"')
                .and_then(|()| super::write_error_chain(&mut Escaped(&mut *self.writer), value))
                .and_then(|()| self.writer.write_char('"'));
        }
    }

    /// Messages, `%` and `?` values: their text as a JSON string.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.key(field) {
            self.result = self
                .writer
                .write_char('"')
                .and_then(|()| write!(Escaped(&mut *self.writer), "{value:?}"))
                .and_then(|()| self.writer.write_char('"'));
        }
    }
}

/// A JSON string, quoted.
fn string(writer: &mut Writer<'_>, value: &str) -> fmt::Result {
    writer.write_char('"')?;
    Escaped(writer).write_str(value)?;
    writer.write_char('"')
}

/// Text inside a JSON string, escaped as serde_json escapes it: `"`, `\` and the control
/// characters below U+0020 (`\b \t \n \f \r` by name, the others as `\u00XX`); everything else,
/// DEL and non-ASCII included, as it is.
struct Escaped<'a, 'writer>(&'a mut Writer<'writer>);

impl fmt::Write for Escaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let bytes = s.as_bytes();
        let mut start = 0;
        for (at, &byte) in bytes.iter().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\x08' => "\\b",
                b'\t' => "\\t",
                b'\n' => "\\n",
                b'\x0c' => "\\f",
                b'\r' => "\\r",
                0..=0x1f => "",
                _ => continue,
            };
            // Every byte escaped is ASCII, so `at` is a character boundary.
            self.0.write_str(&s[start..at])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            start = at + 1;
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    use proptest::prelude::*;
    use tracing::Instrument;

    use crate::logging::fixtures::{Captured, Chained, access_line};

    /// The events wxgate writes, and awkward values a client can put in them.
    fn emit(path: &str) {
        let span = tracing::info_span!("request", method = %"GET", request_id = "abc-123", path);
        let _entered = span.enter();
        access_line(path);
        tracing::warn!(
            path,
            unicode = "/路径/ü\u{7f}",
            negative = -5i64,
            flag = true,
            ratio = 0.25f64,
            big = 1e300f64,
            not_a_number = f64::NAN,
            wide = 1u128 << 100,
            "odd values: {path}"
        );
        tracing::info!(r#type = "raw", debug = ?Some(path), shown = %path, "message");
        let outside = tracing::info_span!("outer");
        let _outer = outside.enter();
        tracing::error!(error = %"plain display", "a span without fields");
    }

    /// wxgate's JSON subscriber (`json_line`) or `tracing-subscriber`'s JSON format, writing to
    /// `out`.
    fn subscriber(json_line: bool, out: &Captured) -> Box<dyn Subscriber + Send + Sync> {
        let builder = tracing_subscriber::fmt().with_writer(out.clone());
        if json_line {
            Box::new(
                builder
                    .fmt_fields(JsonFields::new())
                    .event_format(JsonLine)
                    .finish(),
            )
        } else {
            Box::new(
                builder
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .finish(),
            )
        }
    }

    /// The lines written to `out`, each one's timestamp replaced by a placeholder.
    fn without_timestamps(out: &Captured) -> Vec<String> {
        out.text()
            .lines()
            .map(|line| {
                let rest = line
                    .strip_prefix("{\"timestamp\":\"")
                    .unwrap_or_else(|| panic!("no timestamp first: {line}"));
                assert_eq!(rest.as_bytes()[27], b'"', "{line}");
                format!("{{\"timestamp\":\"T{}", &rest[27..])
            })
            .collect()
    }

    /// What wxgate's JSON subscriber (`json_line`) or `tracing-subscriber`'s JSON format writes for
    /// `emit(path)`, each line's timestamp replaced by a placeholder.
    fn lines(json_line: bool, path: &str) -> Vec<String> {
        let out = Captured::default();
        tracing::subscriber::with_default(subscriber(json_line, &out), || emit(path));
        without_timestamps(&out)
    }

    #[test]
    fn lines_are_the_ones_tracing_subscriber_writes() {
        let ours = lines(true, "/a b\"c\\d\n\u{1b}[31m");
        assert_eq!(ours.len(), 4);
        assert_eq!(ours, lines(false, "/a b\"c\\d\n\u{1b}[31m"));
        assert!(
            ours[0].starts_with(
                r#"{"timestamp":"T","level":"INFO","method":"POST","path":"/a b\"c\\d\n\u001b[31m","#
            ),
            "{}",
            ours[0]
        );
        assert!(
            ours[0].ends_with(
                r#""target":"wxgate::access","span":{"method":"GET","path":"/a b\"c\\d\n\u001b[31m","request_id":"abc-123","name":"request"}}"#
            ),
            "{}",
            ours[0]
        );
        assert!(
            ours[3].ends_with(r#""span":{"name":"outer"}}"#),
            "{}",
            ours[3]
        );
        for line in &ours {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(value.is_object(), "{line}");
        }
    }

    /// Lines logged by a task serving a request `(id, path)`, across an await: with a
    /// [`RequestContext`](crate::logging::RequestContext) and [`JsonLine`] (`ours`), or in the span
    /// named `request` it stands for, through `tracing-subscriber`'s JSON format. Timestamps are
    /// replaced by `T`.
    async fn request_lines(ours: bool, id: &str, path: Option<&str>) -> Vec<String> {
        let out = Captured::default();
        let _default = tracing::subscriber::set_default(subscriber(ours, &out));
        let served = async {
            tracing::info!(user_id = "u1", "login");
            tokio::task::yield_now().await;
            let outer = tracing::info_span!("outer");
            outer.in_scope(|| tracing::warn!("in a span of its own"));
            tracing::info!("after an await");
        };
        if ours {
            let id = http::HeaderValue::from_str(id).unwrap();
            let context = crate::logging::RequestContext::new(&http::Method::POST, &id, path);
            context.scope(served).await;
        } else {
            let span = tracing::info_span!(
                "request",
                method = %http::Method::POST,
                request_id = id,
                path = path.unwrap_or("-"),
            );
            served.instrument(span).await;
        }
        tracing::info!("served");
        without_timestamps(&out)
    }

    #[tokio::test]
    async fn the_request_is_named_as_its_span_would_be() {
        for (id, path) in [("abc-123", Some("/auth/login")), ("\"q\"\t", None)] {
            let ours = request_lines(true, id, path).await;
            assert_eq!(ours, request_lines(false, id, path).await);
            assert_eq!(ours.len(), 4, "{ours:#?}");
        }
        let ours = request_lines(true, "abc-123", Some("/auth/login")).await;
        let named = r#""span":{"method":"POST","path":"/auth/login","request_id":"abc-123","name":"request"}}"#;
        assert!(ours[0].ends_with(named), "{}", ours[0]);
        assert!(
            ours[1].ends_with(r#""span":{"name":"outer"}}"#),
            "{}",
            ours[1]
        );
        assert!(ours[2].ends_with(named), "{}", ours[2]);
        assert!(!ours[3].contains("span"), "{}", ours[3]);
    }

    #[test]
    fn errors_are_written_with_their_sources() {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .fmt_fields(JsonFields::new())
            .event_format(JsonLine)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let error = Chained {
                message: "store \"down\"",
                source: io::Error::new(io::ErrorKind::ConnectionRefused, "refused\n"),
            };
            tracing::error!(
                error = &error as &(dyn std::error::Error + 'static),
                "login failed"
            );
        });
        let text = out.text();
        let value: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(value["error"], "store \"down\": refused\n");
        assert_eq!(value["message"], "login failed");
        assert_eq!(text.lines().count(), 1);
    }

    proptest! {
        /// Any text a client sends (a path, a header) comes out as the JSON string serde_json writes.
        #[test]
        fn strings_are_escaped_as_serde_json_escapes_them(
            value in prop_oneof![any::<String>(), "[\\x00-\\x20\"\\\\a-z\u{7f}é路]{0,40}"]
        ) {
            let mut ours = String::new();
            string(&mut Writer::new(&mut ours), &value).unwrap();
            prop_assert_eq!(ours, serde_json::to_string(&value).unwrap());
        }
    }
}
