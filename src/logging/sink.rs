//! Where log lines go: a buffer that a thread of its own writes out, many lines per write. A thread
//! that logs never writes to stderr itself, and no line is dropped.
//!
//! With the access log on, every request makes a line, so the way from a formatted line to stderr
//! is on the request path. `tracing-appender`'s non-blocking writer, used before, sent each line
//! through a channel and woke its thread for each one: under `wrk`, `strace -c -f` counted per
//! line a `write(2)`, a futex wake and a few `sched_yield`s, and the writing thread took 13% of
//! wxgate's CPU in a login run. Here a line is appended to a shared buffer under a mutex. The
//! writing thread is woken only when the buffer goes from empty to not empty; it then lingers
//! ([`LINGER`]) while more lines join, takes them all and writes them in one call. Under load that
//! is one wake-up and one write per linger, however many lines; at rest nothing runs.
//!
//! When the output is slower than the lines (a stalled pipe, a full disk behind it) and
//! [`BACKLOG`] bytes are waiting, a thread that logs waits for the writer: lines are never dropped,
//! and memory stays bounded (between bursts, at most 256 KB of buffers is kept). Dropping
//! the [`SinkGuard`] writes out everything waiting and ends the thread; a line logged after that is
//! lost.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer waits for more lines to join the first one. Lines reach stderr this much
/// later than they could; in exchange the thread wakes at most 500 times a second.
pub const LINGER: Duration = Duration::from_millis(2);
/// Bytes waiting that cut the linger short: no point waiting once a write would be this large.
const EARLY: usize = 64 * 1024;
/// Bytes waiting at which threads that log wait for the writer.
const BACKLOG: usize = 1024 * 1024;

/// The [`MakeWriter`] for `tracing-subscriber`: each event's line is appended whole, in one call.
#[derive(Clone)]
pub struct LogSink {
    shared: Arc<Shared>,
}

/// Ends the writing thread when dropped, after it has written every line waiting.
pub struct SinkGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// The writer waits here for a first line, or for its linger to end.
    lines: Condvar,
    /// Threads that log wait here while the backlog is full.
    room: Condvar,
    linger: Duration,
    early: usize,
    backlog: usize,
}

struct State {
    waiting: Vec<u8>,
    writer: Writer,
    /// Threads waiting for room.
    blocked: usize,
    closed: bool,
}

/// What the writing thread is doing, so that a thread that logs wakes it only when needed (a
/// notification is a system call even when nobody waits).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Writer {
    /// Waiting for a first line.
    Asleep,
    /// Has lines, waiting for more to join them.
    Lingering,
    /// Taking the lines or writing them; it looks for more before it sleeps.
    Busy,
}

impl LogSink {
    /// Starts the writing thread, named `thread_name`, writing to `out`.
    pub fn start<W: Write + Send + 'static>(
        out: W,
        thread_name: &str,
    ) -> io::Result<(LogSink, SinkGuard)> {
        LogSink::start_with(out, thread_name, LINGER, EARLY, BACKLOG)
    }

    fn start_with<W: Write + Send + 'static>(
        out: W,
        thread_name: &str,
        linger: Duration,
        early: usize,
        backlog: usize,
    ) -> io::Result<(LogSink, SinkGuard)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                waiting: Vec::new(),
                writer: Writer::Busy,
                blocked: 0,
                closed: false,
            }),
            lines: Condvar::new(),
            room: Condvar::new(),
            linger,
            early,
            backlog,
        });
        let thread = std::thread::Builder::new()
            .name(thread_name.to_owned())
            .spawn({
                let shared = shared.clone();
                move || shared.write_out(out)
            })?;
        let guard = SinkGuard {
            shared: shared.clone(),
            thread: Some(thread),
        };
        Ok((LogSink { shared }, guard))
    }

    fn append(&self, line: &[u8]) {
        let shared = &*self.shared;
        let mut state = shared.lock();
        while state.waiting.len() >= shared.backlog && !state.closed {
            state.blocked += 1;
            state = shared
                .room
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.blocked -= 1;
        }
        state.waiting.extend_from_slice(line);
        let wake = match state.writer {
            Writer::Asleep => true,
            Writer::Lingering => state.waiting.len() >= shared.early,
            Writer::Busy => false,
        };
        if wake {
            state.writer = Writer::Busy;
            drop(state);
            shared.lines.notify_one();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The writing thread.
    fn write_out<W: Write>(&self, mut out: W) {
        let mut batch = Vec::new();
        let mut state = self.lock();
        loop {
            if state.waiting.is_empty() {
                if state.closed {
                    break;
                }
                state.writer = Writer::Asleep;
                state = self
                    .lines
                    .wait_while(state, |s| s.waiting.is_empty() && !s.closed)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            if !state.closed && state.waiting.len() < self.early {
                state.writer = Writer::Lingering;
                state = self
                    .lines
                    .wait_timeout_while(state, self.linger, |s| {
                        s.writer == Writer::Lingering && !s.closed
                    })
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            state.writer = Writer::Busy;
            std::mem::swap(&mut state.waiting, &mut batch);
            let room = state.blocked > 0;
            drop(state);
            if room {
                self.room.notify_all();
            }
            // Nowhere to report a failed write to stderr; the lines are given up, not retried.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            if batch.capacity() > self.early * 2 {
                // A stall's backlog is not kept for good.
                batch = Vec::new();
            }
            state = self.lock();
        }
        drop(state);
        let _ = out.flush();
    }
}

impl Drop for SinkGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.lines.notify_one();
        self.shared.room.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl<'a> MakeWriter<'a> for LogSink {
    type Writer = &'a LogSink;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Write for &LogSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    /// An output that records each write, and can be held shut to stall the writer.
    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.writes.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Recorder {
        fn text(&self) -> String {
            String::from_utf8(self.writes.lock().unwrap().concat()).unwrap()
        }
        fn count(&self) -> usize {
            self.writes.lock().unwrap().len()
        }
    }

    /// A sink writing to a new recorder, with these limits.
    fn started(linger: Duration, early: usize, backlog: usize) -> (Recorder, LogSink, SinkGuard) {
        let out = Recorder::default();
        let (sink, guard) =
            LogSink::start_with(out.clone(), "test-log", linger, early, backlog).unwrap();
        (out, sink, guard)
    }

    fn log(sink: &LogSink, line: &str) {
        let mut writer = sink.make_writer();
        writer.write_all(line.as_bytes()).unwrap();
    }

    fn wait_for(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn every_line_from_every_thread_arrives_whole_and_in_order() {
        let out = Recorder::default();
        let (sink, guard) = LogSink::start(out.clone(), "test-log").unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        log(
                            &sink,
                            &format!("thread={t} line={i} {}\n", "x".repeat(i % 90)),
                        );
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(guard);
        let text = out.text();
        let mut next = [0usize; 4];
        for line in text.lines() {
            let mut parts = line.split(' ');
            let t: usize = parts.next().unwrap()["thread=".len()..].parse().unwrap();
            let i: usize = parts.next().unwrap()["line=".len()..].parse().unwrap();
            assert_eq!(i, next[t], "thread {t}'s lines out of order or missing");
            assert_eq!(
                parts.next().unwrap(),
                "x".repeat(i % 90),
                "a line was cut or mixed"
            );
            next[t] += 1;
        }
        assert_eq!(next, [5_000; 4]);
    }

    #[test]
    fn lines_logged_together_leave_in_one_write() {
        let (out, sink, guard) = started(Duration::from_millis(300), EARLY, BACKLOG);
        for i in 0..200 {
            log(&sink, &format!("line {i}\n"));
        }
        wait_for("the lines", Duration::from_secs(10), || {
            out.text().lines().count() == 200
        });
        assert_eq!(
            out.count(),
            1,
            "200 lines in one linger took more than one write"
        );
        drop(guard);
    }

    #[test]
    fn a_lone_line_is_written_after_the_linger_without_waiting_for_more() {
        let out = Recorder::default();
        let (sink, _guard) = LogSink::start(out.clone(), "test-log").unwrap();
        log(&sink, "first\n");
        wait_for("the first line", Duration::from_secs(10), || {
            out.text() == "first\n"
        });
        // The writer went back to sleep; the next line wakes it again.
        std::thread::sleep(LINGER * 5);
        log(&sink, "second\n");
        wait_for("the second line", Duration::from_secs(10), || {
            out.text() == "first\nsecond\n"
        });
    }

    #[test]
    fn a_full_batch_is_written_without_waiting_out_the_linger() {
        let (out, sink, _guard) = started(Duration::from_secs(3600), 1000, BACKLOG);
        log(&sink, "small\n");
        wait_for("the writer to linger", Duration::from_secs(10), || {
            sink.shared.lock().writer == Writer::Lingering
        });
        log(&sink, &format!("{}\n", "y".repeat(1000)));
        wait_for("the batch", Duration::from_secs(10), || {
            out.text().len() == 1007
        });
    }

    #[test]
    fn dropping_the_guard_writes_what_is_lingering() {
        let (out, sink, guard) = started(Duration::from_secs(3600), EARLY, BACKLOG);
        log(&sink, "last words\n");
        drop(guard);
        assert_eq!(out.text(), "last words\n");
    }

    #[test]
    fn a_stalled_output_holds_back_threads_that_log_and_loses_nothing() {
        let (out, sink, guard) = started(Duration::from_millis(1), 100, 1000);
        let stalled = out.gate.lock().unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        let logger = std::thread::spawn({
            let sink = sink.clone();
            move || {
                for i in 0..100 {
                    log(&sink, &format!("{i:099}\n"));
                }
                done_tx.send(()).unwrap();
            }
        });
        // The writer holds one batch at the gate; the backlog fills behind it and the logger waits.
        assert!(
            done_rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "10,000 bytes were taken while the output was stalled with a 1,000-byte backlog"
        );
        let held = sink.shared.lock().waiting.len();
        assert!((1000..1100).contains(&held), "{held} bytes waiting");
        drop(stalled);
        done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        logger.join().unwrap();
        drop(guard);
        let text = out.text();
        assert_eq!(text.lines().count(), 100);
        for (i, line) in text.lines().enumerate() {
            assert_eq!(line, format!("{i:099}"));
        }
    }
}
