//! What wxgate spends per authenticated request, piece by piece: access-token verification, the
//! session lookup, header hygiene on a realistic request, minting a token at login, and decrypting
//! user info (open data) at `/auth/userinfo`.
//!
//!     cargo bench --bench request_path

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use wxgate::auth::Identity;
use wxgate::config::{Config, Secret};
use wxgate::proxy::headers::{ClientInfo, HeadLines, HeaderRules, Survey};
use wxgate::session::memory::MemoryStore;
use wxgate::session::token::{SessionId, Tokens, new_refresh_token};
use wxgate::session::{Session, SessionApp, SessionIds, SessionStore};
use wxgate::wechat::crypto::{check_watermark, decrypt_json};

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn tokens(c: &mut Criterion) {
    let tokens = Tokens::new(
        &Secret::new("bench-signing-key-0123456789abcdef-0123456789"),
        7200,
    );
    let sid = SessionId::random();
    let token = tokens.mint_access(sid, "u_01a1fd2d13df70639aac598c73b87b6a", now());
    c.bench_function("access token: verify", |b| {
        b.iter(|| {
            tokens
                .verify_access(black_box(&token), black_box(now()))
                .unwrap()
        })
    });
    c.bench_function("access token: mint", |b| {
        b.iter(|| {
            tokens.mint_access(
                black_box(sid),
                black_box("u_01a1fd2d13df70639aac598c73b87b6a"),
                now(),
            )
        })
    });
}

fn sessions(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = Arc::new(MemoryStore::new(1_000_000));
    let app = SessionApp::new("shop", "wx0123456789abcdef");
    let mut sids = Vec::new();
    runtime.block_on(async {
        for i in 0..100_000 {
            let sid = SessionId::random();
            let (_, refresh) = new_refresh_token(sid);
            let user_id = format!("u_{i:032}");
            let ids = SessionIds {
                user_id: &user_id,
                openid: "oVBkZ0aYgDMDIywRdgPW8-joxXc4",
                unionid: Some("ocMvos6NjeKLIBqg5Mr9QjxrP1FA"),
                phone: None,
            };
            let session = Session::new(sid, app.clone(), ids, 0, u64::MAX, refresh).unwrap();
            store.insert(session, None).await.unwrap();
            sids.push(sid);
        }
    });
    let hit = sids[sids.len() / 2];
    let miss = SessionId::random();
    c.bench_function("session lookup: hit (100k sessions)", |b| {
        b.to_async(&runtime)
            .iter(|| async { store.get(black_box(&hit), 1).await.unwrap().unwrap() })
    });
    c.bench_function("session lookup: miss", |b| {
        b.to_async(&runtime)
            .iter(|| async { store.get(black_box(&miss), 1).await.unwrap() })
    });
}

fn headers(c: &mut Criterion) {
    let config = Config::parse(
        "bench.toml",
        "[upstream]\nurl = \"http://127.0.0.1:3000\"\n",
        &|_| None,
    )
    .unwrap();
    let rules = HeaderRules::from_config(&config);
    let mut request = HeaderMap::new();
    for (name, value) in [
        ("host", "api.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) MicroMessenger/8.0.40",
        ),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "zh-CN,zh;q=0.9"),
        (
            "authorization",
            "Bearer eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1XzEifQ.sig",
        ),
        ("content-type", "application/json"),
        ("content-length", "42"),
        (
            "referer",
            "https://servicewechat.com/wx0123456789abcdef/12/page-frame.html",
        ),
        ("connection", "keep-alive"),
        ("x-request-id", "0d0c4a5e-3f7a-4f5b-9d9b-6d2f7c1e8a11"),
        ("x-user-id", "forged"),
        ("x_wechat_openid", "forged"),
        ("x-forwarded-for", "1.2.3.4"),
        ("cookie", "a=b; c=d"),
        ("cache-control", "no-cache"),
        ("pragma", "no-cache"),
        ("origin", "https://servicewechat.com"),
        ("sec-fetch-mode", "cors"),
        ("x-app-version", "3.2.1"),
    ] {
        request.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    let identity = Identity::new(
        "wx0123456789abcdef",
        SessionIds {
            user_id: "u_01a1fd2d13df70639aac598c73b87b6a",
            openid: "oVBkZ0aYgDMDIywRdgPW8-joxXc4",
            unionid: Some("ocMvos6NjeKLIBqg5Mr9QjxrP1FA"),
            phone: None,
        },
    )
    .unwrap();
    let client = ClientInfo::new("203.0.113.9".parse().unwrap(), "http");
    c.bench_function("headers: strip and inject, 20-header request", |b| {
        b.iter_batched_ref(
            || request.clone(),
            |headers| {
                rules
                    .prepare_request(headers, Some(&identity), &client)
                    .unwrap()
            },
            criterion::BatchSize::SmallInput,
        )
    });
    // The fast lane (ordinary HTTP/1.1 requests): the same rules, from the head as it arrived
    // straight into the text sent to the backend; no header map is built. The head is the same 20
    // headers as a client sends them, with where each name and value is (what the lane's parse
    // finds).
    let mut head = b"GET /api/orders HTTP/1.1\r\n".to_vec();
    let mut spans = Vec::new();
    for (name, value) in &request {
        let at = |head: &Vec<u8>| head.len() as u32;
        let name_start = at(&head);
        head.extend_from_slice(name.as_str().as_bytes());
        let name_end = at(&head);
        head.extend_from_slice(b": ");
        let value_start = at(&head);
        head.extend_from_slice(value.as_bytes());
        spans.push(((name_start, name_end), (value_start, at(&head))));
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let lines = HeadLines {
        text: &head,
        spans: &spans,
    };
    // The headers the lane's parse finds named Connection, Authorization and Cookie: the only
    // ones it surveys, each by its role.
    let role = |wanted: &[u8]| -> Vec<usize> {
        (0..spans.len())
            .filter(|&i| lines.get(i).0.eq_ignore_ascii_case(wanted))
            .collect()
    };
    let (connection, authorization, cookie) =
        (role(b"connection"), role(b"authorization"), role(b"cookie"));
    assert_eq!(
        (connection.len(), authorization.len(), cookie.len()),
        (1, 1, 1)
    );
    let mut out = Vec::with_capacity(2048);
    c.bench_function(
        "headers: fast lane, survey and write, 20-header request",
        |b| {
            b.iter(|| {
                out.clear();
                let lines = black_box(lines);
                let mut survey = Survey::new();
                for &i in &connection {
                    survey.connection(lines.get(i).1);
                }
                for &i in &authorization {
                    survey.authorization(lines.get(i).1);
                }
                for &i in &cookie {
                    survey.cookie(lines.get(i).1);
                }
                rules
                    .write_request_headers(&mut out, lines, &survey, Some(&identity), &client, None)
                    .unwrap();
                black_box(out.len())
            })
        },
    );
}

/// WeChat's own open-data test vector (wechat-protocol.md): base64, AES-128-CBC, PKCS#7 and the
/// JSON parse, then the watermark check, as `/auth/userinfo` does.
fn user_info(c: &mut Criterion) {
    const SESSION_KEY: &str = "tiihtNczf5v6AKRyjwEUhQ==";
    const IV: &str = "r7BXXKkLb8qrSNn05n0qiA==";
    const ENCRYPTED: &str = "CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS9uT5geRa0W4oTOb1WT7fJlAC+oNPdbB+3hVbJSRgv+4lGOETKUQz6OYStslQ142dNCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1poOFtnEtpyxVLW1zAo6/1Xx1COxFvrc2d7UL/lmHInNlxuacJXwu0fjpXfz/YqYzBIBzD6WUfTIF9GRHpOn/Hz7saL8xz+W//FRAUid1OksQaQx4CMs8LOddcQhULW4ucetDf96JcR3g0gfRK4PC7E/r7Z6xNrXd2UIeorGj5Ef7b1pJAYB6Y5anaHqZ9J6nKEBvB4DnNLIVWSgARns/8wR2SiRS7MNACwTyrGvt9ts8p12PKFdlqYTopNHR1Vf7XjfhQlVsAJdNiKdYmYVoKlaRv85IfVunYzO0IKXsyl7JCUjCpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuyDb/XcxxmK01EpqOyuxINew==";
    let decrypted = decrypt_json(SESSION_KEY, IV, ENCRYPTED).unwrap();
    assert_eq!(decrypted["openId"], "oGZUI0egBJY1zhBYw2KhdUfwVJJE");
    c.bench_function("user info: decrypt and parse (official vector)", |b| {
        b.iter(|| {
            let value =
                decrypt_json(black_box(SESSION_KEY), black_box(IV), black_box(ENCRYPTED)).unwrap();
            // "Now" is a minute after the vector was made.
            let fresh = check_watermark(&value, "wx4f4bc4dec97d474b", 1_477_314_247, 300);
            assert!(fresh.is_ok());
            black_box(value)
        })
    });
}

criterion_group!(benches, tokens, sessions, headers, user_info);
criterion_main!(benches);
