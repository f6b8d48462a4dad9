//! Configuration: compiled-in commented defaults, a TOML file, `KAIROS_*` variables, flags.
//!
//! The defaults are `default.toml`, compiled into the binary (and printed by `kairos config
//! --default`), so the documentation of every setting is the file the binary itself reads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use kairos_api::{ApiConfig, IngestConfig};
use kairos_processor::ProcessorConfig;
use kairos_recommend::RecommendConfig;
use kairos_state::{RedisSettings, StateConfig};

pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub log: String,
    pub state: String,
    pub log_format: String,
    pub log_level: String,
    pub shutdown_timeout_secs: u64,
    pub event_log: EventLogConfig,
    pub kafka: KafkaConfig,
    pub redis: RedisSettings,
    pub ingest: IngestConfig,
    pub api: ApiConfig,
    pub processor: ProcessorConfig,
    pub model: StateConfig,
    pub recommend: RecommendConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventLogConfig {
    pub partitions: u32,
    pub segment_mib: u64,
    pub retention_hours: u64,
    pub retention_mib: u64,
    pub fsync: String,
    pub fsync_interval_ms: u64,
    pub dedup_window_hours: u64,
    pub dedup_max_entries: usize,
    pub max_pending_mib: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub topic: String,
    pub transactions_topic: String,
    pub partitions: u32,
    pub replication_factor: i32,
    pub compression: String,
    pub ack_timeout_ms: u64,
    pub max_buffered_records: usize,
    pub client: std::collections::BTreeMap<String, String>,
    pub group: String,
    pub group_session_timeout_ms: u64,
    pub model_topic: String,
}

/// The event log backend, chosen by the `log` setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogBackend {
    /// Segment files under `<data_dir>/log`.
    Embedded,
    /// A topic on Kafka-protocol brokers (`host:port,host:port`).
    Kafka { brokers: String },
}

/// The state backend, chosen by the `state` setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateBackend {
    /// In memory with snapshots under `<data_dir>/state`.
    Embedded,
    /// In memory as with `Embedded`, the profiles also kept in Redis or Redis Cluster
    /// (`redis://HOST:PORT`, `redis-cluster://HOST:PORT,HOST:PORT,...`).
    Redis { url: String },
}

impl Config {
    pub fn log_backend(&self) -> Result<LogBackend, String> {
        match self.log.as_str() {
            "embedded" => Ok(LogBackend::Embedded),
            other => match other.strip_prefix("kafka://") {
                Some(brokers) if cfg!(feature = "kafka") => {
                    let brokers = brokers.trim_end_matches('/');
                    if brokers.is_empty() || brokers.split(',').any(|b| !b.contains(':')) {
                        return Err(format!(
                            "log backend {other:?}: expected kafka://HOST:PORT[,HOST:PORT...]"
                        ));
                    }
                    Ok(LogBackend::Kafka {
                        brokers: brokers.to_owned(),
                    })
                }
                Some(_) => Err(format!(
                    "log backend {other:?}: this binary was built without the \"kafka\" feature"
                )),
                None => Err(format!(
                    "unknown log backend {other:?}; expected \"embedded\" or \"kafka://HOST:PORT\""
                )),
            },
        }
    }

    pub fn state_backend(&self) -> Result<StateBackend, String> {
        match self.state.as_str() {
            "embedded" => Ok(StateBackend::Embedded),
            other
                if ["redis://", "redis-cluster://", "rediss://", "rediss-cluster://"]
                    .iter()
                    .any(|scheme| other.starts_with(scheme)) =>
            {
                if !cfg!(feature = "redis") {
                    return Err(format!(
                        "state backend {other:?}: this binary was built without the \"redis\" feature"
                    ));
                }
                #[cfg(feature = "redis")]
                kairos_state::redis_mirror::RedisTarget::parse(other)?;
                if other.starts_with("rediss-cluster://") && !self.redis.tls_ca_file.is_empty() {
                    return Err(format!(
                        "state backend {other:?}: [redis] tls_ca_file applies to one server \
                         (rediss://); a cluster's certificates must be signed by a CA the system \
                         trusts (or one in the bundle SSL_CERT_FILE names)"
                    ));
                }
                Ok(StateBackend::Redis {
                    url: other.to_owned(),
                })
            }
            other => Err(format!(
                "unknown state backend {other:?}; expected \"embedded\", \"redis://HOST:PORT\" or \"redis-cluster://HOST:PORT[,HOST:PORT...]\" (rediss:// and rediss-cluster:// with TLS)"
            )),
        }
    }

    #[cfg(feature = "kafka")]
    pub fn kafka_log_config(
        &self,
        brokers: &str,
        start_seq: u64,
        consume: bool,
    ) -> Result<kairos_log::KafkaLogConfig, String> {
        let c = &self.kafka;
        if c.partitions == 0 {
            return Err("kafka.partitions must be at least 1".into());
        }
        Ok(kairos_log::KafkaLogConfig {
            brokers: brokers.to_owned(),
            topic: c.topic.clone(),
            transactions_topic: (!c.transactions_topic.is_empty())
                .then(|| c.transactions_topic.clone()),
            partitions: c.partitions,
            replication_factor: c.replication_factor,
            compression: c.compression.clone(),
            consume,
            start_seq,
            dedup_window_ms: self.event_log.dedup_window_hours as i64 * 3_600_000,
            dedup_max_entries: self.event_log.dedup_max_entries,
            max_buffered_records: c.max_buffered_records.max(1),
            ack_timeout: std::time::Duration::from_millis(c.ack_timeout_ms.max(1)),
            properties: c.client.clone().into_iter().collect(),
            group: None,
            group_session_timeout: std::time::Duration::from_millis(
                c.group_session_timeout_ms.max(1),
            ),
            ..kairos_log::KafkaLogConfig::default()
        })
    }

    pub fn embedded_log_config(&self) -> Result<kairos_log::EmbeddedLogConfig, String> {
        let c = &self.event_log;
        let fsync = match c.fsync.as_str() {
            "always" => kairos_log::FsyncPolicy::Always,
            "interval" => kairos_log::FsyncPolicy::IntervalMs(c.fsync_interval_ms.max(1)),
            "never" => kairos_log::FsyncPolicy::Never,
            other => {
                return Err(format!(
                    "event_log.fsync must be \"always\", \"interval\" or \"never\", not {other:?}"
                ))
            }
        };
        if c.partitions == 0 {
            return Err("event_log.partitions must be at least 1".into());
        }
        Ok(kairos_log::EmbeddedLogConfig {
            partitions: c.partitions,
            segment_bytes: c.segment_mib.max(1) * 1024 * 1024,
            retention_bytes: (c.retention_mib > 0).then_some(c.retention_mib * 1024 * 1024),
            retention_ms: (c.retention_hours > 0).then_some(c.retention_hours as i64 * 3_600_000),
            fsync,
            dedup_window_ms: c.dedup_window_hours as i64 * 3_600_000,
            dedup_max_entries: c.dedup_max_entries,
            max_pending_bytes: c.max_pending_mib.max(1) * 1024 * 1024,
        })
    }
}

/// Merges `overlay` into `base`, table by table.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (k, v) in overlay {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Parses an environment value as a TOML value when it is one, else as a string.
fn env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

/// Turns `KAIROS_*` variables into a TOML overlay. `KAIROS_CONFIG` names the file and is skipped.
fn env_overlay(vars: impl Iterator<Item = (String, String)>) -> toml::Table {
    let mut out = toml::Table::new();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix("KAIROS_") else {
            continue;
        };
        if rest == "CONFIG" || rest.is_empty() {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        let mut table = &mut out;
        for part in &path[..path.len() - 1] {
            table = table
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("intermediate keys are tables");
        }
        table.insert(path[path.len() - 1].clone(), env_value(&value));
    }
    out
}

/// Builds the configuration from the defaults, an optional file, the environment and flag
/// overrides (a TOML table built from the command line).
pub fn load(
    file: Option<&Path>,
    env: impl Iterator<Item = (String, String)>,
    flags: toml::Table,
) -> Result<Config, String> {
    let mut table: toml::Table =
        toml::from_str(DEFAULT_CONFIG).map_err(|e| format!("built-in defaults: {e}"))?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading config file {}: {e}", path.display()))?;
        let overlay: toml::Table =
            toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
        merge(&mut table, overlay);
    }
    merge(&mut table, env_overlay(env));
    merge(&mut table, flags);
    let config: Config = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| format!("invalid configuration: {e}"))?;
    config.log_backend()?;
    config.state_backend()?;
    config.embedded_log_config()?;
    config.ingest.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> std::iter::Empty<(String, String)> {
        std::iter::empty()
    }

    #[test]
    fn defaults_file_matches_code_defaults() {
        let c = load(None, no_env(), toml::Table::new()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7080");
        assert_eq!(c.data_dir, PathBuf::from("./kairos-data"));
        // The commented file documents the defaults the code uses: they must never drift.
        assert_eq!(c.model, StateConfig::default());
        assert_eq!(c.recommend, RecommendConfig::default());
        assert_eq!(c.ingest, IngestConfig::default());
        assert_eq!(c.api, ApiConfig::default());
        assert_eq!(c.processor, ProcessorConfig::default());
        assert_eq!(c.redis, kairos_state::RedisSettings::default());
        let log = c.embedded_log_config().unwrap();
        let d = kairos_log::EmbeddedLogConfig::default();
        assert_eq!(log.partitions, d.partitions);
        assert_eq!(log.segment_bytes, d.segment_bytes);
        assert_eq!(log.dedup_window_ms, d.dedup_window_ms);
        assert_eq!(log.dedup_max_entries, d.dedup_max_entries);
        assert_eq!(log.max_pending_bytes, d.max_pending_bytes);
        assert_eq!(log.fsync, d.fsync);
    }

    #[test]
    fn redis_tls_urls_are_accepted_and_a_ca_file_only_for_one_server() {
        let with = |state: &str, ca: &str| {
            let env = vec![
                ("KAIROS_STATE".to_string(), state.to_string()),
                ("KAIROS_REDIS__TLS_CA_FILE".to_string(), ca.to_string()),
            ];
            load(None, env.into_iter(), toml::Table::new()).map(|c| c.state_backend())
        };
        if !cfg!(feature = "redis") {
            return;
        }
        assert!(matches!(with("rediss://h:1", "/ca.pem"), Ok(Ok(_))));
        assert!(matches!(with("rediss-cluster://a:1,b:2", ""), Ok(Ok(_))));
        let refused = match with("rediss-cluster://a:1,b:2", "/ca.pem") {
            Ok(Err(e)) | Err(e) => e,
            Ok(Ok(_)) => panic!("a CA file for a cluster was accepted"),
        };
        assert!(refused.contains("tls_ca_file"), "{refused}");
    }

    #[test]
    fn sources_replace_the_demo_source_and_are_validated() {
        let c = load(None, no_env(), toml::Table::new()).unwrap();
        assert_eq!(
            c.ingest.sources.len(),
            1,
            "the defaults ship the demo source"
        );
        assert_eq!(c.ingest.sources[0].write_key, "demo");
        let env = vec![(
            "KAIROS_INGEST__SOURCES".to_string(),
            r#"[{name = "shop", write_key = "k1", allowed_origins = ["https://shop.example"]}]"#
                .to_string(),
        )];
        let c = load(None, env.into_iter(), toml::Table::new()).unwrap();
        assert_eq!(
            c.ingest.sources.len(),
            1,
            "a configured list replaces the default one"
        );
        assert_eq!(c.ingest.sources[0].name, "shop");
        for (sources, needle) in [
            (r#"[{name = "a", write_key = ""}]"#, "empty"),
            (
                r#"[{name = "a", write_key = "k"}, {name = "b", write_key = "k"}]"#,
                "another source",
            ),
            (
                r#"[{name = "a", write_key = "k", allowed_origins = ["shop.example"]}]"#,
                "scheme",
            ),
        ] {
            let env = vec![("KAIROS_INGEST__SOURCES".to_string(), sources.to_string())];
            let err = load(None, env.into_iter(), toml::Table::new()).unwrap_err();
            assert!(err.contains(needle), "{sources}: {err}");
        }
    }

    #[test]
    fn env_and_flags_override_in_order() {
        let env = vec![
            ("KAIROS_LISTEN".to_string(), "0.0.0.0:9000".to_string()),
            ("KAIROS_EVENT_LOG__FSYNC".to_string(), "never".to_string()),
            (
                "KAIROS_INGEST__MAX_BATCH_EVENTS".to_string(),
                "7".to_string(),
            ),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let mut flags = toml::Table::new();
        flags.insert("data_dir".into(), toml::Value::String("/tmp/k".into()));
        let c = load(None, env.into_iter(), flags).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(c.event_log.fsync, "never");
        assert_eq!(c.ingest.max_batch_events, 7);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/k"));
    }

    #[test]
    fn file_overrides_defaults_and_errors_are_clear() {
        let dir = std::env::temp_dir().join(format!("kairos-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k.toml");
        std::fs::write(&path, "[model]\nmax_recent_items = 5\n").unwrap();
        let c = load(Some(&path), no_env(), toml::Table::new()).unwrap();
        assert_eq!(c.model.max_recent_items, 5);
        std::fs::write(&path, "[model]\nmax_recnt_items = 5\n").unwrap();
        let err = load(Some(&path), no_env(), toml::Table::new()).unwrap_err();
        assert!(err.contains("max_recnt_items"), "{err}");
        let env = vec![(
            "KAIROS_EVENT_LOG__FSYNC".to_string(),
            "sometimes".to_string(),
        )];
        let err = load(None, env.into_iter(), toml::Table::new()).unwrap_err();
        assert!(err.contains("fsync"), "{err}");
        let kafka = |url: &str| {
            let env = vec![("KAIROS_LOG".to_string(), url.to_string())];
            load(None, env.into_iter(), toml::Table::new()).map(|c| c.log_backend())
        };
        let c = kafka("kafka://10.0.0.1:9092,10.0.0.2:9092").unwrap();
        assert_eq!(
            c,
            Ok(LogBackend::Kafka {
                brokers: "10.0.0.1:9092,10.0.0.2:9092".into()
            })
        );
        let err = kafka("kafka://broker-without-port").unwrap_err();
        assert!(err.contains("kafka://HOST:PORT"), "{err}");
        let err = kafka("kafak://10.0.0.1:9092").unwrap_err();
        assert!(err.contains("unknown log backend"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
