//! An API replica's model saved in Redis, so that a replica that starts later begins from it
//! instead of from the first record of the model topic.
//!
//! ## Why
//! An API replica (`kairos api`) builds its model (item statistics, relations, the session model)
//! from the updates the processor replicas publish on the model topic. Read from the first
//! record, that start-up grows with the topic, and once the topic's retention deleted old
//! updates a new replica would build a model that lacks them, unlike every replica already
//! running. So replicas take turns saving the model here, and a starting replica loads the newest
//! save and reads the topic only from the position the save covers. The topic's retention then
//! only needs to cover the time between two saves.
//!
//! ## Layout
//! - `{prefix}:model:snapshot`, a hash, the manifest of the newest save: `id` (`a` or `b`: saves
//!   alternate between two sets of chunk keys), `chunks` (how many), `bytes` (their total), `applied` (the state's per-partition positions
//!   in the events topic, comma-separated: [`State::model_applied`], which the snapshot format
//!   leaves out) and `written_ms`.
//! - `{prefix}:model:snapshot:<id>:<n>`, strings: the save, in the state's snapshot format
//!   ([`crate::store::encode_snapshot`]: header with checksum, then the body), cut into chunks.
//!   The state's checkpoint in it is the position in the *model* topic the save covers.
//! - `{prefix}:model:snapshot:lock`: held (`SET NX PX`) by the replica whose turn it is, for one
//!   save interval, so that replicas do not all save the same model.
//!
//! ## Invariants
//! - The chunks of a save are written before the manifest names them, and the chunks of the
//!   save it replaces are deleted only after; a reader that lost that race (its chunks deleted
//!   under it) reads the manifest again.
//! - A save writes the set of chunk keys the manifest does not name, so a save cut short (the
//!   replica died before its manifest) leaves chunks that the next save overwrites: Redis holds
//!   at most about two saves.
//! - A save is consistent: the state and `applied` are taken under one read lock.
//! - Loading verifies the checksum of the whole save; a corrupt or incomplete save is not used
//!   (the replica builds from the topic and says so). That covers two replicas saving at once,
//!   which the turn lock allows only when a save outlasts the interval: their chunks may mix,
//!   and the mixed save is refused until the next one replaces it.
//!
//! ## Durability
//! Whatever Redis persists. Nothing is lost with a save: the model topic remains the source, and a
//! replica without a usable save reads it from the start.

use std::time::{SystemTime, UNIX_EPOCH};

use redis::{Cmd, Value};

use crate::redis_mirror::{fence, RedisProfiles};
use crate::state::State;
use crate::store::{decode_snapshot, encode_snapshot};

/// Bytes per chunk: far below Redis's 512 MiB string limit, and small enough that one chunk
/// moves well within the connection's timeout.
pub const CHUNK_BYTES: usize = 4 << 20;

/// How a save went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    pub bytes: u64,
    pub chunks: u64,
    /// Events-topic entries the saved model reflects (the sum of `applied`).
    pub entries: u64,
}

/// A model read back from Redis.
pub struct Loaded {
    pub state: State,
    pub bytes: u64,
}

fn manifest_key(prefix: &str) -> String {
    format!("{prefix}:model:snapshot")
}

fn chunk_key(prefix: &str, id: &str, n: u64) -> String {
    format!("{prefix}:model:snapshot:{id}:{n}")
}

fn lock_key(prefix: &str) -> String {
    format!("{prefix}:model:snapshot:lock")
}

fn redis_err(e: redis::RedisError) -> String {
    e.to_string()
}

/// Takes the turn to save for `ttl_ms` unless another replica holds it; true when taken.
pub fn take_turn(redis: &mut RedisProfiles, holder: &str, ttl_ms: u64) -> Result<bool, String> {
    let mut cmd = Cmd::new();
    cmd.arg("SET")
        .arg(lock_key(redis.prefix()))
        .arg(holder)
        .arg("NX")
        .arg("PX")
        .arg(ttl_ms.max(1));
    let answer = redis.run(vec![cmd]).map_err(redis_err)?;
    Ok(matches!(answer.first(), Some(Value::Okay)))
}

/// A model taken for saving: encoded under the state's read lock, written to Redis after it.
pub struct Prepared {
    bytes: Vec<u8>,
    applied: String,
    /// Events-topic entries the model reflects (the sum of `applied`).
    pub entries: u64,
}

impl Prepared {
    pub fn of(state: &State) -> Result<Prepared, String> {
        Ok(Prepared {
            bytes: encode_snapshot(state).map_err(|e| e.to_string())?,
            applied: fence(&state.model_applied),
            entries: state.model_entries(),
        })
    }
}

/// Saves `model` as the newest save, and deletes the one it replaces.
pub fn save(redis: &mut RedisProfiles, model: &Prepared) -> Result<Saved, String> {
    save_in_chunks(redis, model, CHUNK_BYTES)
}

/// [`save`] in chunks of `chunk_bytes`.
pub fn save_in_chunks(
    redis: &mut RedisProfiles,
    model: &Prepared,
    chunk_bytes: usize,
) -> Result<Saved, String> {
    let prefix = redis.prefix().to_owned();
    let previous = read_manifest(redis)?;
    let id = match &previous {
        Some(old) if old.id == "a" => "b",
        _ => "a",
    };
    let chunks = model.bytes.chunks(chunk_bytes.max(1)).collect::<Vec<_>>();
    for (n, chunk) in chunks.iter().enumerate() {
        let mut cmd = Cmd::new();
        cmd.arg("SET")
            .arg(chunk_key(&prefix, id, n as u64))
            .arg(*chunk);
        redis.run(vec![cmd]).map_err(redis_err)?;
    }
    let written_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut cmd = Cmd::new();
    cmd.arg("HSET")
        .arg(manifest_key(&prefix))
        .arg("id")
        .arg(id)
        .arg("chunks")
        .arg(chunks.len() as u64)
        .arg("bytes")
        .arg(model.bytes.len() as u64)
        .arg("applied")
        .arg(&model.applied)
        .arg("written_ms")
        .arg(written_ms);
    redis.run(vec![cmd]).map_err(redis_err)?;
    if let Some(old) = previous.filter(|old| old.id != id) {
        for n in 0..old.chunks {
            let mut cmd = Cmd::new();
            cmd.arg("DEL").arg(chunk_key(&prefix, &old.id, n));
            redis.run(vec![cmd]).map_err(redis_err)?;
        }
    }
    Ok(Saved {
        bytes: model.bytes.len() as u64,
        chunks: chunks.len() as u64,
        entries: model.entries,
    })
}

/// The newest save, or `None` when there is none. Errors name what is wrong with it.
pub fn load(redis: &mut RedisProfiles) -> Result<Option<Loaded>, String> {
    // A save replaced while it is read loses its chunks: read the new one.
    for _ in 0..3 {
        let Some(manifest) = read_manifest(redis)? else {
            return Ok(None);
        };
        let mut bytes = Vec::with_capacity(manifest.bytes as usize);
        let mut complete = true;
        for n in 0..manifest.chunks {
            let mut cmd = Cmd::new();
            cmd.arg("GET")
                .arg(chunk_key(redis.prefix(), &manifest.id, n));
            match redis.run(vec![cmd]).map_err(redis_err)?.pop() {
                Some(Value::BulkString(chunk)) => bytes.extend_from_slice(&chunk),
                _ => {
                    complete = false;
                    break;
                }
            }
        }
        if !complete {
            continue;
        }
        let mut state =
            decode_snapshot(&bytes, "the model saved in Redis").map_err(|e| e.to_string())?;
        state.model_applied = manifest.applied;
        return Ok(Some(Loaded {
            state,
            bytes: bytes.len() as u64,
        }));
    }
    Err("the saved model kept changing while it was read".into())
}

struct Manifest {
    id: String,
    chunks: u64,
    bytes: u64,
    applied: Vec<u64>,
}

fn read_manifest(redis: &mut RedisProfiles) -> Result<Option<Manifest>, String> {
    let mut cmd = Cmd::new();
    cmd.arg("HGETALL").arg(manifest_key(redis.prefix()));
    let answer = redis.run(vec![cmd]).map_err(redis_err)?;
    let fields: Vec<(String, String)> = match answer.into_iter().next() {
        Some(v) => redis::from_redis_value(v).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    if fields.is_empty() {
        return Ok(None);
    }
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| format!("the saved model's manifest has no {name:?}"))
    };
    let number = |name: &str| -> Result<u64, String> {
        field(name)?
            .parse()
            .map_err(|_| format!("the saved model's manifest has a bad {name:?}"))
    };
    let applied = field("applied")?
        .split(',')
        .map(|o| o.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| "the saved model's manifest has a bad \"applied\"".to_string())?;
    Ok(Some(Manifest {
        id: field("id")?.to_owned(),
        chunks: number("chunks")?,
        bytes: number("bytes")?,
        applied,
    }))
}
