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
//! [8 bytes magic "KAIROSS1"][u32 LE crc32 of body][u64 LE body length][body: postcard(State)]
//! ```
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
use crate::state::{Applied, Checkpoint, LogPosition, State, StateMemory};
use kairos_types::LogEntry;

const MAGIC: &[u8; 8] = b"KAIROSS1";
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
    fn stats(&self) -> StateStats;
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
                    *s.sessions.config_mut() = config.session_model.clone();
                    s.config = config.clone();
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

    fn snapshot(&self) -> Result<SnapshotInfo, StateError> {
        if self.dir.as_os_str().is_empty() {
            return Err(StateError::Corrupt(
                "in-memory store has no snapshot directory".into(),
            ));
        }
        let (body, checkpoint) = {
            let state = self.read();
            let body = postcard::to_stdvec(&*state)
                .map_err(|e| StateError::Corrupt(format!("serializing: {e}")))?;
            (body, state.checkpoint.clone())
        };
        let name = format!("snapshot-{:020}.bin", checkpoint.seq);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let mut file =
            fs::File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        let mut header = Vec::with_capacity(20);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        header.extend_from_slice(&(body.len() as u64).to_le_bytes());
        file.write_all(&header)
            .and_then(|_| file.write_all(&body))
            .and_then(|_| file.sync_all())
            .map_err(io_err(format!("writing {}", tmp.display())))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io_err(format!("renaming {}", tmp.display())))?;
        sync_dir(&self.dir)?;
        let snapshots = list_snapshots(&self.dir)?;
        if snapshots.len() > KEEP_SNAPSHOTS {
            for old in &snapshots[..snapshots.len() - KEEP_SNAPSHOTS] {
                let _ = fs::remove_file(old);
            }
        }
        Ok(SnapshotInfo {
            path,
            checkpoint,
            bytes: (header.len() + body.len()) as u64,
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
    if bytes.len() < 20 || &bytes[..8] != MAGIC {
        return Err(StateError::Corrupt(format!(
            "{}: bad header",
            path.display()
        )));
    }
    let crc = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")) as usize;
    let body = &bytes[20..];
    if body.len() != len || crc32fast::hash(body) != crc {
        return Err(StateError::Corrupt(format!(
            "{}: checksum mismatch",
            path.display()
        )));
    }
    postcard::from_bytes(body).map_err(|e| StateError::Corrupt(format!("{}: {e}", path.display())))
}
