//! Tests of the embedded log through the public [`EventLog`] API.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;

use super::*;
use crate::completion::tests::block_on;
use crate::recovery::partition_dir_name;

/// A unique directory under the system temp dir, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "kairos-log-test-{name}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).expect("create test dir");
        TestDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Deterministic pseudo-random numbers (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn config(partitions: u32, segment_bytes: u64) -> EmbeddedLogConfig {
    EmbeddedLogConfig {
        partitions,
        segment_bytes,
        fsync: FsyncPolicy::Never,
        ..EmbeddedLogConfig::default()
    }
}

fn record(key: &str, timestamp_ms: i64, dedup_id: u64, payload: &[u8]) -> AppendRecord {
    AppendRecord {
        key: key.as_bytes().to_vec(),
        timestamp_ms,
        dedup_id,
        payload: payload.to_vec(),
        transaction: None,
    }
}

fn append(log: &EmbeddedLog, records: Vec<AppendRecord>) -> Vec<AppendOutcome> {
    log.append(records).wait().expect("append")
}

/// Reads a whole partition in small chunks (exercising resumed reads).
fn read_partition(log: &EmbeddedLog, partition: u32) -> Vec<Record> {
    let mut offset = log.start_offsets()[partition as usize];
    let end = log.end_offsets()[partition as usize];
    let mut out = Vec::new();
    while offset < end {
        let chunk = log.read(partition, offset, 7).expect("read");
        assert!(!chunk.is_empty(), "read made no progress at {offset}");
        offset += chunk.len() as u64;
        out.extend(chunk);
    }
    out
}

/// Every retained record, merged across partitions by global sequence number.
fn read_all_by_seq(log: &EmbeddedLog) -> Vec<Record> {
    let mut all: Vec<Record> = (0..log.partition_count())
        .flat_map(|p| read_partition(log, p))
        .collect();
    all.sort_by_key(|r| r.seq);
    all
}

/// Checks the structural invariants of every partition.
fn check_invariants(log: &EmbeddedLog) {
    let starts = log.start_offsets();
    let ends = log.end_offsets();
    let mut seqs = HashSet::new();
    for p in 0..log.partition_count() {
        let records = read_partition(log, p);
        assert_eq!(records.len() as u64, ends[p as usize] - starts[p as usize]);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.partition, p);
            assert_eq!(
                r.offset,
                starts[p as usize] + i as u64,
                "offsets contiguous"
            );
            assert!(r.seq >= 1 && r.seq <= log.committed_seq());
            assert!(seqs.insert(r.seq), "seq {} is not unique", r.seq);
        }
        assert!(
            records.windows(2).all(|w| w[0].seq < w[1].seq),
            "seq increasing"
        );
    }
}

fn active_segment(dir: &Path, partition: u32) -> PathBuf {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.join(partition_dir_name(partition)))
        .expect("list partition")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files.pop().expect("a segment")
}

fn payload_for(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j) as u8).collect()
}

#[test]
fn round_trip_across_partitions_and_segment_rolls() {
    let dir = TestDir::new("roundtrip");
    let log = EmbeddedLog::open(dir.path(), config(4, 512)).expect("open");
    let mut rng = Rng(1);
    let mut appended = Vec::new();
    let mut next_offsets = [0u64; 4];
    let mut i = 0;
    while appended.len() < 400 {
        let batch: Vec<AppendRecord> = (0..1 + rng.below(30) as usize)
            .map(|_| {
                i += 1;
                let key = format!("user-{}", rng.below(25));
                record(
                    &key,
                    1_000 + i as i64,
                    0,
                    &payload_for(i, rng.below(120) as usize),
                )
            })
            .collect();
        let outcomes = append(&log, batch.clone());
        assert_eq!(outcomes.len(), batch.len());
        for (rec, outcome) in batch.into_iter().zip(outcomes) {
            let AppendOutcome::Appended {
                partition,
                offset,
                seq,
            } = outcome
            else {
                panic!("unexpected duplicate");
            };
            assert_eq!(partition, partition_for(&rec.key, 4));
            assert_eq!(offset, next_offsets[partition as usize]);
            next_offsets[partition as usize] += 1;
            assert_eq!(seq, appended.len() as u64 + 1, "seq follows append order");
            appended.push((partition, rec));
        }
    }
    assert_eq!(log.end_offsets(), next_offsets.to_vec());
    assert_eq!(log.committed_seq(), appended.len() as u64);
    let stats = log.stats();
    assert!(
        stats.segment_count > 8,
        "segments rolled: {}",
        stats.segment_count
    );
    assert_eq!(stats.partition_records, next_offsets.to_vec());
    assert_eq!(stats.appended_records, appended.len() as u64);

    check_invariants(&log);
    let merged = read_all_by_seq(&log);
    assert_eq!(merged.len(), appended.len());
    for (read, (partition, rec)) in merged.iter().zip(&appended) {
        assert_eq!(read.partition, *partition);
        assert_eq!(read.payload, rec.payload);
        assert_eq!(read.timestamp_ms, rec.timestamp_ms);
    }
    log.close().expect("close");
}

#[test]
fn reads_start_at_any_offset() {
    let dir = TestDir::new("offsets");
    let log = EmbeddedLog::open(dir.path(), config(1, 64 * 1024)).expect("open");
    let records: Vec<AppendRecord> = (0..3_000)
        .map(|i| record("k", i, 0, &payload_for(i as usize, 100)))
        .collect();
    for chunk in records.chunks(100) {
        append(&log, chunk.to_vec());
    }
    for from in (0..3_000u64).step_by(7) {
        let got = log.read(0, from, 3).expect("read");
        let expected = (from..(from + 3).min(3_000)).collect::<Vec<_>>();
        assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), expected);
        assert_eq!(got[0].payload, records[from as usize].payload);
    }
    assert!(log.read(0, 3_000, 10).expect("read at end").is_empty());
    assert!(log.read(0, 5, 0).expect("zero max").is_empty());
    assert!(matches!(
        log.read(0, 3_001, 10),
        Err(LogError::OffsetOutOfRange { end: 3_000, .. })
    ));
    assert!(matches!(
        log.read(1, 0, 10),
        Err(LogError::InvalidPartition {
            partition: 1,
            partitions: 1
        })
    ));
}

#[test]
fn reopen_preserves_everything_and_continues() {
    let dir = TestDir::new("reopen");
    let before = {
        let log = EmbeddedLog::open(dir.path(), config(3, 700)).expect("open");
        for i in 0..200usize {
            append(
                &log,
                vec![record(
                    &format!("u{}", i % 13),
                    i as i64,
                    0,
                    &payload_for(i, i % 50),
                )],
            );
        }
        log.close().expect("close");
        read_all_by_seq(&log)
    };
    let log = EmbeddedLog::open(dir.path(), config(3, 700)).expect("reopen");
    assert_eq!(read_all_by_seq(&log), before);
    assert_eq!(log.committed_seq(), 200);
    let ends = log.end_offsets();
    let outcome = append(&log, vec![record("u1", 500, 0, b"after")]);
    let partition = partition_for(b"u1", 3);
    assert_eq!(
        outcome,
        vec![AppendOutcome::Appended {
            partition,
            offset: ends[partition as usize],
            seq: 201
        }]
    );
    check_invariants(&log);
    drop(log);

    assert!(matches!(
        EmbeddedLog::open(dir.path(), config(4, 700)),
        Err(LogError::PartitionCountMismatch {
            stored: 3,
            requested: 4
        })
    ));
}

#[test]
fn metadata_file_guards_the_format() {
    let dir = TestDir::new("meta");
    drop(EmbeddedLog::open(dir.path(), config(2, 1 << 20)).expect("create"));
    let meta = fs::read_to_string(dir.path().join("log.meta")).expect("read meta");
    assert!(
        meta.contains("version=1") && meta.contains("partitions=2"),
        "{meta}"
    );

    fs::write(
        dir.path().join("log.meta"),
        meta.replace("version=1", "version=2"),
    )
    .expect("write");
    assert!(matches!(
        EmbeddedLog::open(dir.path(), config(2, 1 << 20)),
        Err(LogError::UnsupportedVersion {
            found: 2,
            supported: 1
        })
    ));
    fs::write(dir.path().join("log.meta"), "garbage").expect("write");
    assert!(matches!(
        EmbeddedLog::open(dir.path(), config(2, 1 << 20)),
        Err(LogError::Corrupt { .. })
    ));
}

/// Appends `count` records spread over the partitions and returns them per
/// partition in offset order (payload only).
fn fill(log: &EmbeddedLog, count: usize, rng: &mut Rng) -> BTreeMap<u32, Vec<Vec<u8>>> {
    let mut per_partition: BTreeMap<u32, Vec<Vec<u8>>> = BTreeMap::new();
    for i in 0..count {
        let key = format!("user-{}", rng.below(10));
        let payload = payload_for(i, 1 + rng.below(80) as usize);
        let outcome = append(log, vec![record(&key, i as i64, 0, &payload)]);
        let AppendOutcome::Appended { partition, .. } = outcome[0] else {
            panic!("duplicate");
        };
        per_partition.entry(partition).or_default().push(payload);
    }
    per_partition
}

#[test]
fn torn_tail_is_truncated_to_a_prefix() {
    let mut rng = Rng(7);
    for round in 0..12 {
        let dir = TestDir::new("torn");
        let cfg = config(2, 2_000);
        let log = EmbeddedLog::open(dir.path(), cfg.clone()).expect("open");
        let expected = fill(&log, 150, &mut rng);
        log.close().expect("close");
        drop(log);

        let victim = (round % 2) as u32;
        let path = active_segment(dir.path(), victim);
        let len = fs::metadata(&path).expect("stat").len();
        let cut = rng.below(len + 1);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open segment")
            .set_len(cut)
            .expect("truncate");

        let log = EmbeddedLog::open(dir.path(), cfg).expect("reopen after truncation");
        check_invariants(&log);
        for (&partition, payloads) in &expected {
            let got: Vec<Vec<u8>> = read_partition(&log, partition)
                .into_iter()
                .map(|r| r.payload)
                .collect();
            assert!(
                payloads.starts_with(&got),
                "partition {partition} is a prefix"
            );
            if partition != victim {
                assert_eq!(&got, payloads, "untouched partition intact");
            }
        }
        // Appends continue at the truncated end with a fresh, higher seq.
        let seq_before = log.committed_seq();
        let key = (0..100)
            .map(|i| format!("user-{i}"))
            .find(|k| partition_for(k.as_bytes(), 2) == victim)
            .expect("a key of the victim partition");
        let end = log.end_offsets()[victim as usize];
        let outcome = append(&log, vec![record(&key, 0, 0, b"new")]);
        assert_eq!(
            outcome,
            vec![AppendOutcome::Appended {
                partition: victim,
                offset: end,
                seq: seq_before + 1
            }]
        );
        assert_eq!(
            log.read(victim, end, 10).expect("read new")[0].payload,
            b"new"
        );
        check_invariants(&log);
    }
}

#[test]
fn corrupted_tail_bytes_are_cut_at_the_damaged_record() {
    let mut rng = Rng(11);
    for _ in 0..8 {
        let dir = TestDir::new("flip");
        let cfg = config(1, 1 << 20);
        let log = EmbeddedLog::open(dir.path(), cfg.clone()).expect("open");
        let payloads: Vec<Vec<u8>> = fill(&log, 60, &mut rng).remove(&0).expect("partition 0");
        log.close().expect("close");
        drop(log);

        let path = active_segment(dir.path(), 0);
        let mut bytes = fs::read(&path).expect("read segment");
        let position = rng.below(bytes.len() as u64) as usize;
        bytes[position] ^= 1 << rng.below(8);
        fs::write(&path, &bytes).expect("write segment");
        // Index of the record containing the damaged byte.
        let mut start = 0;
        let mut damaged = 0;
        for (i, payload) in payloads.iter().enumerate() {
            let end = start + RECORD_HEADER_BYTES + payload.len();
            if position < end {
                damaged = i;
                break;
            }
            start = end;
        }

        let log = EmbeddedLog::open(dir.path(), cfg).expect("reopen");
        let got: Vec<Vec<u8>> = read_partition(&log, 0)
            .into_iter()
            .map(|r| r.payload)
            .collect();
        assert_eq!(
            got,
            payloads[..damaged].to_vec(),
            "byte {position} damaged record {damaged}"
        );
        assert_eq!(fs::metadata(&path).expect("stat").len(), start as u64);
    }
}

#[test]
fn zero_filled_tail_is_removed() {
    let dir = TestDir::new("zeros");
    let cfg = config(1, 1 << 20);
    let log = EmbeddedLog::open(dir.path(), cfg.clone()).expect("open");
    append(
        &log,
        vec![record("a", 1, 0, b"one"), record("a", 2, 0, b"two")],
    );
    log.close().expect("close");
    drop(log);
    let path = active_segment(dir.path(), 0);
    let len = fs::metadata(&path).expect("stat").len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(len + 4096)
        .expect("extend");
    let log = EmbeddedLog::open(dir.path(), cfg).expect("reopen");
    assert_eq!(read_partition(&log, 0).len(), 2);
    assert_eq!(fs::metadata(&path).expect("stat").len(), len);
}

#[test]
fn dedup_within_call_across_calls_and_across_reopen() {
    let dir = TestDir::new("dedup");
    let cfg = config(2, 300);
    let log = EmbeddedLog::open(dir.path(), cfg.clone()).expect("open");
    let outcomes = append(
        &log,
        vec![
            record("a", 10, 1, b"first"),
            record("b", 10, 1, b"same id, other key"),
            record("c", 10, 0, b"no id"),
            record("c", 10, 0, b"no id again"),
            record("d", 10, 2, b"second"),
        ],
    );
    assert!(matches!(outcomes[0], AppendOutcome::Appended { .. }));
    assert_eq!(outcomes[1], AppendOutcome::Duplicate);
    assert!(matches!(outcomes[2], AppendOutcome::Appended { .. }));
    assert!(matches!(outcomes[3], AppendOutcome::Appended { .. }));
    assert!(matches!(
        outcomes[4],
        AppendOutcome::Appended { seq: 4, .. }
    ));

    assert_eq!(
        append(&log, vec![record("x", 11, 2, b"retry")]),
        vec![AppendOutcome::Duplicate]
    );
    // Many more ids, spread over several closed segments.
    for id in 100..160u64 {
        append(&log, vec![record(&format!("k{id}"), 12, id, b"payload")]);
    }
    assert_eq!(log.stats().duplicate_records, 2);
    log.close().expect("close");
    drop(log);

    let log = EmbeddedLog::open(dir.path(), cfg).expect("reopen");
    assert!(log.stats().segment_count > 4);
    for id in [1u64, 2].into_iter().chain(100..160) {
        assert_eq!(
            append(&log, vec![record("z", 13, id, b"after restart")]),
            vec![AppendOutcome::Duplicate],
            "id {id}"
        );
    }
    assert!(matches!(
        append(&log, vec![record("z", 13, 3, b"new id")])[0],
        AppendOutcome::Appended { .. }
    ));
    let stored: Vec<u64> = read_all_by_seq(&log).iter().map(|r| r.dedup_id).collect();
    assert_eq!(stored.iter().filter(|&&id| id == 1).count(), 1);
    assert_eq!(stored.iter().filter(|&&id| id == 2).count(), 1);
}

#[test]
fn dedup_expires_outside_the_window() {
    let dir = TestDir::new("dedup-window");
    let cfg = EmbeddedLogConfig {
        dedup_window_ms: 1_000,
        ..config(1, 1 << 20)
    };
    let log = EmbeddedLog::open(dir.path(), cfg.clone()).expect("open");
    append(&log, vec![record("a", 0, 5, b"original")]);
    append(
        &log,
        vec![record("a", 1_000, 6, b"moves the clock to 1000")],
    );
    assert_eq!(
        append(&log, vec![record("a", 1_000, 5, b"retry")]),
        vec![AppendOutcome::Duplicate]
    );
    append(
        &log,
        vec![record("a", 1_001, 7, b"moves the clock to 1001")],
    );
    assert!(matches!(
        append(&log, vec![record("a", 1_001, 5, b"outside the window")])[0],
        AppendOutcome::Appended { .. }
    ));
    log.close().expect("close");
    drop(log);

    // The rebuilt window agrees: id 6 (t=1000) is live, nothing older is.
    let log = EmbeddedLog::open(dir.path(), cfg).expect("reopen");
    assert_eq!(
        append(&log, vec![record("a", 1_001, 6, b"")]),
        vec![AppendOutcome::Duplicate]
    );
    assert_eq!(
        append(&log, vec![record("a", 1_001, 5, b"")]),
        vec![AppendOutcome::Duplicate]
    );
    assert!(matches!(
        append(
            &log,
            vec![record("a", 5_000, 8, b""), record("a", 5_000, 6, b"")]
        )[1],
        AppendOutcome::Appended { .. }
    ));
}

#[test]
fn concurrent_appends_with_the_same_id_append_once() {
    let dir = TestDir::new("dedup-race");
    let log = Arc::new(EmbeddedLog::open(dir.path(), config(4, 1 << 20)).expect("open"));
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                (1..=50u64)
                    .map(|id| append(&log, vec![record(&format!("t{t}"), 0, id, b"x")]))
                    .filter(|o| matches!(o[0], AppendOutcome::Appended { .. }))
                    .count()
            })
        })
        .collect();
    let appended: usize = handles.into_iter().map(|h| h.join().expect("thread")).sum();
    assert_eq!(appended, 50);
    assert_eq!(log.stats().duplicate_records, 350);
}

#[test]
fn retention_respects_safe_offsets_limits_and_active_segment() {
    let dir = TestDir::new("retention");
    let cfg = EmbeddedLogConfig {
        retention_bytes: Some(1_000),
        ..config(1, 500)
    };
    let log = EmbeddedLog::open(dir.path(), cfg).expect("open");
    // 100 records of 100 bytes of payload (140 bytes framed): 3 per segment.
    for i in 0..100usize {
        append(&log, vec![record("k", i as i64, 0, &payload_for(i, 100))]);
    }
    let segments_before = log.stats().segment_count;
    assert_eq!(segments_before, 34);

    let report = log.enforce_retention(&[0]).expect("retention");
    assert_eq!(
        report.deleted_segments, 0,
        "nothing is below the safe offset"
    );
    assert_eq!(log.start_offsets(), vec![0]);

    let report = log.enforce_retention(&[31]).expect("retention");
    // Segments hold offsets 0-2, 3-5, ...: those ending at or below 31 are
    // 0..=9 (ending at offset 30).
    assert_eq!(report.deleted_segments, 10);
    assert_eq!(report.deleted_records, 30);
    assert_eq!(report.start_offsets, vec![30]);
    assert_eq!(log.start_offsets(), vec![30]);
    assert!(matches!(
        log.read(0, 29, 1),
        Err(LogError::OffsetOutOfRange { start: 30, .. })
    ));
    assert_eq!(log.read(0, 30, 1).expect("read")[0].offset, 30);

    // Everything is safe: deletes until about 1000 bytes are left, never the
    // active segment.
    let report = log.enforce_retention(&[u64::MAX]).expect("retention");
    let stats = log.stats();
    assert!(report.deleted_segments > 0);
    assert!(stats.total_bytes >= 1_000, "keeps at least retention_bytes");
    assert!(stats.total_bytes < 1_000 + 500, "deletes what exceeds it");
    assert!(stats.segment_count >= 1);
    assert_eq!(log.end_offsets(), vec![100]);
    check_invariants(&log);
    let start = log.start_offsets()[0];
    log.close().expect("close");
    drop(log);

    let log = EmbeddedLog::open(dir.path(), config(1, 500)).expect("reopen");
    assert_eq!(log.start_offsets(), vec![start]);
    assert_eq!(log.end_offsets(), vec![100]);
    check_invariants(&log);
}

#[test]
fn retention_by_age_deletes_old_segments_only() {
    let dir = TestDir::new("retention-age");
    let cfg = EmbeddedLogConfig {
        retention_ms: Some(60_000),
        ..config(1, 500)
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let log = EmbeddedLog::open(dir.path(), cfg).expect("open");
    for i in 0..12usize {
        append(&log, vec![record("k", 0, 0, &payload_for(i, 100))]);
    }
    for i in 0..12usize {
        append(&log, vec![record("k", now, 0, &payload_for(i, 100))]);
    }
    let report = log.enforce_retention(&[u64::MAX]).expect("retention");
    assert_eq!(report.deleted_segments, 4);
    assert_eq!(log.start_offsets(), vec![12]);
    assert!(read_partition(&log, 0)
        .iter()
        .all(|r| r.timestamp_ms == now));
    assert_eq!(
        log.enforce_retention(&[u64::MAX])
            .expect("again")
            .deleted_segments,
        0
    );
    assert!(matches!(
        log.enforce_retention(&[]),
        Err(LogError::InvalidArgument(_))
    ));
}

#[test]
fn group_commit_shares_fsyncs_between_concurrent_appenders() {
    let dir = TestDir::new("group-commit");
    let cfg = EmbeddedLogConfig {
        fsync: FsyncPolicy::Always,
        ..config(1, 64 << 20)
    };
    let log = Arc::new(EmbeddedLog::open(dir.path(), cfg).expect("open"));
    let fsyncs_before = log.stats().fsyncs;
    let threads = 16;
    let appends_per_thread = 40;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                for i in 0..appends_per_thread {
                    let batch = (0..20)
                        .map(|j| record(&format!("u{t}"), 0, 0, &payload_for(i * j, 64)))
                        .collect();
                    append(&log, batch);
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("appender");
    }
    let stats = log.stats();
    let appends = (threads * appends_per_thread) as u64;
    let fsyncs = stats.fsyncs - fsyncs_before;
    assert_eq!(stats.appended_records, appends * 20);
    println!(
        "{appends} appends, {fsyncs} fsyncs, {} batches",
        stats.write_batches
    );
    assert!(
        fsyncs * 3 <= appends,
        "{appends} appends needed {fsyncs} fsyncs in {} batches",
        stats.write_batches
    );
    assert!(fsyncs >= 1);
}

#[test]
fn always_policy_syncs_before_acknowledging() {
    let dir = TestDir::new("always");
    let cfg = EmbeddedLogConfig {
        fsync: FsyncPolicy::Always,
        ..config(2, 1 << 20)
    };
    let log = EmbeddedLog::open(dir.path(), cfg).expect("open");
    let before = log.stats().fsyncs;
    append(&log, vec![record("a", 0, 0, b"x")]);
    assert_eq!(
        log.stats().fsyncs,
        before + 1,
        "one dirty partition, one fsync"
    );
}

#[test]
fn interval_policy_syncs_when_idle() {
    let dir = TestDir::new("interval");
    let cfg = EmbeddedLogConfig {
        fsync: FsyncPolicy::IntervalMs(20),
        ..config(1, 1 << 20)
    };
    let log = EmbeddedLog::open(dir.path(), cfg).expect("open");
    let before = log.stats().fsyncs;
    append(&log, vec![record("a", 0, 0, b"x")]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while log.stats().fsyncs == before && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(log.stats().fsyncs, before + 1);
}

#[test]
fn completion_works_as_future_and_blocking() {
    let dir = TestDir::new("completion");
    let log = EmbeddedLog::open(dir.path(), config(2, 1 << 20)).expect("open");
    let (outcome, _polls) = block_on(log.append(vec![record("a", 0, 0, b"via future")]));
    assert!(matches!(
        outcome.expect("append")[0],
        AppendOutcome::Appended { seq: 1, .. }
    ));
    let outcome = log.append(vec![record("a", 0, 0, b"via wait")]).wait();
    assert!(matches!(
        outcome.expect("append")[0],
        AppendOutcome::Appended { seq: 2, .. }
    ));
    assert_eq!(
        block_on(log.append(Vec::new())).0.expect("empty append"),
        Vec::new()
    );
}

#[test]
fn close_resolves_pending_and_rejects_new_appends() {
    let dir = TestDir::new("close");
    let log = EmbeddedLog::open(dir.path(), config(3, 4_096)).expect("open");
    let pending: Vec<_> = (0..300)
        .map(|i| {
            log.append(vec![record(
                &format!("u{i}"),
                i,
                0,
                &payload_for(i as usize, 32),
            )])
        })
        .collect();
    log.close().expect("close");
    for completion in pending {
        let result = completion
            .wait_timeout(Duration::from_secs(10))
            .expect("resolved by close");
        assert!(matches!(
            result.expect("written")[0],
            AppendOutcome::Appended { .. }
        ));
    }
    assert!(matches!(
        log.append(vec![record("a", 0, 0, b"late")]).wait(),
        Err(LogError::Closed)
    ));
    assert_eq!(read_all_by_seq(&log).len(), 300, "reads work after close");
    log.close().expect("second close is a no-op");
    drop(log);
    let log = EmbeddedLog::open(dir.path(), config(3, 4_096)).expect("reopen");
    assert_eq!(log.committed_seq(), 300);
}

#[test]
fn wait_committed_wakes_on_commit_and_times_out() {
    let dir = TestDir::new("wait");
    let log = Arc::new(EmbeddedLog::open(dir.path(), config(1, 1 << 20)).expect("open"));
    let started = Instant::now();
    assert_eq!(log.wait_committed(0, Duration::from_millis(30)), 0);
    assert!(started.elapsed() >= Duration::from_millis(30));
    let waiter = {
        let log = Arc::clone(&log);
        thread::spawn(move || log.wait_committed(0, Duration::from_secs(10)))
    };
    thread::sleep(Duration::from_millis(20));
    append(&log, vec![record("a", 0, 0, b"x")]);
    assert_eq!(waiter.join().expect("waiter"), 1);
}

#[test]
fn concurrent_readers_only_see_committed_contiguous_records() {
    let dir = TestDir::new("concurrent-read");
    let log = Arc::new(EmbeddedLog::open(dir.path(), config(2, 2_048)).expect("open"));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                for i in 0..150usize {
                    append(
                        &log,
                        vec![record(
                            &format!("u{t}-{}", i % 5),
                            0,
                            0,
                            &payload_for(i, 40),
                        )],
                    );
                }
            })
        })
        .collect();
    let reader = {
        let log = Arc::clone(&log);
        thread::spawn(move || {
            let mut next = [0u64; 2];
            let mut last_seq = [0u64; 2];
            while next.iter().sum::<u64>() < 600 {
                for p in 0..2u32 {
                    let end = log.end_offsets()[p as usize];
                    let records = log.read(p, next[p as usize], 50).expect("read");
                    for r in &records {
                        assert_eq!(r.offset, next[p as usize]);
                        assert!(r.seq > last_seq[p as usize]);
                        assert!(r.seq <= log.committed_seq());
                        next[p as usize] += 1;
                        last_seq[p as usize] = r.seq;
                    }
                    assert!(next[p as usize] <= log.end_offsets()[p as usize].max(end));
                }
            }
        })
    };
    for w in writers {
        w.join().expect("writer");
    }
    reader.join().expect("reader");
}

#[test]
fn oversized_records_and_config_are_rejected() {
    let dir = TestDir::new("limits");
    let log = EmbeddedLog::open(dir.path(), config(1, 1 << 20)).expect("open");
    let big = AppendRecord {
        payload: vec![0; MAX_PAYLOAD_BYTES + 1],
        transaction: None,
        ..AppendRecord::default()
    };
    assert!(matches!(
        log.append(vec![big]).wait(),
        Err(LogError::RecordTooLarge { .. })
    ));
    let huge_segment_record = vec![record("a", 0, 0, &[7; 4_000])];
    let small = TestDir::new("limits-small");
    let small_log = EmbeddedLog::open(small.path(), config(1, 1_000)).expect("open");
    append(&small_log, huge_segment_record.clone());
    append(&small_log, huge_segment_record);
    assert_eq!(
        small_log.stats().segment_count,
        2,
        "an oversized record gets its own segment"
    );
    assert_eq!(read_partition(&small_log, 0).len(), 2);

    for bad in [
        EmbeddedLogConfig {
            partitions: 0,
            ..config(1, 1 << 20)
        },
        EmbeddedLogConfig {
            segment_bytes: 10,
            ..config(1, 1 << 20)
        },
        EmbeddedLogConfig {
            fsync: FsyncPolicy::IntervalMs(0),
            ..config(1, 1 << 20)
        },
    ] {
        let d = TestDir::new("bad-config");
        assert!(matches!(
            EmbeddedLog::open(d.path(), bad),
            Err(LogError::InvalidConfig(_))
        ));
    }
}

#[test]
fn open_is_lazy_about_closed_segments() {
    let dir = TestDir::new("lazy");
    let cfg = EmbeddedLogConfig {
        dedup_max_entries: 0,
        ..config(1, 1_000)
    };
    let log = EmbeddedLog::open(dir.path(), cfg.clone()).expect("open");
    for i in 0..100usize {
        append(&log, vec![record("k", 0, 0, &payload_for(i, 60))]);
    }
    log.close().expect("close");
    drop(log);
    // Damage the payload of a record in the first (closed) segment: open
    // does not read it, and a read of that record reports the corruption.
    let first = dir
        .path()
        .join(partition_dir_name(0))
        .join("00000000000000000000.log");
    let mut bytes = fs::read(&first).expect("read");
    bytes[RECORD_HEADER_BYTES + 3] ^= 0xff;
    fs::write(&first, bytes).expect("write");
    let log = EmbeddedLog::open(dir.path(), cfg).expect("reopen");
    assert_eq!(log.end_offsets(), vec![100]);
    assert!(matches!(log.read(0, 0, 1), Err(LogError::Corrupt { .. })));
    assert_eq!(
        log.read(0, 50, 1).expect("other segments readable")[0].offset,
        50
    );
}

/// One step of the property test.
#[derive(Clone, Debug)]
enum Op {
    /// Records as (key, payload length, dedup id from a small pool or 0).
    Append(Vec<(u8, u8, u8)>),
    Reopen,
    /// Close, truncate the active segment of a partition to a fraction of
    /// its length (per mille), reopen.
    Truncate(u32, u16),
    /// Close, flip one byte of the active segment at a fraction of its
    /// length (per mille), reopen.
    Flip(u32, u16),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((0u8..16, 0u8..120, 0u8..6), 1..20).prop_map(Op::Append),
        1 => Just(Op::Reopen),
        1 => (0u32..3, 0u16..=1000).prop_map(|(p, f)| Op::Truncate(p, f)),
        1 => (0u32..3, 0u16..1000).prop_map(|(p, f)| Op::Flip(p, f)),
    ]
}

/// What the model expects of one stored record.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ModelRecord {
    partition: u32,
    seq: u64,
    dedup_id: u64,
    payload: Vec<u8>,
}

fn model_of(log: &EmbeddedLog) -> Vec<ModelRecord> {
    read_all_by_seq(log)
        .into_iter()
        .map(|r| ModelRecord {
            partition: r.partition,
            seq: r.seq,
            dedup_id: r.dedup_id,
            payload: r.payload,
        })
        .collect()
}

fn damage_active_segment(dir: &Path, partition: u32, per_mille: u16, flip: bool) {
    let path = active_segment(dir, partition);
    let len = fs::metadata(&path).expect("stat").len();
    if len == 0 {
        return;
    }
    if flip {
        let mut bytes = fs::read(&path).expect("read");
        let at = (len * u64::from(per_mille) / 1000).min(len - 1) as usize;
        bytes[at] ^= 0x5a;
        fs::write(&path, bytes).expect("write");
    } else {
        OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open")
            .set_len(len * u64::from(per_mille) / 1000)
            .expect("truncate");
    }
}

fn run_ops(ops: Vec<Op>) {
    let dir = TestDir::new("prop");
    let cfg = config(3, 400);
    let mut log = EmbeddedLog::open(dir.path(), cfg.clone()).expect("open");
    let mut model: Vec<ModelRecord> = Vec::new();
    let mut max_seq = 0u64;
    let mut counter = 0usize;
    for op in ops {
        match op {
            Op::Append(specs) => {
                let records: Vec<AppendRecord> = specs
                    .iter()
                    .map(|&(key, len, dedup)| {
                        counter += 1;
                        record(
                            &format!("key-{key}"),
                            0,
                            u64::from(dedup),
                            &payload_for(counter, len.into()),
                        )
                    })
                    .collect();
                let outcomes = append(&log, records.clone());
                let mut ends = model.iter().fold(vec![0u64; 3], |mut ends, r| {
                    ends[r.partition as usize] += 1;
                    ends
                });
                for (rec, outcome) in records.into_iter().zip(outcomes) {
                    let seen =
                        rec.dedup_id != 0 && model.iter().any(|m| m.dedup_id == rec.dedup_id);
                    match outcome {
                        AppendOutcome::Duplicate => {
                            assert!(seen, "false duplicate {}", rec.dedup_id)
                        }
                        AppendOutcome::Appended {
                            partition,
                            offset,
                            seq,
                        } => {
                            assert!(!seen, "missed duplicate {}", rec.dedup_id);
                            assert_eq!(partition, partition_for(&rec.key, 3));
                            assert_eq!(offset, ends[partition as usize]);
                            assert!(seq > max_seq);
                            ends[partition as usize] += 1;
                            max_seq = seq;
                            model.push(ModelRecord {
                                partition,
                                seq,
                                dedup_id: rec.dedup_id,
                                payload: rec.payload,
                            });
                        }
                    }
                }
            }
            Op::Reopen | Op::Truncate(..) | Op::Flip(..) => {
                log.close().expect("close");
                drop(log);
                match op {
                    Op::Truncate(p, f) => damage_active_segment(dir.path(), p, f, false),
                    Op::Flip(p, f) => damage_active_segment(dir.path(), p, f, true),
                    _ => {}
                }
                log = EmbeddedLog::open(dir.path(), cfg.clone()).expect("reopen");
                let actual = model_of(&log);
                for p in 0..3 {
                    let expected: Vec<&ModelRecord> =
                        model.iter().filter(|r| r.partition == p).collect();
                    let got: Vec<&ModelRecord> =
                        actual.iter().filter(|r| r.partition == p).collect();
                    assert!(expected.starts_with(&got), "partition {p} keeps a prefix");
                    if matches!(op, Op::Reopen) {
                        assert_eq!(expected, got);
                    }
                }
                model = actual;
                // Sequence numbers continue above the highest one remaining.
                max_seq = model.iter().map(|r| r.seq).max().unwrap_or(0);
                assert_eq!(
                    log.committed_seq(),
                    model.iter().map(|r| r.seq).max().unwrap_or(0)
                );
            }
        }
        check_invariants(&log);
        assert_eq!(model_of(&log), model, "merge by seq equals append order");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn random_appends_reopens_and_damage_keep_invariants(ops in prop::collection::vec(op_strategy(), 1..12)) {
        run_ops(ops);
    }
}

/// Measures durable append throughput: `threads` appenders each append
/// `appends` batches of `batch` records with 400-byte payloads and wait for
/// each. Run with
/// `cargo test -p kairos-log --release -- --ignored --nocapture throughput`
/// (override the shape with `KAIROS_LOG_BENCH_THREADS`, `_BATCH`, `_APPENDS`).
#[test]
#[ignore = "throughput measurement"]
fn throughput_fsync_always() {
    let dir = TestDir::new("throughput");
    let cfg = EmbeddedLogConfig {
        fsync: FsyncPolicy::Always,
        ..EmbeddedLogConfig::default()
    };
    let log = Arc::new(EmbeddedLog::open(dir.path(), cfg).expect("open"));
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let threads = env("KAIROS_LOG_BENCH_THREADS", 32);
    let batch = env("KAIROS_LOG_BENCH_BATCH", 50);
    let appends_per_thread = env("KAIROS_LOG_BENCH_APPENDS", 1_000);
    let payload = vec![b'x'; 400];
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = Arc::clone(&log);
            let payload = payload.clone();
            thread::spawn(move || {
                for i in 0..appends_per_thread {
                    let records = (0..batch)
                        .map(|j| AppendRecord {
                            key: format!("user-{}", (t * 7919 + i * 31 + j) % 100_000).into_bytes(),
                            timestamp_ms: 1_700_000_000_000,
                            dedup_id: ((t as u64) << 40) | ((i * batch + j) as u64 + 1),
                            payload: payload.clone(),
                            transaction: None,
                        })
                        .collect();
                    append(&log, records);
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("appender");
    }
    let elapsed = started.elapsed();
    let stats = log.stats();
    let events = (threads * appends_per_thread * batch) as f64;
    println!(
        "{threads} appenders x {batch} records: {events} events in {:.2?}: {:.0} events/s \
         durable (fsync=Always), {} batches, {} fsyncs, {} MiB",
        elapsed,
        events / elapsed.as_secs_f64(),
        stats.write_batches,
        stats.fsyncs,
        stats.total_bytes >> 20
    );
    log.close().expect("close");
    drop(log);

    let started = Instant::now();
    let log = EmbeddedLog::open(dir.path(), EmbeddedLogConfig::default()).expect("reopen");
    println!(
        "reopen (tail recovery + dedup window rebuild over {events} records): {:.2?}",
        started.elapsed()
    );
    let started = Instant::now();
    let mut read = 0usize;
    for p in 0..log.partition_count() {
        let mut offset = 0;
        loop {
            let records = log.read(p, offset, 1_000).expect("read");
            if records.is_empty() {
                break;
            }
            offset += records.len() as u64;
            read += records.len();
        }
    }
    assert_eq!(read as f64, events);
    println!(
        "read back {read} records in {:.2?}: {:.0} records/s",
        started.elapsed(),
        read as f64 / started.elapsed().as_secs_f64()
    );
}
