//! K2's configuration: one TOML file, overridable key by key from the environment.
//!
//! The structs below are the schema and their doc comments are the reference documentation
//! (`docs/configuration.md` mirrors them). Defaults live in one place, the `Default` impls; a file only
//! needs the keys it changes. Every struct rejects unknown keys, so a typo is an error rather than a
//! silently ignored setting.
//!
//! Layering, last wins: defaults, then the TOML file, then environment variables
//! `K2_<SECTION>__<KEY>` (for example `K2_COMMIT__INTERVAL_MS=500`). After loading,
//! [`K2Config::validate`] rejects values that parse but make no sense (a zero commit interval, a ratio
//! above 1, an S3 warehouse). Every error is one line naming the key and where its value came from.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::error::{Kind, OneOf};
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer, Serialize};

use crate::breaker::BreakerConfig;
use crate::decode::TradeFormat;
use crate::dedup::DedupConfig;
use crate::degradation::DegradationConfig;
use crate::sequence::SequenceConfig;
use crate::shedding::SheddingConfig;
use crate::state::{StateBackend, StateConfig};

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "K2_";
/// Separator between the section and the key in an override variable: `K2_COMMIT__INTERVAL_MS`.
pub const ENV_SEPARATOR: &str = "__";

/// The value of `kafka.brokers` that makes K2 start librdkafka's in-process mock cluster.
pub const EMBEDDED_BROKERS: &str = "embedded";

/// librdkafka properties K2 sets itself, with the K2 key that controls each (if any).
/// `kafka.client` may not set them: K2's exactly-once design depends on their values.
const RESERVED_CLIENT_KEYS: &[(&str, &str)] = &[
    ("bootstrap.servers", "use `kafka.brokers` instead"),
    ("metadata.broker.list", "use `kafka.brokers` instead"),
    ("group.id", "use `kafka.group_id` instead"),
    ("group.instance.id", "use `kafka.group_instance_id` instead"),
    ("session.timeout.ms", "use `kafka.session_timeout_ms` instead"),
    ("auto.offset.reset", "use `kafka.start_from` instead"),
    (
        "enable.auto.commit",
        "K2 commits offsets itself, after they are durable in Iceberg",
    ),
    (
        "enable.auto.offset.store",
        "K2 stores offsets itself, after they are durable in Iceberg",
    ),
    (
        "enable.partition.eof",
        "K2 reads partitions continuously and needs no end-of-partition events",
    ),
    (
        "partition.assignment.strategy",
        "K2 uses cooperative-sticky: a partition that retention overtook restarts alone",
    ),
];

/// The whole configuration of a K2 process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct K2Config {
    /// Where trades are consumed from.
    pub kafka: KafkaConfig,
    /// How raw Kafka messages are decoded into trades.
    pub decode: DecodeConfig,
    /// Per-(exchange, symbol) sequence tracking.
    pub sequence: SequenceConfig,
    /// Deduplication windows for ids without order, and the probable-duplicate policy.
    pub dedup: DedupConfig,
    /// Where sequence and dedup state is kept between commit epochs.
    pub state: StateConfig,
    /// The per-partition actor lanes.
    pub lanes: LanesConfig,
    /// Per-lane buffering of records into Parquet files.
    pub batcher: BatcherConfig,
    /// The Iceberg committer shared by all lanes.
    pub commit: CommitConfig,
    /// The Iceberg catalog and warehouse.
    pub catalog: CatalogConfig,
    /// Table maintenance: manifest merging, compaction, snapshot expiry, file cleanup.
    pub maintenance: MaintenanceConfig,
    /// The circuit breaker around catalog and storage calls.
    pub breaker: BreakerConfig,
    /// Degradation levels: the signals' thresholds, the cooldown.
    pub degradation: DegradationConfig,
    /// Symbol tiers, which decide what each level sheds.
    pub shedding: SheddingConfig,
    /// The control-plane HTTP server.
    pub http: HttpConfig,
    /// Queries over the tables and the rows not yet committed (`/v1/trades`, `/v1/query`, `k2 query`).
    pub query: QueryConfig,
    /// The built-in load generator.
    pub loadgen: LoadgenConfig,
    /// Failure drills.
    pub faults: FaultsConfig,
}

/// Failure drills: settings that make K2 misbehave on purpose, to watch it
/// recover. Leave them at their defaults in production.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultsConfig {
    /// Whether `POST /v1/faults` may inject faults (it still needs the API key). Off in production.
    pub enabled: bool,
    /// Hold every successful Iceberg commit this long before its stage state is put in force and its
    /// lanes are told, logging "commit landed; holding" first: a drill that kills the process at that
    /// moment aims its kill there. 0: off.
    pub hold_after_commit_ms: u64,
    /// Hold table maintenance this long at each step boundary (files written, snapshot committed,
    /// snapshots expired), logging "maintenance holding" first: a drill that kills the process there
    /// aims its kill inside a compaction or a manifest merge. 0: off.
    pub hold_in_maintenance_ms: u64,
}

/// Kafka consumer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `"embedded"` starts librdkafka's in-process mock cluster inside K2; anything else is a bootstrap
    /// list `"host:port,host:port"`.
    pub brokers: String,
    /// Topic of raw trade messages.
    pub topic: String,
    /// Consumer group; processes with the same group share the topic's partitions.
    pub group_id: String,
    /// Static group membership (`group.instance.id`). Keep it stable across restarts of one process
    /// (e.g. the pod name) so a restarted process gets its partitions back at once, without a
    /// rebalance. Unset: dynamic membership.
    pub group_instance_id: Option<String>,
    /// Consumer session timeout. Short, so a killed member's partitions move to the others quickly.
    pub session_timeout_ms: u64,
    /// Where a partition starts when Iceberg has no offset recorded for it: `"earliest"` or `"latest"`.
    /// Once K2 has committed a partition, it always resumes from the offset stored in Iceberg.
    pub start_from: StartFrom,
    /// Number of partitions of the topic the embedded broker creates (embedded mode only): at least
    /// this many, more when the load generator's rate needs them to keep `embedded_lag_budget_s`.
    pub embedded_partitions: i32,
    /// Embedded mode: seconds of lag, at the load generator's rate, that the embedded broker must be
    /// able to retain (it keeps 5 MiB per partition); the topic gets the partitions that takes, up to
    /// 64, and K2 warns when even that is not enough.
    pub embedded_lag_budget_s: u64,
    /// Bytes the topic retains per partition (`retention.bytes`), for the retention headroom signal.
    /// Unset: read from the topic's config at start-up (the embedded broker's limit is known).
    pub retention_bytes: Option<u64>,
    /// How long the topic retains a record (`retention.ms`), for the retention headroom signal.
    /// Unset: read from the topic's config at start-up.
    pub retention_ms: Option<u64>,
    /// What a lane does when Kafka skips offsets that retention did not delete: `"fail"` (the lane is
    /// rebuilt from the table and, if the skip persists, marked failed) or `"accept"` (for topics that
    /// skip offsets on purpose: transactional producers' commit markers, compaction). A skip retention
    /// explains is always recorded in `k2.dead_letters`.
    pub offset_gaps: OffsetGaps,
    /// Extra librdkafka properties passed through verbatim (`security.protocol`, `sasl.mechanism`,
    /// `fetch.wait.max.ms`, ...). Properties K2 owns (`group.id`, `bootstrap.servers`,
    /// `enable.auto.commit`, ...) are rejected: set the matching K2 key instead.
    #[serde(deserialize_with = "deserialize_client_properties")]
    pub client: BTreeMap<String, String>,
}

/// What a lane does with offsets Kafka skipped for a reason other than retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetGaps {
    /// Fail the lane: a record past the next offset means the partition was repositioned under it.
    #[default]
    Fail,
    /// Accept the skip and count it (`k2_offset_gaps_total`).
    Accept,
}

/// Where a partition with no offset recorded in Iceberg starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// The oldest message Kafka still retains.
    #[default]
    Earliest,
    /// Only messages produced after the partition is assigned.
    Latest,
}

/// Decoding of raw Kafka messages into trades.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    /// Message format: `"canonical"` (K2's own JSON trade), `"binance"` (Binance `trade` stream events)
    /// or `"auto"` (per message: an object with `"e":"trade"` is Binance, anything else canonical).
    pub format: TradeFormat,
    /// A trade whose event time is further than this from the wall clock (either way) is rejected to
    /// the dead-letter destination.
    pub max_event_time_skew_ms: i64,
    /// Exchange name given to trades decoded from the Binance format (which does not carry one).
    pub binance_exchange: String,
}

fn validate_sequence(config: &SequenceConfig) -> Result<(), ConfigError> {
    let rules = std::iter::once(("sequence.reset".to_string(), &config.reset)).chain(
        config
            .exchange_resets
            .iter()
            .map(|(exchange, rule)| (format!("sequence.exchange_resets.{exchange}"), rule)),
    );
    for (key, rule) in rules {
        positive(&format!("{key}.near_start"), rule.near_start)?;
        positive(&format!("{key}.min_drop"), rule.min_drop)?;
    }
    Ok(())
}

fn validate_dedup(config: &DedupConfig) -> Result<(), ConfigError> {
    positive("dedup.recent_window_s", config.recent_window_s)?;
    positive("dedup.recent_max_entries", config.recent_max_entries)?;
    config
        .long_window
        .validate()
        .map_err(|reason| invalid("dedup.long_window", &reason))
}

fn validate_state(config: &StateConfig) -> Result<(), ConfigError> {
    not_blank("state.key_prefix", &config.key_prefix)?;
    positive("state.timeout_ms", config.timeout_ms)?;
    if config.backend == StateBackend::Redis
        && !(config.redis_url.starts_with("redis://")
            || config.redis_url.starts_with("rediss://")
            || config.redis_url.starts_with("redis+unix://")
            || config.redis_url.starts_with("unix://"))
    {
        return Err(invalid(
            "state.redis_url",
            "must be a Redis URL such as `redis://127.0.0.1:6379/0`",
        ));
    }
    Ok(())
}

/// The per-partition lanes (consumer → sequencer → dedup → shedder → batcher).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LanesConfig {
    /// Most records in one chunk, the unit of work passed between stages.
    pub chunk_max_records: usize,
    /// Capacity of each stage's mailbox, in messages (chunks). A full mailbox makes the upstream stage
    /// wait: this is the backpressure bound.
    pub mailbox_capacity: usize,
    /// Number of actix arbiters (threads) the lanes are spread over; 0 means one per CPU core.
    pub arbiters: usize,
    /// A lane that fails more than this many times within `restart_window_ms` is not restarted again
    /// and the process reports itself unhealthy. 0: a failed lane is never restarted.
    pub max_restarts: u32,
    /// Window over which lane restarts are counted.
    pub restart_window_ms: u64,
    /// The first rebuild of a failed lane waits this long; each further failure within
    /// `restart_window_ms` doubles the wait.
    pub restart_backoff_ms: u64,
    /// The longest a rebuild waits.
    pub max_restart_backoff_ms: u64,
}

/// Buffering of records into Parquet files, per lane. A buffer is flushed to a file when any limit is hit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatcherConfig {
    /// Flush after this many buffered rows.
    pub max_rows: usize,
    /// Flush after this many buffered bytes (estimated in-memory size of the rows).
    pub max_bytes: u64,
    /// Flush when the oldest buffered row is this old.
    pub max_age_ms: u64,
    /// A lane that read everything Kafka had (its high watermark) and got nothing more for this
    /// long flushes at once, and the committer commits without waiting out its interval: the tail
    /// of a burst is durable within about a second. 0 turns it off.
    pub idle_flush_ms: u64,
    /// Target size of a written Parquet file; a larger flush is split into several files.
    pub target_file_size_bytes: u64,
    /// zstd compression level of Parquet pages (1 fastest ... 22 smallest).
    pub zstd_level: i32,
}

/// The Iceberg committer: one snapshot for all lanes' files and offsets per commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommitConfig {
    /// Commit at least this often while files are pending.
    pub interval_ms: u64,
    /// Commit early once the pending files hold this many rows.
    pub max_rows: u64,
    /// Commit early once the pending files hold this many bytes.
    pub max_bytes: u64,
    /// Bytes of files written but not yet committed above which lanes wait for a commit (backpressure
    /// when the catalog is slow or down).
    pub max_pending_bytes: u64,
    /// Wait before retrying a failed or conflicting commit.
    pub retry_backoff_ms: u64,
    /// After this many failed commits in a row, while files wait for a commit (or while the catalog
    /// or storage circuit breaker refuses calls), the partitions pause consumption until a commit
    /// succeeds again.
    pub pause_after_failures: u64,
}

/// Table maintenance, run by one background actor (and by `k2 maintain`): keeps commit time, file
/// count and metadata size flat however long K2 runs. At SOFT and above only manifests are merged and
/// snapshots expired; compaction and the orphan sweep wait for NORMAL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceConfig {
    /// Run a maintenance pass over K2's tables this often. 0: never in the background (`k2 maintain`
    /// still runs one on demand).
    pub interval_ms: u64,
    /// Merge the current snapshot's manifests into one once it has more than this many (every
    /// ingestion commit adds one; every scan reads them all).
    pub max_manifests: usize,
    /// Data files smaller than this are compacted with the other small files of their partition.
    pub small_file_bytes: u64,
    /// Compacted files are rolled at this size.
    pub target_file_size_bytes: u64,
    /// A table partition's small files of one size tier (files within 4× of each other) are
    /// compacted together once this many gather; a compacted file climbs to the next tier.
    pub min_files_to_compact: usize,
    /// Bytes of small files one pass rewrites at most, the rest waiting for the next pass. Bounds a
    /// pass's CPU and its memory: it decodes one group (a partition's files of one size tier) at a
    /// time, which Arrow holds in several times its Parquet size.
    pub max_rewrite_bytes: u64,
    /// Snapshots kept when old ones are expired (how far back readers can time-travel). Files only
    /// expired snapshots referenced are deleted.
    pub retain_snapshots: usize,
    /// metadata.json files kept, the current one included; older ones are deleted.
    pub keep_metadata_files: usize,
    /// Files under a table that no snapshot references (written by a commit that never happened: a
    /// kill, a fence, a lost race) are deleted once they are this old. Keep it well above the longest
    /// a file can wait for its commit (a catalog outage), across every process writing the table.
    pub orphan_min_age_ms: u64,
}

/// Queries: each sees the trades table at one snapshot plus the rows consumed since, and each is
/// bounded in rows, time and memory so that no query can take the process down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    /// Rows one answer returns at most; a query that would return more is cut there and says so
    /// (`truncated`). The trade endpoints order their rows holding at most about twice this many.
    pub max_rows: usize,
    /// A query still running after this long is stopped and answered with an error. Keep it well
    /// under the time `maintenance.retain_snapshots` snapshots take to accumulate: a query reads the
    /// snapshot current when it started.
    pub timeout_ms: u64,
    /// Memory one query's operators (sorts, aggregations, joins) may hold; past it the query fails
    /// with an error instead of growing the process. Nothing spills to disk.
    pub memory_limit_bytes: usize,
    /// Threads that run queries, apart from ingestion's arbiters and the HTTP worker.
    pub threads: usize,
    /// Bytes of flushed rows (in Arrow) all lanes keep for queries until their commit. Past it (commits
    /// far behind), a lane drops what it keeps and queries are refused (503) until its rows are
    /// committed, rather than answered without them.
    pub max_live_bytes: u64,
    /// Bytes (in Arrow) of the files K2 committed lately that it keeps in memory for queries, so that
    /// a query of the last minutes does not open each lane's small files. 0: none are kept.
    pub max_recent_bytes: u64,
    /// Files are kept only while a query came within this long; a K2 nobody queries keeps none.
    pub recent_idle_ms: u64,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            max_rows: 100_000,
            timeout_ms: 5_000,
            memory_limit_bytes: 256 * MIB as usize,
            threads: 1,
            max_live_bytes: 256 * MIB,
            max_recent_bytes: 256 * MIB,
            recent_idle_ms: 300_000,
        }
    }
}

impl QueryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("query.max_rows", self.max_rows)?;
        positive("query.timeout_ms", self.timeout_ms)?;
        positive("query.memory_limit_bytes", self.memory_limit_bytes)?;
        positive("query.threads", self.threads)?;
        positive("query.max_live_bytes", self.max_live_bytes)?;
        positive("query.recent_idle_ms", self.recent_idle_ms)
    }
}

/// The Iceberg catalog and warehouse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    /// Catalog name, as Iceberg readers refer to it.
    pub name: String,
    /// SQL catalog database: `sqlite:<path>` or `postgres://user@host:5432/db` (`postgresql://` also
    /// accepted).
    pub uri: String,
    /// Where data and metadata files are written: a local path or a `file://` URL. S3 is not supported
    /// yet.
    pub warehouse: String,
    /// Namespace of the trades table (`<namespace>.trades`). K2's own tables (sequence gaps, shed
    /// ledger, dead letters) always live in namespace `k2`.
    pub namespace: String,
}

/// The control-plane HTTP server (health, metrics, degradation, faults, queries).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Socket address to listen on, `ip:port`; port 0 picks a free port.
    pub listen: String,
    /// Key that mutating endpoints (`PUT`/`DELETE /v1/degradation`) require in
    /// the `X-API-Key` header. Unset: mutations are refused.
    pub api_key: Option<String>,
}

/// The built-in trade generator that feeds the embedded broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadgenConfig {
    /// In embedded mode, run the generator inside K2. Ignored with a real broker.
    pub enabled: bool,
    /// Messages per second produced.
    pub rate: u64,
    /// Fraction of messages deliberately malformed (to exercise the dead-letter path), 0 to 1.
    pub malformed_ratio: f64,
    /// Fraction of messages that are reference-data updates (stored in `market.reference`, LOW
    /// priority: the first records shed under load), 0 to 1.
    pub reference_ratio: f64,
    /// Random seed, so a run can be reproduced.
    pub seed: u64,
}

// Defaults: the only place they are written down (config/k2.toml repeats them and a test keeps the two
// equal).

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: EMBEDDED_BROKERS.to_string(),
            topic: "market.trades.raw".to_string(),
            group_id: "k2".to_string(),
            group_instance_id: None,
            session_timeout_ms: 6_000,
            start_from: StartFrom::Earliest,
            embedded_partitions: 8,
            embedded_lag_budget_s: 30,
            retention_bytes: None,
            retention_ms: None,
            offset_gaps: OffsetGaps::Fail,
            client: BTreeMap::new(),
        }
    }
}

impl Default for DecodeConfig {
    fn default() -> Self {
        DecodeConfig {
            format: TradeFormat::Auto,
            max_event_time_skew_ms: 86_400_000,
            binance_exchange: "BINANCE".to_string(),
        }
    }
}

impl Default for LanesConfig {
    fn default() -> Self {
        LanesConfig {
            chunk_max_records: 2_000,
            mailbox_capacity: 2,
            arbiters: 0,
            max_restarts: 5,
            restart_window_ms: 60_000,
            restart_backoff_ms: 100,
            max_restart_backoff_ms: 30_000,
        }
    }
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            max_rows: 200_000,
            max_bytes: 64 * MIB,
            max_age_ms: 1_000,
            idle_flush_ms: 200,
            target_file_size_bytes: 128 * MIB,
            zstd_level: 1,
        }
    }
}

impl Default for CommitConfig {
    fn default() -> Self {
        CommitConfig {
            interval_ms: 2_000,
            max_rows: 1_000_000,
            max_bytes: 256 * MIB,
            max_pending_bytes: 1024 * MIB,
            retry_backoff_ms: 500,
            pause_after_failures: 2,
        }
    }
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            interval_ms: 20_000,
            max_manifests: 16,
            small_file_bytes: 32 * MIB,
            target_file_size_bytes: 128 * MIB,
            min_files_to_compact: 4,
            max_rewrite_bytes: 128 * MIB,
            retain_snapshots: 20,
            keep_metadata_files: 20,
            orphan_min_age_ms: 24 * 3_600_000,
        }
    }
}

impl Default for CatalogConfig {
    fn default() -> Self {
        CatalogConfig {
            name: "k2".to_string(),
            uri: "sqlite:./data/catalog.db".to_string(),
            warehouse: "./data/warehouse".to_string(),
            namespace: "market".to_string(),
        }
    }
}

impl CatalogConfig {
    /// The embedded layout under `dir`: a SQLite catalog `catalog.db` and the
    /// warehouse `warehouse/` (tests and benchmarks in a temp dir).
    pub fn sqlite_in(dir: &std::path::Path) -> Self {
        CatalogConfig {
            uri: format!("sqlite:{}/catalog.db", dir.display()),
            warehouse: dir.join("warehouse").display().to_string(),
            ..CatalogConfig::default()
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".to_string(),
            api_key: None,
        }
    }
}

impl Default for LoadgenConfig {
    fn default() -> Self {
        LoadgenConfig {
            enabled: true,
            rate: 20_000,
            malformed_ratio: 0.001,
            reference_ratio: 0.0,
            seed: 42,
        }
    }
}

impl Default for FaultsConfig {
    fn default() -> Self {
        FaultsConfig {
            enabled: true,
            hold_after_commit_ms: 0,
            hold_in_maintenance_ms: 0,
        }
    }
}

const MIB: u64 = 1024 * 1024;

/// Why a configuration could not be loaded. Its `Display` is the one line shown to the user.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file given does not exist.
    #[error("config file not found: {}", .0.display())]
    MissingFile(PathBuf),
    /// The file or an environment variable could not be parsed into the schema (syntax, unknown key,
    /// wrong type).
    #[error("{}", describe_figment_error(.0))]
    Figment(Box<figment::Error>),
    /// A `K2_` environment variable is not a well-formed override.
    #[error("environment variable `{name}`: {reason}")]
    EnvVar { name: String, reason: String },
    /// A value parsed but is not acceptable; `key` is the full dotted path.
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl From<figment::Error> for ConfigError {
    fn from(error: figment::Error) -> Self {
        ConfigError::Figment(Box::new(error))
    }
}

impl K2Config {
    /// Loads defaults, then the TOML file at `path` (if given), then `K2_` environment variables, and
    /// validates the result.
    pub fn load(path: Option<&Path>) -> Result<K2Config, ConfigError> {
        let env = std::env::vars_os().map(|(name, value)| {
            (
                name.to_string_lossy().into_owned(),
                value.to_string_lossy().into_owned(),
            )
        });
        Self::load_with_env(path, env)
    }

    /// [`K2Config::load`] with the environment given explicitly (tests, embedding).
    ///
    /// Variables not starting with `K2_` are ignored, and so are `K2_` variables without `__` (they are
    /// not config keys; the command line may use them, e.g. `K2_CONFIG`) — unless they start with a
    /// section name (`K2_COMMIT_INTERVAL_MS`), which is rejected as a probable typo.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<K2Config, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.to_path_buf()));
            }
            // `file_exact`: `Toml::file` would search parent directories for a relative path.
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(EnvOverrides::from_vars(env)?);
        // Lossy: environment values are strings, so "500" must be accepted where a number is expected.
        // A string field still gets a string ("123" stays "123").
        let config: K2Config = figment.extract_lossy()?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects values that parse but make no sense. Returns the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        self.decode.validate()?;
        validate_sequence(&self.sequence)?;
        validate_dedup(&self.dedup)?;
        validate_state(&self.state)?;
        self.lanes.validate()?;
        self.batcher.validate()?;
        self.commit.validate()?;
        self.catalog.validate()?;
        self.maintenance.validate()?;
        self.query.validate()?;
        self.breaker
            .validate()
            .map_err(|reason| invalid("breaker", &reason))?;
        self.degradation
            .validate()
            .map_err(|reason| invalid("degradation", &reason))?;
        self.shedding
            .validate()
            .map_err(|reason| invalid("shedding", &reason))?;
        self.http.validate()?;
        self.loadgen.validate()
    }
}

impl KafkaConfig {
    /// True when K2 runs librdkafka's in-process mock cluster instead of connecting to brokers.
    pub fn is_embedded(&self) -> bool {
        self.brokers.trim() == EMBEDDED_BROKERS
    }

    fn validate(&self) -> Result<(), ConfigError> {
        not_blank("kafka.brokers", &self.brokers)?;
        if !self.is_embedded() && self.brokers.split(',').any(|broker| broker.trim().is_empty()) {
            return Err(invalid(
                "kafka.brokers",
                "has an empty entry; expected `host:port,host:port` or `embedded`",
            ));
        }
        not_blank("kafka.topic", &self.topic)?;
        not_blank("kafka.group_id", &self.group_id)?;
        if let Some(instance_id) = &self.group_instance_id {
            not_blank("kafka.group_instance_id", instance_id)?;
        }
        positive("kafka.session_timeout_ms", self.session_timeout_ms)?;
        positive("kafka.embedded_partitions", self.embedded_partitions)?;
        positive("kafka.embedded_lag_budget_s", self.embedded_lag_budget_s)?;
        for key in self.client.keys() {
            let property = key.trim();
            if let Some((_, instead)) = RESERVED_CLIENT_KEYS
                .iter()
                .find(|(reserved, _)| *reserved == property)
            {
                return Err(invalid(
                    &format!("kafka.client.\"{key}\""),
                    &format!("is set by K2 and cannot be passed through; {instead}"),
                ));
            }
        }
        Ok(())
    }
}

impl DecodeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("decode.max_event_time_skew_ms", self.max_event_time_skew_ms)?;
        not_blank("decode.binance_exchange", &self.binance_exchange)
    }
}

impl LanesConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("lanes.chunk_max_records", self.chunk_max_records)?;
        positive("lanes.mailbox_capacity", self.mailbox_capacity)?;
        positive("lanes.restart_window_ms", self.restart_window_ms)?;
        positive("lanes.restart_backoff_ms", self.restart_backoff_ms)?;
        if self.max_restart_backoff_ms < self.restart_backoff_ms {
            return Err(invalid(
                "lanes.max_restart_backoff_ms",
                "must be at least lanes.restart_backoff_ms",
            ));
        }
        Ok(())
    }
}

impl BatcherConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("batcher.max_rows", self.max_rows)?;
        positive("batcher.max_bytes", self.max_bytes)?;
        positive("batcher.max_age_ms", self.max_age_ms)?;
        positive("batcher.target_file_size_bytes", self.target_file_size_bytes)?;
        if !(1..=22).contains(&self.zstd_level) {
            return Err(invalid("batcher.zstd_level", "must be between 1 and 22"));
        }
        Ok(())
    }
}

impl CommitConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("commit.interval_ms", self.interval_ms)?;
        positive("commit.max_rows", self.max_rows)?;
        positive("commit.max_bytes", self.max_bytes)?;
        positive("commit.max_pending_bytes", self.max_pending_bytes)?;
        positive("commit.retry_backoff_ms", self.retry_backoff_ms)
    }
}

impl MaintenanceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("maintenance.max_manifests", self.max_manifests)?;
        positive("maintenance.small_file_bytes", self.small_file_bytes)?;
        positive("maintenance.target_file_size_bytes", self.target_file_size_bytes)?;
        positive("maintenance.max_rewrite_bytes", self.max_rewrite_bytes)?;
        positive("maintenance.retain_snapshots", self.retain_snapshots)?;
        positive("maintenance.keep_metadata_files", self.keep_metadata_files)?;
        if self.min_files_to_compact < 2 {
            return Err(invalid(
                "maintenance.min_files_to_compact",
                "must be at least 2 (one file compacts into itself)",
            ));
        }
        if self.small_file_bytes > self.target_file_size_bytes {
            return Err(invalid(
                "maintenance.small_file_bytes",
                "must not exceed maintenance.target_file_size_bytes",
            ));
        }
        Ok(())
    }
}

impl CatalogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        not_blank("catalog.name", &self.name)?;
        let uri = self.uri.trim();
        let scheme_ok = ["sqlite:", "postgres:", "postgresql:"]
            .iter()
            .any(|scheme| uri.starts_with(scheme));
        if !scheme_ok {
            return Err(invalid(
                "catalog.uri",
                &format!(
                    "unsupported catalog `{uri}`; expected `sqlite:<path>` or `postgres://user@host:port/db`"
                ),
            ));
        }
        let warehouse = self.warehouse.trim();
        not_blank("catalog.warehouse", warehouse)?;
        if let Some((scheme, _)) = warehouse.split_once("://") {
            if scheme.eq_ignore_ascii_case("s3") || scheme.eq_ignore_ascii_case("s3a") {
                return Err(invalid(
                    "catalog.warehouse",
                    "S3 warehouses are not supported yet; use a local path or a file:// URL",
                ));
            }
            if !scheme.eq_ignore_ascii_case("file") {
                return Err(invalid(
                    "catalog.warehouse",
                    &format!("unsupported scheme `{scheme}://`; use a local path or a file:// URL"),
                ));
            }
        }
        not_blank("catalog.namespace", &self.namespace)
    }
}

impl HttpConfig {
    /// The API key mutations need; an empty value (e.g. an unset variable
    /// in docker-compose) counts as none.
    pub fn mutation_key(&self) -> Option<&str> {
        self.api_key.as_deref().map(str::trim).filter(|k| !k.is_empty())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.mutation_key().is_some_and(|k| k.len() < 16) {
            return Err(invalid(
                "http.api_key",
                "must be at least 16 characters (or unset, which refuses mutations)",
            ));
        }
        match self.listen.trim().parse::<SocketAddr>() {
            Ok(_) => Ok(()),
            Err(_) => Err(invalid(
                "http.listen",
                &format!(
                    "`{}` is not a socket address; expected `ip:port`, e.g. `127.0.0.1:8080`",
                    self.listen
                ),
            )),
        }
    }
}

impl LoadgenConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled {
            positive("loadgen.rate", self.rate)?;
        }
        // Written so that NaN fails too.
        if !(0.0..=1.0).contains(&self.malformed_ratio) {
            return Err(invalid("loadgen.malformed_ratio", "must be between 0 and 1"));
        }
        if !(0.0..=1.0).contains(&self.reference_ratio) {
            return Err(invalid("loadgen.reference_ratio", "must be between 0 and 1"));
        }
        Ok(())
    }
}

fn invalid(key: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

fn positive<T: PartialOrd + Default>(key: &str, value: T) -> Result<(), ConfigError> {
    if value > T::default() {
        Ok(())
    } else {
        Err(invalid(key, "must be > 0"))
    }
}

fn not_blank(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        Err(invalid(key, "must not be empty"))
    } else {
        Ok(())
    }
}

/// librdkafka properties are strings, but a TOML user naturally writes `fetch.wait.max.ms = 100`:
/// accept any scalar and keep its text.
fn deserialize_client_properties<'de, D>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        String(String),
        Bool(bool),
        Unsigned(u64),
        Signed(i64),
        Float(f64),
    }

    let properties = BTreeMap::<String, Scalar>::deserialize(deserializer)?;
    Ok(properties
        .into_iter()
        .map(|(key, value)| {
            let text = match value {
                Scalar::String(s) => s,
                Scalar::Bool(b) => b.to_string(),
                Scalar::Unsigned(n) => n.to_string(),
                Scalar::Signed(n) => n.to_string(),
                Scalar::Float(x) => x.to_string(),
            };
            (key, text)
        })
        .collect())
}

/// The `K2_<SECTION>__<KEY>` environment variables as a figment provider.
///
/// Not figment's `Env`: that one reads the process environment only (so tests would have to mutate it),
/// parses values (so `K2_KAFKA__GROUP_ID=123` would become a number and fail), splits nested keys on `.`
/// (so a librdkafka property like `security.protocol` could not be set), and names keys `COMMIT.INTERVAL_MS`
/// rather than the variable in errors.
struct EnvOverrides {
    dict: Dict,
}

impl EnvOverrides {
    fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let sections = section_names();
        let mut vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        vars.sort();

        let mut dict = Dict::new();
        for (name, value) in vars {
            let rest = &name[ENV_PREFIX.len()..];
            if !rest.contains(ENV_SEPARATOR) {
                let lower = rest.to_ascii_lowercase();
                if let Some(section) = sections
                    .iter()
                    .find(|section| lower == **section || lower.starts_with(&format!("{section}_")))
                {
                    let key = lower[section.len()..].trim_start_matches('_');
                    let hint = if key.is_empty() { "<KEY>" } else { key };
                    return Err(env_var_error(
                        &name,
                        &format!(
                            "looks like a config override but has no `__` between section and key; \
                             did you mean `{}`?",
                            env_var_name(&[section, hint])
                        ),
                    ));
                }
                continue;
            }
            let keys: Vec<String> = rest
                .split(ENV_SEPARATOR)
                .map(|key| key.trim().to_ascii_lowercase())
                .collect();
            if keys.iter().any(String::is_empty) {
                return Err(env_var_error(
                    &name,
                    "has an empty section or key; expected `K2_<SECTION>__<KEY>`",
                ));
            }
            insert_nested(&mut dict, &name, &keys, Value::from(value.trim().to_string()))?;
        }
        Ok(EnvOverrides { dict })
    }
}

impl Provider for EnvOverrides {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable")
            .interpolater(|_profile: &Profile, path: &[&str]| env_var_name(path))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

fn insert_nested(dict: &mut Dict, name: &str, keys: &[String], value: Value) -> Result<(), ConfigError> {
    match keys {
        [] => Ok(()),
        [last] => {
            if matches!(dict.get(last), Some(Value::Dict(..))) {
                return Err(env_var_error(
                    name,
                    "conflicts with another variable that sets keys inside it",
                ));
            }
            dict.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            match entry {
                Value::Dict(_, inner) => insert_nested(inner, name, rest, value),
                _ => Err(env_var_error(
                    name,
                    "conflicts with another variable that sets its parent key to a value",
                )),
            }
        }
    }
}

/// Top-level keys of [`K2Config`], derived from the type so the list cannot drift.
fn section_names() -> Vec<String> {
    match Value::serialize(K2Config::default()) {
        Ok(Value::Dict(_, dict)) => dict.into_keys().collect(),
        _ => Vec::new(),
    }
}

fn env_var_name<S: AsRef<str>>(path: &[S]) -> String {
    let keys: Vec<String> = path.iter().map(|key| key.as_ref().to_ascii_uppercase()).collect();
    format!("{ENV_PREFIX}{}", keys.join(ENV_SEPARATOR))
}

fn env_var_error(name: &str, reason: &str) -> ConfigError {
    ConfigError::EnvVar {
        name: name.to_string(),
        reason: reason.to_string(),
    }
}

/// One line: the key, where its value came from, and what is wrong.
///
/// figment's own `Display` prints `for key "default.commit.interval_ms"` style paths, chains further
/// errors on new lines and passes the TOML parser's multi-line snippet through; a user should see one
/// line with the dotted key K2's docs use.
fn describe_figment_error(error: &figment::Error) -> String {
    let mut path = error.path.clone();
    let what = match &error.kind {
        Kind::UnknownField(field, expected) => {
            // Some figment versions already end the path with the field.
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            format!("unknown key, expected {}", OneOf(expected))
        }
        Kind::UnknownVariant(variant, expected) => {
            format!("unknown value `{variant}`, expected {}", OneOf(expected))
        }
        kind => one_line(&kind.to_string()),
    };

    let mut line = String::from("config");
    if !path.is_empty() {
        let _ = write!(line, " key `{}`", dotted(&path));
    }
    if let Some(metadata) = &error.metadata {
        match &metadata.source {
            // The file's path as figment resolved it (absolute), not figment's
            // display, which shortens it relative to the working directory.
            Some(figment::Source::File(file)) => {
                let _ = write!(line, " in {}", file.display());
            }
            Some(source) => {
                let _ = write!(line, " in {source}");
            }
            None if !path.is_empty() => {
                let profile = error.profile.clone().unwrap_or_default();
                let keys: Vec<&str> = path.iter().map(String::as_str).collect();
                let origin = metadata.interpolate(&profile, &keys);
                let _ = write!(line, " from {} `{origin}`", metadata.name);
            }
            None => {
                let _ = write!(line, " from {}", metadata.name);
            }
        }
    }
    let _ = write!(line, ": {what}");
    let more = error.count() - 1;
    if more > 0 {
        let _ = write!(
            line,
            " (and {more} more error{})",
            if more == 1 { "" } else { "s" }
        );
    }
    line
}

/// `kafka.client."security.protocol"`: segments with dots are quoted, as in TOML.
fn dotted(path: &[String]) -> String {
    let segments: Vec<String> = path
        .iter()
        .map(|segment| {
            if segment.contains('.') {
                format!("\"{segment}\"")
            } else {
                segment.clone()
            }
        })
        .collect();
    segments.join(".")
}

/// Collapses a multi-line message (the TOML parser's, with a source snippet) to one line, keeping the
/// text and dropping the snippet.
fn one_line(message: &str) -> String {
    let parts: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .filter(|line| !is_snippet_line(line))
        .collect();
    parts.join(": ")
}

/// A line of the TOML parser's source excerpt: `  |`, `3 | interval_ms = ...`, `  |     ^`.
fn is_snippet_line(line: &str) -> bool {
    let after_number = line.trim_start_matches(|c: char| c.is_ascii_digit()).trim_start();
    after_number.starts_with('|')
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn manifest_path(relative: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
    }

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    /// Writes `text` to a `k2.toml` in a fresh temp dir and loads it with `vars` as the environment.
    fn load_text(text: &str, vars: &[(&str, &str)]) -> (Result<K2Config, ConfigError>, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("k2.toml");
        fs::write(&path, text).expect("write config");
        let result = K2Config::load_with_env(Some(&path), env(vars));
        (result, path)
    }

    fn error_line(result: Result<K2Config, ConfigError>) -> String {
        match result {
            Ok(config) => panic!("expected an error, loaded {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    /// Applies `change` to the defaults and returns the key validate() complains about.
    fn rejected_key(change: impl FnOnce(&mut K2Config)) -> String {
        let mut config = K2Config::default();
        change(&mut config);
        match config.validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected ConfigError::Invalid, got {other:?}"),
        }
    }

    fn accepted(change: impl FnOnce(&mut K2Config)) -> bool {
        let mut config = K2Config::default();
        change(&mut config);
        config.validate().is_ok()
    }

    // Shipped files

    #[test]
    fn every_shipped_config_file_loads_and_validates() {
        let dir = manifest_path("config");
        let mut loaded = Vec::new();
        for entry in fs::read_dir(&dir).expect("config/ exists") {
            let path = entry.expect("dir entry").path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                if let Err(error) = K2Config::load_with_env(Some(&path), no_env()) {
                    panic!("{} does not load: {error}", path.display());
                }
                loaded.push(path);
            }
        }
        assert!(
            loaded.len() >= 2,
            "expected k2.toml and k2.production.toml, found {loaded:?}"
        );
    }

    #[test]
    fn embedded_default_file_equals_builtin_defaults() {
        let config = K2Config::load_with_env(Some(&manifest_path("config/k2.toml")), no_env())
            .expect("config/k2.toml loads");
        assert_eq!(config, K2Config::default());
    }

    /// Equal values are not enough: a key missing from the file still takes its default. The file is
    /// the reference of every knob, so its keys must be exactly the schema's.
    #[test]
    fn embedded_default_file_spells_out_every_key() {
        fn leaf_paths(prefix: &str, value: &Value, out: &mut Vec<String>) {
            match value {
                Value::Dict(_, dict) if !dict.is_empty() => {
                    for (key, child) in dict {
                        let path = if prefix.is_empty() {
                            key.clone()
                        } else {
                            format!("{prefix}.{key}")
                        };
                        leaf_paths(&path, child, out);
                    }
                }
                _ => out.push(prefix.to_string()),
            }
        }

        let file: Dict = Figment::from(Toml::file_exact(manifest_path("config/k2.toml")))
            .extract()
            .expect("config/k2.toml parses");
        let mut in_file = Vec::new();
        leaf_paths("", &Value::from(file), &mut in_file);
        let mut in_schema = Vec::new();
        let defaults = Value::serialize(K2Config::default()).expect("defaults serialize");
        leaf_paths("", &defaults, &mut in_schema);
        // An unset Option cannot be written in TOML; the file shows it commented out.
        in_schema.retain(|key| {
            ![
                "kafka.group_instance_id",
                "kafka.retention_bytes",
                "kafka.retention_ms",
                "http.api_key",
            ]
            .contains(&key.as_str())
        });
        in_file.sort();
        in_schema.sort();
        assert_eq!(in_file, in_schema);
    }

    #[test]
    fn production_file_uses_real_kafka_postgres_and_no_loadgen() {
        let config = K2Config::load_with_env(Some(&manifest_path("config/k2.production.toml")), no_env())
            .expect("config/k2.production.toml loads");
        assert!(!config.kafka.is_embedded());
        assert_eq!(config.kafka.brokers, "kafka-1:9092,kafka-2:9092,kafka-3:9092");
        assert_eq!(config.catalog.uri, "postgres://k2@postgres:5432/k2");
        assert_eq!(config.catalog.warehouse, "/var/lib/k2/warehouse");
        assert_eq!(config.http.listen, "0.0.0.0:8080");
        assert!(!config.loadgen.enabled);
    }

    // Loading

    #[test]
    fn no_file_and_no_env_gives_the_defaults() {
        let config = K2Config::load_with_env(None, no_env()).expect("defaults load");
        assert_eq!(config, K2Config::default());
        assert!(config.kafka.is_embedded());
    }

    #[test]
    fn a_file_only_needs_the_keys_it_changes() {
        let (result, _) = load_text("[commit]\ninterval_ms = 750\n", &[]);
        let config = result.expect("partial file loads");
        assert_eq!(config.commit.interval_ms, 750);
        assert_eq!(config.commit.max_rows, CommitConfig::default().max_rows);
        assert_eq!(config.kafka, KafkaConfig::default());
    }

    #[test]
    fn missing_file_is_an_error_naming_the_path() {
        let path = manifest_path("config/does-not-exist.toml");
        let error = K2Config::load_with_env(Some(&path), no_env()).unwrap_err();
        assert!(matches!(&error, ConfigError::MissingFile(p) if *p == path));
        assert_eq!(
            error.to_string(),
            format!("config file not found: {}", path.display())
        );
    }

    #[test]
    fn unknown_key_is_rejected_naming_the_key_and_the_file() {
        let (result, path) = load_text("[commit]\nintervall_ms = 500\n", &[]);
        assert_eq!(
            error_line(result),
            format!(
                "config key `commit.intervall_ms` in {}: unknown key, expected one of \
                 `interval_ms`, `max_rows`, `max_bytes`, `max_pending_bytes`, `retry_backoff_ms`, \
                 `pause_after_failures`",
                path.display()
            )
        );
    }

    #[test]
    fn unknown_section_is_rejected_naming_it() {
        let (result, _) = load_text("[comit]\ninterval_ms = 500\n", &[]);
        let line = error_line(result);
        assert!(line.starts_with("config key `comit` in "), "unexpected: {line}");
        assert!(line.contains("unknown key, expected one of `kafka`"), "{line}");
    }

    #[test]
    fn bad_type_is_rejected_naming_the_key() {
        let (result, path) = load_text("[commit]\ninterval_ms = \"soon\"\n", &[]);
        assert_eq!(
            error_line(result),
            format!(
                "config key `commit.interval_ms` in {}: invalid type: found string \"soon\", \
                 expected u64",
                path.display()
            )
        );
    }

    #[test]
    fn unknown_enum_value_is_rejected_listing_the_choices() {
        let (result, _) = load_text("[kafka]\nstart_from = \"newest\"\n", &[]);
        let line = error_line(result);
        assert!(line.starts_with("config key `kafka.start_from` in "), "{line}");
        assert!(
            line.ends_with("unknown value `newest`, expected `earliest` or `latest`"),
            "{line}"
        );
    }

    #[test]
    fn toml_syntax_error_is_reported_on_one_line() {
        let (result, path) = load_text("[commit]\ninterval_ms = \n", &[]);
        let line = error_line(result);
        assert!(!line.contains('\n'), "not one line: {line:?}");
        assert!(line.contains(&path.display().to_string()), "{line}");
        assert!(line.contains("line 2"), "{line}");
    }

    #[test]
    fn client_properties_accept_numbers_and_booleans_as_text() {
        let (result, _) = load_text(
            "[kafka.client]\n\"fetch.wait.max.ms\" = 100\n\"check.crcs\" = false\n\
             \"security.protocol\" = \"SASL_SSL\"\n",
            &[],
        );
        let client = result.expect("client properties load").kafka.client;
        assert_eq!(client["fetch.wait.max.ms"], "100");
        assert_eq!(client["check.crcs"], "false");
        assert_eq!(client["security.protocol"], "SASL_SSL");
    }

    // Environment overrides

    #[test]
    fn env_var_overrides_the_file() {
        let (result, _) = load_text(
            "[commit]\ninterval_ms = 2000\n",
            &[("K2_COMMIT__INTERVAL_MS", "500")],
        );
        assert_eq!(result.expect("loads").commit.interval_ms, 500);
    }

    #[test]
    fn env_var_with_bad_value_is_rejected_naming_key_and_variable() {
        let (result, _) = load_text("", &[("K2_COMMIT__INTERVAL_MS", "abc")]);
        assert_eq!(
            error_line(result),
            "config key `commit.interval_ms` from environment variable `K2_COMMIT__INTERVAL_MS`: \
             invalid type: found string \"abc\", expected u64"
        );
    }

    #[test]
    fn env_override_is_validated_too() {
        let (result, _) = load_text("", &[("K2_COMMIT__INTERVAL_MS", "0")]);
        assert_eq!(error_line(result), "config key `commit.interval_ms`: must be > 0");
    }

    #[test]
    fn env_vars_set_strings_enums_options_floats_and_booleans() {
        let config = K2Config::load_with_env(
            None,
            env(&[
                ("K2_KAFKA__BROKERS", "kafka-1:9092,kafka-2:9092"),
                // Digits only, but the field is a string: it must stay a string.
                ("K2_KAFKA__GROUP_ID", "123"),
                ("K2_KAFKA__GROUP_INSTANCE_ID", "k2-0"),
                ("K2_KAFKA__START_FROM", "latest"),
                ("K2_LOADGEN__MALFORMED_RATIO", "0.25"),
                ("K2_LOADGEN__ENABLED", "false"),
                ("K2_HTTP__LISTEN", "0.0.0.0:9090"),
            ]),
        )
        .expect("env overrides load");
        assert_eq!(config.kafka.brokers, "kafka-1:9092,kafka-2:9092");
        assert!(!config.kafka.is_embedded());
        assert_eq!(config.kafka.group_id, "123");
        assert_eq!(config.kafka.group_instance_id.as_deref(), Some("k2-0"));
        assert_eq!(config.kafka.start_from, StartFrom::Latest);
        assert_eq!(config.loadgen.malformed_ratio, 0.25);
        assert!(!config.loadgen.enabled);
        assert_eq!(config.http.listen, "0.0.0.0:9090");
    }

    #[test]
    fn env_var_can_set_a_dotted_librdkafka_property() {
        let config =
            K2Config::load_with_env(None, env(&[("K2_KAFKA__CLIENT__security.protocol", "SASL_SSL")]))
                .expect("loads");
        assert_eq!(config.kafka.client["security.protocol"], "SASL_SSL");
    }

    #[test]
    fn env_var_for_unknown_key_is_rejected_naming_the_variable() {
        let (result, _) = load_text(
            "[commit]\ninterval_ms = 2000\n",
            &[("K2_COMMIT__INTERVALL_MS", "500")],
        );
        let line = error_line(result);
        assert!(
            line.starts_with(
                "config key `commit.intervall_ms` from environment variable \
                 `K2_COMMIT__INTERVALL_MS`: unknown key"
            ),
            "{line}"
        );
    }

    #[test]
    fn env_var_missing_the_double_underscore_is_rejected_with_a_suggestion() {
        let error = K2Config::load_with_env(None, env(&[("K2_COMMIT_INTERVAL_MS", "500")])).unwrap_err();
        assert_eq!(
            error.to_string(),
            "environment variable `K2_COMMIT_INTERVAL_MS`: looks like a config override but has no \
             `__` between section and key; did you mean `K2_COMMIT__INTERVAL_MS`?"
        );
    }

    #[test]
    fn env_var_with_an_empty_key_is_rejected() {
        let error = K2Config::load_with_env(None, env(&[("K2_COMMIT__", "500")])).unwrap_err();
        assert!(
            matches!(&error, ConfigError::EnvVar { name, .. } if name == "K2_COMMIT__"),
            "{error:?}"
        );
    }

    #[test]
    fn unrelated_and_non_config_env_vars_are_ignored() {
        let config = K2Config::load_with_env(
            None,
            env(&[
                ("PATH", "/usr/bin"),
                ("K2_CONFIG", "config/k2.toml"),
                ("K2_LOG", "debug"),
                ("RUST_LOG", "info"),
            ]),
        )
        .expect("loads");
        assert_eq!(config, K2Config::default());
    }

    // validate(): one test per rule

    #[test]
    fn invalid_error_names_the_dotted_key() {
        let mut config = K2Config::default();
        config.commit.interval_ms = 0;
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "config key `commit.interval_ms`: must be > 0"
        );
    }

    #[test]
    fn defaults_are_valid() {
        assert!(K2Config::default().validate().is_ok());
    }

    #[test]
    fn zero_lane_sizes_are_rejected() {
        assert_eq!(
            rejected_key(|c| c.lanes.chunk_max_records = 0),
            "lanes.chunk_max_records"
        );
        assert_eq!(
            rejected_key(|c| c.lanes.mailbox_capacity = 0),
            "lanes.mailbox_capacity"
        );
        assert_eq!(
            rejected_key(|c| c.lanes.restart_window_ms = 0),
            "lanes.restart_window_ms"
        );
    }

    #[test]
    fn zero_arbiters_and_zero_restarts_are_allowed() {
        assert!(accepted(|c| c.lanes.arbiters = 0));
        assert!(accepted(|c| c.lanes.max_restarts = 0));
    }

    #[test]
    fn zero_batcher_limits_are_rejected() {
        assert_eq!(rejected_key(|c| c.batcher.max_rows = 0), "batcher.max_rows");
        assert_eq!(rejected_key(|c| c.batcher.max_bytes = 0), "batcher.max_bytes");
        assert_eq!(rejected_key(|c| c.batcher.max_age_ms = 0), "batcher.max_age_ms");
        assert_eq!(
            rejected_key(|c| c.batcher.target_file_size_bytes = 0),
            "batcher.target_file_size_bytes"
        );
    }

    #[test]
    fn zstd_level_outside_1_to_22_is_rejected() {
        assert_eq!(rejected_key(|c| c.batcher.zstd_level = 0), "batcher.zstd_level");
        assert_eq!(rejected_key(|c| c.batcher.zstd_level = 23), "batcher.zstd_level");
        assert!(accepted(|c| c.batcher.zstd_level = 22));
    }

    #[test]
    fn zero_commit_limits_are_rejected() {
        assert_eq!(rejected_key(|c| c.commit.interval_ms = 0), "commit.interval_ms");
        assert_eq!(rejected_key(|c| c.commit.max_rows = 0), "commit.max_rows");
        assert_eq!(rejected_key(|c| c.commit.max_bytes = 0), "commit.max_bytes");
        assert_eq!(
            rejected_key(|c| c.commit.max_pending_bytes = 0),
            "commit.max_pending_bytes"
        );
        assert_eq!(
            rejected_key(|c| c.commit.retry_backoff_ms = 0),
            "commit.retry_backoff_ms"
        );
    }

    #[test]
    fn zero_retained_snapshots_is_rejected() {
        assert_eq!(
            rejected_key(|c| c.maintenance.retain_snapshots = 0),
            "maintenance.retain_snapshots"
        );
    }

    #[test]
    fn maintenance_that_could_not_compact_is_rejected() {
        assert_eq!(
            rejected_key(|c| c.maintenance.min_files_to_compact = 1),
            "maintenance.min_files_to_compact"
        );
        assert_eq!(
            rejected_key(|c| c.maintenance.small_file_bytes = c.maintenance.target_file_size_bytes + 1),
            "maintenance.small_file_bytes"
        );
    }

    #[test]
    fn non_positive_embedded_partitions_are_rejected() {
        assert_eq!(
            rejected_key(|c| c.kafka.embedded_partitions = 0),
            "kafka.embedded_partitions"
        );
        assert_eq!(
            rejected_key(|c| c.kafka.embedded_partitions = -3),
            "kafka.embedded_partitions"
        );
    }

    #[test]
    fn zero_session_timeout_is_rejected() {
        assert_eq!(
            rejected_key(|c| c.kafka.session_timeout_ms = 0),
            "kafka.session_timeout_ms"
        );
    }

    #[test]
    fn empty_kafka_names_are_rejected() {
        assert_eq!(rejected_key(|c| c.kafka.brokers = " ".into()), "kafka.brokers");
        assert_eq!(rejected_key(|c| c.kafka.topic = String::new()), "kafka.topic");
        assert_eq!(
            rejected_key(|c| c.kafka.group_id = String::new()),
            "kafka.group_id"
        );
        assert_eq!(
            rejected_key(|c| c.kafka.group_instance_id = Some(String::new())),
            "kafka.group_instance_id"
        );
    }

    #[test]
    fn broker_list_with_an_empty_entry_is_rejected() {
        assert_eq!(
            rejected_key(|c| c.kafka.brokers = "kafka-1:9092,,kafka-2:9092".into()),
            "kafka.brokers"
        );
        assert!(accepted(|c| c.kafka.brokers = "kafka-1:9092,kafka-2:9092".into()));
    }

    #[test]
    fn reserved_librdkafka_property_is_rejected_naming_the_k2_key() {
        let mut config = K2Config::default();
        config
            .kafka
            .client
            .insert("group.id".to_string(), "other".to_string());
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "config key `kafka.client.\"group.id\"`: is set by K2 and cannot be passed through; \
             use `kafka.group_id` instead"
        );
        for (reserved, _) in RESERVED_CLIENT_KEYS {
            assert_eq!(
                rejected_key(|c| {
                    c.kafka.client.insert(reserved.to_string(), "x".to_string());
                }),
                format!("kafka.client.\"{reserved}\"")
            );
        }
        assert!(accepted(|c| {
            c.kafka
                .client
                .insert("security.protocol".to_string(), "SSL".to_string());
        }));
    }

    #[test]
    fn event_time_skew_must_be_positive() {
        assert_eq!(
            rejected_key(|c| c.decode.max_event_time_skew_ms = 0),
            "decode.max_event_time_skew_ms"
        );
        assert_eq!(
            rejected_key(|c| c.decode.max_event_time_skew_ms = -1),
            "decode.max_event_time_skew_ms"
        );
    }

    #[test]
    fn empty_binance_exchange_is_rejected() {
        assert_eq!(
            rejected_key(|c| c.decode.binance_exchange = String::new()),
            "decode.binance_exchange"
        );
    }

    #[test]
    fn unparsable_listen_address_is_rejected() {
        assert_eq!(
            rejected_key(|c| c.http.listen = "localhost".into()),
            "http.listen"
        );
        assert_eq!(
            rejected_key(|c| c.http.listen = "127.0.0.1:99999".into()),
            "http.listen"
        );
        assert!(accepted(|c| c.http.listen = "[::1]:0".into()));
    }

    #[test]
    fn catalog_uri_must_be_sqlite_or_postgres() {
        assert_eq!(
            rejected_key(|c| c.catalog.uri = "mysql://k2@db/k2".into()),
            "catalog.uri"
        );
        assert_eq!(
            rejected_key(|c| c.catalog.uri = "http://rest-catalog:8181".into()),
            "catalog.uri"
        );
        assert!(accepted(|c| c.catalog.uri = "postgres://k2@db:5432/k2".into()));
        assert!(accepted(|c| c.catalog.uri = "postgresql://k2@db:5432/k2".into()));
        assert!(accepted(|c| c.catalog.uri = "sqlite::memory:".into()));
    }

    #[test]
    fn s3_warehouse_is_rejected_as_not_supported_yet() {
        let mut config = K2Config::default();
        config.catalog.warehouse = "s3://bucket/warehouse".into();
        let error = config.validate().unwrap_err();
        assert_eq!(
            error.to_string(),
            "config key `catalog.warehouse`: S3 warehouses are not supported yet; use a local path \
             or a file:// URL"
        );
        assert_eq!(
            rejected_key(|c| c.catalog.warehouse = "S3A://bucket/w".into()),
            "catalog.warehouse"
        );
    }

    #[test]
    fn warehouse_must_be_a_path_or_file_url() {
        assert_eq!(
            rejected_key(|c| c.catalog.warehouse = "gs://bucket/w".into()),
            "catalog.warehouse"
        );
        assert_eq!(
            rejected_key(|c| c.catalog.warehouse = String::new()),
            "catalog.warehouse"
        );
        assert!(accepted(|c| c.catalog.warehouse = "file:///var/lib/k2/w".into()));
        assert!(accepted(|c| c.catalog.warehouse = "/var/lib/k2/w".into()));
    }

    #[test]
    fn empty_catalog_names_are_rejected() {
        assert_eq!(rejected_key(|c| c.catalog.name = String::new()), "catalog.name");
        assert_eq!(
            rejected_key(|c| c.catalog.namespace = String::new()),
            "catalog.namespace"
        );
    }

    #[test]
    fn malformed_ratio_outside_0_to_1_is_rejected() {
        assert_eq!(
            rejected_key(|c| c.loadgen.malformed_ratio = 1.5),
            "loadgen.malformed_ratio"
        );
        assert_eq!(
            rejected_key(|c| c.loadgen.malformed_ratio = -0.1),
            "loadgen.malformed_ratio"
        );
        assert_eq!(
            rejected_key(|c| c.loadgen.malformed_ratio = f64::NAN),
            "loadgen.malformed_ratio"
        );
        assert!(accepted(|c| c.loadgen.malformed_ratio = 0.0));
        assert!(accepted(|c| c.loadgen.malformed_ratio = 1.0));
    }

    #[test]
    fn reference_ratio_outside_0_to_1_is_rejected() {
        for bad in [1.5, -0.1, f64::NAN] {
            assert_eq!(
                rejected_key(|c| c.loadgen.reference_ratio = bad),
                "loadgen.reference_ratio",
                "{bad}"
            );
        }
        assert!(accepted(|c| c.loadgen.reference_ratio = 0.0));
        assert!(accepted(|c| c.loadgen.reference_ratio = 1.0));
    }

    #[test]
    fn zero_rate_is_rejected_only_when_loadgen_is_enabled() {
        assert_eq!(rejected_key(|c| c.loadgen.rate = 0), "loadgen.rate");
        assert!(accepted(|c| {
            c.loadgen.enabled = false;
            c.loadgen.rate = 0;
        }));
    }
}
