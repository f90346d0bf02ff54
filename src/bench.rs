//! `k2 bench`: the steady throughput of `k2 run` against a raw consumer, on
//! the embedded broker.
//!
//! Preloads generated trades into librdkafka's mock cluster in this process,
//! keyed by symbol as a feed is, and checks that the broker kept them all.
//! Then, per run and over the same messages:
//!
//! 1. a raw rdkafka consumer in this process that only counts them, timed
//!    from its first record to its last;
//! 2. `k2 run` as a process of its own (fresh group, fresh SQLite catalog and
//!    warehouse, HTTP on a free port), timed from the first record it
//!    consumed to the moment the last one is durable, from the gauges of
//!    its `/metrics` (read every 50 ms). Its CPU time and peak RSS are its
//!    own, not shared with the broker and the raw consumer.
//!
//! Both group joins (~3 s on the mock broker) are reported apart: what a user
//! cares about is the steady rate, and on a shared, noisy machine the ratio of
//! the two steady rates.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;

use crate::config::K2Config;
use crate::embedded::EmbeddedBroker;

pub mod latency;
pub mod query;
use crate::loadgen::{GeneratorParams, Spread, preload};
use crate::metrics as m;
use crate::storage::catalog::open_catalog;
use crate::storage::reader::committed_record_count;
use crate::storage::tables::TableIdents;

const TOPIC: &str = "k2.bench.trades";
/// The exchange of the canonical workload (any exchange but Binance has
/// canonical trades with ids without order, `SYMBOL-000000123`).
const CANONICAL_EXCHANGE: &str = "ASX";
/// The pipeline/raw ratio of steady rates the performance work aims at.
pub const TARGET_RATIO: f64 = 0.6;

/// How often the bench reads the child's `/metrics` while it ingests. A
/// render costs the child ~0.4 ms of CPU (measured with perf: at 5 ms the
/// scrapes were ~1 µs of the CPU per trade), so not more often; the times
/// come from the child's own gauges, not from when a scrape saw them.
const SCRAPE_INTERVAL: Duration = Duration::from_millis(50);
/// How long `k2 run` may take to open its HTTP port.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a run may take to make every message durable.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// How long `k2 run` may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of the child's log quoted in an error.
const LOG_TAIL_LINES: usize = 30;

/// What the preloaded trades look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// K2's canonical trade JSON, with ids without order (`SYMBOL-000000123`).
    Canonical,
    /// Binance's trade event JSON, with numeric ids that increase per symbol.
    Binance,
}

/// How trades are spread over the symbols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Popularity {
    /// Every symbol equally often.
    Uniform,
    /// Zipf with the load generator's exponent (1.1): a few symbols dominate.
    Zipf,
}

#[derive(Debug, Clone)]
pub struct BenchParams {
    pub workload: Workload,
    pub symbols: u32,
    pub popularity: Popularity,
    pub messages: u64,
    pub partitions: i32,
    /// Timed repetitions of both measurements; the report gives medians.
    pub runs: u32,
    /// Config file for `k2 run` (pipeline tuning). The bench sets the Kafka
    /// brokers, topic and group, the catalog and the HTTP address itself.
    pub config_file: Option<PathBuf>,
    /// The `k2` binary that runs the pipeline (`k2 bench` passes itself).
    pub k2_binary: PathBuf,
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    /// Raw consumer: creation to its first record.
    pub raw_join_s: f64,
    /// Raw consumer: first record to last.
    pub raw_steady_s: f64,
    pub raw_msgs_per_s: f64,
    /// `k2 run`: process start to the first record consumed.
    pub pipeline_join_s: f64,
    /// `k2 run`: first record consumed to the last record durable.
    pub pipeline_steady_s: f64,
    pub pipeline_msgs_per_s: f64,
    /// `k2 run`: last record consumed to the last record durable.
    pub tail_s: f64,
    /// Pipeline steady rate over raw steady rate.
    pub ratio: f64,
    /// User + system CPU of `k2 run`, from its start to the last record durable.
    pub cpu_s: f64,
    pub cpu_us_per_trade: f64,
    /// Of `cpu_s`, the kernel's: mostly zeroing the pages `k2 run` touches for the first time.
    pub system_cpu_s: f64,
    /// Minor page faults of `k2 run` over the same span: about its peak RSS in 4 KiB pages.
    pub minor_faults: u64,
    /// CPU of `k2 run` before its first record was consumed: start-up and the group join.
    pub startup_cpu_s: f64,
    /// CPU of `k2 run` per trade in the steady state: from the first scrape that showed a record
    /// consumed to the last record durable, over the trades consumed after that scrape.
    pub steady_cpu_us_per_trade: f64,
    /// Peak RSS (VmHWM) of `k2 run`.
    pub peak_rss_bytes: u64,
    pub commits: u64,
    /// Commit duration quantiles, from `k2_commit_duration_seconds`.
    pub commit_p50_s: f64,
    pub commit_p99_s: f64,
    pub commit_mean_s: f64,
    /// Trades the table holds, read back after `k2 run` stopped.
    pub rows_committed: u64,
    pub data_files: u64,
    pub avg_file_bytes: u64,
}

/// Medians over the runs (each field as in [`RunFigures`]), and every run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub workload: Workload,
    pub symbols: u32,
    pub popularity: Popularity,
    pub messages: u64,
    pub partitions: i32,
    pub payload_bytes: u64,
    pub runs: u32,
    /// Medians of the runs' figures (in the JSON, beside the fields above).
    /// The ratio is the median of the runs' ratios (each run's raw and
    /// pipeline are measured back to back), so not always the ratio of the
    /// median rates.
    #[serde(flatten)]
    pub median: RunFigures,
    pub pipeline_mb_per_s: f64,
    pub per_run: Vec<RunFigures>,
}

pub async fn run(params: BenchParams, data_dir: &Path) -> anyhow::Result<BenchReport> {
    if params.messages == 0 || params.symbols == 0 || params.partitions < 1 {
        anyhow::bail!("k2 bench needs at least one message, one symbol and one partition");
    }
    // The config `k2 run` will load, read here too: a bad file fails before
    // the preload, and the catalog's namespace is needed to read the table back.
    let config = K2Config::load(params.config_file.as_deref()).map_err(|err| anyhow::anyhow!("{err}"))?;
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), params.partitions)])?;
    let brokers = broker.bootstrap_servers().to_string();
    eprintln!(
        "k2 bench: preloading {} {} trades over {} symbols ({}) into {} partitions, keyed by symbol",
        params.messages,
        workload_name(params.workload),
        params.symbols,
        popularity_name(params.popularity),
        params.partitions
    );
    let (messages, partitions) = (params.messages, params.partitions);
    let loaded = {
        let brokers = brokers.clone();
        let generator = generator_params(params.workload, params.symbols, params.popularity);
        tokio::task::spawn_blocking(move || preload(&brokers, TOPIC, messages, generator, Spread::ByKey))
            .await??
    };
    if loaded.valid.len() as u64 != messages {
        anyhow::bail!("preload produced {} of {messages} messages", loaded.valid.len());
    }
    let retained = {
        let brokers = brokers.clone();
        tokio::task::spawn_blocking(move || retained_messages(&brokers, partitions)).await??
    };
    if retained != messages {
        let advice = match params.popularity {
            // More partitions do not split the hottest symbol's partition.
            Popularity::Zipf => "use fewer --messages or --popularity uniform",
            Popularity::Uniform => "use more --partitions or fewer --messages",
        };
        anyhow::bail!(
            "the embedded broker kept {retained} of {messages} messages: it keeps ~5 MiB per partition, and \
             all of a symbol's trades go to one partition; {advice}"
        );
    }

    let runs = params.runs.max(1);
    let mut per_run = Vec::new();
    for run in 1..=runs {
        eprintln!("k2 bench: run {run}/{runs}: raw consume");
        let raw = {
            let brokers = brokers.clone();
            tokio::task::spawn_blocking(move || raw_consume(&brokers, messages)).await??
        };
        eprintln!(
            "k2 bench: run {run}/{runs}: k2 run ({})",
            params.k2_binary.display()
        );
        let run_dir = data_dir.join(format!("run-{run}"));
        let pipeline = time_pipeline(&params, &config, &brokers, &run_dir, messages).await;
        // Each run's catalog and warehouse are only needed for its own figures.
        let _ = std::fs::remove_dir_all(&run_dir);
        let figures = run_figures(&raw, &pipeline?, messages);
        eprintln!(
            "k2 bench: run {run}/{runs}: raw {:.0} msg/s, pipeline {:.0} msg/s, ratio {:.2}, \
             join {:.2} s, tail {:.2} s, {:.1} µs CPU/trade",
            figures.raw_msgs_per_s,
            figures.pipeline_msgs_per_s,
            figures.ratio,
            figures.pipeline_join_s,
            figures.tail_s,
            figures.cpu_us_per_trade
        );
        per_run.push(figures);
    }
    drop(broker);
    Ok(report(&params, loaded.bytes, per_run))
}

/// The generator for a workload: one exchange, `symbols` symbols.
fn generator_params(workload: Workload, symbols: u32, popularity: Popularity) -> GeneratorParams {
    let (exchange, symbols): (&str, Vec<String>) = match workload {
        Workload::Canonical => (
            CANONICAL_EXCHANGE,
            (1..=symbols).map(|i| format!("S{i:05}")).collect(),
        ),
        Workload::Binance => ("BINANCE", (1..=symbols).map(|i| format!("S{i:05}USDT")).collect()),
    };
    let defaults = GeneratorParams::default();
    GeneratorParams {
        exchanges: vec![(exchange.to_string(), symbols)],
        zipf_exponent: match popularity {
            Popularity::Uniform => 0.0,
            Popularity::Zipf => defaults.zipf_exponent,
        },
        malformed_ratio: 0.0,
        binance_native_ratio: 1.0,
        ..defaults
    }
}

fn workload_name(workload: Workload) -> &'static str {
    match workload {
        Workload::Canonical => "canonical",
        Workload::Binance => "binance",
    }
}

fn popularity_name(popularity: Popularity) -> &'static str {
    match popularity {
        Popularity::Uniform => "uniform",
        Popularity::Zipf => "zipf",
    }
}

fn run_figures(raw: &RawRun, pipeline: &PipelineRun, messages: u64) -> RunFigures {
    let raw_msgs_per_s = messages as f64 / raw.steady_s;
    let pipeline_msgs_per_s = messages as f64 / pipeline.steady_s;
    RunFigures {
        raw_join_s: raw.join_s,
        raw_steady_s: raw.steady_s,
        raw_msgs_per_s,
        pipeline_join_s: pipeline.join_s,
        pipeline_steady_s: pipeline.steady_s,
        pipeline_msgs_per_s,
        tail_s: pipeline.tail_s,
        ratio: pipeline_msgs_per_s / raw_msgs_per_s,
        cpu_s: pipeline.cpu_s,
        cpu_us_per_trade: pipeline.cpu_s * 1e6 / messages as f64,
        system_cpu_s: pipeline.system_cpu_s,
        minor_faults: pipeline.minor_faults,
        startup_cpu_s: pipeline.startup_cpu_s,
        steady_cpu_us_per_trade: pipeline.steady_cpu_us_per_trade,
        peak_rss_bytes: pipeline.peak_rss_bytes,
        commits: pipeline.commits,
        commit_p50_s: pipeline.commit_p50_s,
        commit_p99_s: pipeline.commit_p99_s,
        commit_mean_s: pipeline.commit_mean_s,
        rows_committed: pipeline.rows_committed,
        data_files: pipeline.data_files,
        avg_file_bytes: pipeline.avg_file_bytes,
    }
}

fn report(params: &BenchParams, payload_bytes: u64, per_run: Vec<RunFigures>) -> BenchReport {
    let of = |field: fn(&RunFigures) -> f64| median(&per_run.iter().map(field).collect::<Vec<_>>());
    let whole = |field: fn(&RunFigures) -> u64| of_u64(&per_run, field);
    let pipeline_steady_s = of(|r| r.pipeline_steady_s);
    BenchReport {
        workload: params.workload,
        symbols: params.symbols,
        popularity: params.popularity,
        messages: params.messages,
        partitions: params.partitions,
        payload_bytes,
        runs: per_run.len() as u32,
        median: RunFigures {
            raw_join_s: of(|r| r.raw_join_s),
            raw_steady_s: of(|r| r.raw_steady_s),
            raw_msgs_per_s: of(|r| r.raw_msgs_per_s),
            pipeline_join_s: of(|r| r.pipeline_join_s),
            pipeline_steady_s,
            pipeline_msgs_per_s: of(|r| r.pipeline_msgs_per_s),
            tail_s: of(|r| r.tail_s),
            ratio: of(|r| r.ratio),
            cpu_s: of(|r| r.cpu_s),
            cpu_us_per_trade: of(|r| r.cpu_us_per_trade),
            system_cpu_s: of(|r| r.system_cpu_s),
            minor_faults: whole(|r| r.minor_faults),
            startup_cpu_s: of(|r| r.startup_cpu_s),
            steady_cpu_us_per_trade: of(|r| r.steady_cpu_us_per_trade),
            peak_rss_bytes: whole(|r| r.peak_rss_bytes),
            commits: whole(|r| r.commits),
            commit_p50_s: of(|r| r.commit_p50_s),
            commit_p99_s: of(|r| r.commit_p99_s),
            commit_mean_s: of(|r| r.commit_mean_s),
            rows_committed: whole(|r| r.rows_committed),
            data_files: whole(|r| r.data_files),
            avg_file_bytes: whole(|r| r.avg_file_bytes),
        },
        pipeline_mb_per_s: payload_bytes as f64 / 1e6 / pipeline_steady_s,
        per_run,
    }
}

fn of_u64(runs: &[RunFigures], field: fn(&RunFigures) -> u64) -> u64 {
    median(&runs.iter().map(|r| field(r) as f64).collect::<Vec<_>>()).round() as u64
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

// ---------------------------------------------------------------------------------------------
// The raw consumer
// ---------------------------------------------------------------------------------------------

struct RawRun {
    join_s: f64,
    steady_s: f64,
}

/// Consumes `messages` with a bare consumer of a fresh group that only
/// counts them.
fn raw_consume(brokers: &str, messages: u64) -> anyhow::Result<RawRun> {
    let started = Instant::now();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("k2-bench-raw-{}", uuid::Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .create()
        .context("failed to create the raw consumer")?;
    consumer.subscribe(&[TOPIC])?;
    let mut count = 0u64;
    let mut first = None;
    while count < messages {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(_)) => {
                first.get_or_insert_with(Instant::now);
                count += 1;
            }
            Some(Err(err)) => anyhow::bail!("raw consumer error: {err}"),
            None if started.elapsed() > Duration::from_secs(300) => {
                anyhow::bail!("raw consumer got {count} of {messages} messages in 300 s")
            }
            None => {}
        }
    }
    let last = Instant::now();
    let first = first.unwrap_or(last);
    Ok(RawRun {
        join_s: (first - started).as_secs_f64(),
        steady_s: (last - first).as_secs_f64(),
    })
}

/// Messages the broker still holds in the bench topic (high − low watermark, summed).
fn retained_messages(brokers: &str, partitions: i32) -> anyhow::Result<u64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("failed to create a client to read watermarks")?;
    let mut total = 0;
    for partition in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(TOPIC, partition, Duration::from_secs(10))
            .with_context(|| format!("failed to read the watermarks of partition {partition}"))?;
        total += (high - low).max(0) as u64;
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------------
// `k2 run` as a child process
// ---------------------------------------------------------------------------------------------

/// One timed `k2 run`.
struct PipelineRun {
    join_s: f64,
    steady_s: f64,
    tail_s: f64,
    cpu_s: f64,
    system_cpu_s: f64,
    minor_faults: u64,
    startup_cpu_s: f64,
    steady_cpu_us_per_trade: f64,
    peak_rss_bytes: u64,
    commits: u64,
    commit_p50_s: f64,
    commit_p99_s: f64,
    commit_mean_s: f64,
    rows_committed: u64,
    data_files: u64,
    avg_file_bytes: u64,
}

/// Runs `k2 run` under `dir` until every preloaded message is durable, stops
/// it, and reads its table back.
async fn time_pipeline(
    params: &BenchParams,
    config: &K2Config,
    brokers: &str,
    dir: &Path,
    messages: u64,
) -> anyhow::Result<PipelineRun> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let launch = Launch {
        binary: params.k2_binary.clone(),
        config_file: params.config_file.clone(),
        brokers: brokers.to_string(),
        dir: dir.to_path_buf(),
        overrides: Vec::new(),
        log_name: LOG_FILE.to_string(),
    };
    let watched = tokio::task::spawn_blocking(move || watch_k2_run(&launch, messages)).await??;

    let mut catalog_config = config.catalog.clone();
    catalog_config.uri = CATALOG_URI.to_string();
    catalog_config.warehouse = WAREHOUSE.to_string();
    let catalog = open_catalog(&catalog_config, dir).await?;
    let trades = catalog
        .load_table(&TableIdents::new(&catalog_config.namespace).trades)
        .await
        .context("failed to read the trades table back")?;
    let rows_committed = committed_record_count(&trades);
    if rows_committed != messages {
        anyhow::bail!("the trades table holds {rows_committed} rows for {messages} messages");
    }
    let summary = trades
        .metadata()
        .current_snapshot()
        .map(|s| s.summary().additional_properties.clone())
        .unwrap_or_default();
    let number = |key: &str| summary.get(key).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let data_files = number("total-data-files");

    let scrape = &watched.scrape;
    let first_consumed = scrape.first_consumed_s.unwrap_or(watched.durable_at_s);
    let last_consumed = scrape.last_consumed_s.unwrap_or(watched.durable_at_s);
    let quantile = |q: f64| scrape.commit_quantile(q).unwrap_or(f64::NAN);
    Ok(PipelineRun {
        join_s: first_consumed - watched.started_at_s,
        steady_s: watched.durable_at_s - first_consumed,
        tail_s: watched.durable_at_s - last_consumed,
        cpu_s: watched.stat.cpu_s(),
        system_cpu_s: watched.stat.system_s,
        minor_faults: watched.stat.minor_faults,
        startup_cpu_s: watched.at_first_consumed.cpu_s,
        steady_cpu_us_per_trade: watched.steady_cpu_us_per_trade(messages),
        peak_rss_bytes: watched.peak_rss_bytes,
        commits: scrape.commits,
        commit_p50_s: quantile(0.5),
        commit_p99_s: quantile(0.99),
        commit_mean_s: scrape.commit_mean_s().unwrap_or(f64::NAN),
        rows_committed,
        data_files,
        avg_file_bytes: number("total-files-size").checked_div(data_files).unwrap_or(0),
    })
}

/// The catalog and warehouse of a run, relative to its directory.
const CATALOG_URI: &str = "sqlite:catalog.db";
const WAREHOUSE: &str = "warehouse";
/// Where `k2 run` writes its stderr, in the run's directory.
const LOG_FILE: &str = "k2-run.log";

/// How to start one `k2 run`.
/// How to start a `k2 run` child: the bench's, and `k2 demo kill-restart`'s.
pub(crate) struct Launch {
    pub binary: PathBuf,
    pub config_file: Option<PathBuf>,
    pub brokers: String,
    pub dir: PathBuf,
    /// `K2_*` variables set after the bench's own (so they win).
    pub overrides: Vec<(&'static str, String)>,
    /// Its stderr, under `dir`.
    pub log_name: String,
}

/// What was seen of one `k2 run`, times in unix seconds.
struct Watched {
    started_at_s: f64,
    /// When `/metrics` first showed every message committed.
    durable_at_s: f64,
    /// The `/metrics` scrape that showed it.
    scrape: Scrape,
    /// The process's CPU and page faults when every message was committed.
    stat: ProcStat,
    /// The first scrape that showed a record consumed.
    at_first_consumed: CpuMark,
    peak_rss_bytes: u64,
}

/// The CPU time of `k2 run` and the records it had consumed, read together.
#[derive(Debug, Clone, Copy, Default)]
struct CpuMark {
    cpu_s: f64,
    consumed: u64,
}

impl Watched {
    /// CPU per trade from [`Watched::at_first_consumed`] to the end, over the trades consumed in
    /// between; the whole run's when the mark came after the last record.
    fn steady_cpu_us_per_trade(&self, messages: u64) -> f64 {
        let mark = self.at_first_consumed;
        match messages.checked_sub(mark.consumed) {
            Some(trades) if trades > 0 => (self.stat.cpu_s() - mark.cpu_s) * 1e6 / trades as f64,
            _ => self.stat.cpu_s() * 1e6 / messages.max(1) as f64,
        }
    }
}

/// Starts `k2 run`, reads its `/metrics` until every message is committed,
/// takes its CPU time and peak RSS, and stops it with SIGTERM. Blocking.
fn watch_k2_run(launch: &Launch, messages: u64) -> anyhow::Result<Watched> {
    let started_at_s = unix_now_s();
    let mut child = spawn_k2_run(launch)?;
    let addr = child.http_addr()?;
    watch_until_committed(child, addr, started_at_s, messages)
}

/// Starts `k2 run` as [`Launch`] says, its stderr in the run's log file.
pub(crate) fn spawn_k2_run(launch: &Launch) -> anyhow::Result<RunningChild> {
    let config_file = match &launch.config_file {
        Some(path) => std::path::absolute(path)?,
        None => {
            let path = launch.dir.join("k2.toml");
            std::fs::write(
                &path,
                "# k2 bench: defaults; the bench sets Kafka, catalog and HTTP through K2_* variables.\n",
            )
            .with_context(|| format!("failed to write {}", path.display()))?;
            path
        }
    };
    let log_path = launch.dir.join(&launch.log_name);
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("failed to create {}", log_path.display()))?;
    let child = Command::new(&launch.binary)
        .arg("run")
        .arg("--config")
        .arg(&config_file)
        .current_dir(&launch.dir)
        .env_remove("K2_CONFIG")
        .env("K2_KAFKA__BROKERS", &launch.brokers)
        .env("K2_KAFKA__TOPIC", TOPIC)
        .env("K2_KAFKA__GROUP_ID", format!("k2-bench-{}", uuid::Uuid::now_v7()))
        .env("K2_CATALOG__URI", CATALOG_URI)
        .env("K2_CATALOG__WAREHOUSE", WAREHOUSE)
        .env("K2_HTTP__LISTEN", "127.0.0.1:0")
        .envs(launch.overrides.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("failed to start {} run", launch.binary.display()))?;
    Ok(RunningChild { child, log_path })
}

fn watch_until_committed(
    mut child: RunningChild,
    addr: SocketAddr,
    started_at_s: f64,
    messages: u64,
) -> anyhow::Result<Watched> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    let pid = child.child.id();
    let mut at_first_consumed = None;
    let (scrape, durable_at_s) = loop {
        child.check_running("before every message was committed")?;
        // A failed scrape (the server is busy starting) is retried.
        if let Ok(body) = http_get(addr, "/metrics") {
            let scrape = Scrape::parse(&body);
            if at_first_consumed.is_none() && scrape.records_consumed > 0 {
                at_first_consumed = Some(CpuMark {
                    cpu_s: cpu_seconds(pid).context("failed to read the CPU time of k2 run")?,
                    consumed: scrape.records_consumed,
                });
            }
            if scrape.trades_committed >= messages {
                // The commit's own time: the scrape interval does not blur it.
                let durable_at_s = scrape.last_commit_s.unwrap_or_else(unix_now_s);
                break (scrape, durable_at_s);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "k2 run committed {} of {messages} trades in {} s; its log:\n{}",
                    scrape.trades_committed,
                    RUN_TIMEOUT.as_secs(),
                    child.log_tail()
                );
            }
        } else if Instant::now() > deadline {
            anyhow::bail!("k2 run's /metrics did not answer; its log:\n{}", child.log_tail());
        }
        std::thread::sleep(SCRAPE_INTERVAL);
    };
    // Before the stop: the final commit and shutdown are not ingestion.
    let stat = ProcStat::of(pid).context("failed to read the CPU time of k2 run")?;
    let peak_rss_bytes = peak_rss_of(&pid.to_string());
    child.stop()?;
    Ok(Watched {
        started_at_s,
        durable_at_s,
        scrape,
        stat,
        at_first_consumed: at_first_consumed.unwrap_or_default(),
        peak_rss_bytes,
    })
}

/// A `k2 run` child process. Dropped while it still runs (an error in the
/// bench), it is killed and reaped, so the bench never leaves it behind.
pub(crate) struct RunningChild {
    child: Child,
    log_path: PathBuf,
}

impl RunningChild {
    /// The address its HTTP server listens on, from the line it logs.
    fn http_addr(&mut self) -> anyhow::Result<SocketAddr> {
        const MARKER: &str = "k2: HTTP on http://";
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_running("before it opened its HTTP port")?;
            let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            if let Some(at) = log.find(MARKER) {
                let rest = &log[at + MARKER.len()..];
                let addr = rest.split_whitespace().next().unwrap_or_default();
                return addr
                    .parse()
                    .with_context(|| format!("k2 run logged an HTTP address that does not parse: {addr}"));
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "k2 run did not open its HTTP port in {} s; its log:\n{}",
                    START_TIMEOUT.as_secs(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash would end it, then reaped.
    pub(crate) fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().context("failed to send SIGKILL to k2 run")?;
        self.child.wait().context("failed to reap k2 run")?;
        Ok(())
    }

    pub(crate) fn check_running(&mut self, when: &str) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => anyhow::bail!("k2 run exited ({status}) {when}; its log:\n{}", self.log_tail()),
        }
    }

    /// SIGTERM (a clean stop: final commit), then a wait; killed if it
    /// does not exit in time. Either way it is reaped.
    pub(crate) fn stop(&mut self) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("child pid out of range")?;
        // SAFETY: kill(2) with a pid this process spawned and has not reaped.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            anyhow::bail!(
                "failed to send SIGTERM to k2 run: {}",
                std::io::Error::last_os_error()
            );
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status: ExitStatus = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                anyhow::bail!(
                    "k2 run did not stop within {} s of SIGTERM and was killed; its log:\n{}",
                    STOP_TIMEOUT.as_secs(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            anyhow::bail!(
                "k2 run exited with {status} after SIGTERM; its log:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for RunningChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn unix_now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// One HTTP/1.1 GET with `Connection: close`; the body of a 200 answer.
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    http_get_with_head(addr, path).map(|(_, body)| body)
}

/// GET `path` over HTTP/1.1; the answer's head (status line and headers)
/// and body, or an error unless the status is 200.
fn http_get_with_head(addr: SocketAddr, path: &str) -> anyhow::Result<(String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("HTTP answer without a header end")?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    if status != "200" {
        anyhow::bail!("GET {path}: HTTP {status}");
    }
    Ok((head.to_string(), body.to_string()))
}

/// User + system CPU seconds of process `pid` so far (/proc/<pid>/stat).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    Ok(ProcStat::of(pid)?.cpu_s())
}

/// What `/proc/<pid>/stat` says of a process's CPU time and page faults.
#[derive(Debug, Clone, Copy, Default)]
struct ProcStat {
    user_s: f64,
    system_s: f64,
    /// Page faults served without I/O: each first touch of a fresh page.
    minor_faults: u64,
}

impl ProcStat {
    /// User + system CPU seconds.
    fn cpu_s(&self) -> f64 {
        self.user_s + self.system_s
    }

    fn of(pid: u32) -> anyhow::Result<ProcStat> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        ProcStat::parse(&stat).with_context(|| format!("/proc/{pid}/stat"))
    }

    fn parse(stat: &str) -> anyhow::Result<ProcStat> {
        // Fields after the command name, which is in parentheses and may hold spaces:
        // state is field 3, minflt 10, utime 14 and stime 15 (proc(5)).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let number = |field: usize| -> anyhow::Result<u64> {
            fields
                .get(field - 3)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no field {field}"))
        };
        // SAFETY: sysconf only reads a system constant.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if per_second <= 0 {
            anyhow::bail!("sysconf(_SC_CLK_TCK) failed");
        }
        Ok(ProcStat {
            user_s: number(14)? as f64 / per_second as f64,
            system_s: number(15)? as f64 / per_second as f64,
            minor_faults: number(10)?,
        })
    }
}

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    peak_rss_of("self")
}

/// Peak resident set size (VmHWM) of `/proc/<pid>`, in bytes; 0 if unknown.
fn peak_rss_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

// ---------------------------------------------------------------------------------------------
// What `/metrics` says
// ---------------------------------------------------------------------------------------------

/// The figures the bench reads from `k2 run`'s Prometheus text.
#[derive(Debug, Default, Clone, PartialEq)]
struct Scrape {
    trades_committed: u64,
    /// Records consumed, over all partitions.
    records_consumed: u64,
    /// Successful commits.
    commits: u64,
    first_consumed_s: Option<f64>,
    last_consumed_s: Option<f64>,
    /// When the last commit was verified: the one that made the last record durable.
    last_commit_s: Option<f64>,
    /// `k2_commit_duration_seconds` as a histogram: (upper bound, cumulative count).
    commit_buckets: Vec<(f64, u64)>,
    /// ... or as a summary: (quantile, value).
    commit_quantiles: Vec<(f64, f64)>,
    commit_sum_s: f64,
    commit_count: u64,
    /// Data files the batchers wrote.
    data_files_written: u64,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let bucket = format!("{}_bucket", m::COMMIT_DURATION);
        let sum = format!("{}_sum", m::COMMIT_DURATION);
        let count = format!("{}_count", m::COMMIT_DURATION);
        let mut scrape = Scrape::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, labels, value)) = split_sample(line) else {
                continue;
            };
            match name {
                m::TRADES_COMMITTED => scrape.trades_committed = value as u64,
                m::RECORDS_CONSUMED => scrape.records_consumed += value as u64,
                m::COMMITS if label(labels, "outcome") == Some("ok") => scrape.commits = value as u64,
                m::FIRST_RECORD_CONSUMED => scrape.first_consumed_s = Some(value),
                m::LAST_RECORD_CONSUMED => scrape.last_consumed_s = Some(value),
                m::LAST_COMMIT => scrape.last_commit_s = Some(value),
                m::DATA_FILES_WRITTEN => scrape.data_files_written = value as u64,
                m::COMMIT_DURATION => {
                    if let Some(q) = label(labels, "quantile").and_then(|q| q.parse().ok()) {
                        scrape.commit_quantiles.push((q, value));
                    }
                }
                _ if name == bucket => {
                    if let Some(le) = label(labels, "le").and_then(|le| le.parse().ok()) {
                        scrape.commit_buckets.push((le, value as u64));
                    }
                }
                _ if name == sum => scrape.commit_sum_s = value,
                _ if name == count => scrape.commit_count = value as u64,
                _ => {}
            }
        }
        scrape.commit_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        scrape
    }

    /// The `q` quantile of commit durations: from a summary as rendered, or
    /// from the histogram's buckets, linear within a bucket (as Prometheus's
    /// `histogram_quantile`). None before the first commit.
    fn commit_quantile(&self, q: f64) -> Option<f64> {
        if let Some(&(_, value)) = self
            .commit_quantiles
            .iter()
            .find(|(at, _)| (*at - q).abs() < 1e-9)
        {
            return Some(value);
        }
        let total = self.commit_buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let (mut lower, mut below) = (0.0, 0u64);
        for &(upper, cumulative) in &self.commit_buckets {
            if cumulative as f64 >= rank {
                if upper.is_infinite() {
                    // Beyond the last finite bound: that bound is all we know.
                    return Some(lower);
                }
                let in_bucket = cumulative.saturating_sub(below) as f64;
                let into = if in_bucket > 0.0 {
                    (rank - below as f64) / in_bucket
                } else {
                    0.0
                };
                return Some(lower + (upper - lower) * into);
            }
            (lower, below) = (upper, cumulative);
        }
        None
    }

    fn commit_mean_s(&self) -> Option<f64> {
        (self.commit_count > 0).then(|| self.commit_sum_s / self.commit_count as f64)
    }
}

/// `name{labels} value` or `name value` → (name, labels, value).
fn split_sample(line: &str) -> Option<(&str, &str, f64)> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (&line[..open], &line[open + 1..close], &line[close + 1..])
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, "", rest)
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// The value of label `name` in `a="x",b="y"`.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key.trim() == name).then(|| value.trim().trim_matches('"'))
    })
}

// ---------------------------------------------------------------------------------------------
// Printing
// ---------------------------------------------------------------------------------------------

pub fn print_report(r: &BenchReport) {
    let m = &r.median;
    println!(
        "k2 bench: {} {} trades ({:.1} MB), {} symbols ({}), {} partitions; {}",
        r.messages,
        workload_name(r.workload),
        r.payload_bytes as f64 / 1e6,
        r.symbols,
        popularity_name(r.popularity),
        r.partitions,
        if r.runs == 1 {
            "one run".to_string()
        } else {
            format!("medians of {} runs", r.runs)
        }
    );
    println!(
        "  raw consume, steady  {:>10.0} msg/s  ({:.2} s first to last record; join {:.2} s)",
        m.raw_msgs_per_s, m.raw_steady_s, m.raw_join_s
    );
    println!(
        "  k2 run, steady       {:>10.0} msg/s  ({:.2} s first consumed to last durable, {:.1} MB/s)",
        m.pipeline_msgs_per_s, m.pipeline_steady_s, r.pipeline_mb_per_s
    );
    println!(
        "  ratio k2 run / raw   {:>10.2}        (target >= {TARGET_RATIO}; runs {})",
        m.ratio,
        list(r.per_run.iter().map(|f| f.ratio))
    );
    println!(
        "  join                 {:>10.2} s      (k2 run start to first record consumed)",
        m.pipeline_join_s
    );
    println!(
        "  tail                 {:>10.2} s      (last record consumed to last durable)",
        m.tail_s
    );
    println!(
        "  CPU of k2 run        {:>10.2} µs/trade ({:.2} s user+sys, start to last durable)",
        m.cpu_us_per_trade, m.cpu_s
    );
    println!(
        "  ... steady state     {:>10.2} µs/trade (first record consumed to last durable; start-up and join {:.2} s; runs {})",
        m.steady_cpu_us_per_trade,
        m.startup_cpu_s,
        list(r.per_run.iter().map(|f| f.steady_cpu_us_per_trade))
    );
    println!(
        "  ... in the kernel    {:>10.2} s      ({} minor page faults, {:.0} MiB of fresh pages)",
        m.system_cpu_s,
        m.minor_faults,
        m.minor_faults as f64 * 4096.0 / (1024.0 * 1024.0)
    );
    println!(
        "  peak RSS of k2 run   {:>10.1} MiB",
        m.peak_rss_bytes as f64 / (1024.0 * 1024.0)
    );
    println!(
        "  commits              {:>10}        (p50 {:.0} ms, p99 {:.0} ms, mean {:.0} ms)",
        m.commits,
        m.commit_p50_s * 1e3,
        m.commit_p99_s * 1e3,
        m.commit_mean_s * 1e3
    );
    println!("  rows committed       {:>10}", m.rows_committed);
    println!(
        "  data files           {:>10}        (avg {:.1} KiB)",
        m.data_files,
        m.avg_file_bytes as f64 / 1024.0
    );
}

fn list(values: impl Iterator<Item = f64>) -> String {
    let mut out = String::new();
    for (i, v) in values.enumerate() {
        let _ = write!(out, "{}{v:.2}", if i == 0 { "" } else { ", " });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    const METRICS: &str = r#"# TYPE k2_commits_total counter
k2_commits_total{outcome="ok"} 3
k2_commits_total{outcome="fenced"} 1
# TYPE k2_trades_committed_total counter
k2_trades_committed_total 1000000
# TYPE k2_first_record_consumed_timestamp_seconds gauge
k2_first_record_consumed_timestamp_seconds 1764680000.125
k2_last_record_consumed_timestamp_seconds 1764680008.5
# TYPE k2_commit_duration_seconds histogram
k2_commit_duration_seconds_bucket{le="0.01"} 0
k2_commit_duration_seconds_bucket{le="0.025"} 1
k2_commit_duration_seconds_bucket{le="0.05"} 2
k2_commit_duration_seconds_bucket{le="0.1"} 3
k2_commit_duration_seconds_bucket{le="+Inf"} 3
k2_commit_duration_seconds_sum 0.12
k2_commit_duration_seconds_count 3
k2_records_consumed_total{partition="0"} 500000
k2_records_consumed_total{partition="1"} 250000
# TYPE k2_data_files_written_total counter
k2_data_files_written_total 192
"#;

    #[test]
    fn proc_stat_reads_faults_and_cpu_past_a_command_name_with_spaces() {
        let line = "4242 (k2 run (x)) S 1 4242 4242 0 -1 4194304 127723 0 7 0 238 78 0 0 20 0 9 0 100 0 0";
        let stat = ProcStat::parse(line).unwrap();
        assert_eq!(stat.minor_faults, 127_723);
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert!((stat.user_s - 238.0 / hz).abs() < 1e-9);
        assert!((stat.system_s - 78.0 / hz).abs() < 1e-9);
        assert!(
            ProcStat::parse("4242 (k2) S 1").is_err(),
            "a short line is an error"
        );
    }

    #[test]
    fn steady_cpu_counts_only_what_came_after_the_first_consumed_mark() {
        let watched = |cpu_s, consumed| Watched {
            started_at_s: 0.0,
            durable_at_s: 1.0,
            scrape: Scrape::default(),
            stat: ProcStat {
                user_s: 3.0,
                ..ProcStat::default()
            },
            at_first_consumed: CpuMark { cpu_s, consumed },
            peak_rss_bytes: 0,
        };
        // 0.5 s of start-up, 2.5 s over the 1M trades consumed after the mark.
        assert!((watched(0.5, 0).steady_cpu_us_per_trade(1_000_000) - 2.5).abs() < 1e-9);
        // 2.0 s over the 500K consumed after it.
        assert!((watched(1.0, 500_000).steady_cpu_us_per_trade(1_000_000) - 4.0).abs() < 1e-9);
        // A mark after the last record: the whole run's figure.
        assert!((watched(2.9, 1_000_000).steady_cpu_us_per_trade(1_000_000) - 3.0).abs() < 1e-9);
    }

    #[test]
    fn a_scrape_reads_commits_trades_files_and_the_consumed_timestamps() {
        let scrape = Scrape::parse(METRICS);
        assert_eq!(scrape.trades_committed, 1_000_000);
        assert_eq!(scrape.commits, 3, "only outcome=\"ok\" counts");
        assert_eq!(scrape.records_consumed, 750_000, "summed over partitions");
        assert_eq!(scrape.first_consumed_s, Some(1_764_680_000.125));
        assert_eq!(scrape.last_consumed_s, Some(1_764_680_008.5));
        assert_eq!(scrape.data_files_written, 192);
        assert_eq!(scrape.commit_buckets.len(), 5);
        assert_eq!(scrape.commit_buckets[4], (f64::INFINITY, 3));
        assert!((scrape.commit_mean_s().unwrap() - 0.04).abs() < 1e-12);
    }

    #[test]
    fn commit_quantiles_interpolate_within_the_bucket_that_holds_the_rank() {
        let scrape = Scrape::parse(METRICS);
        // Rank 1.5 of 3 lies halfway into (0.025, 0.05], which holds the second commit.
        assert!((scrape.commit_quantile(0.5).unwrap() - 0.0375).abs() < 1e-12);
        // Rank 2.97: 97% into (0.05, 0.1].
        assert!((scrape.commit_quantile(0.99).unwrap() - 0.0985).abs() < 1e-12);
        assert_eq!(Scrape::default().commit_quantile(0.5), None, "no commit yet");
    }

    #[test]
    fn a_quantile_past_the_last_finite_bucket_is_that_bound() {
        let scrape = Scrape::parse(
            "k2_commit_duration_seconds_bucket{le=\"10\"} 1\nk2_commit_duration_seconds_bucket{le=\"+Inf\"} 2\n",
        );
        assert_eq!(scrape.commit_quantile(0.99), Some(10.0));
    }

    #[test]
    fn a_summary_gives_its_quantiles_as_rendered() {
        let scrape = Scrape::parse(
            "k2_commit_duration_seconds{quantile=\"0.5\"} 0.031\nk2_commit_duration_seconds{quantile=\"0.99\"} 0.2\n",
        );
        assert_eq!(scrape.commit_quantile(0.5), Some(0.031));
        assert_eq!(scrape.commit_quantile(0.99), Some(0.2));
    }

    #[test]
    fn workloads_generate_the_advertised_ids_and_popularity() {
        use crate::loadgen::{TradeGenerator, message_profile};

        let canonical = generator_params(Workload::Canonical, 2_000, Popularity::Uniform);
        let message = TradeGenerator::new(canonical.clone()).next_message(0);
        let (exchange, symbol, id) = message.trade.expect("a valid trade");
        assert_eq!(exchange, CANONICAL_EXCHANGE);
        assert_eq!(id, format!("{symbol}-000000001"));
        let uniform = message_profile(&canonical).hottest_key_share;
        assert!(uniform < 0.002, "uniform over 2,000 symbols, hottest {uniform}");

        let binance = generator_params(Workload::Binance, 2_000, Popularity::Zipf);
        let message = TradeGenerator::new(binance.clone()).next_message(0);
        let payload = String::from_utf8(message.payload).unwrap();
        assert!(payload.starts_with(r#"{"e":"trade""#), "{payload}");
        assert_eq!(message.trade.expect("a valid trade").2, "1");
        let zipf = message_profile(&binance).hottest_key_share;
        assert!(zipf > 0.1, "zipf: a few symbols dominate, hottest {zipf}");
    }
}
