//! `POST /auth/login`: a `wx.login()` code becomes a user and a token pair.
//!
//! One code, one exchange: WeChat codes are single use, and clients retry, double-submit and race. The
//! first post of a code asks WeChat; every other post of the same code while it could still be alive
//! (5 minutes) — concurrent or later — gets that same answer, success or error, without a second call.
//! A code is never sent to WeChat again after WeChat answered.

use std::hash::RandomState;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hashlink::LinkedHashMap;
use http::Response;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::open_data;
use super::service::{App, AuthService, LOGIN_EXPECTED, LoginRequest, NewSession};
use crate::body::Body;
use crate::config::Secret;
use crate::error::Error;
use crate::identity::LoginIds;
use crate::shared::SharedRedis;
use crate::wechat::client::{CodeSession, OauthGrant, WechatError};

/// How long an exchange's answer is kept: the life of a `wx.login()` code.
pub const CODE_LIFETIME: Duration = Duration::from_secs(5 * 60);

/// How many codes one instance guards at once: 316 bytes each with its answer, 63 MB in all
/// (`cargo bench --bench sessions_memory`). Past this, the codes first presented longest ago lose
/// their retry protection first (the newest are the ones a client may still retry).
pub const GUARDED_CODES: usize = 200_000;

type Answer<T> = Result<T, WechatError>;

/// WeChat's answers per single-use code (a `wx.login()` code, an OAuth code), kept for the code's
/// life and keyed by a hash of (appid, code) so no code is kept in memory. With Redis
/// ([`CodeExchanges::shared`]) the guard spans every instance: a retry that lands on another instance
/// gets the same answer, and the code still goes to WeChat once.
pub struct CodeExchanges<T> {
    /// Codes in the order they were first presented. Every code is kept for the same lifetime, so
    /// the oldest is always the next to expire: expiry only ever looks at the front.
    exchanges: Mutex<LinkedHashMap<[u8; 32], Exchange<T>, RandomState>>,
    lifetime: Duration,
    capacity: usize,
    shared: Option<SharedExchanges>,
}

/// One code's exchange: empty while WeChat is being asked, then WeChat's answer.
struct Exchange<T> {
    first_presented: Instant,
    answer: Arc<OnceCell<Answer<T>>>,
}

struct SharedExchanges {
    redis: SharedRedis,
    /// How long an instance waits for another one's exchange of the same code.
    wait: Duration,
}

/// The marker an instance leaves on a code it is exchanging.
const PENDING: &str = "pending";
/// How often an instance looks for the answer to a code another one is exchanging.
const POLL: Duration = Duration::from_millis(20);

/// An answer that can travel between instances through Redis. The secrets in it (a session_key, an
/// OAuth user access token) are written out on purpose: Redis keeps them for the code's life, no
/// longer, so that a retry on another instance can be served.
pub trait Shareable: Sized {
    fn share(&self) -> serde_json::Value;
    fn unshare(value: &serde_json::Value) -> Option<Self>;
}

impl Shareable for CodeSession {
    fn share(&self) -> serde_json::Value {
        serde_json::json!({
            "openid": self.openid,
            "session_key": self.session_key.expose(),
            "unionid": self.unionid,
        })
    }

    fn unshare(value: &serde_json::Value) -> Option<Self> {
        Some(CodeSession {
            openid: value["openid"].as_str()?.to_owned(),
            session_key: Secret::new(value["session_key"].as_str()?),
            unionid: value["unionid"].as_str().map(str::to_owned),
        })
    }
}

impl Shareable for OauthGrant {
    fn share(&self) -> serde_json::Value {
        serde_json::json!({
            "openid": self.openid,
            "unionid": self.unionid,
            "scope": self.scope,
            "snapshot_user": self.snapshot_user,
            "access_token": self.access_token.expose(),
        })
    }

    fn unshare(value: &serde_json::Value) -> Option<Self> {
        Some(OauthGrant {
            openid: value["openid"].as_str()?.to_owned(),
            unionid: value["unionid"].as_str().map(str::to_owned),
            scope: value["scope"].as_str()?.to_owned(),
            snapshot_user: value["snapshot_user"].as_bool()?,
            access_token: Secret::new(value["access_token"].as_str()?),
        })
    }
}

fn encode<T: Shareable>(answer: &Result<T, WechatError>) -> String {
    match answer {
        Ok(value) => serde_json::json!({ "ok": value.share() }),
        Err(WechatError::Api { errcode }) => serde_json::json!({ "errcode": errcode }),
        Err(WechatError::Timeout) => serde_json::json!({ "timeout": true }),
        Err(WechatError::Unavailable(why)) => serde_json::json!({ "unavailable": why }),
    }
    .to_string()
}

fn decode<T: Shareable>(text: &str) -> Option<Result<T, WechatError>> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    if let Some(ok) = value.get("ok") {
        return T::unshare(ok).map(Ok);
    }
    if let Some(errcode) = value["errcode"].as_i64() {
        return Some(Err(WechatError::Api { errcode }));
    }
    if value["timeout"].as_bool() == Some(true) {
        return Some(Err(WechatError::Timeout));
    }
    let why = value["unavailable"].as_str()?;
    Some(Err(WechatError::Unavailable(why.to_owned())))
}

/// Redis failed: the code's fate cannot be known, so the login fails (503 `auth_unavailable`) and
/// nothing is cached.
fn shared_failure(e: redis::RedisError) -> String {
    format!("code exchanges in Redis: {:?}", e.kind())
}

impl SharedExchanges {
    /// WeChat's answer for the code under `key`: asked here if this instance is first to claim the
    /// code, else awaited from the instance that did.
    async fn exchange<T: Shareable>(
        &self,
        key: &[u8; 32],
        lifetime: Duration,
        ask: impl Future<Output = Result<T, WechatError>>,
    ) -> Result<Result<T, WechatError>, String> {
        let redis_key = format!("wxgate:code:{}", hex::encode(key));
        let mut redis = self.redis.conn();
        let claimed: Option<String> = redis::cmd("SET")
            .arg(&redis_key)
            .arg(PENDING)
            .arg("NX")
            .arg("PX")
            .arg(lifetime.as_millis() as u64)
            .query_async(&mut redis)
            .await
            .map_err(shared_failure)?;
        if claimed.is_some() {
            let answer = ask.await;
            redis::cmd("SET")
                .arg(&redis_key)
                .arg(encode(&answer))
                .arg("PX")
                .arg(lifetime.as_millis() as u64)
                .query_async::<()>(&mut redis)
                .await
                .map_err(shared_failure)?;
            return Ok(answer);
        }
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let found: Option<String> = redis::cmd("GET")
                .arg(&redis_key)
                .query_async(&mut redis)
                .await
                .map_err(shared_failure)?;
            match found.as_deref() {
                Some(PENDING) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(POLL).await;
                }
                Some(PENDING) | None => {
                    // The instance that claimed the code died mid-exchange (or its answer expired):
                    // WeChat may have used the code, so it is not sent again.
                    return Ok(Err(WechatError::Api { errcode: 40163 }));
                }
                Some(text) => {
                    return decode(text)
                        .ok_or_else(|| "a shared code exchange in Redis is malformed".to_owned());
                }
            }
        }
    }
}

impl<T: Shareable + Clone + Send + Sync + 'static> CodeExchanges<T> {
    /// Answers kept for `lifetime`, the longest the code could still be presented.
    pub fn new(lifetime: Duration) -> Self {
        Self::guarding(lifetime, GUARDED_CODES)
    }

    fn guarding(lifetime: Duration, capacity: usize) -> Self {
        CodeExchanges {
            exchanges: Mutex::new(LinkedHashMap::with_hasher(RandomState::new())),
            lifetime,
            capacity,
            shared: None,
        }
    }

    /// The guard across instances, through Redis; `wait` bounds how long an instance waits for the
    /// answer of another that is exchanging the same code (longer than one WeChat call).
    pub fn shared(mut self, redis: SharedRedis, wait: Duration) -> Self {
        self.shared = Some(SharedExchanges { redis, wait });
        self
    }

    /// WeChat's answer for `code` of `appid`: `ask` runs once, however many callers present the
    /// code at the same time or later, on this instance or (shared) any other. WeChat's errors are
    /// mapped to the client's (DESIGN.md's table); a Redis failure is 503 `auth_unavailable`.
    pub async fn exchange(
        &self,
        appid: &str,
        code: &str,
        ask: impl Future<Output = Answer<T>>,
    ) -> Result<T, Error> {
        let mut hasher = Sha256::new();
        hasher.update(appid.as_bytes());
        hasher.update([0]);
        hasher.update(code.as_bytes());
        let key: [u8; 32] = hasher.finalize().into();
        let answer = self.answer_for(key);
        // The first caller runs its `ask`; every other one waits for that answer. If the first is
        // dropped (its client went away), a waiting caller runs its own `ask` in its place, so a
        // code is never left waiting for an answer nobody is fetching. A Redis failure is not
        // kept: a retry asks again. The waits are boxed: holding a WeChat call, they are large, and
        // built once on the heap they are not copied along with every future that awaits a login.
        let answer = match &self.shared {
            None => Ok(Box::pin(answer.get_or_init(|| ask)).await),
            Some(shared) => {
                let ask = || shared.exchange(&key, self.lifetime, ask);
                Box::pin(answer.get_or_try_init(ask)).await
            }
        };
        match answer {
            Ok(answer) => answer.clone().map_err(login_error),
            Err(failure) => Err(Error::AuthUnavailable(failure.into())),
        }
    }

    /// The exchange of the code hashed to `key`: the one under way or done, or a new one. Forgets
    /// the codes whose lifetime is over, and the oldest code when the guard is full.
    fn answer_for(&self, key: [u8; 32]) -> Arc<OnceCell<Answer<T>>> {
        let mut exchanges = self
            .exchanges
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Read under the lock, so that the codes' times grow from the front to the back.
        let now = Instant::now();
        while let Some((_, oldest)) = exchanges.front() {
            if now.duration_since(oldest.first_presented) < self.lifetime {
                break;
            }
            exchanges.pop_front();
        }
        if let Some(exchange) = exchanges.get(&key) {
            return exchange.answer.clone();
        }
        if exchanges.len() >= self.capacity {
            exchanges.pop_front();
        }
        let answer = Arc::new(OnceCell::new());
        let exchange = Exchange {
            first_presented: now,
            answer: answer.clone(),
        };
        exchanges.insert(key, exchange);
        answer
    }

    #[cfg(test)]
    fn guarded(&self) -> usize {
        self.exchanges.lock().unwrap().len()
    }
}

/// Whether `code` could be a `wx.login()` code (WeChat's are 32 alphanumerics; allow some slack).
pub(super) fn looks_like_code(code: &str) -> bool {
    (1..=128).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Maps WeChat's answer to the client's error (DESIGN.md's table).
fn login_error(e: WechatError) -> Error {
    match e {
        WechatError::Api {
            errcode: 40029 | 42003,
        } => Error::InvalidCode,
        WechatError::Api { errcode: 40163 } => Error::CodeUsed,
        WechatError::Api { errcode: 40226 } => Error::LoginBlocked,
        WechatError::Api { errcode: 45011 } => Error::RateLimited,
        WechatError::Api {
            errcode: errcode @ (40013 | 40125 | 41002 | 41004 | 41008 | 40002),
        } => {
            tracing::error!(
                errcode,
                "WeChat refused wxgate's own credentials: check apps[].appid and apps[].secret"
            );
            Error::WechatUnavailable(e)
        }
        other => Error::WechatUnavailable(other),
    }
}

impl AuthService {
    pub(super) async fn login(
        &self,
        request: LoginRequest,
        now: u64,
    ) -> Result<Response<Body>, Error> {
        let app = self.mini_program(request.app.as_deref())?;
        let result = self.login_to(app, request, now).await;
        self.count_login(app, &result);
        result
    }

    async fn login_to(
        &self,
        app: &App,
        request: LoginRequest,
        now: u64,
    ) -> Result<Response<Body>, Error> {
        let code = request.code.ok_or(Error::BadRequest(LOGIN_EXPECTED))?;
        if !looks_like_code(&code) {
            return Err(Error::InvalidCode);
        }
        let appid = app.config.appid.as_str();
        // Boxed where it is made: the call holds the WeChat exchange's buffers and state, over a
        // kilobyte, and unboxed it was copied at every layer of futures it was handed through
        // (ten copies a login, by callgrind).
        let ask = Box::pin(self.wechat.jscode2session(appid, &app.config.secret, &code));
        let exchanged = self.exchanges.exchange(appid, &code, ask).await?;
        // User info sent with the code comes from the same wx.login() round: this exchange's
        // session_key is the one it was encrypted with.
        let opened = match request.open_data.is_present() {
            true => Some(request.open_data.open(
                std::slice::from_ref(&exchanged.session_key),
                appid,
                &exchanged.openid,
                now,
                self.watermark_max_age,
            )?),
            false => None,
        };
        let unionid = exchanged.unionid.clone().or_else(|| {
            opened
                .as_ref()
                .and_then(open_data::unionid)
                .map(str::to_owned)
        });
        let resolved = self
            .resolve_identity(LoginIds {
                appid,
                openid: &exchanged.openid,
                unionid: unionid.as_deref(),
            })
            .await?;
        tracing::info!(app = %app.name, user_id = %resolved.user_id, new_user = resolved.created, "login");
        let new = NewSession {
            user_id: resolved.user_id,
            openid: exchanged.openid,
            unionid,
            phone: resolved.phone,
            profile: opened.as_ref().map(open_data::profile),
        };
        self.start_session(app, new, Some(&exchanged.session_key), now)
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn session(openid: &str) -> CodeSession {
        CodeSession {
            openid: openid.to_owned(),
            session_key: Secret::new("tiihtNczf5v6AKRyjwEUhQ=="),
            unionid: None,
        }
    }

    /// A WeChat call that counts itself in `asks` and answers `answer` after `delay`.
    async fn wechat(
        asks: &AtomicUsize,
        answer: Answer<CodeSession>,
        delay: Duration,
    ) -> Answer<CodeSession> {
        asks.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
        answer
    }

    const CALL: Duration = Duration::from_millis(100);

    /// Posts `code` of app `appid` and returns the openid it was answered with; WeChat, if asked,
    /// names the person `openid` after [`CALL`].
    async fn post(
        guard: &CodeExchanges<CodeSession>,
        asks: &AtomicUsize,
        (appid, code): (&str, &str),
        openid: &str,
    ) -> String {
        let ask = wechat(asks, Ok(session(openid)), CALL);
        guard
            .exchange(appid, code, ask)
            .await
            .expect("an answer")
            .openid
    }

    fn asked(asks: &AtomicUsize) -> usize {
        asks.load(Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn a_code_posted_at_once_and_later_is_exchanged_once() {
        let guard = CodeExchanges::new(CODE_LIFETIME);
        let asks = AtomicUsize::new(0);
        let posts = (0..10).map(|i| {
            let (guard, asks, me) = (&guard, &asks, format!("o{i}"));
            async move { post(guard, asks, ("wxa", "c1"), &me).await }
        });
        let answers = futures_util::future::join_all(posts).await;
        assert_eq!(asked(&asks), 1);
        assert!(answers.iter().all(|o| o == "o0"), "{answers:?}");

        tokio::time::advance(CODE_LIFETIME - Duration::from_secs(1)).await;
        assert_eq!(post(&guard, &asks, ("wxa", "c1"), "x").await, "o0");
        assert_eq!(asked(&asks), 1);

        // The same code of another app is another code.
        assert_eq!(post(&guard, &asks, ("wxb", "c1"), "b").await, "b");
        assert_eq!(asked(&asks), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_code_keeps_its_refusal() {
        let guard = CodeExchanges::new(CODE_LIFETIME);
        let asks = AtomicUsize::new(0);
        for _ in 0..2 {
            let refused = Err(WechatError::Api { errcode: 40029 });
            let answer = guard
                .exchange("wxa", "c1", wechat(&asks, refused, CALL))
                .await;
            assert_eq!(answer.unwrap_err().code(), "invalid_code");
        }
        assert_eq!(asked(&asks), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_code_is_forgotten_when_its_lifetime_is_over() {
        let guard = CodeExchanges::new(CODE_LIFETIME);
        let asks = AtomicUsize::new(0);
        post(&guard, &asks, ("wxa", "c1"), "a").await;
        tokio::time::advance(CODE_LIFETIME).await;
        post(&guard, &asks, ("wxa", "c2"), "b").await;
        assert_eq!(guard.guarded(), 1, "c1's answer is no longer held");
        assert_eq!(post(&guard, &asks, ("wxa", "c1"), "c").await, "c");
        assert_eq!(asked(&asks), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn when_full_the_code_presented_first_loses_its_guard_first() {
        let guard = CodeExchanges::guarding(CODE_LIFETIME, 3);
        let asks = AtomicUsize::new(0);
        for code in ["c1", "c2", "c3", "c4"] {
            post(&guard, &asks, ("wxa", code), code).await;
        }
        assert_eq!(guard.guarded(), 3);
        for code in ["c2", "c3", "c4"] {
            assert_eq!(post(&guard, &asks, ("wxa", code), "x").await, code);
        }
        assert_eq!(asked(&asks), 4);
        assert_eq!(post(&guard, &asks, ("wxa", "c1"), "x").await, "x");
        assert_eq!(asked(&asks), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_exchange_hands_the_code_to_a_waiting_caller() {
        let guard = CodeExchanges::new(CODE_LIFETIME);
        let asks = AtomicUsize::new(0);
        let hour = Duration::from_secs(3600);
        // The first caller's client goes away (a timeout here) while WeChat is being asked.
        let first = tokio::time::timeout(
            CALL,
            guard.exchange("wxa", "c1", wechat(&asks, Ok(session("a")), hour)),
        );
        let second = async {
            tokio::time::sleep(CALL / 2).await;
            post(&guard, &asks, ("wxa", "c1"), "b").await
        };
        let (first, second) = tokio::join!(first, second);
        assert!(first.is_err(), "the first caller gave up");
        assert_eq!(second, "b");
        assert_eq!(post(&guard, &asks, ("wxa", "c1"), "c").await, "b");
        assert_eq!(asked(&asks), 2);
    }

    #[test]
    fn codes_are_plausible_before_wechat_is_asked() {
        assert!(looks_like_code("0a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P"));
        for bad in ["", " ", "a b", "code\n", &"x".repeat(129), "码"] {
            assert!(!looks_like_code(bad), "{bad:?}");
        }
    }

    #[test]
    fn wechat_errors_map_to_the_documented_codes() {
        let code = |errcode| login_error(WechatError::Api { errcode }).code();
        assert_eq!(code(40029), "invalid_code");
        assert_eq!(code(42003), "invalid_code");
        assert_eq!(code(40163), "code_used");
        assert_eq!(code(40226), "login_blocked");
        assert_eq!(code(45011), "rate_limited");
        assert_eq!(code(-1), "wechat_unavailable");
        assert_eq!(code(40125), "wechat_unavailable");
        assert_eq!(code(12345), "wechat_unavailable");
        assert_eq!(login_error(WechatError::Timeout).status(), 504);
        assert_eq!(login_error(WechatError::Api { errcode: -1 }).status(), 503);
        assert_eq!(
            login_error(WechatError::Unavailable("html".into())).status(),
            502
        );
    }
}
