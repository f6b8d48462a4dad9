//! # The Kafka-protocol backend: [`KafkaLog`]
//!
//! The same [`EventLog`] contract as the embedded log, kept by a Kafka-protocol broker (Apache
//! Kafka, Redpanda, MSK, Confluent, tansu) through librdkafka, so that the processor and the API
//! run unchanged on top of it.
//!
//! ## Mapping
//!
//! * The log is one topic (default `kairos.events`); log partition *n* is topic partition *n*.
//!   [`KafkaLog::open`] creates the topic with the configured partition count when it does not
//!   exist, and otherwise adopts the partition count the broker reports.
//! * Records are keyed by their partition key (the user), and librdkafka's `murmur2_random`
//!   partitioner picks the same partition as [`partition_for`](crate::partition_for) and the
//!   Java client, so one user's events stay in order in one partition.
//! * The `dedup_id` travels in the record header `kairos-dedup-id` (8 bytes, little endian); the
//!   event time is the record timestamp.
//! * A record with a [`AppendRecord::transaction`] copy (a purchase) is also produced, with the
//!   same key and headers, to the transactions topic (default `kairos.transactions`) for other
//!   systems; this log never reads that topic, so each user's events keep one order. The append
//!   resolves once both copies are acknowledged.
//!
//! ## Durability
//!
//! The producer is idempotent with `acks=all`: an append's [`Completion`] resolves `Ok` only after
//! the broker acknowledged every record of it (written to all in-sync replicas), so an
//! acknowledged event survives whatever the broker's own durability guarantees. A record the
//! broker refuses, or does not acknowledge within `message.timeout.ms`, fails the whole append:
//! the caller retries it with the same dedup ids.
//!
//! ## Sequence numbers
//!
//! Kafka has no order across partitions, so [`Record::seq`] is stamped by this process: a
//! consumer thread fetches every partition from where the processor reads and numbers records in
//! the order they arrive, continuing from `start_seq` (the state's checkpoint), which keeps the
//! numbers increasing across restarts. Within a partition the order is the broker's. Replay order
//! across partitions can therefore differ from the live order; only per-partition (per-user)
//! order is guaranteed, as with any Kafka consumer.
//!
//! An append in a process that consumes (`consume = true`, as `kairos serve` does) resolves once
//! its records are both acknowledged by the broker and fetched back, so its outcome carries the
//! `seq` a read must wait for (read-your-writes works as with the embedded log). When the
//! consumer is more than `seq_wait` behind (a replay at start), the outcome carries the next
//! sequence number instead, and such a read may not see the event yet. Without a consumer
//! (an ingest-only process), outcomes carry `seq` 0.
//!
//! ## Dedup
//!
//! The window semantics of the embedded log (see the `dedup` module) apply twice: the producer
//! reports a retry of an id it delivered recently as [`AppendOutcome::Duplicate`] without sending
//! it, and the consumer drops a record whose id it read recently from the same partition, so two
//! copies sent at once, or by two ingest processes, are applied once. An append whose record the
//! consumer dropped is answered as a duplicate whether the broker's delivery report or the
//! consumer's fetch comes first (the consumer remembers its verdicts on the last
//! `RECENT_STAMPS` records of each partition). Both windows live in memory (the producer's holds
//! at most a million ids, the consumer's `dedup_max_entries`, split evenly among the
//! partitions). After a restart the consumer refills its window by reading back (without
//! applying) up to `dedup_restore_records` records per partition before the state's checkpoint,
//! so a retry of an event from shortly before a crash is still recognised; a retry of an older
//! one (beyond that many records of its partition) is applied again.
//!
//! ## Consumer groups
//!
//! With [`KafkaLogConfig::group`] (`kairos process`), the log also joins that consumer group on
//! the topic, through a second consumer that only holds the membership: it is paused, and a
//! thread polls it (heartbeats and rebalances happen in those polls) and publishes each change of
//! the partitions it was given as an [`Assignment`]. Fetching stays with the consumer described
//! below, which reads every partition where the processor asks, so that a replica sees every
//! partition's catalogue entries; the processor applies only the events of its own partitions.
//! The group's offsets are read and committed through the membership consumer
//! ([`EventLog::committed_offsets`], [`EventLog::commit_offsets`]); Kairos commits an offset
//! only once the state below it is stored (see `crates/kairos/src/group.rs`). A partition the
//! processor gains is re-read from the group's committed offset after [`EventLog::rewind`],
//! which also rebuilds that partition's dedup window from the records before it, as a restart
//! does: each partition has a window of its own (a retry carries its event's key, so it lands
//! in the partition of its first copy).
//!
//! ## Retention and reads
//!
//! Retention belongs to the broker (the topic's `retention.ms`); [`EventLog::enforce_retention`]
//! deletes nothing. The consumer thread buffers at most `max_buffered_records` fetched records
//! ahead of the processor and pauses fetching beyond that. [`EventLog::read`] serves the buffer;
//! the first read of a partition, or one that jumps ahead of what was fetched, repositions the
//! consumer and returns nothing until records from there arrive. Reads go forward only (as the
//! processor's do): reading again below an offset already read from is an error, since the
//! records there were numbered and dropped from the buffer.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::completion::{completion_pair, Completer, Completion};
use crate::dedup::DedupSet;
use crate::{
    AppendOutcome, AppendRecord, Assignment, EventLog, LogError, LogStats, Record, RetentionReport,
    MAX_PAYLOAD_BYTES,
};

/// The header carrying a record's dedup id.
const DEDUP_HEADER: &str = "kairos-dedup-id";

/// Fetched `(offset, seq)` pairs remembered per partition, so a delivery report that arrives
/// after its record was fetched back still finds its sequence number.
const RECENT_STAMPS: usize = 8192;

/// Ids the producer side remembers at most. It only lets a retry through this same process be
/// answered as a duplicate at once; the consumer's windows (`dedup_max_entries` in all) are what
/// keeps duplicates out of the state, so a second window of the full size would only double the
/// memory.
const PRODUCED_IDS: usize = 1_000_000;

/// How often the consumer thread looks for appends it has not fetched back within `seq_wait`.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Settings of [`KafkaLog`].
#[derive(Clone, Debug)]
pub struct KafkaLogConfig {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// The events topic.
    pub topic: String,
    /// The topic that also receives every purchase (as JSON, for systems such as finance or an
    /// ERP); `None` for none. Kairos itself does not read it.
    pub transactions_topic: Option<String>,
    /// Partitions of the topic when this log creates it.
    pub partitions: u32,
    /// Replication factor of the topic when this log creates it (-1 = the broker's default).
    pub replication_factor: i32,
    /// librdkafka `compression.type`: none, gzip, lz4, snappy or zstd.
    pub compression: String,
    /// Whether this process reads the topic (serve and process roles) or only appends (ingest).
    pub consume: bool,
    /// Sequence number to continue from (the state's checkpoint).
    pub start_seq: u64,
    /// Dedup window in event-time milliseconds.
    pub dedup_window_ms: i64,
    /// Maximum remembered dedup ids per window (0 disables dedup).
    pub dedup_max_entries: usize,
    /// Records per partition before the read position that the consumer reads back (without
    /// applying them) to refill its dedup window after a restart.
    pub dedup_restore_records: u64,
    /// Fetched records held ahead of the processor at most.
    pub max_buffered_records: usize,
    /// How long an append waits for the consumer to fetch its records back (see the module docs).
    pub seq_wait: Duration,
    /// Time the broker has to acknowledge a record before its append fails.
    pub ack_timeout: Duration,
    /// Extra librdkafka properties for both clients (security.protocol, sasl.*, ssl.*, ...).
    pub properties: Vec<(String, String)>,
    /// The consumer group this process joins to share the partitions with other processors
    /// (`kairos process`); `None` to apply every partition (`kairos serve`). See "Consumer
    /// groups" in the module docs.
    pub group: Option<String>,
    /// The group's `session.timeout.ms`: how long a member that stopped (crashed, or cut off)
    /// keeps its partitions before the group hands them to the others.
    pub group_session_timeout: Duration,
}

impl Default for KafkaLogConfig {
    fn default() -> Self {
        KafkaLogConfig {
            brokers: "127.0.0.1:9092".into(),
            topic: "kairos.events".into(),
            transactions_topic: Some("kairos.transactions".into()),
            partitions: 8,
            replication_factor: -1,
            compression: "lz4".into(),
            consume: true,
            start_seq: 0,
            dedup_window_ms: 24 * 60 * 60 * 1000,
            dedup_max_entries: 10_000_000,
            dedup_restore_records: 100_000,
            max_buffered_records: 65_536,
            seq_wait: Duration::from_secs(2),
            ack_timeout: Duration::from_secs(30),
            properties: Vec::new(),
            group: None,
            group_session_timeout: Duration::from_secs(10),
        }
    }
}

/// An event log on a Kafka-protocol broker. See the module docs.
pub struct KafkaLog {
    partitions: u32,
    /// Replaced after a fatal error (see [`KafkaLog::producer`]).
    producer: std::sync::RwLock<Arc<ThreadedProducer<Delivery>>>,
    /// The settings it was opened with (topics, and what the producer is made from, to make it
    /// again).
    config: KafkaLogConfig,
    shared: Arc<Shared>,
    consumer: Mutex<Option<JoinHandle<()>>>,
    start_offsets: Vec<u64>,
    group: Option<Group>,
}

/// This process's membership of a consumer group (see "Consumer groups" in the module docs).
struct Group {
    /// Subscribed to the topic, paused: it holds the membership and the group's offsets, while
    /// the fetching consumer reads.
    consumer: Arc<BaseConsumer>,
    assignment: Arc<Mutex<Assignment>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stopping: Arc<AtomicBool>,
}

/// The group membership thread: polls the group's consumer (heartbeats and rebalances happen
/// inside those polls) and publishes every change of the assignment.
fn group_loop(
    consumer: &BaseConsumer,
    topic: &str,
    assignment: &Mutex<Assignment>,
    stopping: &AtomicBool,
) {
    let mut current: Option<Vec<u32>> = None;
    while !stopping.load(Ordering::Acquire) {
        // Records this consumer fetches before it is paused are not used: the fetching
        // consumer reads them where the processor asks.
        let _ = consumer.poll(Duration::from_millis(50));
        let Ok(tpl) = consumer.assignment() else {
            continue;
        };
        let mut owned: Vec<u32> = tpl
            .elements_for_topic(topic)
            .iter()
            .map(|e| e.partition() as u32)
            .collect();
        owned.sort_unstable();
        if current.as_ref() == Some(&owned) {
            continue;
        }
        if !owned.is_empty() {
            if let Err(e) = consumer.pause(&tpl) {
                tracing::warn!(error = %e, "pausing the group consumer failed");
            }
        }
        let mut a = lock(assignment);
        a.generation += 1;
        a.partitions = owned.clone();
        tracing::info!(partitions = ?owned, generation = a.generation, "consumer group assignment");
        drop(a);
        current = Some(owned);
    }
    consumer.unsubscribe();
}

/// What the producer's delivery callbacks and the consumer thread share with the log.
struct Shared {
    fetch: Mutex<Fetch>,
    /// Signalled when records were fetched (or a partition reached its end).
    fetched: Condvar,
    /// Signalled when the processor consumed buffered records or asked for a new position.
    consumed: Condvar,
    /// Ids the producer delivered recently.
    produced: Mutex<DedupSet>,
    consume: bool,
    /// Appends are refused.
    closed: AtomicBool,
    /// The consumer thread stops.
    stopping: AtomicBool,
    /// The idempotent producer has its producer id.
    producer_id: AtomicBool,
    /// The brokers no longer hold a position being read (a recreated or truncated topic, or
    /// retention ahead of the reader). Reads fail from then on, which stops the processor and
    /// takes the node out of readiness: records below the state's checkpoint would otherwise be
    /// skipped without a word.
    offsets_lost: AtomicBool,
    appended: AtomicU64,
    duplicates: AtomicU64,
    batches: AtomicU64,
    seq_wait: Duration,
}

/// The consumer side's state, under one lock.
struct Fetch {
    partitions: Vec<PartitionFetch>,
    /// A position changed: the consumer must reassign.
    reposition: bool,
    buffered: usize,
    committed_seq: u64,
    /// The dedup window's settings, for a partition's window rebuilt on [`EventLog::rewind`].
    dedup_window_ms: i64,
    dedup_entries_per_partition: usize,
    /// Delivered records whose sequence number is not known yet.
    waiting: HashMap<(u32, u64), Waiter>,
}

struct PartitionFetch {
    /// Where the current fetch run started (`None` until the processor first reads).
    run_start: Option<u64>,
    /// Where the consumer starts fetching for it: records from here to `run_start` only refill
    /// the dedup window.
    warm_from: u64,
    /// Next offset expected from the broker.
    fetched_to: u64,
    /// The highest offset read from in this run: the buffer holds nothing below it.
    read_from: u64,
    /// Reached the end of the partition since the run started.
    at_end: bool,
    /// The fetch run asked for (bumped by every new run and [`EventLog::rewind`]), and the run
    /// the consumer's current assignment serves. A record polled while they differ came from
    /// the assignment before: the consumer thread polls without the lock, so a record it fetched
    /// for the old position can reach the lock after a read asked for a new one. Taken for the
    /// new run, it would also hide the records before it (see `fetched_to`).
    run: u64,
    assigned_run: u64,
    buffer: VecDeque<Record>,
    /// The newest fetched records' verdicts, oldest first (at most `RECENT_STAMPS`), for
    /// delivery reports that arrive after the consumer fetched their record back.
    recent: VecDeque<Stamp>,
    /// Ids the consumer read recently from this partition. A retry carries its event's key, so
    /// it lands on the partition of its first copy: one window per partition sees every
    /// duplicate, and a partition's window can be rebuilt on its own (see
    /// [`EventLog::rewind`]).
    dedup: DedupSet,
}

/// What the consumer made of the record at `offset`: applied under `seq`, or dropped as a
/// duplicate (then `seq` is the next sequence number, which a read may wait for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    offset: u64,
    seq: u64,
    duplicate: bool,
}

struct Waiter {
    batch: Arc<PendingAppend>,
    index: Option<usize>,
    since: Instant,
}

/// One `append` call waiting for its records' outcomes.
struct PendingAppend {
    state: Mutex<PendingState>,
}

struct PendingState {
    outcomes: Vec<Option<AppendOutcome>>,
    remaining: usize,
    error: Option<LogError>,
    completer: Option<Completer<Result<Vec<AppendOutcome>, LogError>>>,
}

impl PendingAppend {
    /// Settles one sent record: the record at `index` of the append, or (`None`) a purchase's
    /// copy on the transactions topic, which has no outcome of its own but must be acknowledged
    /// too.
    fn settle(&self, index: Option<usize>, result: Result<AppendOutcome, LogError>) {
        let mut s = lock(&self.state);
        match (index, result) {
            (Some(index), Ok(outcome)) => s.outcomes[index] = Some(outcome),
            (None, Ok(_)) => {}
            (_, Err(e)) => {
                s.error.get_or_insert(e);
            }
        }
        s.remaining -= 1;
        if s.remaining == 0 {
            let result = match s.error.take() {
                Some(e) => Err(e),
                None => Ok(s.outcomes.iter().map(|o| o.expect("settled")).collect()),
            };
            if let Some(c) = s.completer.take() {
                c.complete(result);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn broker_error(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Broker(format!("{what}: {e}"))
}

/// The producer's delivery callbacks, on librdkafka's polling thread.
struct Delivery {
    shared: Arc<Shared>,
}

/// What a delivery report is about.
struct Sent {
    batch: Arc<PendingAppend>,
    /// The record's index in its append; `None` for a purchase's copy on the transactions topic.
    index: Option<usize>,
    dedup_id: u64,
    timestamp_ms: i64,
}

impl ClientContext for Delivery {
    fn stats(&self, statistics: Statistics) {
        if statistics
            .eos
            .is_some_and(|eos| eos.idemp_state == "Assigned")
            && !self.shared.producer_id.swap(true, Ordering::AcqRel)
        {
            // Take the lock so that the notification cannot slip between a waiter's check
            // and its wait.
            drop(lock(&self.shared.fetch));
            self.shared.fetched.notify_all();
        }
    }
}

/// How long opening the log waits for the producer id before going on without it.
const PRODUCER_ID_WAIT: Duration = Duration::from_secs(10);

/// Waits until the idempotent producer has its producer id. Until then librdkafka holds every
/// record back (for up to a second after start with some brokers), so a node that reported ready
/// earlier would answer its first requests that much later.
fn wait_for_producer_id(shared: &Shared, timeout: Duration) {
    let started = Instant::now();
    let fetch = lock(&shared.fetch);
    let (_fetch, waited) = shared
        .fetched
        .wait_timeout_while(fetch, timeout, |_| {
            !shared.producer_id.load(Ordering::Acquire)
        })
        .unwrap_or_else(|e| e.into_inner());
    if waited.timed_out() {
        tracing::warn!(
            secs = timeout.as_secs(),
            "the Kafka producer has no producer id yet; going on, appends wait for it"
        );
    } else {
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "Kafka producer id assigned"
        );
    }
}

impl ProducerContext for Delivery {
    type DeliveryOpaque = Box<Sent>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let Sent {
            batch,
            index,
            dedup_id,
            timestamp_ms,
        } = *opaque;
        let Some(index) = index else {
            let result = match result {
                Ok(_) => Ok(AppendOutcome::Duplicate),
                Err((e, _)) => Err(broker_error("broker refused a transaction record", e)),
            };
            batch.settle(None, result);
            return;
        };
        let index = Some(index);
        match result {
            Err((e, _)) => batch.settle(index, Err(broker_error("broker refused a record", e))),
            Ok(m) => {
                if dedup_id != 0 {
                    lock(&self.shared.produced).record_appended(dedup_id, timestamp_ms);
                }
                let partition = m.partition() as u32;
                let offset = m.offset() as u64;
                // Without a consumer there is no sequence number to wait for; with one, the
                // record may not be fetched back yet, and the consumer settles it when it is.
                let outcome = if self.shared.consume {
                    let mut fetch = lock(&self.shared.fetch);
                    let outcome =
                        fetch.partitions[partition as usize].outcome_of(partition, offset);
                    if outcome.is_none() {
                        let since = Instant::now();
                        let waiter = Waiter {
                            batch: batch.clone(),
                            index,
                            since,
                        };
                        fetch.waiting.insert((partition, offset), waiter);
                    }
                    outcome
                } else {
                    Some(AppendOutcome::Appended {
                        partition,
                        offset,
                        seq: 0,
                    })
                };
                if let Some(outcome) = outcome {
                    batch.settle(index, Ok(outcome));
                }
            }
        }
    }
}

/// What the consumer thread does with a record it fetched (see [`PartitionFetch::place`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// Not for the run being read: no run, a run asked for after the record was fetched, or a
    /// record the run already has.
    Drop,
    /// Before the run's start: it only refills the dedup window.
    Refill,
    /// The run's next record.
    Take,
}

impl PartitionFetch {
    /// Where the record at `offset`, just fetched, belongs.
    fn place(&self, offset: u64) -> Placement {
        match self.run_start {
            None => Placement::Drop,
            // Fetched under the assignment before the current run was asked for.
            Some(_) if self.assigned_run != self.run => Placement::Drop,
            Some(start) if offset < start => Placement::Refill,
            // Already fetched in this run.
            Some(_) if offset < self.fetched_to => Placement::Drop,
            Some(_) => Placement::Take,
        }
    }

    /// Ends the current fetch run: a new run number, and what was buffered for the old run
    /// dropped. Returns how many records were dropped (for the `buffered` count).
    fn end_run(&mut self) -> usize {
        let dropped = self.buffer.len();
        self.buffer.clear();
        self.run += 1;
        self.at_end = false;
        dropped
    }

    fn new(dedup: DedupSet) -> PartitionFetch {
        PartitionFetch {
            run_start: None,
            warm_from: 0,
            fetched_to: 0,
            read_from: 0,
            at_end: false,
            run: 0,
            assigned_run: 0,
            buffer: VecDeque::new(),
            recent: VecDeque::new(),
            dedup,
        }
    }

    /// The outcome of the append that put a record at `offset`, if the consumer fetched it
    /// already: what the consumer made of it, as if it had settled the append itself. For a
    /// record older than the remembered stamps the verdict is gone; it is reported appended,
    /// with the oldest remembered stamp's sequence number, which is never lower than its own.
    fn outcome_of(&self, partition: u32, offset: u64) -> Option<AppendOutcome> {
        if self.recent.back()?.offset < offset {
            return None;
        }
        let stamp = self.recent[self.recent.partition_point(|s| s.offset < offset)];
        Some(if stamp.offset == offset && stamp.duplicate {
            AppendOutcome::Duplicate
        } else {
            AppendOutcome::Appended {
                partition,
                offset,
                seq: stamp.seq,
            }
        })
    }
}

/// Runs a future to completion on this thread (the admin client's futures need no runtime).
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// Joins consumer group `id` on the topic and starts the membership thread.
fn join_group(config: &KafkaLogConfig, id: &str) -> Result<Group, LogError> {
    let session_timeout_ms = config.group_session_timeout.as_millis().max(1).to_string();
    let consumer: BaseConsumer = client_config(
        config,
        &[
            ("group.id", id),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("session.timeout.ms", &session_timeout_ms),
            ("heartbeat.interval.ms", "1000"),
            // Only the membership is used: fetch as little as possible before the pause.
            ("max.partition.fetch.bytes", "1024"),
            ("queued.max.messages.kbytes", "64"),
        ],
    )
    .create()
    .map_err(|e| broker_error("creating the Kafka group consumer", e))?;
    consumer
        .subscribe(&[config.topic.as_str()])
        .map_err(|e| broker_error("joining the consumer group", e))?;
    let consumer = Arc::new(consumer);
    let assignment = Arc::new(Mutex::new(Assignment::default()));
    let stopping = Arc::new(AtomicBool::new(false));
    let thread = {
        let (consumer, assignment, stopping) =
            (consumer.clone(), assignment.clone(), stopping.clone());
        let topic = config.topic.clone();
        std::thread::Builder::new()
            .name("kairos-kafka-group".into())
            .spawn(move || group_loop(&consumer, &topic, &assignment, &stopping))
            .map_err(|e| LogError::io("starting the Kafka group thread", e))?
    };
    tracing::info!(group = id, "joining the consumer group");
    Ok(Group {
        consumer,
        assignment,
        thread: Mutex::new(Some(thread)),
        stopping,
    })
}

/// A client configuration: the brokers, then `defaults`, then the user's `properties`, which
/// override both.
fn client_config(config: &KafkaLogConfig, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    c
}

impl KafkaLog {
    /// Connects to the brokers, creates the topic if it does not exist and, with `consume`,
    /// starts the consumer thread (which fetches nothing until the first [`EventLog::read`]).
    pub fn open(config: KafkaLogConfig) -> Result<KafkaLog, LogError> {
        if config.topic.is_empty() {
            return Err(LogError::InvalidConfig(
                "the Kafka topic name is empty".into(),
            ));
        }
        if config.partitions == 0 {
            return Err(LogError::InvalidConfig(
                "a Kafka topic needs at least one partition".into(),
            ));
        }
        // One short-lived client answers every metadata question of opening.
        let probe: ProbeClient = client_config(&config, &[])
            .create_with_context(Probe::default())
            .map_err(|e| broker_error("creating a Kafka client", e))?;
        let partitions = ensure_topic(&probe, &config, &config.topic)?;
        if let Some(topic) = &config.transactions_topic {
            ensure_topic(&probe, &config, topic)?;
        }
        let start_offsets = low_watermarks(&probe, &config.topic, partitions)?;
        drop(probe);
        let dedup_entries_per_partition = config.dedup_max_entries.div_ceil(partitions as usize);
        let shared = Arc::new(Shared {
            fetch: Mutex::new(Fetch {
                partitions: (0..partitions)
                    .map(|_| {
                        PartitionFetch::new(DedupSet::new(
                            config.dedup_window_ms,
                            dedup_entries_per_partition,
                        ))
                    })
                    .collect(),
                reposition: false,
                buffered: 0,
                committed_seq: config.start_seq,
                dedup_window_ms: config.dedup_window_ms,
                dedup_entries_per_partition,
                waiting: HashMap::new(),
            }),
            fetched: Condvar::new(),
            consumed: Condvar::new(),
            produced: Mutex::new(DedupSet::new(
                config.dedup_window_ms,
                config.dedup_max_entries.min(PRODUCED_IDS),
            )),
            consume: config.consume,
            closed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            producer_id: AtomicBool::new(false),
            offsets_lost: AtomicBool::new(false),
            appended: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            seq_wait: config.seq_wait,
        });
        let idempotent = !config
            .properties
            .iter()
            .any(|(k, v)| k == "enable.idempotence" && v == "false");
        let producer = create_producer(&config, &shared)?;
        producer
            .client()
            .fetch_metadata(Some(&config.topic), Duration::from_secs(10))
            .map_err(|e| broker_error("reading the topic's metadata", e))?;
        if idempotent {
            wait_for_producer_id(&shared, PRODUCER_ID_WAIT);
        }
        let consumer = if config.consume {
            let consumer: BaseConsumer = client_config(
                &config,
                &[
                    // librdkafka needs a group id to assign partitions, though this consumer
                    // never joins the group nor commits: its positions live in the state.
                    ("group.id", "kairos.local-reader"),
                    ("enable.auto.commit", "false"),
                    ("enable.auto.offset.store", "false"),
                    ("enable.partition.eof", "true"),
                    // A position the brokers no longer have is an error, not a silent jump: see
                    // `Shared::offsets_lost`.
                    ("auto.offset.reset", "error"),
                    ("fetch.wait.max.ms", "10"),
                    ("queued.max.messages.kbytes", "16384"),
                ],
            )
            .create()
            .map_err(|e| broker_error("creating the Kafka consumer", e))?;
            let topic = config.topic.clone();
            let thread_shared = shared.clone();
            let max_buffered = config.max_buffered_records.max(1);
            Some(
                std::thread::Builder::new()
                    .name("kairos-kafka-fetch".into())
                    .spawn(move || fetch_loop(consumer, &topic, &thread_shared, max_buffered))
                    .map_err(|e| LogError::io("starting the Kafka consumer thread", e))?,
            )
        } else {
            None
        };
        let group = match (&config.group, config.consume) {
            (Some(id), true) => Some(join_group(&config, id)?),
            _ => None,
        };
        tracing::info!(brokers = %config.brokers, topic = %config.topic, partitions, consume = config.consume, group = ?config.group, "Kafka event log open");
        Ok(KafkaLog {
            partitions,
            producer: std::sync::RwLock::new(Arc::new(producer)),
            config,
            shared,
            consumer: Mutex::new(consumer),
            start_offsets,
            group,
        })
    }

    /// The producer, made again if the current one hit a fatal error. An idempotent producer
    /// stops for good when the brokers contradict its state (a broker that lost it, say, by
    /// restarting without its data): every later append would fail until the process restarts.
    /// The records it still held fail, and the clients retry them (with their dedup ids).
    fn producer(&self) -> Arc<ThreadedProducer<Delivery>> {
        let current = self
            .producer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some((code, reason)) = current.client().fatal_error() else {
            return current;
        };
        let mut slot = self.producer.write().unwrap_or_else(|e| e.into_inner());
        if Arc::ptr_eq(&slot, &current) {
            tracing::error!(%code, reason, "the Kafka producer hit a fatal error: making a new one");
            self.shared.producer_id.store(false, Ordering::Release);
            match create_producer(&self.config, &self.shared) {
                Ok(fresh) => {
                    let old = std::mem::replace(&mut *slot, Arc::new(fresh));
                    // Dropping a producer waits for its outstanding requests: not here.
                    std::thread::spawn(move || drop(old));
                }
                Err(e) => tracing::error!(error = %e, "making a new Kafka producer failed"),
            }
        }
        slot.clone()
    }

    /// Queues `payload` for `topic` with `r`'s key, timestamp and dedup id.
    fn send(
        &self,
        topic: &str,
        r: &AppendRecord,
        payload: &[u8],
        sent: Box<Sent>,
    ) -> Result<(), LogError> {
        let mut record = BaseRecord::with_opaque_to(topic, sent)
            .key(&r.key[..])
            .payload(payload)
            .timestamp(r.timestamp_ms);
        if r.dedup_id != 0 {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: DEDUP_HEADER,
                value: Some(&r.dedup_id.to_le_bytes()[..]),
            }));
        }
        self.producer().send(record).map_err(|(e, _)| match e {
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => LogError::Overloaded {
                pending_bytes: 0,
                limit: 0,
            },
            e => broker_error("queueing a record for the broker", e),
        })
    }
}

/// The idempotent producer of a log with `config`, reporting to `shared`.
fn create_producer(
    config: &KafkaLogConfig,
    shared: &Arc<Shared>,
) -> Result<ThreadedProducer<Delivery>, LogError> {
    let ack_timeout_ms = config.ack_timeout.as_millis().to_string();
    client_config(
        config,
        &[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("compression.type", &config.compression),
            ("partitioner", "murmur2_random"),
            ("linger.ms", "2"),
            ("message.timeout.ms", &ack_timeout_ms),
            // Only to learn when the producer id is assigned (see `wait_for_producer_id`).
            ("statistics.interval.ms", "100"),
        ],
    )
    .create_with_context(Delivery {
        shared: shared.clone(),
    })
    .map_err(|e| broker_error("creating the Kafka producer", e))
}

/// Returns the topic's partition count, creating the topic first if the broker does not have it.
/// The context of the client that opens the log: it keeps the errors librdkafka reported, since
/// a failed TLS handshake or SASL authentication is told only there, and a metadata request that
/// never got through only says the transport failed.
#[derive(Default)]
struct Probe {
    errors: Mutex<Vec<String>>,
}

impl Probe {
    /// The distinct errors reported, oldest first, joined.
    fn reported(&self) -> Option<String> {
        let errors = lock(&self.errors);
        (!errors.is_empty()).then(|| errors.join("; "))
    }
}

impl ClientContext for Probe {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "Kafka client error while opening the log");
        // The cause, without librdkafka's timing suffix and its "N/M brokers are down" summary.
        let cause = reason.split(" (after ").next().unwrap_or(reason);
        if cause.contains("brokers are down") {
            return;
        }
        let mut errors = lock(&self.errors);
        if errors.len() < 3 && !errors.iter().any(|e| e == cause) {
            errors.push(cause.to_owned());
        }
    }
}

impl rdkafka::consumer::ConsumerContext for Probe {}

type ProbeClient = BaseConsumer<Probe>;

fn ensure_topic(
    probe: &ProbeClient,
    config: &KafkaLogConfig,
    topic: &str,
) -> Result<u32, LogError> {
    let count = |probe: &ProbeClient| -> Result<u32, LogError> {
        let metadata = probe
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| {
                let what = format!("reaching the brokers {}", config.brokers);
                // Errors are delivered to the context by polling.
                for _ in 0..5 {
                    let _ = probe.poll(Duration::from_millis(20));
                }
                match probe.context().reported() {
                    Some(reported) => {
                        broker_error(&what, format!("{e}; the client reported: {reported}"))
                    }
                    None => broker_error(&what, e),
                }
            })?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len() as u32))
    };
    let existing = count(probe)?;
    if existing > 0 {
        if existing != config.partitions {
            tracing::info!(
                topic = %topic,
                partitions = existing,
                configured = config.partitions,
                "using the existing topic's partition count"
            );
        }
        return Ok(existing);
    }
    let admin: AdminClient<DefaultClientContext> = client_config(config, &[])
        .create()
        .map_err(|e| broker_error("creating a Kafka admin client", e))?;
    let new_topic = NewTopic::new(
        topic,
        config.partitions as i32,
        TopicReplication::Fixed(config.replication_factor),
    );
    let results = block_on(admin.create_topics(
        [&new_topic],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
    ))
    .map_err(|e| broker_error(&format!("creating topic {}", topic), e))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(broker_error(&format!("creating topic {name}"), code));
            }
        }
    }
    // Metadata can lag behind the creation for a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = count(probe)?;
        if n > 0 {
            return Ok(n);
        }
        if Instant::now() > deadline {
            return Err(broker_error(
                &format!("topic {}", topic),
                "created but not visible in the metadata after 10 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn low_watermarks(probe: &ProbeClient, topic: &str, partitions: u32) -> Result<Vec<u64>, LogError> {
    (0..partitions)
        .map(|p| {
            probe
                .fetch_watermarks(topic, p as i32, Duration::from_secs(10))
                .map(|(low, _)| low.max(0) as u64)
                .map_err(|e| broker_error(&format!("reading the offsets of partition {p}"), e))
        })
        .collect()
}

/// The consumer thread: fetches from the positions the processor reads at, stamps sequence
/// numbers, drops duplicates and settles appends waiting for their sequence numbers.
fn fetch_loop(consumer: BaseConsumer, topic: &str, shared: &Shared, max_buffered: usize) {
    let mut last_error: Option<Instant> = None;
    let mut last_sweep = Instant::now();
    while !shared.stopping.load(Ordering::Acquire) {
        {
            let mut fetch = lock(&shared.fetch);
            if last_sweep.elapsed() >= SWEEP_INTERVAL {
                settle_overdue(&mut fetch, shared.seq_wait);
                last_sweep = Instant::now();
            }
            if fetch.reposition {
                fetch.reposition = false;
                let mut tpl = TopicPartitionList::new();
                for (p, pf) in fetch.partitions.iter_mut().enumerate() {
                    pf.assigned_run = pf.run;
                    if let Some(start) = pf.run_start {
                        let from = if pf.fetched_to > start {
                            pf.fetched_to
                        } else {
                            pf.warm_from
                        };
                        let _ =
                            tpl.add_partition_offset(topic, p as i32, Offset::Offset(from as i64));
                    }
                }
                drop(fetch);
                if let Err(e) = consumer.assign(&tpl) {
                    tracing::error!(error = %e, "assigning Kafka partitions failed; retrying");
                    lock(&shared.fetch).reposition = true;
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            if fetch.buffered >= max_buffered {
                let _ = shared
                    .consumed
                    .wait_timeout(fetch, Duration::from_millis(50));
                continue;
            }
        }
        match consumer.poll(Duration::from_millis(50)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                let mut fetch = lock(&shared.fetch);
                if let Some(pf) = fetch.partitions.get_mut(p as usize) {
                    // Not the end of a run asked for after the assignment that reached it.
                    if pf.assigned_run == pf.run {
                        pf.at_end = true;
                    }
                }
                drop(fetch);
                shared.fetched.notify_all();
            }
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                tracing::error!("a partition of the Kafka topic no longer holds the position being read: the topic was recreated or truncated, or retention deleted records before they were applied");
                shared.offsets_lost.store(true, Ordering::Release);
                shared.fetched.notify_all();
            }
            Some(Err(e)) if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) => {
                tracing::warn!(error = %e, "Kafka consumer error");
                last_error = Some(Instant::now());
            }
            Some(Err(_)) => {}
            Some(Ok(m)) => {
                let partition = m.partition() as u32;
                let offset = m.offset() as u64;
                let dedup_id = m
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == DEDUP_HEADER)
                            .and_then(|h| h.value)
                            .and_then(|v| <[u8; 8]>::try_from(v).ok())
                    })
                    .map_or(0, u64::from_le_bytes);
                let timestamp_ms = m.timestamp().to_millis().unwrap_or(0);
                let payload = m.payload().unwrap_or_default().to_vec();
                let mut fetch = lock(&shared.fetch);
                let Fetch {
                    partitions,
                    buffered,
                    committed_seq,
                    waiting,
                    ..
                } = &mut *fetch;
                let Some(pf) = partitions.get_mut(partition as usize) else {
                    continue;
                };
                match pf.place(offset) {
                    Placement::Drop => continue,
                    Placement::Refill => {
                        if dedup_id != 0 && !pf.dedup.is_duplicate(dedup_id) {
                            pf.dedup.record_appended(dedup_id, timestamp_ms);
                        }
                        continue;
                    }
                    Placement::Take => {}
                }
                let dedup = &mut pf.dedup;
                pf.fetched_to = offset + 1;
                let duplicate = dedup_id != 0 && dedup.is_duplicate(dedup_id);
                let seq = if duplicate {
                    shared.duplicates.fetch_add(1, Ordering::Relaxed);
                    *committed_seq + 1
                } else {
                    if dedup_id != 0 {
                        dedup.record_appended(dedup_id, timestamp_ms);
                    }
                    *committed_seq += 1;
                    pf.buffer.push_back(Record {
                        partition,
                        offset,
                        seq: *committed_seq,
                        timestamp_ms,
                        dedup_id,
                        payload,
                    });
                    *buffered += 1;
                    *committed_seq
                };
                pf.recent.push_back(Stamp {
                    offset,
                    seq,
                    duplicate,
                });
                if pf.recent.len() > RECENT_STAMPS {
                    pf.recent.pop_front();
                }
                let waiter = waiting.remove(&(partition, offset));
                drop(fetch);
                shared.fetched.notify_all();
                if let Some(w) = waiter {
                    let outcome = if duplicate {
                        AppendOutcome::Duplicate
                    } else {
                        AppendOutcome::Appended {
                            partition,
                            offset,
                            seq,
                        }
                    };
                    w.batch.settle(w.index, Ok(outcome));
                }
            }
        }
    }
}

/// Settles appends whose records the consumer has not fetched back within `wait`: they are
/// acknowledged, and carry the next sequence number (see the module docs).
fn settle_overdue(fetch: &mut Fetch, wait: Duration) {
    if fetch.waiting.is_empty() {
        return;
    }
    let next = fetch.committed_seq + 1;
    let overdue: Vec<(u32, u64)> = fetch
        .waiting
        .iter()
        .filter(|(_, w)| w.since.elapsed() >= wait)
        .map(|(k, _)| *k)
        .collect();
    for (partition, offset) in overdue {
        if let Some(w) = fetch.waiting.remove(&(partition, offset)) {
            w.batch.settle(
                w.index,
                Ok(AppendOutcome::Appended {
                    partition,
                    offset,
                    seq: next,
                }),
            );
        }
    }
}

impl EventLog for KafkaLog {
    fn partition_count(&self) -> u32 {
        self.partitions
    }

    fn append(
        &self,
        records: Vec<AppendRecord>,
    ) -> Completion<Result<Vec<AppendOutcome>, LogError>> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Completion::ready(Err(LogError::Closed));
        }
        if records.is_empty() {
            return Completion::ready(Ok(Vec::new()));
        }
        if let Some(r) = records.iter().find(|r| r.payload.len() > MAX_PAYLOAD_BYTES) {
            return Completion::ready(Err(LogError::RecordTooLarge {
                size: r.payload.len(),
                max: MAX_PAYLOAD_BYTES,
            }));
        }
        let (completer, completion) = completion_pair(|| Err(LogError::Closed));
        let n = records.len();
        let copies = match &self.config.transactions_topic {
            Some(_) => records.iter().filter(|r| r.transaction.is_some()).count(),
            None => 0,
        };
        let pending = Arc::new(PendingAppend {
            state: Mutex::new(PendingState {
                outcomes: vec![None; n],
                remaining: n + copies,
                error: None,
                completer: Some(completer),
            }),
        });
        self.shared.batches.fetch_add(1, Ordering::Relaxed);
        for (index, r) in records.iter().enumerate() {
            let copy = self
                .config
                .transactions_topic
                .as_deref()
                .zip(r.transaction.as_deref());
            if r.dedup_id != 0 && lock(&self.shared.produced).is_duplicate(r.dedup_id) {
                self.shared.duplicates.fetch_add(1, Ordering::Relaxed);
                pending.settle(Some(index), Ok(AppendOutcome::Duplicate));
                if copy.is_some() {
                    pending.settle(None, Ok(AppendOutcome::Duplicate));
                }
                continue;
            }
            let sent = |index| {
                Box::new(Sent {
                    batch: pending.clone(),
                    index,
                    dedup_id: r.dedup_id,
                    timestamp_ms: r.timestamp_ms,
                })
            };
            match self.send(&self.config.topic, r, &r.payload, sent(Some(index))) {
                Ok(()) => {
                    self.shared.appended.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => pending.settle(Some(index), Err(e)),
            }
            if let Some((topic, json)) = copy {
                if let Err(e) = self.send(topic, r, json, sent(None)) {
                    pending.settle(None, Err(e));
                }
            }
        }
        completion
    }

    fn read(
        &self,
        partition: u32,
        from_offset: u64,
        max_records: usize,
    ) -> Result<Vec<Record>, LogError> {
        if partition >= self.partitions {
            return Err(LogError::InvalidPartition {
                partition,
                partitions: self.partitions,
            });
        }
        if !self.shared.consume {
            return Err(LogError::InvalidArgument(
                "this Kafka log was opened without a consumer".into(),
            ));
        }
        if self.shared.offsets_lost.load(Ordering::Acquire) {
            return Err(broker_error(
                &format!("topic {}", self.config.topic),
                "a partition no longer holds the position being read (the topic was recreated or truncated, or retention ran ahead of the processor); to rebuild the state from what the topic holds now, start with an empty data directory",
            ));
        }
        let mut fetch = lock(&self.shared.fetch);
        let Fetch {
            partitions,
            buffered,
            reposition,
            ..
        } = &mut *fetch;
        let pf = &mut partitions[partition as usize];
        if pf.run_start.is_some() && from_offset < pf.read_from {
            return Err(LogError::InvalidArgument(format!(
                "the Kafka log reads forward only: partition {partition} was read from offset {}, not {from_offset}",
                pf.read_from
            )));
        }
        // Reads below `read_from` were refused above.
        let continues = pf.run_start.is_some() && from_offset <= pf.fetched_to;
        if !continues {
            *buffered -= pf.end_run();
            pf.run_start = Some(from_offset);
            pf.fetched_to = from_offset;
            pf.read_from = from_offset;
            pf.warm_from = from_offset
                .saturating_sub(self.config.dedup_restore_records)
                .max(self.start_offsets[partition as usize]);
            *reposition = true;
            drop(fetch);
            self.shared.consumed.notify_all();
            return Ok(Vec::new());
        }
        pf.read_from = from_offset;
        let mut dropped = 0;
        while pf.buffer.front().is_some_and(|r| r.offset < from_offset) {
            pf.buffer.pop_front();
            dropped += 1;
        }
        *buffered -= dropped;
        let out = pf.buffer.iter().take(max_records).cloned().collect();
        drop(fetch);
        if dropped > 0 {
            self.shared.consumed.notify_all();
        }
        Ok(out)
    }

    /// What was fetched so far: the brokers' own end offsets are not asked for (tansu, for one,
    /// reports them far too low).
    fn end_offsets(&self) -> Vec<u64> {
        lock(&self.shared.fetch)
            .partitions
            .iter()
            .map(|p| p.fetched_to)
            .collect()
    }

    fn start_offsets(&self) -> Vec<u64> {
        self.start_offsets.clone()
    }

    fn committed_seq(&self) -> u64 {
        lock(&self.shared.fetch).committed_seq
    }

    fn wait_committed(&self, after: u64, timeout: Duration) -> u64 {
        let fetch = lock(&self.shared.fetch);
        let (fetch, _) = self
            .shared
            .fetched
            .wait_timeout_while(fetch, timeout, |f| f.committed_seq <= after)
            .unwrap_or_else(|e| e.into_inner());
        fetch.committed_seq
    }

    fn caught_up(&self) -> bool {
        let fetch = lock(&self.shared.fetch);
        fetch
            .partitions
            .iter()
            .all(|p| p.run_start.is_some() && p.at_end)
    }

    fn stats(&self) -> LogStats {
        let fetch = lock(&self.shared.fetch);
        LogStats {
            partition_records: fetch
                .partitions
                .iter()
                .zip(&self.start_offsets)
                .map(|(p, &start)| p.fetched_to.saturating_sub(start))
                .collect(),
            appended_records: self.shared.appended.load(Ordering::Relaxed),
            duplicate_records: self.shared.duplicates.load(Ordering::Relaxed),
            write_batches: self.shared.batches.load(Ordering::Relaxed),
            committed_seq: fetch.committed_seq,
            ..LogStats::default()
        }
    }

    fn enforce_retention(&self, _safe_offsets: &[u64]) -> Result<RetentionReport, LogError> {
        Ok(RetentionReport {
            start_offsets: self.start_offsets.clone(),
            ..RetentionReport::default()
        })
    }

    fn assignment(&self) -> Option<Assignment> {
        self.group.as_ref().map(|g| lock(&g.assignment).clone())
    }

    fn committed_offsets(&self, partitions: &[u32]) -> Result<Vec<Option<u64>>, LogError> {
        let Some(group) = &self.group else {
            return Ok(vec![None; partitions.len()]);
        };
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(&self.config.topic, p as i32);
        }
        let committed = group
            .consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .map_err(|e| broker_error("reading the group's committed offsets", e))?;
        Ok(partitions
            .iter()
            .map(|&p| {
                committed
                    .find_partition(&self.config.topic, p as i32)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) if o >= 0 => Some(o as u64),
                        _ => None,
                    })
            })
            .collect())
    }

    fn commit_offsets(&self, offsets: &[(u32, u64)]) -> Result<(), LogError> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        if offsets.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for &(p, o) in offsets {
            tpl.add_partition_offset(&self.config.topic, p as i32, Offset::Offset(o as i64))
                .map_err(|e| broker_error("committing offsets", e))?;
        }
        group
            .consumer
            .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
            .map_err(|e| broker_error("committing the group's offsets", e))
    }

    fn rewind(&self, partition: u32) -> Result<(), LogError> {
        if partition >= self.partitions {
            return Err(LogError::InvalidPartition {
                partition,
                partitions: self.partitions,
            });
        }
        let mut fetch = lock(&self.shared.fetch);
        let (window_ms, entries) = (fetch.dedup_window_ms, fetch.dedup_entries_per_partition);
        let pf = &mut fetch.partitions[partition as usize];
        let dropped = pf.end_run();
        pf.run_start = None;
        pf.dedup = DedupSet::new(window_ms, entries);
        fetch.buffered -= dropped;
        fetch.reposition = true;
        drop(fetch);
        self.shared.consumed.notify_all();
        Ok(())
    }

    fn close(&self) -> Result<(), LogError> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let flushed = self.producer().flush(Duration::from_secs(30));
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.consumed.notify_all();
        if let Some(h) = lock(&self.consumer).take() {
            let _ = h.join();
        }
        if let Some(group) = &self.group {
            group.stopping.store(true, Ordering::Release);
            if let Some(h) = lock(&group.thread).take() {
                let _ = h.join();
            }
        }
        // Appends still waiting for their records to come back were acknowledged by the broker.
        settle_overdue(&mut lock(&self.shared.fetch), Duration::ZERO);
        flushed.map_err(|e| broker_error("flushing records to the broker", e))
    }
}

impl Drop for KafkaLog {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched(stamps: &[(u64, u64, bool)]) -> PartitionFetch {
        PartitionFetch {
            recent: stamps
                .iter()
                .map(|&(offset, seq, duplicate)| Stamp {
                    offset,
                    seq,
                    duplicate,
                })
                .collect(),
            ..PartitionFetch::new(DedupSet::new(0, 0))
        }
    }

    /// A record the consumer polled for the old position of a partition, and placed after a
    /// read asked for a new run, is not taken for that run: it would move `fetched_to` past the
    /// run's own records, which would then all be dropped as already fetched. (A processor that
    /// takes a partition over rewinds it below where it had read; the group test lost events
    /// this way.)
    #[test]
    fn a_record_fetched_for_the_previous_run_is_not_taken_for_the_next() {
        let mut pf = PartitionFetch::new(DedupSet::new(0, 0));
        pf.run_start = Some(100);
        pf.fetched_to = 100;
        assert_eq!(pf.place(99), Placement::Refill);
        assert_eq!(pf.place(100), Placement::Take);
        pf.fetched_to = 500;
        assert_eq!(pf.place(400), Placement::Drop);
        // A rewind to 100 and a read there: a new run, not assigned yet.
        pf.run += 1;
        pf.run_start = Some(100);
        pf.fetched_to = 100;
        assert_eq!(pf.place(500), Placement::Drop, "a record of the old run");
        // Once the consumer thread has assigned the new position.
        pf.assigned_run = pf.run;
        assert_eq!(pf.place(50), Placement::Refill);
        assert_eq!(pf.place(100), Placement::Take);
        pf.run_start = None;
        assert_eq!(pf.place(100), Placement::Drop);
    }

    /// A delivery report that arrives after the consumer fetched its record gets the consumer's
    /// verdict: a retry the consumer dropped is a duplicate, even when a record after it was
    /// applied (before, it took that record's sequence number and was reported appended).
    #[test]
    fn a_late_delivery_report_gets_the_consumers_verdict() {
        let pf = fetched(&[(10, 7, false), (11, 8, true), (12, 8, false)]);
        assert_eq!(pf.outcome_of(2, 11), Some(AppendOutcome::Duplicate));
        assert_eq!(
            pf.outcome_of(2, 10),
            Some(AppendOutcome::Appended {
                partition: 2,
                offset: 10,
                seq: 7
            })
        );
        assert_eq!(
            pf.outcome_of(2, 12),
            Some(AppendOutcome::Appended {
                partition: 2,
                offset: 12,
                seq: 8
            })
        );
        // Not fetched yet: the consumer settles it when it is.
        assert_eq!(pf.outcome_of(2, 13), None);
        assert_eq!(fetched(&[]).outcome_of(2, 0), None);
        // Older than every remembered stamp: appended, waiting for a sequence number that
        // covers it.
        assert_eq!(
            pf.outcome_of(2, 3),
            Some(AppendOutcome::Appended {
                partition: 2,
                offset: 3,
                seq: 7
            })
        );
    }
}
