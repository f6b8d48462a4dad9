//! The storage ceilings: what the data directory's disk and the log reader can do at most.
//!
//! Durable ingest can never beat the disk: every acknowledged byte was appended and fdatasynced.
//! [`append_fsync`] measures that ceiling in-process on the data directory's file system, with the
//! same system calls the log writer uses (`write(2)` of a large buffer, then `fdatasync(2)`), and
//! the latency of one small fdatasync, which bounds how fast a lone request can be acknowledged.
//! Recovery can never beat reading the log: [`read_log`] reads every retained record through the
//! embedded log's own reader (checksums verified), which is what a restart's replay does before it
//! decodes and applies anything.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use kairos_log::{EmbeddedLog, EmbeddedLogConfig, EventLog};

use super::stats::Latencies;

/// Figures of the data directory's disk.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiskCeiling {
    /// Bytes per second appended and fdatasynced in 1 MiB writes.
    pub append_fsync_bytes_per_sec: f64,
    /// Latency of `fdatasync` after a 4 KiB append.
    pub fdatasync_p50_us: u64,
    pub fdatasync_p99_us: u64,
}

/// Measures append+fdatasync throughput and small-fdatasync latency for about `duration`, in a
/// scratch file under `dir` that is removed afterwards.
pub fn append_fsync(dir: &Path, duration: Duration) -> std::io::Result<DiskCeiling> {
    let path = dir.join("bench-disk-probe.tmp");
    let result = measure(&path, duration);
    let _ = std::fs::remove_file(&path);
    result
}

fn measure(path: &Path, duration: Duration) -> std::io::Result<DiskCeiling> {
    let mut file = File::create(path)?;
    let small = vec![b'x'; 4096];
    let mut latencies = Latencies::default();
    let started = Instant::now();
    while started.elapsed() < duration / 3 || latencies.len() < 20 {
        file.write_all(&small)?;
        let t = Instant::now();
        file.sync_data()?;
        latencies.record(t.elapsed());
        if latencies.len() >= 5000 {
            break;
        }
    }
    let big = vec![b'y'; 1024 * 1024];
    let mut bytes = 0u64;
    let started = Instant::now();
    while started.elapsed() < duration * 2 / 3 || bytes < 8 * big.len() as u64 {
        file.write_all(&big)?;
        file.sync_data()?;
        bytes += big.len() as u64;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let summary = latencies.summary();
    Ok(DiskCeiling {
        append_fsync_bytes_per_sec: bytes as f64 / elapsed,
        fdatasync_p50_us: summary.p50_us,
        fdatasync_p99_us: summary.p99_us,
    })
}

/// What reading a whole log took.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogRead {
    pub records: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl LogRead {
    pub fn records_per_sec(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Reads every retained record of the log in `dir` (which no server may hold open), partition by
/// partition, in the processor's read size.
pub fn read_log(dir: &Path, config: EmbeddedLogConfig, batch: usize) -> Result<LogRead, String> {
    let log = EmbeddedLog::open(dir, config)
        .map_err(|e| format!("opening event log {}: {e}", dir.display()))?;
    let started = Instant::now();
    let mut read = LogRead::default();
    for (p, start) in log.start_offsets().into_iter().enumerate() {
        let mut offset = start;
        loop {
            let records = log
                .read(p as u32, offset, batch)
                .map_err(|e| format!("reading partition {p}: {e}"))?;
            let Some(last) = records.last() else {
                break;
            };
            offset = last.offset + 1;
            read.records += records.len() as u64;
            read.bytes += records.iter().map(|r| r.payload.len() as u64).sum::<u64>();
        }
    }
    read.elapsed = started.elapsed();
    log.close().map_err(|e| format!("closing event log: {e}"))?;
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_the_disk_and_reads_a_log() {
        let dir = std::env::temp_dir().join(format!("kairos-bench-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = append_fsync(&dir, Duration::from_millis(30)).unwrap();
        assert!(disk.append_fsync_bytes_per_sec > 0.0);
        assert!(disk.fdatasync_p99_us >= disk.fdatasync_p50_us);
        assert!(!dir.join("bench-disk-probe.tmp").exists());

        let log_dir = dir.join("log");
        let config = EmbeddedLogConfig {
            partitions: 2,
            ..Default::default()
        };
        {
            let log = EmbeddedLog::open(&log_dir, config.clone()).unwrap();
            let records = (0..10u8)
                .map(|i| kairos_log::AppendRecord {
                    key: vec![i],
                    timestamp_ms: 1,
                    dedup_id: 0,
                    payload: vec![i; 5],
                    transaction: None,
                })
                .collect();
            log.append(records).wait().unwrap();
            log.close().unwrap();
        }
        let read = read_log(&log_dir, config, 3).unwrap();
        assert_eq!((read.records, read.bytes), (10, 50));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
