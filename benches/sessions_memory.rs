//! What a live session costs in memory: the resident set of this process before and after one
//! million logins' worth of state in the in-memory store (a session each, and the session_key WeChat
//! issued for that person in that app), divided by the count. Measured as RSS, so allocator
//! overhead, table load factors and fragmentation are all in the number.
//!
//!     cargo bench --bench sessions_memory            # 1,000,000 sessions
//!     SESSIONS=100000 cargo bench --bench sessions_memory
//!
//! A third figure is the other state a login leaves: its code's answer, which the one-code-one-exchange
//! guard keeps for the code's life, in a table of the 200,000 codes posted most recently.
//!
//! Each session is of a different person with a realistic shape: an internal user_id
//! (`u_` + 32 hex), a 28-character openid and unionid, no phone number, never refreshed. A second
//! figure adds 16 refreshes to every session (the most used refresh tokens a session remembers).

use wxgate::auth::login::{CODE_LIFETIME, CodeExchanges, GUARDED_CODES};
use wxgate::config::Secret;
use wxgate::session::memory::MemoryStore;
use wxgate::session::token::{SessionId, new_refresh_token};
use wxgate::session::{REMEMBERED_REFRESH_TOKENS, Session, SessionApp, SessionIds, SessionStore};
use wxgate::wechat::client::CodeSession;

/// The allocator the binary uses (src/main.rs), so the bytes are the ones wxgate would use.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm's second field");
    pages * 4096
}

fn id28(prefix: char, i: usize) -> String {
    format!("{prefix}{i:0>27}")
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing: do the work only
    // when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let count: usize = std::env::var("SESSIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let app = SessionApp::new("shop", "wx0123456789abcdef");
    let key = Secret::new("tiihtNczf5v6AKRyjwEUhQ==");
    runtime.block_on(async {
        let store = MemoryStore::new(count as u64 * 2);
        // The list of ids is the benchmark's own memory: made (and resident) before the first
        // reading.
        let sids: Vec<SessionId> = (0..count).map(|_| SessionId::random()).collect();
        let before = rss_bytes();
        for (i, &sid) in sids.iter().enumerate() {
            let (_, refresh) = new_refresh_token(sid);
            let (openid, unionid, user_id) = (id28('o', i), id28('U', i), format!("u_{i:032x}"));
            let ids = SessionIds {
                user_id: &user_id,
                openid: &openid,
                unionid: Some(&unionid),
                phone: None,
            };
            let session =
                Session::new(sid, app.clone(), ids, 1_800_000_000, 1_900_000_000, refresh)
                    .expect("plausible ids");
            // As a login leaves it: the session, and the session_key WeChat issued for the person.
            store
                .insert(session, Some(&key))
                .await
                .expect("memory store");
        }
        let fresh = rss_bytes();
        println!(
            "{count} sessions, never refreshed: {} bytes per session (RSS {} MB → {} MB)",
            (fresh - before) / count as u64,
            before / 1_000_000,
            fresh / 1_000_000
        );
        let mut refreshes = 0u64;
        for sid in &sids {
            let mut current = store
                .get(sid, 1_800_000_000)
                .await
                .expect("memory store")
                .expect("live")
                .refresh;
            for _ in 0..REMEMBERED_REFRESH_TOKENS {
                let (_, next) = new_refresh_token(*sid);
                store
                    .rotate_refresh(sid, &current, next, 1_800_000_000, 1_900_000_000)
                    .await
                    .expect("memory store");
                current = next;
                refreshes += 1;
            }
        }
        let refreshed = rss_bytes();
        println!(
            "after {} refreshes each: {} bytes per session",
            refreshes / count as u64,
            (refreshed.max(fresh) - before) / count as u64
        );
        assert_eq!(
            store.count(),
            Some(count as u64),
            "every session is still there"
        );

        // A full guard: as many codes as it holds, each answered with a session_key for a person
        // with an openid and a unionid.
        let guard = CodeExchanges::new(CODE_LIFETIME);
        let codes: Vec<String> = (0..GUARDED_CODES).map(|i| format!("{i:032}")).collect();
        let before = rss_bytes();
        for (i, code) in codes.iter().enumerate() {
            let answer = CodeSession {
                openid: id28('o', i),
                session_key: key.clone(),
                unionid: Some(id28('U', i)),
            };
            guard
                .exchange(&app.appid, code, async { Ok(answer) })
                .await
                .expect("an answer");
        }
        let guarded = rss_bytes();
        println!(
            "{GUARDED_CODES} codes' answers in the exchange guard: {} bytes per code",
            (guarded - before) / GUARDED_CODES as u64
        );
    });
}
