//! The `StateStore` seam and its embedded implementation.
//!
//! The processor writes through [`StateStore::apply`]; the recommender reads through
//! [`StateStore::read`], which hands it a consistent [`State`]. The embedded store keeps the state
//! in memory behind one read-write lock and persists it as snapshots in the data directory; a Redis
//! store (scale-out) implements the same trait.
//!
//! ## Snapshot files
//! `state/snapshot-<seq:020>.bin`, where `seq` is the last log sequence number the snapshot covers:
//!
//! ```text
//! [8 bytes magic "KAIROSS2"][u32 LE crc32 of body][u64 LE body length][body: postcard(State)]
//! ```
//!
//! The magic's digit is the layout version of `State`: it changes whenever the serialized layout
//! does, so a snapshot of another layout is skipped as unreadable (and the state rebuilt from the
//! log) rather than misread.
//!
//! Durability: a snapshot is written to a `.tmp` file, fsynced, renamed into place, and the
//! directory is fsynced; a crash at any point leaves either the previous snapshot or the new one,
//! never a half-written file under a final name. Loading takes the newest snapshot whose checksum
//! verifies and falls back to older ones. The two newest snapshots are kept.
//!
//! Invariant: a snapshot holds the state *and* its checkpoint together, so restoring it and
//! replaying the log from that checkpoint reproduces exactly the state a straight replay gives.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};

use crate::config::StateConfig;
use crate::profile::Profile;
use crate::state::{Applied, Checkpoint, LogPosition, State, StateMemory};
use kairos_types::LogEntry;

const MAGIC: &[u8; 8] = b"KAIROSS2";
const KEEP_SNAPSHOTS: usize = 2;

#[derive(Debug)]
pub enum StateError {
    Io(String, std::io::Error),
    Corrupt(String),
}

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateError::Io(what, e) => write!(f, "{what}: {e}"),
            StateError::Corrupt(what) => write!(f, "corrupt snapshot: {what}"),
        }
    }
}

impl std::error::Error for StateError {}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StateError {
    let what = what.into();
    move |e| StateError::Io(what, e)
}

/// What one `apply` call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub applied: usize,
    pub skipped: usize,
}

/// A snapshot written to disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub path: PathBuf,
    pub checkpoint: Checkpoint,
    pub bytes: u64,
}

/// Backend-independent view of the state's size.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct StateStats {
    pub memory: StateMemory,
    pub checkpoint_seq: u64,
    pub events_applied: u64,
}

pub trait StateStore: Send + Sync + 'static {
    /// Applies log entries in order, skipping those the checkpoint already covers.
    fn apply(&self, entries: &[(LogPosition, LogEntry)]) -> ApplyReport;
    /// The log positions the state covers.
    fn checkpoint(&self) -> Checkpoint;
    /// A consistent read-only view for the recommender and the API.
    fn read(&self) -> RwLockReadGuard<'_, State>;
    /// Persists the state with its checkpoint.
    fn snapshot(&self) -> Result<SnapshotInfo, StateError>;
    /// Starts persisting the state with its checkpoint, finishing in the background when the
    /// backend can, so that applying never stops for a snapshot; the default takes it right away.
    fn begin_snapshot(&self) -> Result<SnapshotJob, StateError> {
        Ok(SnapshotJob::finished(self.snapshot()))
    }
    fn stats(&self) -> StateStats;
    /// A profile read from outside (an API replica's, from Redis) in the state's numbering,
    /// adding the item, category and brand names the state does not know yet; `None` for a
    /// corrupt one.
    fn import_profile(&self, profile: &crate::portable::PortableProfile) -> Option<Profile>;
}

/// See [`EmbeddedStore::take_for_mirror`].
#[derive(Debug, Default)]
pub struct MirrorTake {
    pub keys: rustc_hash::FxHashSet<Box<str>>,
    pub links: Vec<(Box<str>, Box<str>)>,
    pub offsets: Vec<u64>,
    /// The group epoch of `offsets` (see `GroupView::epoch`).
    pub epoch: u64,
}

/// The model updates `state` recorded since the last call (see `GroupView::publish_model`), at
/// most [`MODEL_BATCH_ENTRIES`] entries per batch, each partition's in order.
pub fn take_model(state: &mut State) -> Vec<kairos_types::ModelBatch> {
    let clock = state.clock;
    match &mut state.group {
        Some(g) if !g.model_ops.is_empty() => {
            model_batches(std::mem::take(&mut g.model_ops), clock)
        }
        _ => Vec::new(),
    }
}

/// Entries per published model batch at most, which keeps a batch's record well below a
/// broker's default message size limit (1 MB).
pub const MODEL_BATCH_ENTRIES: usize = 500;

/// Groups recorded model updates (position, update; in apply order) into batches per partition.
fn model_batches(
    ops: Vec<(u32, u64, kairos_types::ModelOp)>,
    clock: i64,
) -> Vec<kairos_types::ModelBatch> {
    let mut batches: Vec<kairos_types::ModelBatch> = Vec::new();
    // The batch each partition is filling, as an index in `batches`.
    let mut filling: rustc_hash::FxHashMap<u32, usize> = Default::default();
    for (partition, offset, op) in ops {
        let at = match filling.get(&partition) {
            Some(&i)
                if batches[i].entries.len() < MODEL_BATCH_ENTRIES
                    || batches[i].entries.last().is_some_and(|(o, _)| *o == offset) =>
            {
                i
            }
            _ => {
                batches.push(kairos_types::ModelBatch {
                    partition,
                    clock,
                    entries: Vec::new(),
                });
                filling.insert(partition, batches.len() - 1);
                batches.len() - 1
            }
        };
        let entries = &mut batches[at].entries;
        match entries.last_mut() {
            Some((o, ops)) if *o == offset => ops.push(op),
            _ => entries.push((offset, vec![op])),
        }
    }
    batches
}

/// In-memory state with snapshot files under `<data_dir>/state`.
pub struct EmbeddedStore {
    dir: PathBuf,
    state: RwLock<State>,
}

impl EmbeddedStore {
    /// Opens the store: restores the newest valid snapshot, or starts empty.
    pub fn open(dir: &Path, config: StateConfig) -> Result<EmbeddedStore, StateError> {
        fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let mut state = None;
        for path in list_snapshots(dir)?.into_iter().rev() {
            match read_snapshot(&path) {
                Ok(mut s) => {
                    s.adopt_config(&config);
                    tracing::info!(path = %path.display(), seq = s.checkpoint.seq, "restored state snapshot");
                    state = Some(s);
                    break;
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable snapshot")
                }
            }
        }
        Ok(EmbeddedStore {
            dir: dir.to_owned(),
            state: RwLock::new(state.unwrap_or_else(|| State::new(config))),
        })
    }

    /// An in-memory store that never touches disk, starting from `state` (a snapshot read from
    /// elsewhere: an API replica's model from Redis) under this node's `config`.
    pub fn in_memory_from(mut state: State, config: StateConfig) -> EmbeddedStore {
        state.adopt_config(&config);
        EmbeddedStore {
            dir: PathBuf::new(),
            state: RwLock::new(state),
        }
    }

    /// An in-memory store that never touches disk (evaluation, tests).
    pub fn in_memory(config: StateConfig) -> EmbeddedStore {
        EmbeddedStore {
            dir: PathBuf::new(),
            state: RwLock::new(State::new(config)),
        }
    }

    /// Exclusive access, for callers that drive the state directly (evaluation).
    pub fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts remembering which profiles change, for a mirror that copies them elsewhere
    /// (see [`crate::profile::Profiles::track_changes`]).
    pub fn track_profile_changes(&self) {
        self.write().users.track_changes(true);
    }

    /// What a mirror copies next, taken at once under one write lock: the profile keys changed
    /// and the identity links made since the last call, and the checkpoint (with its group
    /// epoch) below which every change is among them.
    pub fn take_for_mirror(&self) -> MirrorTake {
        let mut state = self.write();
        let keys = state.users.take_changes();
        let (links, epoch) = match &mut state.group {
            Some(g) => {
                g.in_flight = keys.clone();
                (std::mem::take(&mut g.new_links), g.epoch)
            }
            None => (Vec::new(), 0),
        };
        MirrorTake {
            keys,
            links,
            offsets: state.checkpoint.offsets.clone(),
            epoch,
        }
    }

    /// The mirror is done with what it took: written, or marked changed again.
    pub fn mirror_done(&self) {
        if let Some(g) = &mut self.write().group {
            g.in_flight.clear();
        }
    }

    /// In a processor group's state (see `GroupView`), whose profiles live in Redis: drops from
    /// memory, least recently active first, profiles whose every change a mirror has written
    /// (neither changed since its last take nor in the flush under way), until at most `keep`
    /// remain. Nothing happens while at most `keep + keep / 10` are held, so that this runs once
    /// per tenth of `keep` new profiles, not at every one. Returns the keys dropped.
    pub fn evict_copied_profiles(&self, keep: usize) -> Vec<Box<str>> {
        let keep = keep.max(1);
        if self.read().users.len() <= keep + keep / 10 {
            return Vec::new();
        }
        let mut state = self.write();
        let state = &mut *state;
        let (Some(group), held) = (&state.group, state.users.len()) else {
            return Vec::new();
        };
        let mut idle: Vec<(i64, Box<str>)> = state
            .users
            .iter()
            .filter(|(k, _)| !state.users.is_changed(k) && !group.in_flight.contains(*k))
            .map(|(k, p)| (p.last_seen, k.into()))
            .collect();
        let excess = held.saturating_sub(keep);
        if idle.len() > excess {
            idle.select_nth_unstable_by_key(excess, |(seen, _)| *seen);
            idle.truncate(excess);
        }
        for (_, key) in &idle {
            state.users.forget(key);
        }
        idle.into_iter().map(|(_, k)| k).collect()
    }

    /// Puts back links a mirror took and could not copy.
    pub fn requeue_links(&self, links: Vec<(Box<str>, Box<str>)>) {
        if let Some(g) = &mut self.write().group {
            g.new_links.extend(links);
        }
    }

    /// Marks `keys` changed again, after a failed copy.
    pub fn mark_profiles_changed_again(&self, keys: impl IntoIterator<Item = Box<str>>) {
        self.write().users.mark_changed_again(keys);
    }

    /// Marks every profile changed (the copy was lost).
    pub fn mark_all_profiles_changed(&self) {
        self.write().users.mark_all_changed();
    }
}

impl StateStore for EmbeddedStore {
    fn apply(&self, entries: &[(LogPosition, LogEntry)]) -> ApplyReport {
        let mut state = self.write();
        let mut report = ApplyReport::default();
        for (pos, entry) in entries {
            match state.apply(*pos, entry) {
                Applied::Applied => report.applied += 1,
                Applied::Skipped => report.skipped += 1,
            }
        }
        report
    }

    fn checkpoint(&self) -> Checkpoint {
        self.read().checkpoint.clone()
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn import_profile(&self, profile: &crate::portable::PortableProfile) -> Option<Profile> {
        profile.import(&mut self.write())
    }

    fn snapshot(&self) -> Result<SnapshotInfo, StateError> {
        self.check_dir()?;
        let (body, checkpoint) = {
            let state = self.read();
            (serialize(&state)?, state.checkpoint.clone())
        };
        let info = write_snapshot(&self.dir, &body, checkpoint)?;
        prune_snapshots(&self.dir)?;
        Ok(info)
    }

    /// Forks the process: the child, which sees the state exactly as it is at the fork (the
    /// caller is the only writer and is inside this call), serializes and writes the snapshot
    /// and exits; the parent returns at once and goes on applying, its pages shared
    /// copy-on-write with the child. Serializing a million profiles takes seconds, during which
    /// a synchronous snapshot stops the processor and every read waiting for it. Falls back to a
    /// synchronous snapshot where the process cannot fork.
    fn begin_snapshot(&self) -> Result<SnapshotJob, StateError> {
        self.check_dir()?;
        let state = self.read();
        let checkpoint = state.checkpoint.clone();
        // SAFETY: the child only reads memory (the state, which nothing else writes: the single
        // writer is this thread, now in the child), allocates (glibc's malloc is made fork-safe
        // by its own fork handlers), writes files and leaves with `_exit`, running no destructor,
        // no other thread's code and no lock another thread could hold (caches, logging).
        let forking = std::time::Instant::now();
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let written = serialize(&state)
                .and_then(|body| write_snapshot(&self.dir, &body, checkpoint).map(|_| ()));
            // SAFETY: ends the child without returning into the parent's code.
            unsafe { libc::_exit(i32::from(written.is_err())) }
        }
        drop(state);
        // fork() copies the page tables of the whole (large) heap, and every thread of the
        // process waits meanwhile: the pause readers see.
        tracing::info!(
            pause_ms = (forking.elapsed().as_secs_f64() * 1e4).round() / 10.0,
            "snapshot started in a forked child"
        );
        if pid < 0 {
            let error = std::io::Error::last_os_error();
            tracing::warn!(%error, "cannot fork for a background snapshot; taking it synchronously");
            return Ok(SnapshotJob::finished(self.snapshot()));
        }
        Ok(SnapshotJob {
            state: JobState::Forked {
                pid,
                dir: self.dir.clone(),
                checkpoint,
            },
        })
    }

    fn stats(&self) -> StateStats {
        let state = self.read();
        StateStats {
            memory: state.memory(),
            checkpoint_seq: state.checkpoint.seq,
            events_applied: state.counters.events_applied,
        }
    }
}

impl EmbeddedStore {
    fn check_dir(&self) -> Result<(), StateError> {
        if self.dir.as_os_str().is_empty() {
            return Err(StateError::Corrupt(
                "in-memory store has no snapshot directory".into(),
            ));
        }
        Ok(())
    }
}

/// A snapshot being written (see [`StateStore::begin_snapshot`]).
pub struct SnapshotJob {
    state: JobState,
}

enum JobState {
    Finished(Option<Result<SnapshotInfo, StateError>>),
    Forked {
        pid: libc::pid_t,
        dir: PathBuf,
        checkpoint: Checkpoint,
    },
}

impl SnapshotJob {
    /// A job that is already done.
    pub fn finished(result: Result<SnapshotInfo, StateError>) -> SnapshotJob {
        SnapshotJob {
            state: JobState::Finished(Some(result)),
        }
    }

    /// The outcome once the snapshot is written, `None` while it is still being written.
    pub fn poll(&mut self) -> Option<Result<SnapshotInfo, StateError>> {
        self.check(false)
    }

    /// Blocks until the snapshot is written.
    pub fn wait(&mut self) -> Result<SnapshotInfo, StateError> {
        self.check(true)
            .unwrap_or_else(|| Err(StateError::Corrupt("snapshot job already finished".into())))
    }

    fn check(&mut self, block: bool) -> Option<Result<SnapshotInfo, StateError>> {
        let JobState::Forked {
            pid,
            dir,
            checkpoint,
        } = &self.state
        else {
            let JobState::Finished(result) = &mut self.state else {
                unreachable!("the other state");
            };
            return result.take();
        };
        let mut status = 0;
        let flags = if block { 0 } else { libc::WNOHANG };
        // SAFETY: waits for our own child process; `status` is a valid out-pointer.
        let waited = unsafe { libc::waitpid(*pid, &mut status, flags) };
        if waited == 0 {
            return None;
        }
        let result = if waited < 0 {
            Err(StateError::Io(
                "waiting for the snapshot process".into(),
                std::io::Error::last_os_error(),
            ))
        } else if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            let path = snapshot_path(dir, checkpoint.seq);
            fs::metadata(&path)
                .map_err(io_err(format!("reading {}", path.display())))
                .and_then(|m| {
                    prune_snapshots(dir)?;
                    Ok(SnapshotInfo {
                        path,
                        checkpoint: checkpoint.clone(),
                        bytes: m.len(),
                    })
                })
        } else {
            Err(StateError::Corrupt(format!(
                "the snapshot process failed (wait status {status})"
            )))
        };
        self.state = JobState::Finished(None);
        Some(result)
    }
}

impl Drop for SnapshotJob {
    fn drop(&mut self) {
        if let JobState::Forked { pid, .. } = self.state {
            // Reap the child so it does not linger as a zombie; its file is complete or absent.
            let mut status = 0;
            // SAFETY: as in `check`.
            unsafe {
                libc::waitpid(pid, &mut status, 0);
            }
        }
    }
}

fn serialize(state: &State) -> Result<Vec<u8>, StateError> {
    postcard::to_stdvec(state).map_err(|e| StateError::Corrupt(format!("serializing: {e}")))
}

fn snapshot_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("snapshot-{seq:020}.bin"))
}

/// The header of a snapshot of `body` (see the module docs).
fn snapshot_header(body: &[u8]) -> Vec<u8> {
    let mut header = Vec::with_capacity(20);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    header.extend_from_slice(&(body.len() as u64).to_le_bytes());
    header
}

/// `state` in the snapshot format (header and body), for a snapshot kept somewhere else than a
/// file: an API replica's model in Redis.
pub fn encode_snapshot(state: &State) -> Result<Vec<u8>, StateError> {
    let body = serialize(state)?;
    let mut bytes = snapshot_header(&body);
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// The state in `bytes`, written by [`encode_snapshot`] (or read from a snapshot file), its
/// header and checksum verified; `what` names where it came from, for errors.
pub fn decode_snapshot(bytes: &[u8], what: &str) -> Result<State, StateError> {
    if bytes.len() < 20 || &bytes[..8] != MAGIC {
        return Err(StateError::Corrupt(format!("{what}: bad header")));
    }
    let crc = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")) as usize;
    let body = &bytes[20..];
    if body.len() != len || crc32fast::hash(body) != crc {
        return Err(StateError::Corrupt(format!("{what}: checksum mismatch")));
    }
    postcard::from_bytes(body).map_err(|e| StateError::Corrupt(format!("{what}: {e}")))
}

/// Writes `body` as the snapshot of `checkpoint`: a temporary file, fsynced, renamed into place,
/// the directory fsynced.
fn write_snapshot(
    dir: &Path,
    body: &[u8],
    checkpoint: Checkpoint,
) -> Result<SnapshotInfo, StateError> {
    let path = snapshot_path(dir, checkpoint.seq);
    let tmp = path.with_extension("bin.tmp");
    let mut file = fs::File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    let header = snapshot_header(body);
    file.write_all(&header)
        .and_then(|_| file.write_all(body))
        .and_then(|_| file.sync_all())
        .map_err(io_err(format!("writing {}", tmp.display())))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io_err(format!("renaming {}", tmp.display())))?;
    sync_dir(dir)?;
    Ok(SnapshotInfo {
        path,
        checkpoint,
        bytes: (header.len() + body.len()) as u64,
    })
}

/// Keeps the newest [`KEEP_SNAPSHOTS`] snapshots.
fn prune_snapshots(dir: &Path) -> Result<(), StateError> {
    let snapshots = list_snapshots(dir)?;
    if snapshots.len() > KEEP_SNAPSHOTS {
        for old in &snapshots[..snapshots.len() - KEEP_SNAPSHOTS] {
            let _ = fs::remove_file(old);
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("syncing {}", dir.display())))
}

/// Snapshot files, oldest first (names sort by sequence number).
fn list_snapshots(dir: &Path) -> Result<Vec<PathBuf>, StateError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(format!("listing {}", dir.display())))? {
        let path = entry.map_err(io_err("listing snapshots"))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("snapshot-") && name.ends_with(".bin") {
            out.push(path);
        } else if name.ends_with(".bin.tmp") {
            let _ = fs::remove_file(&path);
        }
    }
    out.sort();
    Ok(out)
}

fn read_snapshot(path: &Path) -> Result<State, StateError> {
    let bytes = fs::read(path).map_err(io_err(format!("reading {}", path.display())))?;
    decode_snapshot(&bytes, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_types::{normalize_json, RequestContext};

    fn entry(n: u64) -> (LogPosition, LogEntry) {
        let raw = format!(
            r#"{{"type":"track","event":"product_view","anonymousId":"a{}","messageId":"m{n}","properties":{{"product_id":"p{}"}}}}"#,
            n % 3,
            n % 5
        );
        let req = RequestContext {
            received_at: 1_000 + n as i64,
            ..Default::default()
        };
        let pos = LogPosition {
            partition: 0,
            offset: n,
            seq: n + 1,
        };
        (pos, LogEntry::Event(normalize_json(&raw, &req).unwrap()))
    }

    /// A background snapshot (written by a forked child) restores exactly the state of the
    /// moment it began, although the parent kept applying, and only the newest snapshots stay.
    #[test]
    fn background_snapshot_captures_the_state_when_it_began() {
        let dir = std::env::temp_dir().join(format!("kairos-store-fork-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = EmbeddedStore::open(&dir, StateConfig::default()).unwrap();
        let entries: Vec<_> = (0..40).map(entry).collect();
        store.apply(&entries[..20]);
        let expected = EmbeddedStore::in_memory(StateConfig::default());
        expected.apply(&entries[..20]);
        let mut job = store.begin_snapshot().unwrap();
        store.apply(&entries[20..]);
        let info = job.wait().unwrap();
        assert_eq!(info.checkpoint.seq, 20);
        assert!(info.bytes > 20);
        let restored = EmbeddedStore::open(&dir, StateConfig::default()).unwrap();
        let (a, b) = (restored.read(), expected.read());
        assert_eq!(a.checkpoint, b.checkpoint);
        assert_eq!(a.users, b.users);
        assert_eq!(a.sessions, b.sessions);
        assert_eq!(a.item_data, b.item_data);
        assert_eq!((a.clock, &a.counters), (b.clock, &b.counters));
        drop((a, b));
        for _ in 0..3 {
            store.begin_snapshot().unwrap().wait().unwrap();
        }
        assert_eq!(list_snapshots(&dir).unwrap().len(), KEEP_SNAPSHOTS);
        fs::remove_dir_all(&dir).unwrap();
    }
}
