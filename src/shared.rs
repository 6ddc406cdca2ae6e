//! How instances reach the Redis they share: one address (`redis://`, `rediss://`, `redis+unix://`),
//! or the primary that Redis Sentinel names (`redis+sentinel://`), followed across failovers.
//!
//! Everything that lives in Redis (sessions, code exchanges, OAuth states, rate limits, the
//! access_token) asks [`SharedRedis::conn`] for the connection at each use, so after a failover the
//! next command goes to the new primary.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};

use crate::session::StoreError;

/// How long one Redis command may take before the request fails with 503. Redis answers in well
/// under a millisecond; waiting longer only holds requests.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often an instance asks Sentinel where the primary is.
pub const SENTINEL_POLL: Duration = Duration::from_millis(500);

/// A handle on the shared Redis; cheap to clone.
#[derive(Clone)]
pub struct SharedRedis(Arc<Inner>);

struct Inner {
    link: RwLock<Link>,
    follower: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Clone)]
struct Link {
    client: redis::Client,
    manager: ConnectionManager,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(follower) = &self.follower {
            follower.abort();
        }
    }
}

/// A URL error without the URL, which may hold a password.
fn unusable(what: &str) -> StoreError {
    StoreError(format!("session.store: {what}").into())
}

fn link(client: redis::Client) -> Result<Link, StoreError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(RESPONSE_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)
        .map_err(|e| StoreError(Box::new(e)))?;
    Ok(Link { client, manager })
}

/// `redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`: the Sentinels (which
/// take no password here), the monitored primary's name, and the credentials and database for the
/// primary itself.
pub struct SentinelUrl {
    pub sentinels: Vec<String>,
    pub service: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

impl SentinelUrl {
    pub fn parse(url: &str) -> Result<SentinelUrl, String> {
        let rest = url
            .strip_prefix("redis+sentinel://")
            .ok_or("a Sentinel URL starts with redis+sentinel://")?;
        let (authority, path) = rest
            .split_once('/')
            .ok_or("names no service: write redis+sentinel://HOST:26379/SERVICE")?;
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let (username, password) = match userinfo.map(|u| u.split_once(':').unwrap_or(("", u))) {
            Some((user, password)) => (
                Some(user.to_owned()).filter(|u| !u.is_empty()),
                Some(password.to_owned()).filter(|p| !p.is_empty()),
            ),
            None => (None, None),
        };
        let sentinels: Vec<String> = hosts
            .split(',')
            .map(|host| {
                let (name, port) = host.rsplit_once(':').unwrap_or((host, "26379"));
                match (name.is_empty(), port.parse::<u16>()) {
                    (false, Ok(port)) => Ok(format!("redis://{name}:{port}")),
                    _ => Err("has a Sentinel address that is not HOST:PORT".to_owned()),
                }
            })
            .collect::<Result<_, _>>()?;
        let mut segments = path.split('/');
        let service = segments.next().unwrap_or_default();
        if service.is_empty() {
            return Err("names no service: write redis+sentinel://HOST:26379/SERVICE".into());
        }
        let db = match segments.next() {
            None | Some("") => 0,
            Some(db) => db
                .parse()
                .map_err(|_| "has a database that is not a number")?,
        };
        Ok(SentinelUrl {
            sentinels,
            service: service.to_owned(),
            username,
            password,
            db,
        })
    }

    fn client(&self) -> Result<SentinelClient, StoreError> {
        let mut primary = redis::RedisConnectionInfo::default().set_db(self.db);
        if let Some(username) = &self.username {
            primary = primary.set_username(username);
        }
        if let Some(password) = &self.password {
            primary = primary.set_password(password);
        }
        SentinelClient::build(
            self.sentinels.clone(),
            self.service.clone(),
            Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(primary)),
            SentinelServerType::Master,
        )
        .map_err(|e| unusable(&format!("Sentinel ({:?})", e.kind())))
    }
}

/// Checks a `session.store` Redis URL without connecting, for `wxgate check`. The error never
/// repeats the URL.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("redis+sentinel://") {
        return SentinelUrl::parse(url).map(drop);
    }
    redis::Client::open(url)
        .map(drop)
        .map_err(|e| format!("is not a usable Redis URL ({:?})", e.kind()))
}

impl SharedRedis {
    /// The Redis at `url`. A plain address is connected lazily (wxgate starts while Redis is down);
    /// with Sentinel, a Sentinel must name the primary now, and is asked again every
    /// [`SENTINEL_POLL`].
    pub async fn open(url: &str) -> Result<SharedRedis, StoreError> {
        if !url.starts_with("redis+sentinel://") {
            let client = redis::Client::open(url)
                .map_err(|e| unusable(&format!("not a usable Redis URL ({:?})", e.kind())))?;
            return Ok(SharedRedis(Arc::new(Inner {
                link: RwLock::new(link(client)?),
                follower: None,
            })));
        }
        let mut sentinel = SentinelUrl::parse(url)
            .map_err(|e| unusable(&e))?
            .client()?;
        let primary = tokio::time::timeout(RESPONSE_TIMEOUT * 3, sentinel.async_get_client())
            .await
            .map_err(|_| unusable("no Sentinel answered in time"))?
            .map_err(|e| unusable(&format!("no Sentinel named the primary ({:?})", e.kind())))?;
        tracing::info!(primary = %primary.get_connection_info().addr(), "Redis primary named by Sentinel");
        let first = link(primary)?;
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| Inner {
            link: RwLock::new(first),
            follower: Some(tokio::spawn(follow(weak.clone(), sentinel))),
        });
        Ok(SharedRedis(inner))
    }

    /// The connection to the current primary.
    pub fn conn(&self) -> ConnectionManager {
        self.0.link.read().expect("not poisoned").manager.clone()
    }

    /// The current primary's client, for connections of their own (pub/sub).
    pub fn client(&self) -> redis::Client {
        self.0.link.read().expect("not poisoned").client.clone()
    }
}

/// Asks Sentinel where the primary is, and moves every later command there when it changes.
async fn follow(inner: std::sync::Weak<Inner>, mut sentinel: SentinelClient) {
    let mut failing = false;
    loop {
        tokio::time::sleep(SENTINEL_POLL).await;
        let asked = tokio::time::timeout(RESPONSE_TIMEOUT, sentinel.async_get_client()).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let primary = match asked {
            Ok(Ok(primary)) => primary,
            Ok(Err(e)) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = ?e.kind(), "no Sentinel names the Redis primary; keeping the last one");
                }
                continue;
            }
            Err(_) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!("no Sentinel answered in time; keeping the last Redis primary");
                }
                continue;
            }
        };
        failing = false;
        let moved = {
            let current = inner.link.read().expect("not poisoned");
            current.client.get_connection_info().addr() != primary.get_connection_info().addr()
        };
        if moved && let Ok(new) = link(primary) {
            tracing::warn!(primary = %new.client.get_connection_info().addr(), "the Redis primary moved (failover); following it");
            *inner.link.write().expect("not poisoned") = new;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse() {
        let url =
            SentinelUrl::parse("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2/main/2").unwrap();
        assert_eq!(
            url.sentinels,
            ["redis://10.0.0.1:26379", "redis://10.0.0.2:26379"]
        );
        assert_eq!((url.service.as_str(), url.db), ("main", 2));
        assert_eq!((url.username, url.password.as_deref()), (None, Some("pw")));
        let url = SentinelUrl::parse("redis+sentinel://app:pw@s1:5000/m").unwrap();
        assert_eq!((url.username.as_deref(), url.db), (Some("app"), 0));
        for bad in [
            "redis+sentinel://s1:26379",
            "redis+sentinel://s1:26379/",
            "redis+sentinel://s1:port/m",
            "redis+sentinel://s1/m/notanumber",
        ] {
            let error = SentinelUrl::parse(bad).map(drop).unwrap_err();
            assert!(!error.contains("s1"), "{error}");
        }
    }
}
