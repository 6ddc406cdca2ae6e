//! Rate limits (`[limits]`): requests per client IP to wxgate's own endpoints, which turn into WeChat
//! calls and database writes, and optionally requests per user to the proxied routes. GCRA from the
//! `governor` crate, one state per key; idle keys are pruned every minute so memory follows the
//! active clients, not every client ever seen.
//!
//! With Redis ([`RateLimits::shared`]) the counters are shared by every instance: the same GCRA runs
//! as a Lua script on `wxgate:rl:{a|u}:{key}`, on Redis's clock, so a client spread over instances
//! gets the configured rate in all, not once per instance. If Redis fails, each instance falls back
//! to its own counters rather than refuse or wave everything through.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::{LimitsConfig, Rate};

/// The configured rate limits; `None` where a limit is off.
pub struct RateLimits {
    auth: Option<Limit<IpAddr>>,
    user: Option<Limit<String>>,
    shared: Option<Shared>,
}

/// One limit: its rate, and this instance's counters (all of them without Redis, the fallback with).
struct Limit<K: std::hash::Hash + Eq + Clone> {
    rate: Rate,
    local: DefaultKeyedRateLimiter<K>,
}

struct Shared {
    redis: crate::shared::SharedRedis,
    gcra: redis::Script,
    /// Set while Redis fails, so the fallback is logged once per outage, not per request.
    failing: AtomicBool,
}

/// GCRA over Redis. KEYS[1]: the key's theoretical arrival time (ms). ARGV: emission interval (ms),
/// burst. Returns 0 when the request may pass, else the milliseconds until it may.
const GCRA: &str = r#"
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local next_tat = tat + interval
local over = next_tat - now - interval * tonumber(ARGV[2])
if over > 0 then return over end
redis.call('SET', KEYS[1], next_tat, 'PX', next_tat - now)
return 0
"#;

/// Whole seconds to wait, rounded up, at least 1.
fn seconds(wait: std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

fn limit<K: std::hash::Hash + Eq + Clone>(rate: Rate) -> Limit<K> {
    Limit {
        rate,
        local: RateLimiter::keyed(Quota::per_minute(rate.per_minute).allow_burst(rate.burst)),
    }
}

/// Whole seconds until `limiter` lets `key` through again (at least 1), or `Ok` now.
fn check<K: std::hash::Hash + Eq + Clone>(
    limiter: &DefaultKeyedRateLimiter<K>,
    key: &K,
) -> Result<(), u64> {
    limiter
        .check_key(key)
        .map_err(|not_until| seconds(not_until.wait_time_from(limiter.clock().now())))
}

impl RateLimits {
    pub fn new(config: &LimitsConfig) -> Self {
        RateLimits {
            auth: config.auth.map(limit),
            user: config.user.map(limit),
            shared: None,
        }
    }

    /// Counters shared by every instance through Redis.
    pub fn shared(mut self, redis: crate::shared::SharedRedis) -> Self {
        self.shared = Some(Shared {
            redis,
            gcra: redis::Script::new(GCRA),
            failing: AtomicBool::new(false),
        });
        self
    }

    /// Asks Redis for `key` at `rate`; `None` if Redis failed (the caller falls back).
    async fn check_shared(&self, key: String, rate: Rate) -> Option<Result<(), u64>> {
        let shared = self.shared.as_ref()?;
        let interval_ms = (60_000 / u64::from(rate.per_minute.get())).max(1);
        let result: Result<u64, _> = shared
            .gcra
            .key(key)
            .arg(interval_ms)
            .arg(rate.burst.get())
            .invoke_async(&mut shared.redis.conn())
            .await;
        match result {
            Ok(wait_ms) => {
                if shared.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("rate limits: shared counters in Redis are back");
                }
                Some(match wait_ms {
                    0 => Ok(()),
                    ms => Err(seconds(std::time::Duration::from_millis(ms))),
                })
            }
            Err(e) => {
                if !shared.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = ?e.kind(), "rate limits: Redis failed; counting per instance until it is back");
                }
                None
            }
        }
    }

    /// `key` under `limit`: shared through Redis when it answers, else this instance's counters.
    async fn decide<K: std::hash::Hash + Eq + Clone>(
        &self,
        limit: Option<&Limit<K>>,
        key: &K,
        shared_key: impl FnOnce() -> String,
    ) -> Result<(), u64> {
        let Some(limit) = limit else {
            return Ok(());
        };
        // Boxed: the Redis call's state would otherwise sit inside every request's future, used or not.
        if self.shared.is_some()
            && let Some(decision) = Box::pin(self.check_shared(shared_key(), limit.rate)).await
        {
            return decision;
        }
        check(&limit.local, key)
    }

    /// A request from `ip` to `/auth/*`: `Err(seconds)` to wait when over the limit.
    pub async fn check_auth(&self, ip: IpAddr) -> Result<(), u64> {
        self.decide(self.auth.as_ref(), &ip, || format!("wxgate:rl:a:{ip}"))
            .await
    }

    /// A proxied request of `user_id`: `Err(seconds)` to wait when over the limit.
    pub async fn check_user(&self, user_id: &str) -> Result<(), u64> {
        if self.user.is_none() {
            return Ok(());
        }
        self.decide(self.user.as_ref(), &user_id.to_owned(), || {
            format!("wxgate:rl:u:{user_id}")
        })
        .await
    }

    /// Forgets keys whose state is back to a full allowance.
    pub fn prune(&self) {
        if let Some(l) = &self.auth {
            l.local.retain_recent();
            l.local.shrink_to_fit();
        }
        if let Some(l) = &self.user {
            l.local.retain_recent();
            l.local.shrink_to_fit();
        }
    }

    /// Keys tracked now (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.auth.as_ref().map_or(0, |l| l.local.len())
            + self.user.as_ref().map_or(0, |l| l.local.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn limits(per_minute: u32, burst: u32) -> RateLimits {
        let rate = Rate {
            per_minute: NonZeroU32::new(per_minute).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        };
        RateLimits {
            auth: Some(limit(rate)),
            user: Some(limit(rate)),
            shared: None,
        }
    }

    #[tokio::test]
    async fn a_burst_passes_then_the_rate_applies_per_key() {
        let limits = limits(60, 3);
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(limits.check_auth(ip).await, Ok(()));
        }
        // One request a second refills: the next is due within a second.
        assert_eq!(limits.check_auth(ip).await, Err(1));
        let other: IpAddr = "203.0.113.8".parse().unwrap();
        assert_eq!(
            limits.check_auth(other).await,
            Ok(()),
            "keys are independent"
        );
        let user = "u_1".to_owned();
        assert_eq!(limits.check_user(&user).await, Ok(()));
        assert_eq!(limits.tracked(), 3);
    }

    #[tokio::test]
    async fn retry_after_is_whole_seconds_rounded_up() {
        let limits = limits(2, 1);
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(limits.check_auth(ip).await, Ok(()));
        let wait = limits.check_auth(ip).await.unwrap_err();
        assert!((29..=30).contains(&wait), "{wait}");
    }
}
