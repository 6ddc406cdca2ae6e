//! The parts of a text log line that run once per line, made cheap: with the access log on, every
//! request writes one, and `tracing-subscriber`'s defaults spent half a public request's user-space
//! instructions on it (styling calls that write nothing when colours are off, and a calendar
//! computation per line).
//!
//! [`UtcMicros`] writes the same RFC 3339 timestamp as `tracing-subscriber`'s default, the date and
//! time of day computed once a second. [`PlainFields`] writes fields exactly as the default does
//! without colours (`name=value`, strings quoted and escaped as Rust's `Debug` does), and escapes
//! control characters in messages and in values shown with `%`, newlines included, so one event
//! stays one line. One difference: an error value with sources is written as one chain joined by
//! `: ` rather than with a separate `.sources` list. [`TextLine`] writes the whole line as the
//! default format does without colours, without the styling calls it makes even then, and names
//! the request being served; on a terminal it adds colours of its own.

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` in UTC, as `tracing_subscriber::fmt::time::SystemTime` writes it.
#[derive(Clone, Copy, Debug, Default)]
pub struct UtcMicros;

thread_local! {
    /// The second last written and its text, per thread: the calendar work runs once a second.
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

impl FormatTime for UtcMicros {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        // A clock before 1970 is written as the epoch rather than refused.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        write_timestamp(w, now.as_secs(), now.subsec_micros())
    }
}

fn write_timestamp(w: &mut impl fmt::Write, secs: u64, micros: u32) -> fmt::Result {
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        text = date_time(secs);
        SECOND.set((secs, text));
    }
    let mut line = *b"0000-00-00T00:00:00.000000Z";
    line[..19].copy_from_slice(&text);
    let mut rest = micros.min(999_999);
    for digit in line[20..26].iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    w.write_str(std::str::from_utf8(&line).unwrap_or("?"))
}

/// `YYYY-MM-DDTHH:MM:SS` for seconds since the epoch (years past 9999 are written as 9999's last
/// second: no clock of this program's lifetime reads them).
fn date_time(secs: u64) -> [u8; 19] {
    const LAST: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let secs = secs.min(LAST);
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let of_day = secs % 86_400;
    let mut out = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut value: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, of_day / 3600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    out
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's algorithm:
/// 400-year eras, years starting in March so that the leap day comes last).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `<timestamp> <level> <span>{<its fields>}:... <target>: <fields>`, byte for byte the line of
/// `tracing-subscriber`'s default format with colours off, [`UtcMicros`] and [`PlainFields`]. That
/// format runs every piece of the line through a styling call that writes nothing when colours are
/// off. The request being served ([`RequestContext`](super::RequestContext)) is written first, as
/// a span named `request` holding its fields would be.
///
/// With colours on (a terminal), the timestamp and the target are dimmed and the level coloured;
/// without the colour codes the line is the same.
#[derive(Clone, Copy, Debug, Default)]
pub struct TextLine;

/// `tracing-subscriber`'s colours for the levels, the level padded to five characters.
fn level(level: Level, colours: bool) -> &'static str {
    match (level, colours) {
        (Level::TRACE, false) => " TRACE ",
        (Level::DEBUG, false) => " DEBUG ",
        (Level::INFO, false) => "  INFO ",
        (Level::WARN, false) => "  WARN ",
        (Level::ERROR, false) => " ERROR ",
        (Level::TRACE, true) => " \x1b[35mTRACE\x1b[0m ",
        (Level::DEBUG, true) => " \x1b[34mDEBUG\x1b[0m ",
        (Level::INFO, true) => " \x1b[32m INFO\x1b[0m ",
        (Level::WARN, true) => " \x1b[33m WARN\x1b[0m ",
        (Level::ERROR, true) => " \x1b[31mERROR\x1b[0m ",
    }
}

const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

impl<S> FormatEvent<S, PlainFields> for TextLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, PlainFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let colours = writer.has_ansi_escapes();
        if colours {
            writer.write_str(DIM)?;
        }
        UtcMicros.format_time(&mut writer)?;
        if colours {
            writer.write_str(RESET)?;
        }
        writer.write_str(level(*meta.level(), colours))?;
        let mut prefixed = false;
        super::request::with_current(|request| {
            prefixed = true;
            writer.write_str("request{method=")?;
            Escaped(&mut writer).write_str(request.method())?;
            writer.write_str(" request_id=")?;
            quoted(&mut writer, request.request_id())?;
            writer.write_str(" path=")?;
            quoted(&mut writer, request.path())?;
            writer.write_str("}:")
        })?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                writer.write_str(span.name())?;
                prefixed = true;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<PlainFields>>()
                    && !fields.is_empty()
                {
                    writer.write_char('{')?;
                    writer.write_str(fields)?;
                    writer.write_char('}')?;
                }
                writer.write_char(':')?;
            }
        }
        if prefixed {
            writer.write_char(' ')?;
        }
        if colours {
            writer.write_str(DIM)?;
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        if colours {
            writer.write_str(RESET)?;
        }
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

/// `value` as `Debug` writes a string: quoted, with quotes, backslashes and control characters
/// escaped.
fn quoted(writer: &mut Writer<'_>, value: &str) -> fmt::Result {
    if value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        // What `Debug` writes for such a string, without walking it a character at a time.
        writer.write_char('"')?;
        writer.write_str(value)?;
        writer.write_char('"')
    } else {
        write!(writer, "{value:?}")
    }
}

/// Fields as `tracing-subscriber` writes them without colours, without its styling calls (on a
/// terminal too: the level and the target keep their colours, field names are plain).
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = PlainVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Writes the separator and `name=` (nothing for the message), or returns false for a field
    /// not to be written: the `log` crate's metadata, already on the line.
    fn start(&mut self, field: &Field) -> bool {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return false;
        }
        if !std::mem::take(&mut self.first) {
            self.result = self.writer.write_char(' ');
        }
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self
                .result
                .and_then(|()| self.writer.write_str(name))
                .and_then(|()| self.writer.write_char('='));
        }
        self.result.is_ok()
    }

    fn integer(&mut self, field: &Field, value: impl itoa::Integer) {
        if self.start(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.integer(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.integer(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field) {
            self.result = self.writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.start(field) {
            return;
        }
        self.result = if field.name() == "message" {
            Escaped(&mut self.writer).write_str(value)
        } else {
            quoted(&mut self.writer, value)
        };
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !self.start(field) {
            return;
        }
        self.result = super::write_error_chain(&mut Escaped(&mut self.writer), value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.start(field) {
            return;
        }
        // Values shown with `%` (Display) reach here unquoted: their control characters are
        // escaped like a message's.
        self.result = write!(Escaped(&mut self.writer), "{value:?}");
    }
}

/// Control characters written as `\u{..}` escapes (a newline too: one event, one line), as
/// `tracing-subscriber` escapes terminal sequences in messages.
struct Escaped<'a, 'writer>(&'a mut Writer<'writer>);

impl fmt::Write for Escaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Control characters are U+0000-U+001F and U+007F (one byte each) and U+0080-U+009F
        // (0xC2 and a second byte): text with none of those bytes, nearly all, goes as it is
        // after one pass over its bytes instead of a walk through its characters.
        if !s.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2) {
            return self.0.write_str(s);
        }
        let mut rest = s;
        while let Some(at) = rest.find(char::is_control) {
            self.0.write_str(&rest[..at])?;
            let control = rest[at..].chars().next().unwrap_or_default();
            write!(self.0, "\\u{{{:x}}}", control as u32)?;
            rest = &rest[at + control.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    use proptest::prelude::*;

    use crate::logging::fixtures::{Captured, Chained, access_line};

    /// The events wxgate writes, and the awkward values a client can put in them.
    fn emit() {
        let span =
            tracing::info_span!("request", method = %"GET", request_id = "abc-123", path = "/a b");
        let _entered = span.enter();
        access_line("/public/x");
        tracing::warn!(
            path = "/quo\"te\\back",
            unicode = "/路径/ü",
            tab = "a\tb",
            negative = -5i64,
            flag = true,
            "odd values"
        );
        tracing::info!(r#type = "raw", debug = ?Some(3), shown = %"display", "message with {} and {:?}", "args", "quoted");
        tracing::error!(error = %"plain display", "no sources");
    }

    fn lines(plain: bool) -> String {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(false)
            .without_time();
        let dispatch = if plain {
            tracing::Dispatch::new(builder.fmt_fields(PlainFields).finish())
        } else {
            tracing::Dispatch::new(builder.finish())
        };
        tracing::dispatcher::with_default(&dispatch, emit);
        out.text()
    }

    #[test]
    fn lines_are_the_ones_tracing_subscriber_writes_without_colours() {
        let plain = lines(true);
        assert_eq!(plain, lines(false));
        assert!(
            plain.contains(r#"wxgate::access: method=POST path="/public/x" route="public" status=200 duration_us=1234 user_id="-" request_id="0f1e2d3c-aaaa""#),
            "{plain}"
        );
        assert!(
            plain.contains(r#"request{method=GET request_id="abc-123" path="/a b"}"#),
            "{plain}"
        );
    }

    /// Every level, events in no span, in nested spans and in a span without fields, with
    /// timestamps replaced by `T`.
    fn whole_lines(ours: bool) -> String {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(false)
            .with_max_level(Level::TRACE)
            .with_timer(UtcMicros)
            .fmt_fields(PlainFields);
        let dispatch = if ours {
            tracing::Dispatch::new(builder.event_format(TextLine).finish())
        } else {
            tracing::Dispatch::new(builder.finish())
        };
        tracing::dispatcher::with_default(&dispatch, || {
            emit();
            tracing::trace!(n = 1, "trace");
            tracing::debug!("debug");
            tracing::info!("info");
            tracing::warn!("warn");
            tracing::error!("error");
            let _outer = tracing::info_span!("outer").entered();
            let _inner = tracing::debug_span!("inner", n = 2, s = "a b").entered();
            tracing::info!(x = 3, "nested");
            tracing::info!(target: "elsewhere", "another target");
        });
        out.text()
            .lines()
            .map(|line| {
                assert!(line.len() > 27 && line.as_bytes()[26] == b'Z', "{line}");
                format!("T{}\n", &line[27..])
            })
            .collect()
    }

    #[test]
    fn whole_text_lines_are_the_ones_tracing_subscriber_writes_without_colours() {
        let ours = whole_lines(true);
        assert_eq!(ours, whole_lines(false));
        assert_eq!(ours.lines().count(), 11, "{ours}");
        for expected in [
            "T TRACE wxgate::logging::format::tests: trace n=1\n",
            "T  INFO wxgate::logging::format::tests: info\n",
            "T ERROR wxgate::logging::format::tests: error\n",
            "T  INFO outer:inner{n=2 s=\"a b\"}: wxgate::logging::format::tests: nested x=3\n",
            "T  INFO outer:inner{n=2 s=\"a b\"}: elsewhere: another target\n",
        ] {
            assert!(ours.contains(expected), "{expected:?} in\n{ours}");
        }
    }

    /// What is logged while serving a request: lines of its own, in a span of a library's, and
    /// with values a client chose.
    fn request_events() {
        tracing::info!(user_id = "u1", new_user = false, "login");
        let _inner = tracing::debug_span!("query", n = 2).entered();
        tracing::warn!(path = "/quo\"te", "store slow");
    }

    /// `request_events()` logged while serving `(method, id, path)`: with a [`RequestContext`] and
    /// [`TextLine`] (`ours`), or in the span named `request` it stands for, through
    /// `tracing-subscriber`'s default format. Timestamps are replaced by `T`.
    fn request_lines(
        ours: bool,
        colours: bool,
        (method, id, path): (&str, &[u8], Option<&str>),
    ) -> String {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(colours)
            .with_max_level(Level::TRACE)
            .with_timer(UtcMicros)
            .fmt_fields(PlainFields);
        let method = http::Method::from_bytes(method.as_bytes()).unwrap();
        let id = http::HeaderValue::from_bytes(id).unwrap();
        let context = crate::logging::RequestContext::new(&method, &id, path);
        if ours {
            let dispatch = tracing::Dispatch::new(builder.event_format(TextLine).finish());
            tracing::dispatcher::with_default(&dispatch, || context.in_scope(request_events));
        } else {
            let dispatch = tracing::Dispatch::new(builder.finish());
            tracing::dispatcher::with_default(&dispatch, || {
                let span = tracing::info_span!(
                    "request",
                    %method,
                    request_id = id.to_str().unwrap_or("-"),
                    path = path.unwrap_or("-"),
                );
                span.in_scope(request_events);
            });
        }
        out.text()
            .lines()
            .map(|line| {
                let at = line.find('Z').expect("a timestamp");
                format!("T{}\n", &line[at + 1..])
            })
            .collect()
    }

    #[test]
    fn the_request_is_named_as_its_span_would_be() {
        for request in [
            ("POST", &b"abc-123"[..], Some("/auth/login")),
            ("GET", b"odd \"id\"", Some("/a b\"c\n\u{1b}[31m")),
            ("PURGE", b"\xff not text", None),
        ] {
            let ours = request_lines(true, false, request);
            assert_eq!(ours, request_lines(false, false, request));
            assert_eq!(ours.lines().count(), 2, "{ours}");
            assert!(ours.starts_with("T  INFO request{method="), "{ours}");
        }
        assert_eq!(
            request_lines(true, false, ("POST", b"abc-123", Some("/auth/login"))),
            "T  INFO request{method=POST request_id=\"abc-123\" path=\"/auth/login\"}: \
             wxgate::logging::format::tests: login user_id=\"u1\" new_user=false\n\
             T  WARN request{method=POST request_id=\"abc-123\" path=\"/auth/login\"}:query{n=2}: \
             wxgate::logging::format::tests: store slow path=\"/quo\\\"te\"\n"
        );
        let unnamed = request_lines(true, false, ("PURGE", b"\xff not text", None));
        assert!(
            unnamed.contains("request{method=PURGE request_id=\"-\" path=\"-\"}:"),
            "{unnamed}"
        );
    }

    #[test]
    fn on_a_terminal_only_colours_are_added() {
        let request = ("POST", &b"abc-123"[..], Some("/a\u{1b}[31m"));
        let coloured = request_lines(true, true, request);
        assert!(
            coloured.contains("\u{1b}[32m INFO\u{1b}[0m"),
            "{coloured:?}"
        );
        assert!(
            coloured.contains("\u{1b}[33m WARN\u{1b}[0m"),
            "{coloured:?}"
        );
        // Without its colour codes (`ESC [ digits m`), the line is the one written without colours.
        let mut stripped = String::new();
        let mut rest = coloured.as_str();
        while let Some(at) = rest.find('\u{1b}') {
            stripped.push_str(&rest[..at]);
            let end = rest[at..].find('m').expect("a colour code ends with m");
            assert!(
                rest[at + 2..at + end].bytes().all(|b| b.is_ascii_digit()),
                "{coloured:?}"
            );
            rest = &rest[at + end + 1..];
        }
        stripped.push_str(rest);
        assert_eq!(stripped, request_lines(true, false, request));
        // A client's escape sequence is escaped, never passed on.
        assert!(stripped.contains(r#"path="/a\u{1b}[31m""#), "{stripped}");
    }

    #[test]
    fn messages_stay_on_one_line_and_free_of_terminal_sequences() {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(false)
            .without_time()
            .fmt_fields(PlainFields)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let forged = "x\n2026-01-01T00:00:00Z  INFO forged\x1b[31m";
            tracing::info!(value = forged, shown = %forged, "got {}", forged);
            tracing::info!(
                error = &Chained {
                    message: "store unavailable",
                    source: io::Error::other("refused\nagain"),
                } as &(dyn std::error::Error + 'static)
            );
        });
        let text = out.text();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!text.contains('\x1b'), "{text}");
        assert!(
            text.contains(r"got x\u{a}2026-01-01T00:00:00Z  INFO forged\u{1b}[31m"),
            "{text}"
        );
        assert!(text.contains(r#"value="x\n2026"#), "{text}");
        assert!(text.contains(r"shown=x\u{a}2026"), "{text}");
        assert!(
            text.contains(r"error=store unavailable: refused\u{a}again"),
            "{text}"
        );
    }

    fn timestamp(secs: u64, micros: u32) -> String {
        let mut out = String::new();
        write_timestamp(&mut out, secs, micros).unwrap();
        out
    }

    #[test]
    fn timestamps_known_instants() {
        assert_eq!(timestamp(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(timestamp(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(
            timestamp(1_796_187_973, 123_456),
            "2026-12-02T05:06:13.123456Z"
        );
        // The cache must not keep a second's text for the next one.
        assert_eq!(
            timestamp(1_796_187_974, 999_999),
            "2026-12-02T05:06:14.999999Z"
        );
        assert_eq!(timestamp(4_107_542_399, 0), "2100-02-28T23:59:59.000000Z");
        assert_eq!(timestamp(u64::MAX, 0), "9999-12-31T23:59:59.000000Z");
    }

    #[test]
    fn timestamps_match_tracing_subscribers_format_now() {
        // The same instant can't be handed to both: retry across a second boundary.
        for _ in 0..5 {
            let mut theirs = String::new();
            tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut Writer::new(&mut theirs))
                .unwrap();
            let mut ours = String::new();
            UtcMicros.format_time(&mut Writer::new(&mut ours)).unwrap();
            assert_eq!(ours.len(), theirs.len(), "{ours} / {theirs}");
            if ours[..19] == theirs[..19] {
                assert_eq!(&ours[19..20], ".");
                assert!(ours.ends_with('Z'));
                return;
            }
        }
        panic!("the seconds never agreed");
    }

    proptest! {
        /// Every control character, and nothing else, is written as its `\u{..}` escape.
        #[test]
        fn escaped_writes_control_characters_as_escapes(
            text in "(\\PC|[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}]|\\u{a0}|\\u{c0}|é|王)*",
        ) {
            let mut ours = String::new();
            Escaped(&mut Writer::new(&mut ours)).write_str(&text).unwrap();
            let expected: String = text
                .chars()
                .map(|c| if c.is_control() { format!("\\u{{{:x}}}", c as u32) } else { c.to_string() })
                .collect();
            prop_assert_eq!(ours, expected);
        }

        /// The date and time of day agree with httpdate's, for every second to year 9999.
        #[test]
        fn date_time_agrees_with_httpdate(secs in 0u64..253_402_300_800) {
            let ours = String::from_utf8(date_time(secs).to_vec()).unwrap();
            let http = httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_secs(secs));
            // "Wed, 02 Dec 2026 06:26:13 GMT"
            let parts: Vec<&str> = http.split(' ').collect();
            let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
                .iter()
                .position(|m| *m == parts[2])
                .unwrap()
                + 1;
            let expected = format!("{}-{month:02}-{}T{}", parts[3], parts[1], parts[4]);
            prop_assert_eq!(ours, expected);
        }
    }
}
