//! Profiles in Redis or Redis Cluster (`state = "redis://HOST:PORT"` or
//! `"redis-cluster://HOST:PORT,HOST:PORT,…"`).
//!
//! ## What is where, and why
//! The node keeps its whole state in memory, rebuilt from the event log and its snapshots exactly
//! as in the embedded mode: the session model and the item relations are read at random, hundreds
//! of records per recommendation, which only memory serves in a millisecond. The profiles (the
//! part of the state that grows with the audience) are *also* written to Redis, where they
//! outlive the node, carry a TTL, and can be read by every other service and replica without
//! asking this node. The mirror runs on its own thread: the processor only marks which profiles
//! changed ([`crate::profile::Profiles::track_changes`]), so applying never waits for Redis.
//!
//! ## Layout
//! - `{prefix}:{<profile key>}`, a hash: `d` holds the [`StoredProfile`] (see
//!   [`crate::portable`]: item names, not this node's numbering), `f` the state's checkpoint the
//!   profile reflects (the next log offset per partition, comma-separated). The profile key is the
//!   hash tag, so the keys a profile may gain later land in its slot (Redis Cluster).
//! - `{prefix}:meta`: written after every profile has been written once; its absence means Redis
//!   lost the mirror (restarted without persistence, flushed) or never had it.
//! - Channel `{prefix}:changed`: the Redis key of every profile written, for caches.
//!
//! A processor group (`kairos process`, `crates/kairos/src/group.rs`) writes the same hashes,
//! fenced by the offset of the key's own partition only, and adds:
//! - field `l` of an anonymous (or earlier user) key: the user key it was linked to;
//! - field `t` of a profile: the incarnation of its partition it was written in;
//! - `{prefix}:meta:p<partition>`: the partition's current incarnation. Its absence means Redis
//!   lost the partition's profiles: the owner rebuilds them from the start of the log, in a new
//!   incarnation, and ignores (then replaces) profiles of older ones, which a replica may have
//!   written from memory after the loss without the links that went with them.
//!
//! ## Invariants
//! - A profile is replaced only by one whose checkpoint dominates the stored one (behind on no
//!   partition, ahead on one), checked by the write script atomically with the write. A node
//!   replaying its log after a restart, or a stale node, never puts an older profile over a newer
//!   one. The content written for a checkpoint is deterministic (golden replay tests), so a write
//!   refused during a replay held what the replay would have written.
//! - Every profile changed in memory is written eventually: changes taken from the state and not
//!   written (Redis down, a timeout) are marked changed again and retried.
//! - A node that did not stop with every change written (its first start, a crash, Redis down at
//!   shutdown) writes every profile when it starts (see [`SYNCED_FILE`]).
//! - When the marker is missing, every profile is marked changed and written, then the marker is
//!   set (checked every second). A Redis error during that pass starts it again if the marker is
//!   still missing afterwards: the server may have restarted empty between the pass's writes and
//!   the marker, which would otherwise mark a Redis that lacks them as current. So Redis
//!   restarted empty holds every profile again after one pass, without replaying anything: the
//!   state in memory already has them.
//!
//! ## Durability
//! Whatever Redis itself persists (RDB/AOF). The event log remains the source of truth: the state
//! is rebuilt from it and the mirror from the state, so nothing Redis loses is lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Cmd, RedisResult, Value};

use kairos_types::metrics::{Counter, Gauge, Registry};

use crate::config::RedisSettings;
use crate::portable::{Person, StoredProfile};
use crate::state::State;
use crate::store::{EmbeddedStore, StateStore};

/// Where Redis is: one server, or the seed nodes of a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTarget {
    Single(String),
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// Parses `redis://HOST:PORT[/DB]` or `redis-cluster://HOST:PORT,HOST:PORT,…`, and their TLS
    /// forms `rediss://…` and `rediss-cluster://…`. (A cluster's servers must present
    /// certificates of a CA the system trusts: the client cannot be given one for a cluster.)
    pub fn parse(url: &str) -> Result<RedisTarget, String> {
        let cluster = url
            .strip_prefix("redis-cluster://")
            .map(|nodes| ("redis", nodes))
            .or_else(|| {
                url.strip_prefix("rediss-cluster://")
                    .map(|nodes| ("rediss", nodes))
            });
        if let Some((scheme, nodes)) = cluster {
            let nodes: Vec<&str> = nodes
                .trim_end_matches('/')
                .split(',')
                .map(str::trim)
                .collect();
            // Every seed node needs a host and a port.
            if nodes.iter().any(|n| {
                !n.split_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && !p.is_empty())
            }) {
                return Err(format!(
                    "state backend {url:?}: expected {scheme}-cluster://HOST:PORT[,HOST:PORT...]"
                ));
            }
            return Ok(RedisTarget::Cluster(
                nodes.iter().map(|n| format!("{scheme}://{n}")).collect(),
            ));
        }
        for scheme in ["redis://", "rediss://"] {
            if url.starts_with(scheme) && url.len() > scheme.len() {
                return Ok(RedisTarget::Single(url.to_owned()));
            }
        }
        Err(format!(
            "state backend {url:?}: expected redis://HOST:PORT or redis-cluster://HOST:PORT[,HOST:PORT...] (rediss:// and rediss-cluster:// with TLS)"
        ))
    }
}

/// The CA of `settings` for TLS connections, or `None` for the system's trusted CAs.
fn tls_certificates(settings: &RedisSettings) -> RedisResult<Option<redis::TlsCertificates>> {
    if settings.tls_ca_file.is_empty() {
        return Ok(None);
    }
    let pem = std::fs::read(&settings.tls_ca_file).map_err(|e| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "cannot read [redis] tls_ca_file",
            format!("{}: {e}", settings.tls_ca_file),
        ))
    })?;
    Ok(Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

/// A client for one server at `url`, trusting `[redis] tls_ca_file` when it is a `rediss://` one.
pub(crate) fn client(url: &str, settings: &RedisSettings) -> RedisResult<redis::Client> {
    match tls_certificates(settings)? {
        Some(certs) if url.starts_with("rediss://") => redis::Client::build_with_tls(url, certs),
        _ => redis::Client::open(url),
    }
}

enum Connection {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

/// A connection to Redis or Redis Cluster that runs pipelines of single-slot commands.
pub struct RedisProfiles {
    target: RedisTarget,
    settings: RedisSettings,
    conn: Option<Connection>,
    /// [`WRITE_SCRIPT`] with its SHA-1, computed once for every EVALSHA.
    script: redis::Script,
    /// In a processor group: the partition of a profile key (see [`RedisProfiles::owned_by`]).
    owner: Option<PartitionOf>,
}

/// The log partition a profile key's events are in (`kairos process`).
pub type PartitionOf = Arc<dyn Fn(&str) -> u32 + Send + Sync>;

/// Writes a profile unless Redis holds one at a checkpoint this one does not dominate; publishes
/// the key. Returns 1 when written, 0 when refused as not newer. With a partition (ARGV[5], 1 +
/// the index; 0 for none), only that partition's offset is compared: in a processor group only
/// the events of the partition of the profile's key change it (see `GroupView` in the state).
/// ARGV[6] is the partition's incarnation (0 outside a group, see
/// [`RedisProfiles::partition_tokens`]): a profile of a newer one replaces any of an older one,
/// and one of an older one is refused, whatever their offsets.
const WRITE_SCRIPT: &str = r"
local old = redis.call('HGET', KEYS[1], 'f')
local part = tonumber(ARGV[5])
local stored_t = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
local t = tonumber(ARGV[6])
if stored_t > t then return 0 end
if stored_t < t then old = nil end
if old and part > 0 then
  local stored, new = {}, {}
  for o in string.gmatch(old, '[^,]+') do stored[#stored + 1] = tonumber(o) end
  for o in string.gmatch(ARGV[2], '[^,]+') do new[#new + 1] = tonumber(o) end
  if (new[part] or 0) <= (stored[part] or 0) then return 0 end
elseif old then
  local stored = {}
  for o in string.gmatch(old, '[^,]+') do stored[#stored + 1] = tonumber(o) end
  local ahead = false
  local i = 0
  for o in string.gmatch(ARGV[2], '[^,]+') do
    i = i + 1
    local n, s = tonumber(o), stored[i] or 0
    if n < s then return 0 end
    if n > s then ahead = true end
  end
  for j = i + 1, #stored do
    if stored[j] > 0 then return 0 end
  end
  if not ahead then return 0 end
end
redis.call('HSET', KEYS[1], 'd', ARGV[1], 'f', ARGV[2], 't', ARGV[6])
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) else redis.call('PERSIST', KEYS[1]) end
redis.call('PUBLISH', ARGV[4], KEYS[1])
return 1
";

/// Sets one field of a profile's hash (ARGV[1] = ARGV[2]), renews its TTL (ARGV[3] seconds, 0
/// for none) and publishes the key on the change channel (ARGV[4]).
const LINK_SCRIPT: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
redis.call('PUBLISH', ARGV[4], KEYS[1])
return 1
";

/// The outcome of writing a batch of profiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteReport {
    pub written: u64,
    /// Refused because Redis holds the profile at the same or a newer checkpoint.
    pub stale: u64,
}

impl RedisProfiles {
    /// A client for `url`; connects on first use.
    pub fn new(url: &str, settings: RedisSettings) -> Result<RedisProfiles, String> {
        Ok(RedisProfiles {
            target: RedisTarget::parse(url)?,
            settings,
            conn: None,
            script: redis::Script::new(WRITE_SCRIPT),
            owner: None,
        })
    }

    /// Fences every profile by the offset of one partition, `partition_of` its key, instead of
    /// the whole checkpoint: the layout of a processor group (`kairos process`).
    pub fn owned_by(mut self, partition_of: PartitionOf) -> RedisProfiles {
        self.owner = Some(partition_of);
        self
    }

    /// The Redis key of profile `key`.
    pub fn key(&self, profile_key: &str) -> String {
        format!("{}:{{{profile_key}}}", self.settings.prefix)
    }

    /// The channel on which written profile keys are published.
    pub fn channel(&self) -> String {
        format!("{}:changed", self.settings.prefix)
    }

    fn meta_key(&self) -> String {
        format!("{}:meta", self.settings.prefix)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.settings.timeout_ms.max(1))
    }

    fn connection(&mut self) -> RedisResult<&mut Connection> {
        if self.conn.is_none() {
            let timeout = self.timeout();
            let conn = match &self.target {
                RedisTarget::Single(url) => {
                    let c = client(url, &self.settings)?.get_connection_with_timeout(timeout)?;
                    c.set_read_timeout(Some(timeout))?;
                    c.set_write_timeout(Some(timeout))?;
                    Connection::Single(c)
                }
                RedisTarget::Cluster(nodes) => Connection::Cluster(Box::new(
                    redis::cluster::ClusterClient::builder(nodes.clone())
                        .connection_timeout(timeout)
                        .response_timeout(timeout)
                        .build()?
                        .get_connection()?,
                )),
            };
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// The prefix of every key (`[redis] prefix`).
    pub(crate) fn prefix(&self) -> &str {
        &self.settings.prefix
    }

    /// Runs `cmds` in one pipeline (every command names keys of one slot). After an error Redis
    /// did not answer itself (a timeout, a dropped connection), the next call reconnects.
    pub(crate) fn run(&mut self, cmds: Vec<Cmd>) -> RedisResult<Vec<Value>> {
        let result = match self.connection()? {
            Connection::Single(c) => {
                let mut p = redis::pipe();
                for cmd in cmds {
                    p.add_command(cmd);
                }
                p.query(c)
            }
            Connection::Cluster(c) => {
                let mut p = redis::cluster::cluster_pipe();
                for cmd in cmds {
                    p.add_command(cmd);
                }
                p.query(c)
            }
        };
        // An error Redis answered with (NOSCRIPT, say) leaves the connection usable.
        if result.as_ref().is_err_and(|e| e.code().is_none()) {
            self.conn = None;
        }
        result
    }

    /// Writes `profiles` (profile key, what it holds) as of the state checkpoint `offsets`, and
    /// in a processor group with the incarnation of each profile's partition (`tokens`, by
    /// partition).
    pub fn write(
        &mut self,
        profiles: &[(Box<str>, StoredProfile)],
        offsets: &[u64],
        tokens: &[u64],
    ) -> RedisResult<WriteReport> {
        if profiles.is_empty() {
            return Ok(WriteReport::default());
        }
        let fence = fence(offsets);
        let channel = self.channel();
        let docs: Vec<(String, Vec<u8>, u32, u64)> = profiles
            .iter()
            .map(|(key, stored)| {
                let partition = self.owner.as_ref().map(|of| of(key));
                let token = partition
                    .and_then(|p| tokens.get(p as usize))
                    .copied()
                    .unwrap_or(0);
                // The script's ARGV[5]: 1 + the partition, 0 for none.
                let part = partition.map_or(0, |p| p + 1);
                (self.key(key), stored.encode(), part, token)
            })
            .collect();
        // EVALSHA sends the script's hash instead of its text. A node that does not have the
        // script yet (restarted, or a new cluster node) answers NOSCRIPT; the batch then goes
        // again with EVAL, which also caches the script there. Profiles the first attempt
        // already wrote are refused the second time as not newer, which changes nothing.
        let hash = self.script.get_hash().to_owned();
        let ttl = self.settings.profile_ttl_secs;
        let commands = |by_hash: bool| -> Vec<Cmd> {
            docs.iter()
                .map(|(key, doc, part, token)| {
                    let mut cmd = if by_hash {
                        let mut c = redis::cmd("EVALSHA");
                        c.arg(&hash);
                        c
                    } else {
                        let mut c = redis::cmd("EVAL");
                        c.arg(WRITE_SCRIPT);
                        c
                    };
                    cmd.arg(1)
                        .arg(key)
                        .arg(doc)
                        .arg(&fence)
                        .arg(ttl)
                        .arg(&channel)
                        .arg(part)
                        .arg(token);
                    cmd
                })
                .collect()
        };
        let values = match self.run(commands(true)) {
            Err(e) if e.code() == Some("NOSCRIPT") => self.run(commands(false))?,
            other => other?,
        };
        let mut report = WriteReport::default();
        for v in values {
            match v {
                Value::Int(1) => report.written += 1,
                _ => report.stale += 1,
            }
        }
        Ok(report)
    }

    /// What Redis holds for profile `key`: the profile (`None` when absent or in an unknown
    /// format) and the checkpoint offsets it reflects.
    pub fn read(&mut self, profile_key: &str) -> RedisResult<Option<(StoredProfile, Vec<u64>)>> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.key(profile_key)).arg("d").arg("f");
        let mut values = self.run(vec![cmd])?;
        let Some(Value::Array(fields)) = values.pop() else {
            return Ok(None);
        };
        let (Some(Value::BulkString(doc)), Some(Value::BulkString(f))) =
            (fields.first(), fields.get(1))
        else {
            return Ok(None);
        };
        Ok(StoredProfile::decode(doc).map(|p| (p, parse_fence(f))))
    }

    /// What Redis holds for each of `profile_keys`, in one pipelined round trip: the profile
    /// and the offset of partition `partition_of(key)` it reflects (0 when it reflects none).
    /// Keys without a profile (absent, or a link only), and profiles written in an older
    /// incarnation of their partition than `tokens` says, give `None`.
    pub fn load(
        &mut self,
        profile_keys: &[&str],
        partition_of: &dyn Fn(&str) -> u32,
        tokens: &[u64],
    ) -> RedisResult<Vec<Option<(StoredProfile, u64)>>> {
        if profile_keys.is_empty() {
            return Ok(Vec::new());
        }
        let cmds = profile_keys
            .iter()
            .map(|k| {
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(self.key(k)).arg("d").arg("f").arg("t");
                cmd
            })
            .collect();
        let values = self.run(cmds)?;
        Ok(values
            .into_iter()
            .zip(profile_keys)
            .map(|(v, key)| {
                let Value::Array(fields) = v else {
                    return None;
                };
                let (Some(Value::BulkString(doc)), Some(Value::BulkString(f))) =
                    (fields.first(), fields.get(1))
                else {
                    return None;
                };
                let partition = partition_of(key) as usize;
                let token = match fields.get(2) {
                    Some(Value::BulkString(t)) => String::from_utf8_lossy(t).parse().unwrap_or(0),
                    _ => 0,
                };
                if token < tokens.get(partition).copied().unwrap_or(0) {
                    return None;
                }
                let offset = parse_fence(f).get(partition).copied().unwrap_or(0);
                StoredProfile::decode(doc).map(|p| (p, offset))
            })
            .collect())
    }

    /// Records identity links: `l` of the linked key (the key it joined), and `m:<linked key>`
    /// of the key it joined, so that a reader finds a person's profiles from either. Each write
    /// names one key, so that none spans two profiles' slots; both keys are published on the
    /// change channel, for caches.
    pub fn write_links(&mut self, links: &[(Box<str>, Box<str>)]) -> RedisResult<()> {
        if links.is_empty() {
            return Ok(());
        }
        let ttl = self.settings.profile_ttl_secs;
        let channel = self.channel();
        let mut cmds = Vec::with_capacity(links.len() * 2);
        for (from, to) in links {
            for (key, field, value) in [
                (self.key(from), "l".to_owned(), to.as_ref()),
                (self.key(to), format!("{MEMBER_FIELD}{from}"), "1"),
            ] {
                // A script, because a cluster pipeline cannot route a bare PUBLISH.
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(LINK_SCRIPT)
                    .arg(1)
                    .arg(&key)
                    .arg(field)
                    .arg(value)
                    .arg(ttl)
                    .arg(&channel);
                cmds.push(cmd);
            }
        }
        self.run(cmds).map(drop)
    }

    /// Everything Redis holds about one person, named by a profile key or two (`u:<userId>`,
    /// `a:<anonymousId>`), for a reader (an API replica): their profiles, following the links a
    /// processor group records instead of merging (see `GroupView` in the state). From an
    /// anonymous key it goes to the user key it was linked to, and from a user key to every key
    /// linked to it: at most three pipelined round trips, one when nothing is linked.
    pub fn read_person(&mut self, keys: &[&str]) -> RedisResult<Person> {
        let mut person = Person::default();
        let mut next: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        for _ in 0..3 {
            next.retain(|k| !person.keys.contains(k));
            next.sort_unstable();
            next.dedup();
            if next.is_empty() {
                break;
            }
            let cmds = next
                .iter()
                .map(|k| {
                    let mut cmd = redis::cmd("HGETALL");
                    cmd.arg(self.key(k));
                    cmd
                })
                .collect();
            let values = self.run(cmds)?;
            let mut found = Vec::new();
            for (key, value) in next.drain(..).zip(values) {
                let fields = hash_fields(value);
                for (field, v) in &fields {
                    if field == "l" {
                        let user = String::from_utf8_lossy(v).into_owned();
                        person.user.get_or_insert_with(|| user.clone());
                        found.push(user);
                    } else if let Some(linked) = field.strip_prefix(MEMBER_FIELD) {
                        found.push(linked.to_owned());
                    }
                }
                if key.starts_with("u:") {
                    person.user.get_or_insert_with(|| key.clone());
                }
                if let Some(StoredProfile::Profile(p)) = fields
                    .iter()
                    .find(|(f, _)| f == "d")
                    .and_then(|(_, d)| StoredProfile::decode(d))
                {
                    person.profiles.push((key.clone(), *p));
                }
                person.keys.push(key);
            }
            next = found;
        }
        Ok(person)
    }

    /// The key `profile_key` was linked to (its `l` field), if any.
    pub fn link_of(&mut self, profile_key: &str) -> RedisResult<Option<String>> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(self.key(profile_key)).arg("l");
        Ok(match self.run(vec![cmd])?.pop() {
            Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(&b).into_owned()),
            _ => None,
        })
    }

    /// The key that records that Redis holds the profiles of log partition `partition` as of
    /// the processor group's committed offset (`kairos process`), and in which incarnation.
    fn partition_marker(&self, partition: u32) -> String {
        format!("{}:meta:p{partition}", self.settings.prefix)
    }

    /// The incarnation of each of `partitions` (one pipelined round trip): `None` where Redis
    /// has no marker, having lost the partition's profiles (or never had them). A rebuild of a
    /// partition's profiles from the log starts a newer incarnation, whose profiles replace
    /// whatever an older one left, offsets notwithstanding: after Redis lost data, a replica
    /// may have written profiles from its memory that the rebuild must not trust.
    pub fn partition_tokens(&mut self, partitions: &[u32]) -> RedisResult<Vec<Option<u64>>> {
        let cmds = partitions
            .iter()
            .map(|&p| {
                let mut cmd = redis::cmd("GET");
                cmd.arg(self.partition_marker(p));
                cmd
            })
            .collect();
        Ok(self
            .run(cmds)?
            .into_iter()
            .map(|v| match v {
                Value::BulkString(t) => String::from_utf8_lossy(&t).parse().ok(),
                _ => None,
            })
            .collect())
    }

    /// Records that Redis holds partition `partition`'s profiles, in incarnation `token`.
    pub fn set_partition_token(&mut self, partition: u32, token: u64) -> RedisResult<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.partition_marker(partition)).arg(token);
        self.run(vec![cmd]).map(drop)
    }

    /// Whether Redis holds the mirror's marker (see the module docs).
    pub fn has_marker(&mut self) -> RedisResult<bool> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(self.meta_key());
        Ok(matches!(self.run(vec![cmd])?.first(), Some(Value::Int(1))))
    }

    fn set_marker(&mut self) -> RedisResult<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.meta_key()).arg("profiles written");
        self.run(vec![cmd]).map(drop)
    }

    /// Bytes Redis uses for the stored profile `key` (`MEMORY USAGE`), if it exists.
    pub fn memory_usage(&mut self, profile_key: &str) -> RedisResult<Option<u64>> {
        let mut cmd = redis::cmd("MEMORY");
        cmd.arg("USAGE")
            .arg(self.key(profile_key))
            .arg("SAMPLES")
            .arg(0);
        Ok(match self.run(vec![cmd])?.first() {
            Some(Value::Int(n)) => u64::try_from(*n).ok(),
            _ => None,
        })
    }
}

/// The field prefix of a user key's hash naming a key linked to it (see
/// [`RedisProfiles::write_links`]).
const MEMBER_FIELD: &str = "m:";

/// The fields of an `HGETALL` answer (empty when the key is absent).
fn hash_fields(value: Value) -> Vec<(String, Vec<u8>)> {
    let pairs = match value {
        Value::Map(pairs) => pairs,
        Value::Array(flat) => {
            let mut it = flat.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(k, v)| match (k, v) {
            (Value::BulkString(k), Value::BulkString(v)) => {
                Some((String::from_utf8_lossy(&k).into_owned(), v))
            }
            _ => None,
        })
        .collect()
}

/// The offsets of a stored fence (`f`), as [`fence`] wrote them.
fn parse_fence(f: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(f)
        .split(',')
        .map(|o| o.parse().unwrap_or(0))
        .collect()
}

/// Offsets as Redis keeps them: comma-separated (`0` for none).
pub(crate) fn fence(offsets: &[u64]) -> String {
    let parts: Vec<String> = offsets.iter().map(u64::to_string).collect();
    if parts.is_empty() {
        "0".into()
    } else {
        parts.join(",")
    }
}

/// The mirror's metrics.
#[derive(Clone)]
pub struct MirrorMetrics {
    pub written: Arc<Counter>,
    pub stale: Arc<Counter>,
    pub errors: Arc<Counter>,
    pub resyncs: Arc<Counter>,
    pub up: Arc<Gauge>,
    pub pending: Arc<Gauge>,
    pub profile_bytes: Arc<Gauge>,
}

impl MirrorMetrics {
    pub fn new(registry: &Registry) -> MirrorMetrics {
        let counter = |name: &str, help: &str| registry.counter(name, help, &[]);
        let gauge = |name: &str, help: &str| registry.gauge(name, help, &[]);
        MirrorMetrics {
            written: counter(
                "kairos_redis_profiles_written_total",
                "Profiles written to Redis.",
            ),
            stale: counter(
                "kairos_redis_profiles_stale_total",
                "Profile writes Redis refused because it held one at the same or a newer checkpoint.",
            ),
            errors: counter(
                "kairos_redis_errors_total",
                "Failed round trips to Redis (the profiles are written again).",
            ),
            resyncs: counter(
                "kairos_redis_resyncs_total",
                "Times Redis was found without the copy and every profile was written again.",
            ),
            up: gauge(
                "kairos_redis_up",
                "1 while the last round trip to Redis succeeded.",
            ),
            pending: gauge(
                "kairos_redis_profiles_pending",
                "Changed profiles not yet written to Redis.",
            ),
            profile_bytes: gauge(
                "kairos_redis_profile_bytes",
                "Redis memory per profile (MEMORY USAGE of recently written profiles, averaged).",
            ),

        }
    }
}

/// Called after every flush that wrote everything it took, with the group epoch and the state's
/// checkpoint at the time it took them (every entry below that checkpoint is in Redis), and
/// whether it is the last flush before the mirror stops. A processor group commits its offsets
/// there (see `kairos process`).
pub type OnDurable = Box<dyn FnMut(u64, &[u64], bool) + Send>;

/// Publishes model updates for the API replicas (a processor group's model topic), returning
/// once they are durable there. Called before [`OnDurable`]: offsets are committed only after
/// the updates of the entries below them are published.
pub type Publish = Box<dyn FnMut(&[kairos_types::ModelBatch]) -> Result<(), String> + Send>;

/// Writes the profiles `store` changes to Redis until `stop` is set, then once more, so that a
/// clean shutdown leaves Redis current. Returns whether it did: every change written and the
/// marker in place (see [`SYNCED_FILE`]).
pub fn run_mirror(
    mut redis: RedisProfiles,
    store: Arc<EmbeddedStore>,
    metrics: MirrorMetrics,
    stop: Arc<AtomicBool>,
    mut on_durable: Option<OnDurable>,
    publish: Option<Publish>,
) -> bool {
    let mut publisher = Publisher {
        publish,
        unsent: Vec::new(),
    };
    let interval = Duration::from_millis(redis.settings.flush_interval_ms.max(1));
    let mut last_check: Option<Instant> = None;
    let mut last_sample: Option<Instant> = None;
    let mut resync_pending = false;
    // A Redis error during a resync: what the pass wrote may have gone with a server that
    // restarted since, so a marker still missing means starting the pass again.
    let mut resync_broken = false;
    let mut backoff = Duration::ZERO;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if !stopping {
            std::thread::sleep(interval + backoff);
        }
        if last_check.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            match redis.has_marker() {
                Ok(true) => last_check = Some(Instant::now()),
                Ok(false) => {
                    last_check = Some(Instant::now());
                    if !resync_pending || resync_broken {
                        tracing::info!("Redis holds no copy of the profiles: writing them all");
                        metrics.resyncs.inc();
                        store.mark_all_profiles_changed();
                        resync_pending = true;
                        resync_broken = false;
                    }
                }
                Err(e) => {
                    resync_broken |= resync_pending;
                    fail(&metrics, &mut backoff, &e);
                    if stopping {
                        return false;
                    }
                    continue;
                }
            }
        }
        let flushed = flush(&mut redis, &store, &metrics, &mut publisher);
        if let (Ok(f), Some(durable)) = (&flushed, &mut on_durable) {
            durable(f.epoch, &f.offsets, stopping);
        }

        if stopping {
            let synced = flushed.is_ok() && !resync_pending;
            if let Err(e) = &flushed {
                tracing::warn!(
                    error = %e,
                    "the last profiles could not be written to Redis; the next start writes them all"
                );
            }
            return synced;
        }
        match flushed {
            Ok(Flushed { sampled, .. }) => {
                backoff = Duration::ZERO;
                metrics.up.set(1);
                if resync_pending {
                    match redis.set_marker() {
                        Ok(()) => {
                            resync_pending = false;
                            tracing::info!("every profile written to Redis");
                        }
                        Err(e) => {
                            resync_broken = true;
                            fail(&metrics, &mut backoff, &e)
                        }
                    }
                }
                if let Some(key) = sampled
                    .filter(|_| last_sample.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)))
                {
                    last_sample = Some(Instant::now());
                    if let Ok(Some(bytes)) = redis.memory_usage(&key) {
                        let previous = metrics.profile_bytes.get();
                        let bytes = bytes as i64;
                        metrics.profile_bytes.set(if previous == 0 {
                            bytes
                        } else {
                            (previous * 7 + bytes) / 8
                        });
                    }
                }
            }
            Err(FlushError::Redis(e)) => {
                resync_broken |= resync_pending;
                fail(&metrics, &mut backoff, &e)
            }
            Err(FlushError::Publish(e)) => {
                tracing::warn!(error = %e, batches = publisher.unsent.len(), "publishing model updates failed; retrying");
                backoff = (backoff * 2).clamp(Duration::from_millis(50), Duration::from_secs(2));
            }
        }
    }
}

/// Publishes the model updates a processor replica records (see [`Publish`]).
struct Publisher {
    publish: Option<Publish>,
    /// Taken from the state and not yet published, oldest first: after a failed publish they go
    /// again, ahead of newer ones, so that each partition's stay in order.
    unsent: Vec<kairos_types::ModelBatch>,
}

impl Publisher {
    /// Publishes `taken` after whatever is left from earlier attempts.
    fn publish(&mut self, mut taken: Vec<kairos_types::ModelBatch>) -> Result<(), FlushError> {
        self.unsent.append(&mut taken);
        let Some(publish) = &mut self.publish else {
            self.unsent.clear();
            return Ok(());
        };
        if self.unsent.is_empty() {
            return Ok(());
        }
        publish(&self.unsent).map_err(FlushError::Publish)?;
        self.unsent.clear();
        Ok(())
    }
}

/// Why a flush stopped.
#[derive(Debug)]
enum FlushError {
    Redis(redis::RedisError),
    Publish(String),
}

impl From<redis::RedisError> for FlushError {
    fn from(e: redis::RedisError) -> FlushError {
        FlushError::Redis(e)
    }
}

impl std::fmt::Display for FlushError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlushError::Redis(e) => write!(f, "{e}"),
            FlushError::Publish(e) => f.write_str(e),
        }
    }
}

/// Left in the state directory by a node whose mirror stopped with every change written. A
/// node that starts without it (first start, a crash, Redis unreachable at shutdown) marks every
/// profile changed: only this run's changes are tracked in memory, so profiles changed after the
/// last write and before a snapshot would otherwise never reach Redis.
pub const SYNCED_FILE: &str = "redis-synced";

fn fail(metrics: &MirrorMetrics, backoff: &mut Duration, e: &redis::RedisError) {
    if *backoff == Duration::ZERO || metrics.up.get() == 1 {
        tracing::warn!(error = %e, "writing profiles to Redis failed; retrying");
    }
    metrics.errors.inc();
    metrics.up.set(0);
    *backoff = (*backoff * 2).clamp(Duration::from_millis(50), Duration::from_secs(2));
}

/// What one flush wrote.
struct Flushed {
    /// A key written, for sampling its size.
    sampled: Option<String>,
    /// Every entry below this checkpoint is in Redis (see [`OnDurable`]).
    offsets: Vec<u64>,
    epoch: u64,
}

/// Writes every profile (and identity link) changed since the last flush, and publishes the model
/// updates recorded since.
fn flush(
    redis: &mut RedisProfiles,
    store: &EmbeddedStore,
    metrics: &MirrorMetrics,
    publisher: &mut Publisher,
) -> Result<Flushed, FlushError> {
    let taken = store.take_for_mirror();
    let result = write_taken(redis, store, metrics, taken, publisher);
    store.mirror_done();
    result
}

/// Writes what [`EmbeddedStore::take_for_mirror`] took.
///
/// In a processor group, the model updates recorded up to the moment each chunk of profiles is
/// read are published before the chunk is written: whatever a profile in Redis reflects, the
/// updates its events made are on the model topic. A replica that takes the partition over skips
/// the events the profile reflects (its fence) and publishes nothing for them, so the other order
/// would lose them when a replica dies between the two writes.
fn write_taken(
    redis: &mut RedisProfiles,
    store: &EmbeddedStore,
    metrics: &MirrorMetrics,
    taken: crate::store::MirrorTake,
    publisher: &mut Publisher,
) -> Result<Flushed, FlushError> {
    let keys: Vec<Box<str>> = taken.keys.into_iter().collect();
    metrics.pending.set(keys.len() as i64);
    // Links first: a profile written with the checkpoint of the event that linked it must not
    // be in Redis without the link, which a replay from there would not make again.
    if let Err(e) = redis.write_links(&taken.links) {
        store.requeue_links(taken.links);
        store.mark_profiles_changed_again(keys);
        return Err(e.into());
    }
    let batch = redis.settings.batch.max(1);
    let mut sampled = None;
    for (n, chunk) in keys.chunks(batch).enumerate() {
        // Profiles and the checkpoint they reflect, read together under one short lock, with
        // the model updates recorded so far when they are published (which takes them, so the
        // lock is exclusive then; readers of a single node are not held up otherwise).
        let read = |state: &State| {
            let profiles: Vec<(Box<str>, StoredProfile)> = chunk
                .iter()
                .filter_map(|k| state.stored_profile(k).map(|p| (k.clone(), p)))
                .collect();
            let tokens = state
                .group
                .as_ref()
                .map(|g| g.tokens.clone())
                .unwrap_or_default();
            (profiles, state.checkpoint.offsets.clone(), tokens)
        };
        let ((profiles, offsets, tokens), model) = if publisher.publish.is_some() {
            let mut state = store.write();
            (read(&state), crate::store::take_model(&mut state))
        } else {
            (read(&store.read()), Vec::new())
        };
        if let Err(e) = publisher.publish(model) {
            store.mark_profiles_changed_again(keys[n * batch..].iter().cloned());
            return Err(e);
        }
        match redis.write(&profiles, &offsets, &tokens) {
            Ok(report) => {
                metrics.written.add(report.written);
                metrics.stale.add(report.stale);
                metrics
                    .pending
                    .set(keys.len().saturating_sub((n + 1) * batch) as i64);
                sampled = profiles.last().map(|(k, _)| k.to_string());
            }
            Err(e) => {
                store.mark_profiles_changed_again(keys[n * batch..].iter().cloned());
                return Err(e.into());
            }
        }
    }
    // The updates of entries that changed no profile (catalogue changes), and of everything
    // applied since the last chunk: published before the checkpoint taken above is committed.
    if publisher.publish.is_some() {
        publisher.publish(crate::store::take_model(&mut store.write()))?;
    }
    Ok(Flushed {
        sampled,
        offsets: taken.offsets,
        epoch: taken.epoch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            RedisTarget::parse("redis://127.0.0.1:6379"),
            Ok(RedisTarget::Single("redis://127.0.0.1:6379".into()))
        );
        assert_eq!(
            RedisTarget::parse("redis-cluster://a:1, b:2/"),
            Ok(RedisTarget::Cluster(vec![
                "redis://a:1".into(),
                "redis://b:2".into()
            ]))
        );
        // TLS: the same, each node with the TLS scheme.
        assert_eq!(
            RedisTarget::parse("rediss://h:6380"),
            Ok(RedisTarget::Single("rediss://h:6380".into()))
        );
        assert_eq!(
            RedisTarget::parse("rediss-cluster://a:1,b:2"),
            Ok(RedisTarget::Cluster(vec![
                "rediss://a:1".into(),
                "rediss://b:2".into()
            ]))
        );
        for bad in [
            "redis-cluster://a:1,b",
            "redis-cluster://:1",
            "redis://",
            "redis-cluster://",
            "redis-cluster://a:1,",
            "rediss://",
            "rediss-cluster://a",
            "http://x:1",
        ] {
            assert!(RedisTarget::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn keys_are_tagged_by_profile() {
        let r = RedisProfiles::new("redis://h:1", RedisSettings::default()).expect("valid");
        assert_eq!(r.key("u:alice"), "kairos:{u:alice}");
        assert_eq!(r.channel(), "kairos:changed");
        assert_eq!(fence(&[]), "0");
        assert_eq!(fence(&[3, 0, 12]), "3,0,12");
        assert_eq!(parse_fence(fence(&[3, 0, 12]).as_bytes()), [3, 0, 12]);
    }
}
