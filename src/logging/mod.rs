//! Logging: what a line looks like, as text ([`TextLine`], [`UtcMicros`], [`PlainFields`]) or JSON
//! ([`JsonLine`]), the request a line is logged for ([`RequestContext`]), and where every line goes
//! ([`LogSink`]). All of it is on the request path when the access log is on, one line per request.
//! Nothing here decides what is logged; secrets are kept out where events are made.

mod format;
mod json;
mod request;
mod sink;

pub use format::{PlainFields, TextLine, UtcMicros};
pub use json::JsonLine;
pub use request::RequestContext;
pub use sink::{LogSink, SinkGuard};

/// `error`, then each of its sources after `: `, as one text.
fn write_error_chain(
    out: &mut impl std::fmt::Write,
    error: &(dyn std::error::Error + 'static),
) -> std::fmt::Result {
    write!(out, "{error}")?;
    let mut source = error.source();
    while let Some(cause) = source {
        write!(out, ": {cause}")?;
        source = cause.source();
    }
    Ok(())
}

/// What the format tests share: an output to read back, an error with a source, an access line.
#[cfg(test)]
mod fixtures {
    /// What a test's subscriber wrote: the output the format tests read back.
    #[derive(Clone, Default)]
    pub(super) struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Captured {
        pub(super) fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// An error with a source, as the stores' errors are: `message`, caused by `source`.
    #[derive(Debug)]
    pub(super) struct Chained {
        pub(super) message: &'static str,
        pub(super) source: std::io::Error,
    }

    impl std::fmt::Display for Chained {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.message)
        }
    }

    impl std::error::Error for Chained {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    /// An access line as `gateway` writes one, for `path`.
    pub(super) fn access_line(path: &str) {
        tracing::info!(
            target: "wxgate::access",
            method = %"POST",
            path,
            route = "public",
            status = 200u16,
            duration_us = 1234u64,
            user_id = "-",
            request_id = "0f1e2d3c-aaaa",
        );
    }
}
