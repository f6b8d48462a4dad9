//! An API replica's side of Redis (`kairos api`): reading people's profiles, and following the
//! change channel on which every profile write is published, for its answer cache.
//!
//! Reads go through a small pool of connections, one per request in flight, each pipelining a
//! person's keys (see [`RedisProfiles::read_person`]); a connection that failed is dropped and a
//! new one made by the next read. The change channel is classic pub/sub, which Redis Cluster
//! delivers to subscribers of every node, so one subscription to one node is enough.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::config::RedisSettings;
use crate::portable::Person;
use crate::redis_mirror::{RedisProfiles, RedisTarget};

/// Connections for reading profiles, shared by the request handlers.
pub struct ProfilePool {
    url: String,
    settings: RedisSettings,
    idle: Mutex<Vec<RedisProfiles>>,
}

impl ProfilePool {
    /// A pool for `url` (`redis://…` or `redis-cluster://…`); connects on first use.
    pub fn new(url: &str, settings: RedisSettings) -> Result<ProfilePool, String> {
        RedisTarget::parse(url)?;
        Ok(ProfilePool {
            url: url.to_owned(),
            settings,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<RedisProfiles>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What Redis holds about the person named by `keys` (blocking).
    pub fn read_person(&self, keys: &[&str]) -> Result<Person, String> {
        let taken = self.idle().pop();
        let mut conn = match taken {
            Some(c) => c,
            None => RedisProfiles::new(&self.url, self.settings.clone())?,
        };
        let person = conn.read_person(keys).map_err(|e| e.to_string())?;
        self.idle().push(conn);
        Ok(person)
    }

    /// Whether Redis answers (a start-up check).
    pub fn check(&self) -> Result<(), String> {
        let mut conn = RedisProfiles::new(&self.url, self.settings.clone())?;
        conn.has_marker().map(drop).map_err(|e| e.to_string())
    }
}

/// What the change channel says.
#[derive(Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// Subscribed: changes from now on are delivered (earlier ones may have been missed).
    Connected,
    /// The subscription broke; it is being made again.
    Disconnected,
    /// Profile key (`u:…`, `a:…`) written.
    Profile(&'a str),
}

/// Follows the change channel of the profiles in Redis at `url` until `stop` is set, calling
/// `on` with each change; reconnects (with backoff) after errors.
pub fn follow_changes(
    url: &str,
    settings: &RedisSettings,
    stop: &AtomicBool,
    mut on: impl FnMut(Change<'_>),
) -> Result<(), String> {
    let nodes = match RedisTarget::parse(url)? {
        RedisTarget::Single(url) => vec![url],
        RedisTarget::Cluster(nodes) => nodes,
    };
    let channel = format!("{}:changed", settings.prefix);
    let key_prefix = format!("{}:{{", settings.prefix);
    let timeout = Duration::from_millis(settings.timeout_ms.max(1));
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 0usize;
    while !stop.load(Ordering::Acquire) {
        let node = &nodes[attempt % nodes.len()];
        attempt += 1;
        let subscribed = (|| -> redis::RedisResult<()> {
            let client = crate::redis_mirror::client(node, settings)?;
            let mut conn = client.get_connection_with_timeout(timeout)?;
            let mut pubsub = conn.as_pubsub();
            pubsub.subscribe(&channel)?;
            // Wakes up to look at `stop` while the channel is quiet.
            pubsub.set_read_timeout(Some(Duration::from_millis(200)))?;
            on(Change::Connected);
            backoff = Duration::from_millis(50);
            while !stop.load(Ordering::Acquire) {
                match pubsub.get_message() {
                    Ok(msg) => {
                        let key = msg.get_payload_bytes();
                        let key = String::from_utf8_lossy(key);
                        if let Some(profile) = key
                            .strip_prefix(key_prefix.as_str())
                            .and_then(|k| k.strip_suffix('}'))
                        {
                            on(Change::Profile(profile));
                        }
                    }
                    Err(e) if e.is_timeout() => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })();
        if let Err(e) = subscribed {
            on(Change::Disconnected);
            tracing::warn!(error = %e, node, "following the profile change channel failed; reconnecting");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
    Ok(())
}
