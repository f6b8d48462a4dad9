//! One Kairos node: the log, the state, the processor thread and the API, wired together.
//!
//! `kairos serve` builds a [`Node`] with every role and serves its router; the integration tests
//! build the same node in-process. `kairos ingest` builds one with the ingest role only: the
//! tracker endpoints appending to a Kafka topic, no processor and no state (see [`Role`]). Start-up order matters for correctness: the state is restored from its newest
//! snapshot, then the processor replays the log from the snapshot's checkpoint before `/readyz`
//! turns ready, so no read ever sees a state older than what was acknowledged before a restart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use kairos_api::{register_state_gauges, AppState};
use kairos_log::{EmbeddedLog, EventLog};
use kairos_processor::{Processor, ProcessorMetrics, Watermark};
use kairos_state::{EmbeddedStore, StateStore};
use kairos_types::metrics::Registry;

use crate::config::{Config, LogBackend, StateBackend};

/// What a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything: ingest, log, processor, state and the read API (`kairos serve`).
    All,
    /// Only the ingest API, appending to a shared (Kafka) log that other nodes process
    /// (`kairos ingest`): stateless, so any number of them can run side by side.
    Ingest,
    /// One processor replica of a consumer group sharing a Kafka log's partitions, the profiles
    /// in Redis (`kairos process`, see [`crate::group`]): any number side by side.
    Process,
    /// A stateless API replica (`kairos api`): the model built from the processor replicas'
    /// model topic, the profiles read from Redis, answers cached (see `kairos_api::replica`).
    Api,
}

pub struct Node {
    pub app: Arc<AppState>,
    pub log: Arc<dyn EventLog>,
    pub store: Arc<dyn StateStore>,
    pub role: Role,
    stop: Arc<AtomicBool>,
    processor: Option<JoinHandle<Result<(), String>>>,
    /// The thread writing profiles to Redis (it returns whether it stopped with every change
    /// written), its stop flag, and the file that records it.
    mirror: Option<Mirror>,
    /// An API replica's threads: following the profile change channel, saving the model.
    helpers: Vec<JoinHandle<()>>,
}

impl Node {
    /// Opens the data directory and starts the processor thread. The node turns ready once the
    /// processor has replayed the log.
    pub fn start(config: &Config) -> Result<Node, String> {
        Self::start_role(config, Role::All)
    }

    /// Starts a node running `role`.
    pub fn start_role(config: &Config, role: Role) -> Result<Node, String> {
        if role == Role::Ingest {
            return Self::start_ingest(config);
        }
        if role == Role::Process {
            return Self::start_process(config);
        }
        if role == Role::Api {
            return Self::start_api(config);
        }
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| format!("creating data dir {}: {e}", config.data_dir.display()))?;
        let registry = Arc::new(Registry::default());
        let dir = config.data_dir.join("state");
        let embedded = Arc::new(
            EmbeddedStore::open(&dir, config.model.clone())
                .map_err(|e| format!("opening state {}: {e}", dir.display()))?,
        );
        // With Redis, the state stays in memory (rebuilt from the log and its snapshots) and the
        // profiles are written to Redis as well (kairos-state/src/redis_mirror.rs).
        let mirror = match config.state_backend()? {
            StateBackend::Embedded => None,
            #[cfg(feature = "redis")]
            StateBackend::Redis { url } => {
                let redis =
                    kairos_state::redis_mirror::RedisProfiles::new(&url, config.redis.clone())?;
                Some(start_mirror(
                    config, &url, redis, &embedded, &registry, None, None,
                )?)
            }
            #[cfg(not(feature = "redis"))]
            StateBackend::Redis { .. } => unreachable!("rejected by Config::state_backend"),
        };
        let store: Arc<dyn StateStore> = embedded;
        let log: Arc<dyn EventLog> = match config.log_backend()? {
            LogBackend::Embedded => {
                let dir = config.data_dir.join("log");
                let started = Instant::now();
                let mut settings = config.embedded_log_config()?;
                let stored = EmbeddedLog::stored_partitions(&dir)
                    .map_err(|e| format!("reading event log {}: {e}", dir.display()))?;
                if let Some(stored) = stored.filter(|&p| p != settings.partitions) {
                    tracing::info!(
                        partitions = stored,
                        configured = settings.partitions,
                        "the event log keeps the partition count it was created with"
                    );
                    settings.partitions = stored;
                }
                let log = EmbeddedLog::open(&dir, settings)
                    .map_err(|e| format!("opening event log {}: {e}", dir.display()))?;
                tracing::info!(dir = %dir.display(), ms = started.elapsed().as_millis() as u64, committed_seq = log.committed_seq(), "event log open");
                Arc::new(log)
            }
            #[cfg(feature = "kafka")]
            LogBackend::Kafka { brokers } => {
                // Sequence numbers are stamped locally; they continue from the state's.
                open_kafka_log(config, &brokers, store.checkpoint().seq, true, None)?
            }
            #[cfg(not(feature = "kafka"))]
            LogBackend::Kafka { .. } => unreachable!("rejected by Config::log_backend"),
        };
        let (app, mut processor) = wire(config, &log, &store, registry);
        // With a refresh period, the cached lists are refreshed by the processor rather than by
        // whichever read finds them stale (with none, every read recomputes, as tests want).
        if config.model.trending_refresh_ms > 0 {
            let recommend = config.recommend.clone();
            processor.set_maintenance(Box::new(move |state| {
                kairos_recommend::refresh_caches(state, &recommend)
            }));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let handle = spawn_processor(processor, app.clone(), stop.clone())?;
        Ok(Node {
            app,
            log,
            store,
            role,
            stop,
            processor: Some(handle),
            mirror,
            helpers: Vec::new(),
        })
    }

    /// An ingest-only node: a Kafka log without a consumer, and an empty state nobody reads
    /// (the ingest router has no read routes). Ready as soon as the topic is there.
    fn start_ingest(config: &Config) -> Result<Node, String> {
        let log = Self::open_ingest_log(config)?;
        let store: Arc<dyn StateStore> = Arc::new(EmbeddedStore::in_memory(config.model.clone()));
        let registry = Arc::new(Registry::default());
        let app = AppState::new(
            log.clone(),
            store.clone(),
            Watermark::new(0),
            config.ingest.clone(),
            config.api.clone(),
            config.recommend.clone(),
            registry,
        );
        app.ingest_only.store(true, Ordering::Relaxed);
        app.set_ready(true);
        Ok(Node {
            app,
            log,
            store,
            role: Role::Ingest,
            stop: Arc::new(AtomicBool::new(false)),
            processor: None,
            mirror: None,
            helpers: Vec::new(),
        })
    }

    /// The log of an ingest node: a Kafka topic, appended to without a consumer.
    fn open_ingest_log(config: &Config) -> Result<Arc<dyn EventLog>, String> {
        match config.log_backend()? {
            LogBackend::Embedded => Err("the ingest role appends to a log other nodes process: it needs log = \"kafka://HOST:PORT\" (`kairos serve` runs everything on the embedded log)".into()),
            #[cfg(feature = "kafka")]
            LogBackend::Kafka { brokers } => open_kafka_log(config, &brokers, 0, false, None),
            #[cfg(not(feature = "kafka"))]
            LogBackend::Kafka { .. } => unreachable!("rejected by Config::log_backend"),
        }
    }

    pub fn router(&self) -> axum::Router {
        match self.role {
            Role::All => kairos_api::router(self.app.clone()),
            Role::Ingest => kairos_api::ingest_router(self.app.clone()),
            Role::Process => kairos_api::process_router(self.app.clone()),
            Role::Api => kairos_api::api_router(self.app.clone()),
        }
    }

    /// A processor replica: a Kafka log read as a member of the consumer group
    /// `kafka.group`, a state in memory holding the profiles of the partitions it owns, loaded
    /// from and written to Redis (see [`crate::group`]). No snapshots: Redis and the group's
    /// committed offsets are what survives it.
    #[cfg(all(feature = "kafka", feature = "redis"))]
    fn start_process(config: &Config) -> Result<Node, String> {
        use crate::group::{commit_durable, partition_of, RedisPartitioning};
        use kairos_state::redis_mirror::RedisProfiles;
        let need = "the process role shares a Kafka log's partitions and keeps the profiles in Redis: it needs log = \"kafka://HOST:PORT\" and state = \"redis://HOST:PORT\" (or redis-cluster://…)";
        let (brokers, url) = kafka_and_redis(config, need)?;
        if config.kafka.group.is_empty() {
            return Err(
                "kafka.group (the consumer group of the processor replicas) is empty".into(),
            );
        }
        // Nothing goes to the data directory: the profiles are in Redis, the positions in the
        // group's committed offsets.
        let registry = Arc::new(Registry::default());
        let embedded = Arc::new(EmbeddedStore::in_memory(config.model.clone()));
        let log = open_kafka_log(config, &brokers, 0, true, Some(&config.kafka.group))?;
        let partitions = log.partition_count();
        let owner: kairos_state::redis_mirror::PartitionOf =
            Arc::new(move |key: &str| partition_of(key, partitions));
        let stop = Arc::new(AtomicBool::new(false));
        let commit_lock = Arc::new(std::sync::Mutex::new(()));
        let partitioning = RedisPartitioning::new(
            embedded.clone(),
            log.clone(),
            RedisProfiles::new(&url, config.redis.clone())?.owned_by(owner.clone()),
            commit_lock.clone(),
            config.redis.process_max_profiles,
            stop.clone(),
            &registry,
        );
        // The model updates of what this replica applies, for the API replicas.
        let publish = if config.kafka.model_topic.is_empty() {
            None
        } else {
            let model_log = open_model_log(config, &brokers, false)?;
            if let Some(group) = &mut embedded.write().group {
                group.publish_model = true;
            }
            Some(model_publisher(model_log))
        };
        let mirror = start_mirror(
            config,
            &url,
            RedisProfiles::new(&url, config.redis.clone())?.owned_by(owner),
            &embedded,
            &registry,
            Some(commit_durable(
                log.clone(),
                embedded.clone(),
                commit_lock,
                std::time::Duration::from_secs(1),
            )),
            publish,
        )?;
        let store: Arc<dyn StateStore> = embedded;
        let (app, mut processor) = wire(config, &log, &store, registry);
        processor.set_partitioning(Box::new(partitioning));
        let handle = spawn_processor(processor, app.clone(), stop.clone())?;
        Ok(Node {
            app,
            log,
            store,
            role: Role::Process,
            stop,
            processor: Some(handle),
            mirror: Some(mirror),
            helpers: Vec::new(),
        })
    }

    #[cfg(not(all(feature = "kafka", feature = "redis")))]
    fn start_process(_config: &Config) -> Result<Node, String> {
        Err("the process role needs a build with the kafka and redis features".into())
    }

    /// An API replica: a state holding the model only, loaded from the newest save in Redis (see
    /// `kairos_state::redis_model`) and kept current by a processor applying the model topic
    /// (every partition, no group) from where that save ends, or from the start without one;
    /// the profiles read from Redis per request; a thread following Redis's change channel for
    /// the answer cache, and one saving the model in turns. Nothing is kept on disk. Ready once
    /// the model topic is read to its end.
    #[cfg(all(feature = "kafka", feature = "redis"))]
    fn start_api(config: &Config) -> Result<Node, String> {
        use kairos_api::replica::{RecCache, Replica};
        use kairos_state::redis_mirror::RedisProfiles;
        use kairos_state::redis_model;
        use kairos_state::redis_reader::{follow_changes, Change, ProfilePool};
        let need = "the api role reads the model the processor replicas publish on Kafka and the profiles in Redis: it needs log = \"kafka://HOST:PORT\" and state = \"redis://HOST:PORT\" (or redis-cluster://…)";
        let (brokers, url) = kafka_and_redis(config, need)?;
        if config.kafka.model_topic.is_empty() {
            return Err("kafka.model_topic is empty: the api role builds its model from the updates the processor replicas publish there".into());
        }
        let pool = ProfilePool::new(&url, config.redis.clone())?;
        pool.check()
            .map_err(|e| format!("state backend: cannot reach Redis at {url:?}: {e}"))?;
        let registry = Arc::new(Registry::default());
        // The newest model saved in Redis, if any: the model topic is then read from where it ends.
        let mut redis = RedisProfiles::new(&url, config.redis.clone())?;
        let restored = match redis_model::load(&mut redis) {
            Ok(Some(loaded)) => {
                tracing::info!(
                    bytes = loaded.bytes,
                    entries = loaded.state.model_entries(),
                    "model loaded from its save in Redis; reading the model topic from where it ends"
                );
                Some(loaded.state)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "the model saved in Redis is unusable; building the model from the start of the model topic");
                None
            }
        };
        registry
            .gauge(
                "kairos_model_restored_entries",
                "Events-topic entries the model an API replica loaded from its save in Redis at start reflected (0: built from the start of the model topic).",
                &[],
            )
            .set(restored.as_ref().map_or(0, kairos_state::State::model_entries) as i64);
        let store: Arc<dyn StateStore> = Arc::new(match restored {
            Some(state) => EmbeddedStore::in_memory_from(state, config.model.clone()),
            None => EmbeddedStore::in_memory(config.model.clone()),
        });
        let log = open_model_log(config, &brokers, true)?;
        let cache = RecCache::new(
            std::time::Duration::from_millis(config.api.cache_ttl_ms),
            config.api.cache_max_entries,
            &registry,
        );
        let s = store.clone();
        registry.computed(
            "kairos_model_entries_applied",
            "Events-topic entries an API replica's model reflects: per partition, the position after the last entry whose model updates it applied, summed (compare with the topic's end offsets).",
            &[],
            move || s.read().model_entries() as f64,
        );
        let (app, mut processor) = wire(config, &log, &store, registry.clone());
        // Nothing is kept on disk: a replica starts from the model saved in Redis, or the topic.
        processor.without_snapshots();
        if config.model.trending_refresh_ms > 0 {
            let recommend = config.recommend.clone();
            processor.set_maintenance(Box::new(move |state| {
                kairos_recommend::refresh_caches(state, &recommend)
            }));
        }
        let reader: Arc<dyn kairos_api::replica::ProfileReader> = Arc::new(PoolReader(pool));
        let _ = app.replica.set(Replica {
            reader,
            cache: cache.clone(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_stop, settings) = (stop.clone(), config.redis.clone());
        let subscriber = std::thread::Builder::new()
            .name("kairos-redis-changes".into())
            .spawn(move || {
                let followed = follow_changes(&url, &settings, &thread_stop, |change| match change {
                    Change::Connected => cache.set_live(true),
                    Change::Disconnected => cache.set_live(false),
                    Change::Profile(key) => cache.invalidate(key),
                });
                if let Err(e) = followed {
                    tracing::error!(error = %e, "cannot follow the profile change channel: answers are not cached");
                }
            })
            .map_err(|e| format!("starting the Redis subscriber thread: {e}"))?;
        let mut helpers = vec![subscriber];
        if config.api.model_save_secs > 0 {
            let saver = ModelSaver {
                redis,
                store: store.clone(),
                app: app.clone(),
                stop: stop.clone(),
                every: std::time::Duration::from_secs(config.api.model_save_secs),
                holder: format!(
                    "{}-{}",
                    std::env::var("HOSTNAME").unwrap_or_default(),
                    std::process::id()
                ),
                saves: registry.counter(
                    "kairos_model_saves_total",
                    "Models this API replica saved in Redis (replicas take turns).",
                    &[],
                ),
                bytes: registry.gauge(
                    "kairos_model_save_bytes",
                    "Size of the last model this API replica saved in Redis.",
                    &[],
                ),
                entries: registry.gauge(
                    "kairos_model_saved_entries",
                    "Events-topic entries the last model this API replica saved in Redis reflected.",
                    &[],
                ),
                took_ms: registry.gauge(
                    "kairos_model_save_ms",
                    "How long the last save of this API replica's model took: encoding it under the read lock, then writing it to Redis.",
                    &[],
                ),
            };
            helpers.push(
                std::thread::Builder::new()
                    .name("kairos-model-save".into())
                    .spawn(move || saver.run())
                    .map_err(|e| format!("starting the model save thread: {e}"))?,
            );
        }
        let handle = spawn_processor(processor, app.clone(), stop.clone())?;
        Ok(Node {
            app,
            log,
            store,
            role: Role::Api,
            stop,
            processor: Some(handle),
            mirror: None,
            helpers,
        })
    }

    #[cfg(not(all(feature = "kafka", feature = "redis")))]
    fn start_api(_config: &Config) -> Result<Node, String> {
        Err("the api role needs a build with the kafka and redis features".into())
    }

    /// Blocks until the processor has replayed the log (or failed).
    pub fn wait_ready(&self, timeout: std::time::Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.app.ready.load(Ordering::Acquire) {
            if Instant::now() > deadline || self.processor.as_ref().is_none_or(|h| h.is_finished())
            {
                return self.app.ready.load(Ordering::Acquire);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    /// Stops the processor after it applied everything committed, writes the final snapshot and
    /// closes the log.
    pub fn shutdown(mut self) -> Result<(), String> {
        self.app.set_ready(false);
        self.stop.store(true, Ordering::Release);
        let result = match self.processor.take() {
            Some(h) => h
                .join()
                .map_err(|_| "processor thread panicked".to_string())?,
            None => Ok(()),
        };
        // After the processor's last apply, so that Redis ends with what the state holds.
        self.stop_mirror();
        for helper in self.helpers.drain(..) {
            let _ = helper.join();
        }
        // An ingest node's appends are flushed to the broker here.
        self.log.close().map_err(|e| format!("closing log: {e}"))?;
        result
    }

    fn stop_mirror(&mut self) {
        if let Some(mirror) = self.mirror.take() {
            mirror.stop.store(true, Ordering::Release);
            let synced = mirror.handle.join().unwrap_or(false);
            if let Some(file) = mirror.synced_file.filter(|_| synced) {
                if let Err(e) = std::fs::write(file, b"") {
                    tracing::warn!(error = %e, "recording that Redis is current");
                }
            }
        }
    }
}

struct Mirror {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<bool>,
    /// Where a clean stop records that Redis is current (`None` for a processor replica).
    synced_file: Option<std::path::PathBuf>,
}

/// The API state and the processor of a node on `log` and `store`, with their metrics.
fn wire(
    config: &Config,
    log: &Arc<dyn EventLog>,
    store: &Arc<dyn StateStore>,
    registry: Arc<Registry>,
) -> (Arc<AppState>, Processor) {
    let watermark = Watermark::new(store.checkpoint().seq);
    let metrics = Arc::new(ProcessorMetrics::new(&registry));
    register_state_gauges(&registry, log.clone(), store.clone(), watermark.clone());
    let app = AppState::new(
        log.clone(),
        store.clone(),
        watermark.clone(),
        config.ingest.clone(),
        config.api.clone(),
        config.recommend.clone(),
        registry,
    );
    let processor = Processor::new(
        log.clone(),
        store.clone(),
        config.processor.clone(),
        watermark,
        metrics,
    );
    (app, processor)
}

/// Starts the processor thread: it replays the log, turns the node ready, and applies until
/// `stop`.
fn spawn_processor(
    mut processor: Processor,
    app: Arc<AppState>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<Result<(), String>>, String> {
    std::thread::Builder::new()
        .name("kairos-processor".into())
        .spawn(move || {
            let started = Instant::now();
            let replayed = processor.catch_up()?;
            tracing::info!(
                entries = replayed,
                ms = started.elapsed().as_millis() as u64,
                "log replayed; node ready"
            );
            app.set_ready(true);
            let result = processor.run(stop);
            if let Err(e) = &result {
                // Reads would silently serve a frozen state: report the node as not ready.
                app.set_ready(false);
                tracing::error!(error = %e, "processor stopped");
            }
            result
        })
        .map_err(|e| format!("starting processor thread: {e}"))
}

/// Starts the thread that writes the profiles `store` changes to Redis.
#[cfg(feature = "redis")]
fn start_mirror(
    config: &Config,
    url: &str,
    mut redis: kairos_state::redis_mirror::RedisProfiles,
    store: &Arc<EmbeddedStore>,
    registry: &Registry,
    on_durable: Option<kairos_state::redis_mirror::OnDurable>,
    publish: Option<kairos_state::redis_mirror::Publish>,
) -> Result<Mirror, String> {
    use kairos_state::redis_mirror::{run_mirror, MirrorMetrics, SYNCED_FILE};
    // A wrong address is a configuration error to report now; later outages are retried.
    redis
        .has_marker()
        .map_err(|e| format!("state backend: cannot reach Redis at {url:?}: {e}"))?;
    store.track_profile_changes();
    // Only a clean stop of the last run, with Redis current, leaves this file behind. A
    // processor replica (`on_durable`) starts empty every time: it has nothing to write again.
    let synced_file = on_durable
        .is_none()
        .then(|| config.data_dir.join("state").join(SYNCED_FILE));
    if let Some(file) = &synced_file {
        if std::fs::remove_file(file).is_err() {
            tracing::info!("the last run did not stop with Redis current: writing every profile");
            store.mark_all_profiles_changed();
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (thread_stop, thread_store) = (stop.clone(), store.clone());
    let metrics = MirrorMetrics::new(registry);
    let handle = std::thread::Builder::new()
        .name("kairos-redis".into())
        .spawn(move || {
            run_mirror(
                redis,
                thread_store,
                metrics,
                thread_stop,
                on_durable,
                publish,
            )
        })
        .map_err(|e| format!("starting the Redis thread: {e}"))?;
    tracing::info!(url, "profiles are written to Redis");
    Ok(Mirror {
        stop,
        handle,
        synced_file,
    })
}

/// The brokers and the Redis URL of a role that needs both (`need` says so otherwise).
#[cfg(all(feature = "kafka", feature = "redis"))]
fn kafka_and_redis(config: &Config, need: &str) -> Result<(String, String), String> {
    let LogBackend::Kafka { brokers } = config.log_backend()? else {
        return Err(need.into());
    };
    let StateBackend::Redis { url } = config.state_backend()? else {
        return Err(need.into());
    };
    Ok((brokers, url))
}

/// The Kafka log on `brokers`, numbering from `start_seq`, with a consumer if `consume`.
#[cfg(feature = "kafka")]
fn open_kafka_log(
    config: &Config,
    brokers: &str,
    start_seq: u64,
    consume: bool,
    group: Option<&str>,
) -> Result<Arc<dyn EventLog>, String> {
    let mut settings = config.kafka_log_config(brokers, start_seq, consume)?;
    settings.group = group.map(str::to_owned);
    let log = kairos_log::KafkaLog::open(settings)
        .map_err(|e| format!("opening the Kafka event log at {brokers}: {e}"))?;
    Ok(Arc::new(log))
}

/// The model topic (`kafka.model_topic`) on `brokers`: read from the start by an API replica
/// (`consume`), appended to by a processor replica. Its records are not deduplicated by the log:
/// a reader skips updates it already applied (`State::apply_model`).
#[cfg(feature = "kafka")]
fn open_model_log(
    config: &Config,
    brokers: &str,
    consume: bool,
) -> Result<Arc<dyn EventLog>, String> {
    let mut settings = config.kafka_log_config(brokers, 0, consume)?;
    settings.topic = config.kafka.model_topic.clone();
    settings.transactions_topic = None;
    settings.dedup_max_entries = 0;
    settings.dedup_restore_records = 0;
    let log = kairos_log::KafkaLog::open(settings).map_err(|e| {
        format!(
            "opening the model topic {:?} at {brokers}: {e}",
            config.kafka.model_topic
        )
    })?;
    Ok(Arc::new(log))
}

/// Publishes model updates on the model topic, each partition's under one key so that they
/// stay in order, and returns once the broker acknowledged them all.
#[cfg(all(feature = "kafka", feature = "redis"))]
fn model_publisher(log: Arc<dyn EventLog>) -> kairos_state::redis_mirror::Publish {
    Box::new(move |batches| {
        let records = batches
            .iter()
            .map(|batch| kairos_log::AppendRecord {
                key: format!("partition-{}", batch.partition).into_bytes(),
                timestamp_ms: batch.clock,
                dedup_id: 0,
                payload: kairos_types::LogEntry::encode_model(batch),
                transaction: None,
            })
            .collect();
        let outcomes = log
            .append(records)
            .wait()
            .map_err(|e| format!("publishing model updates: {e}"))?;
        match outcomes
            .iter()
            .find(|o| !matches!(o, kairos_log::AppendOutcome::Appended { .. }))
        {
            Some(o) => Err(format!("publishing model updates: {o:?}")),
            None => Ok(()),
        }
    })
}

/// An API replica's thread saving its model in Redis every `every`, in turns with the other
/// replicas (see `kairos_state::redis_model`).
#[cfg(all(feature = "kafka", feature = "redis"))]
struct ModelSaver {
    redis: kairos_state::redis_mirror::RedisProfiles,
    store: Arc<dyn StateStore>,
    app: Arc<AppState>,
    stop: Arc<AtomicBool>,
    every: std::time::Duration,
    /// This replica's name in the turn lock.
    holder: String,
    saves: Arc<kairos_types::metrics::Counter>,
    bytes: Arc<kairos_types::metrics::Gauge>,
    entries: Arc<kairos_types::metrics::Gauge>,
    took_ms: Arc<kairos_types::metrics::Gauge>,
}

#[cfg(all(feature = "kafka", feature = "redis"))]
impl ModelSaver {
    fn run(mut self) {
        use kairos_state::redis_model;
        let mut saved_entries = 0;
        let mut next = Instant::now() + self.every;
        while !self.stop.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(100));
            // A replica still catching up would save an older model than the others have.
            if Instant::now() < next || !self.app.ready.load(Ordering::Acquire) {
                continue;
            }
            next = Instant::now() + self.every;
            let entries = self.store.read().model_entries();
            if entries == saved_entries {
                continue;
            }
            let turn = redis_model::take_turn(
                &mut self.redis,
                &self.holder,
                self.every.as_millis() as u64,
            );
            match turn {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "saving the model in Redis: cannot take the turn");
                    continue;
                }
            }
            let started = Instant::now();
            // Encoded under the read lock (the processor waits, requests do not); written after.
            let prepared = redis_model::Prepared::of(&self.store.read());
            let saved = prepared.and_then(|model| redis_model::save(&mut self.redis, &model));
            match saved {
                Ok(saved) => {
                    let ms = started.elapsed().as_millis() as u64;
                    saved_entries = saved.entries;
                    self.saves.inc();
                    self.bytes.set(saved.bytes as i64);
                    self.entries.set(saved.entries as i64);
                    self.took_ms.set(ms as i64);
                    tracing::info!(
                        bytes = saved.bytes,
                        chunks = saved.chunks,
                        entries = saved.entries,
                        ms,
                        "model saved in Redis"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "saving the model in Redis failed"),
            }
        }
    }
}

/// The [`kairos_api::replica::ProfileReader`] of an API replica: Redis, through a pool.
#[cfg(all(feature = "kafka", feature = "redis"))]
struct PoolReader(kairos_state::redis_reader::ProfilePool);

#[cfg(all(feature = "kafka", feature = "redis"))]
impl kairos_api::replica::ProfileReader for PoolReader {
    fn read(&self, keys: &[&str]) -> Result<kairos_state::portable::Person, String> {
        self.0.read_person(keys)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(h) = self.processor.take() {
            self.stop.store(true, Ordering::Release);
            let _ = h.join();
            let _ = self.log.close();
        }
        self.stop_mirror();
        if !self.helpers.is_empty() {
            self.stop.store(true, Ordering::Release);
            for helper in self.helpers.drain(..) {
                let _ = helper.join();
            }
        }
    }
}
