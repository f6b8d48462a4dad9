//! The `log.meta` file: format version and partition count.
//!
//! The partition count is fixed when the log is created because the
//! key → partition mapping depends on it; reopening with another count would
//! silently scatter a key's events over two partitions and break per-key
//! ordering. The file is tiny text, written once via write-to-temp, fsync,
//! rename, fsync-directory, so it is either absent or complete.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use crate::error::LogError;
use crate::fsutil::sync_dir;

/// Name of the metadata file in the log directory.
pub(crate) const META_FILE: &str = "log.meta";
const META_TMP_FILE: &str = "log.meta.tmp";
/// On-disk format version written by this build.
pub(crate) const FORMAT_VERSION: u32 = 1;
const MAGIC: &str = "kairos-log";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) version: u32,
    pub(crate) partitions: u32,
}

/// Reads `log.meta` from `dir`, `Ok(None)` if it does not exist.
pub(crate) fn read_meta(dir: &Path) -> Result<Option<Meta>, LogError> {
    let path = dir.join(META_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogError::io(format_args!("reading {}", path.display()), e)),
    };
    let corrupt = |reason: String| LogError::Corrupt {
        path: path.clone(),
        position: 0,
        reason,
    };
    let mut magic = None;
    let mut version = None;
    let mut partitions = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(corrupt(format!("malformed line {line:?}")));
        };
        let value = value.trim();
        match key.trim() {
            "format" => magic = Some(value.to_owned()),
            "version" => {
                version = Some(
                    value
                        .parse::<u32>()
                        .map_err(|_| corrupt(format!("bad version {value:?}")))?,
                )
            }
            "partitions" => {
                partitions = Some(
                    value
                        .parse::<u32>()
                        .map_err(|_| corrupt(format!("bad partition count {value:?}")))?,
                )
            }
            // Unknown keys are tolerated so that a later minor addition does
            // not make older builds refuse the directory.
            _ => {}
        }
    }
    if magic.as_deref() != Some(MAGIC) {
        return Err(corrupt(format!("not a {MAGIC} metadata file")));
    }
    let version = version.ok_or_else(|| corrupt("missing version".to_owned()))?;
    let partitions = partitions.ok_or_else(|| corrupt("missing partitions".to_owned()))?;
    Ok(Some(Meta {
        version,
        partitions,
    }))
}

/// Writes `log.meta` atomically and durably.
pub(crate) fn write_meta(dir: &Path, meta: Meta) -> Result<(), LogError> {
    let tmp = dir.join(META_TMP_FILE);
    let path = dir.join(META_FILE);
    let text = format!(
        "# Kairos event log metadata. Do not edit.\nformat={MAGIC}\nversion={}\npartitions={}\n",
        meta.version, meta.partitions
    );
    let write = || -> io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        sync_dir(dir)
    };
    write().map_err(|e| LogError::io(format_args!("writing {}", path.display()), e))
}

/// Loads the metadata of an existing log or creates it for a new one, and
/// checks the partition count and version.
pub(crate) fn load_or_create(dir: &Path, partitions: u32) -> Result<Meta, LogError> {
    match read_meta(dir)? {
        Some(meta) => {
            if meta.version == 0 || meta.version > FORMAT_VERSION {
                return Err(LogError::UnsupportedVersion {
                    found: meta.version,
                    supported: FORMAT_VERSION,
                });
            }
            if meta.partitions != partitions {
                return Err(LogError::PartitionCountMismatch {
                    stored: meta.partitions,
                    requested: partitions,
                });
            }
            Ok(meta)
        }
        None => {
            let meta = Meta {
                version: FORMAT_VERSION,
                partitions,
            };
            write_meta(dir, meta)?;
            Ok(meta)
        }
    }
}
