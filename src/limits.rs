//! Rate limits (`[limits]`): requests per client IP to wxgate's own endpoints, which turn into WeChat
//! calls and database writes, and optionally requests per user to the proxied routes. GCRA from the
//! `governor` crate, one state per key; idle keys are pruned every minute so memory follows the
//! active clients, not every client ever seen.

use std::net::IpAddr;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::{LimitsConfig, Rate};

/// The configured rate limits; `None` where a limit is off.
pub struct RateLimits {
    auth: Option<DefaultKeyedRateLimiter<IpAddr>>,
    user: Option<DefaultKeyedRateLimiter<String>>,
}

fn limiter<K: std::hash::Hash + Eq + Clone>(rate: Rate) -> DefaultKeyedRateLimiter<K> {
    RateLimiter::keyed(Quota::per_minute(rate.per_minute).allow_burst(rate.burst))
}

/// Whole seconds until `limiter` lets `key` through again (at least 1), or `Ok` now.
fn check<K: std::hash::Hash + Eq + Clone>(
    limiter: &DefaultKeyedRateLimiter<K>,
    key: &K,
) -> Result<(), u64> {
    limiter.check_key(key).map_err(|not_until| {
        let wait = not_until.wait_time_from(limiter.clock().now());
        (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
    })
}

impl RateLimits {
    pub fn new(config: &LimitsConfig) -> Self {
        RateLimits {
            auth: config.auth.map(limiter),
            user: config.user.map(limiter),
        }
    }

    /// A request from `ip` to `/auth/*`: `Err(seconds)` to wait when over the limit.
    pub fn check_auth(&self, ip: IpAddr) -> Result<(), u64> {
        self.auth.as_ref().map_or(Ok(()), |l| check(l, &ip))
    }

    /// A proxied request of `user_id`: `Err(seconds)` to wait when over the limit.
    pub fn check_user(&self, user_id: &String) -> Result<(), u64> {
        self.user.as_ref().map_or(Ok(()), |l| check(l, user_id))
    }

    /// Forgets keys whose state is back to a full allowance.
    pub fn prune(&self) {
        if let Some(l) = &self.auth {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.user {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Keys tracked now (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.auth.as_ref().map_or(0, |l| l.len()) + self.user.as_ref().map_or(0, |l| l.len())
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
            auth: Some(limiter(rate)),
            user: Some(limiter(rate)),
        }
    }

    #[test]
    fn a_burst_passes_then_the_rate_applies_per_key() {
        let limits = limits(60, 3);
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(limits.check_auth(ip), Ok(()));
        }
        // One request a second refills: the next is due within a second.
        assert_eq!(limits.check_auth(ip), Err(1));
        let other: IpAddr = "203.0.113.8".parse().unwrap();
        assert_eq!(limits.check_auth(other), Ok(()), "keys are independent");
        let user = "u_1".to_owned();
        assert_eq!(limits.check_user(&user), Ok(()));
        assert_eq!(limits.tracked(), 3);
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        let limits = limits(2, 1);
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(limits.check_auth(ip), Ok(()));
        let wait = limits.check_auth(ip).unwrap_err();
        assert!((29..=30).contains(&wait), "{wait}");
    }
}
