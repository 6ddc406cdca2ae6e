//! HTTP/1.1 to the backend as text, for the fast lane (`gateway::fast`): wxgate writes the request
//! head itself, reads the response head with httparse, and forwards the response body by its framing
//! without decoding it. What this module owns: the idle connections, the response head, and the
//! framing rules; what it must not do: interpret anything a client sent (the gateway has done that).
//!
//! A response whose framing is ambiguous (both `Transfer-Encoding` and `Content-Length`, a transfer
//! coding other than `chunked`, differing lengths) is refused with 502: forwarding it would let the
//! backend and the client disagree on where it ends (response splitting).

use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;

use super::pool::SendError;

/// The most idle connections kept; more are closed when they come back.
const MAX_IDLE: usize = 1024;
/// Idle at least this long, a connection may be one the backend has closed: it is checked before
/// any use.
pub const RISKY_IDLE: Duration = Duration::from_secs(1);
/// The largest response head accepted from the backend.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// The most response headers accepted from the backend.
pub const MAX_RESPONSE_HEADERS: usize = 128;

/// One keep-alive connection to the backend, with what has been read from it and not yet used.
pub struct RawConn {
    pub stream: TcpStream,
    pub buf: BytesMut,
    /// When it was last returned to the pool; `None` for a new connection.
    pub idle_since: Option<Instant>,
}

impl RawConn {
    /// How long it sat idle before this use (zero for a new connection).
    pub fn idle_for(&self) -> Duration {
        self.idle_since
            .map_or(Duration::ZERO, |since| since.elapsed())
    }
}

/// Idle connections to one backend, newest on top.
pub struct RawPool {
    address: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Mutex<Vec<RawConn>>,
}

impl RawPool {
    pub fn new(address: String, connect_timeout: Duration, idle_timeout: Duration) -> RawPool {
        RawPool {
            address,
            connect_timeout,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RawConn>> {
        // The stack holds no invariant a panic could break half-way.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection, else a new one.
    ///
    /// A connection may have been closed by the backend since it came back (its idle timeout), and
    /// nothing watches idle connections. With `verify`, or when it has been idle a while, it is
    /// checked first (one non-blocking read). Without, the caller must be able to send its request
    /// again on a new connection should this one turn out closed: that saves the check on every
    /// request under load, where connections come back within microseconds.
    pub async fn get(&self, verify: bool) -> Result<RawConn, SendError> {
        loop {
            let Some(conn) = self.lock().pop() else {
                return self.connect().await;
            };
            let idle = conn.idle_for();
            if idle >= self.idle_timeout {
                continue;
            }
            if !(verify || idle >= RISKY_IDLE) || still_open(&conn.stream) {
                return Ok(conn);
            }
        }
    }

    /// A new connection.
    pub async fn connect(&self) -> Result<RawConn, SendError> {
        let stream = super::pool::connect_tcp(&self.address, self.connect_timeout).await?;
        Ok(RawConn {
            stream,
            buf: BytesMut::with_capacity(8 * 1024),
            idle_since: None,
        })
    }

    /// Returns a connection whose last response was read to its end, with nothing left over.
    pub fn put(&self, mut conn: RawConn) {
        if !conn.buf.is_empty() {
            // The backend sent more than its response: it cannot be trusted with another one.
            return;
        }
        conn.idle_since = Some(Instant::now());
        let mut idle = self.lock();
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push(conn);
    }
}

/// Whether the backend has not closed `stream` (nor sent anything unasked), without waiting.
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Why a backend's response cannot be forwarded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResponseError {
    #[error("the backend's response head is malformed")]
    Malformed,
    #[error("the backend's response head is too large")]
    TooLarge,
    #[error("the backend's response framing is ambiguous or unsupported")]
    Framing,
    #[error("the backend switched protocols unasked")]
    Upgrade,
    #[error("the backend's chunked body is malformed")]
    Chunked,
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes the connection.
    UntilClose,
}

/// A parsed response head: positions in the bytes it was parsed from.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    /// The whole head, status line to the blank line.
    pub len: usize,
    pub headers: Vec<(Range<usize>, Range<usize>)>,
    pub framing: Framing,
    /// `Connection: close`, or an HTTP/1.0 response: the connection is not reused.
    pub close: bool,
}

fn range_in(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    start..start + part.len()
}

/// A Content-Length value: decimal digits only (no sign, no space), at most 19 of them.
fn decimal(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 19 {
        return None;
    }
    text.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// Parses the response head at the start of `buf`: `Ok(None)` when more bytes are needed.
/// Interim responses (1xx other than 101) are not returned: `Ok(Some)` for one of them has
/// `status < 200` and the caller skips `len` bytes and parses again.
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
) -> Result<Option<ResponseHead>, ResponseError> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut storage);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD => {
            return Err(ResponseError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooLarge),
        Err(_) => return Err(ResponseError::Malformed),
    };
    let status = response.code.ok_or(ResponseError::Malformed)?;
    if status == 101 {
        return Err(ResponseError::Upgrade);
    }
    let mut close = response.version == Some(0);
    let (mut length, mut chunked, mut coded) = (None, false, false);
    let mut headers = Vec::with_capacity(response.headers.len());
    for header in response.headers.iter() {
        headers.push((
            range_in(buf, header.name.as_bytes()),
            range_in(buf, header.value),
        ));
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            for part in header.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                let n = decimal(part).ok_or(ResponseError::Framing)?;
                if length.is_some_and(|l| l != n) {
                    return Err(ResponseError::Framing);
                }
                length = Some(n);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let value = std::str::from_utf8(header.value).map_err(|_| ResponseError::Framing)?;
            for coding in value.split(',').map(str::trim) {
                // Only `chunked`, once, last: any other coding would have to be decoded here.
                if chunked || !coding.eq_ignore_ascii_case("chunked") {
                    coded = true;
                }
                chunked = true;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            close |= header
                .value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    if (100..200).contains(&status) {
        return Ok(Some(ResponseHead {
            status,
            len,
            headers,
            framing: Framing::Empty,
            close,
        }));
    }
    if coded || (chunked && length.is_some()) {
        return Err(ResponseError::Framing);
    }
    let framing = if head_request || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(length) = length {
        Framing::Length(length)
    } else {
        close = true;
        Framing::UntilClose
    };
    Ok(Some(ResponseHead {
        status,
        len,
        headers,
        framing,
        close,
    }))
}

/// Where a chunked body (RFC 9112 §7.1) ends, found while its bytes pass through unchanged.
#[derive(Debug, Default)]
pub struct Chunks {
    state: ChunkState,
    /// Bytes of the line being read (size line or trailer line).
    line: usize,
    size: u64,
    digits: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// In a chunk extension, up to the line's end.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (an empty one ends the body).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// The longest chunk-size line or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4096;

impl Chunks {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Takes in `bytes`; returns how many belong to the body (all of them, unless the body ended
    /// before their end).
    pub fn advance(&mut self, bytes: &[u8]) -> Result<usize, ResponseError> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.state {
                Done => return Ok(i),
                Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = (b as char).to_digit(16).expect("a hex digit") as u64;
                        self.digits += 1;
                        // 16 hex digits hold any u64; a longer size is not one anybody sends.
                        if self.digits > 15 {
                            return Err(ResponseError::Chunked);
                        }
                        self.size = self.size * 16 + digit;
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => self.state = Extension,
                    b'\r' if self.digits > 0 => self.state = SizeLf,
                    _ => return Err(ResponseError::Chunked),
                },
                Extension => match b {
                    b'\r' => self.state = SizeLf,
                    b'\n' => return Err(ResponseError::Chunked),
                    _ => {
                        self.line += 1;
                        if self.line > MAX_CHUNK_LINE {
                            return Err(ResponseError::Chunked);
                        }
                    }
                },
                SizeLf => {
                    if b != b'\n' {
                        return Err(ResponseError::Chunked);
                    }
                    self.line = 0;
                    self.digits = 0;
                    self.state = if self.size == 0 { TrailerStart } else { Data };
                }
                Data => {
                    let take = (self.size).min((bytes.len() - i) as u64) as usize;
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => {
                    if b != b'\r' {
                        return Err(ResponseError::Chunked);
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        return Err(ResponseError::Chunked);
                    }
                    self.state = Size;
                }
                TrailerStart => match b {
                    b'\r' => self.state = EndLf,
                    b'\n' => return Err(ResponseError::Chunked),
                    _ => {
                        self.line = 1;
                        self.state = Trailer;
                    }
                },
                Trailer => match b {
                    b'\r' => self.state = TrailerLf,
                    b'\n' => return Err(ResponseError::Chunked),
                    _ => {
                        self.line += 1;
                        if self.line > MAX_CHUNK_LINE {
                            return Err(ResponseError::Chunked);
                        }
                    }
                },
                TrailerLf => {
                    if b != b'\n' {
                        return Err(ResponseError::Chunked);
                    }
                    self.state = TrailerStart;
                }
                EndLf => {
                    if b != b'\n' {
                        return Err(ResponseError::Chunked);
                    }
                    self.state = Done;
                    return Ok(i + 1);
                }
            }
            i += 1;
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn head(text: &str) -> Result<Option<ResponseHead>, ResponseError> {
        parse_response(text.as_bytes(), false)
    }

    #[test]
    fn framing_follows_the_rules_and_refuses_ambiguity() {
        let framing = |text: &str| head(text).map(|h| h.unwrap().framing);
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Ok(Framing::Chunked)
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), Ok(Framing::UntilClose));
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
            Ok(Framing::Empty)
        );
        assert_eq!(
            framing("HTTP/1.1 304 Not Modified\r\n\r\n"),
            Ok(Framing::Empty)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true)
                .map(|h| h.unwrap().framing),
            Ok(Framing::Empty),
            "a HEAD response has no body"
        );
        for ambiguous in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5,\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551616\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
        ] {
            assert_eq!(
                head(ambiguous).map(drop),
                Err(ResponseError::Framing),
                "{ambiguous}"
            );
        }
        assert_eq!(
            head("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n").map(drop),
            Err(ResponseError::Upgrade)
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Le").map(|h| h.is_none()),
            Ok(true)
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nBad Header\r\n\r\n").map(drop),
            Err(ResponseError::Malformed)
        );
    }

    #[test]
    fn close_is_read_from_connection_and_http_1_0() {
        let close = |text: &str| head(text).unwrap().unwrap().close;
        assert!(close(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(close(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(close("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!close("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
    }

    #[test]
    fn interim_responses_are_reported_for_skipping() {
        let interim = head("HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(interim.status, 103);
        assert_eq!(
            interim.len,
            "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n".len()
        );
    }

    fn chunked_body(chunks: &[Vec<u8>], trailers: &[&str]) -> Vec<u8> {
        let mut body = Vec::new();
        for chunk in chunks.iter().filter(|c| !c.is_empty()) {
            body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            body.extend_from_slice(chunk);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n");
        for trailer in trailers {
            body.extend_from_slice(trailer.as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"\r\n");
        body
    }

    proptest! {
        /// However the bytes are split across reads, the end of a chunked body is found exactly,
        /// and whatever follows it is not counted as body.
        #[test]
        fn a_chunked_body_ends_where_it_ends(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..6),
            cuts in prop::collection::vec(1usize..50, 0..40),
            with_trailer in any::<bool>(),
        ) {
            let trailers: &[&str] = if with_trailer { &["x-checksum: abc"] } else { &[] };
            let body = chunked_body(&chunks, trailers);
            let mut stream = body.clone();
            stream.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            let mut state = Chunks::default();
            let (mut at, mut cuts) = (0, cuts.into_iter().cycle());
            loop {
                let end = (at + cuts.next().unwrap_or(stream.len())).min(stream.len());
                let slice = &stream[at..end];
                let taken = state.advance(slice).unwrap();
                at += taken;
                if state.is_done() {
                    break;
                }
                prop_assert_eq!(taken, slice.len(), "not done: everything is body");
                prop_assert!(at < stream.len(), "the body ends before the stream");
            }
            prop_assert_eq!(at, body.len());
        }

        /// Arbitrary bytes never panic the framing, and never end a body early unless they form one.
        #[test]
        fn arbitrary_bytes_are_framed_or_refused(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut chunks = Chunks::default();
            let _ = chunks.advance(&bytes);
        }
    }

    #[test]
    fn malformed_chunk_framing_is_refused() {
        for bad in [
            &b"g\r\n"[..],
            b"\r\n",
            b"5\n",
            b"5\r\nabcde\n",
            b"5\r\nabcdeX",
            b"1234567890abcdef0\r\n",
            b"0\r\nx-trailer: 1\n",
        ] {
            assert_eq!(
                Chunks::default().advance(bad),
                Err(ResponseError::Chunked),
                "{bad:?}"
            );
        }
        let mut ok = Chunks::default();
        assert_eq!(ok.advance(b"3;name=value\r\nabc\r\n0\r\n\r\nextra"), Ok(24));
        assert!(ok.is_done());
    }
}
