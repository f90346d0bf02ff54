//! The `k2` binary: run the pipeline, run the embedded demo, run a broker,
//! generate load, benchmark, backfill what load shedding deferred.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use k2::backfill::BackfillOptions;
use k2::config::K2Config;
use k2::embedded::EmbeddedBroker;
use k2::loadgen::{Burst, GeneratorParams, LoadgenParams, Ramp, RateShape, run_loadgen};
use k2::service::{self, ServiceOptions};

/// jemalloc for the whole process: with `unprefixed_malloc_on_supported_platforms`
/// it also serves librdkafka's C allocations. Under glibc's malloc a message's
/// op, allocated on librdkafka's broker thread and freed on a lane's, took the
/// broker thread's arena lock, and lanes slept on it (docs/perf.md, round nine).
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// K2 ingests market data (trades) from Kafka into Apache Iceberg tables,
/// exactly once, through supervised actor lanes.
#[derive(Parser)]
#[command(name = "k2", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline against the Kafka and catalog named in the config
    /// (with `kafka.brokers = "embedded"`, an in-process broker and load generator).
    Run {
        /// Config file (TOML). Every key can be overridden with K2_<SECTION>__<KEY>.
        #[arg(long, short, env = "K2_CONFIG", default_value = "config/k2.toml")]
        config: PathBuf,
    },
    /// Run the embedded demo: in-process broker, load generator, pipeline, HTTP on
    /// 127.0.0.1:8080. Stops after --duration (or Ctrl-C), commits, and prints a verdict:
    /// produced, committed, dead-lettered, duplicates, lost. With a scenario, a real fault is
    /// injected at a quarter of the run and the scenario's checks join the verdict; the exit
    /// status is 0 only when the verdict holds.
    Demo {
        /// A failure demo to run; none: the plain demo.
        #[arg(value_enum)]
        scenario: Option<k2::demo::Scenario>,
        /// With a scenario: plain progress lines instead of the live terminal view (which is also
        /// left out when stdout is not a terminal, and for kill-restart). Logs go to
        /// <dir>/k2-demo.log while the view is up.
        #[arg(long)]
        no_tui: bool,
        /// Config file; the demo forces the embedded broker and load generator.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Trades per second produced by the load generator.
        #[arg(long)]
        rate: Option<u64>,
        /// Seconds to run before the final commit and verdict (0 = until Ctrl-C).
        #[arg(long, default_value_t = 30)]
        duration: u64,
        /// Directory for the catalog and warehouse (created if missing).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// HTTP listen address.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Run librdkafka's mock Kafka cluster as a process of its own and print its
    /// bootstrap address, so `k2 run`, `k2 loadgen` and kcat can share it.
    Broker {
        /// Topic to create, as NAME or NAME:PARTITIONS (repeatable).
        #[arg(long = "topic", default_value = "market.trades.raw:8")]
        topics: Vec<String>,
    },
    /// Produce generated trades (several exchanges, Zipf-distributed symbols,
    /// random-walk prices) to any Kafka.
    Loadgen {
        /// Bootstrap servers, e.g. 127.0.0.1:9092.
        #[arg(long)]
        brokers: String,
        #[arg(long, default_value = "market.trades.raw")]
        topic: String,
        /// Messages per second (0 = as fast as possible).
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        /// Ramp linearly from --rate to this rate over --ramp-secs, then hold it.
        #[arg(long, requires = "ramp_secs")]
        ramp_to: Option<u64>,
        /// Seconds the ramp takes.
        #[arg(long, requires = "ramp_to")]
        ramp_secs: Option<f64>,
        /// Burst to this rate for --burst-secs once every --burst-every seconds.
        #[arg(long, requires_all = ["burst_secs", "burst_every"])]
        burst_rate: Option<u64>,
        /// Seconds each burst lasts.
        #[arg(long, requires = "burst_rate")]
        burst_secs: Option<f64>,
        /// Seconds from one burst to the next (the first comes this long after the start).
        #[arg(long, requires = "burst_rate")]
        burst_every: Option<f64>,
        /// Seconds to run (0 = until --total or Ctrl-C).
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Stop after this many messages.
        #[arg(long)]
        total: Option<u64>,
        /// Append every acknowledged valid trade to this file, one line each:
        /// exchange,symbol,trade_id,priority,partition,offset. A reference-data update's line has
        /// `reference` for a trade id and priority LOW.
        #[arg(long)]
        ids_file: Option<PathBuf>,
        /// K2 config file whose [shedding] tiers give each trade its priority in --ids-file
        /// (default: K2's default tiers).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Sequence number (and Binance trade id) of each symbol's first trade. Default: this
        /// run's own space, above every earlier run's (milliseconds since the epoch × 1000 + 1),
        /// so a second run repeats no trade id; K2 records the jump between runs as one gap per
        /// symbol.
        #[arg(long)]
        start_sequence: Option<i64>,
        /// Fraction of deliberately malformed messages (0..1).
        #[arg(long, default_value_t = 0.0)]
        malformed_ratio: f64,
        /// Fraction of messages that repeat the previous valid trade (0..1); K2 keeps one.
        #[arg(long, default_value_t = 0.0)]
        duplicate_ratio: f64,
        /// Fraction of valid trades whose symbol skips a sequence number first (0..1); K2 records
        /// the gap.
        #[arg(long, default_value_t = 0.0)]
        gap_ratio: f64,
        /// Fraction of messages that are reference-data updates (0..1): K2 stores them in
        /// market.reference, and sheds them first (LOW priority) under load.
        #[arg(long, default_value_t = 0.0)]
        reference_share: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Ingest what load shedding left out of the trades table: read the offsets recorded in
    /// k2.shed_ledger back from Kafka and commit the trades the table does not hold yet, then
    /// close each entry in the ledger. Safe to rerun and to run beside `k2 run`.
    Backfill {
        /// Config file (TOML) of the pipeline whose shedding to backfill.
        #[arg(long, short, env = "K2_CONFIG", default_value = "config/k2.toml")]
        config: PathBuf,
        /// List the open entries and count what they hold (and what Kafka no longer holds of
        /// them); change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Run one table-maintenance pass now: merge manifests, compact small files, expire old
    /// snapshots and delete the files only they referenced, delete old metadata and orphans.
    /// Safe beside a running `k2 run` (its commits and this one's retry against each other).
    Maintain {
        /// Config file (TOML) of the pipeline whose tables to maintain (`[catalog]`, `[maintenance]`).
        #[arg(long, short, env = "K2_CONFIG", default_value = "config/k2.toml")]
        config: PathBuf,
        /// Print the report as one JSON object on the last line.
        #[arg(long)]
        json: bool,
    },
    /// Read-only SQL over market.trades, market.reference, k2.* and `live` (the rows consumed
    /// and not yet committed). Asks the K2 listening at http.listen (or --server); with none
    /// running, reads the catalog directly (committed rows only). Prints a table.
    Query {
        /// The query, e.g. "SELECT symbol, count(*) FROM market.trades GROUP BY symbol".
        sql: String,
        /// Config file: `[http] listen` says where K2 runs, `[catalog]` where the tables are.
        #[arg(long, short, env = "K2_CONFIG", default_value = "config/k2.toml")]
        config: PathBuf,
        /// Base URL of a running K2, e.g. http://127.0.0.1:8080.
        #[arg(long, conflicts_with = "direct")]
        server: Option<String>,
        /// Read the catalog directly even if a K2 is running (committed rows only).
        #[arg(long)]
        direct: bool,
    },
    /// End-to-end benchmark on the embedded broker: the steady rate of `k2 run` (its own
    /// process) against a raw consumer over the same preloaded trades, plus its join, tail,
    /// CPU per trade, peak RSS and commit latency. Build with --release for meaningful numbers.
    Bench {
        /// What the preloaded trades look like: canonical JSON with ids without order
        /// (`SYMBOL-000000123`), or Binance trade events with numeric per-symbol ids.
        #[arg(long, value_enum, default_value_t = k2::bench::Workload::Canonical)]
        workload: k2::bench::Workload,
        /// Symbols the trades are spread over (one exchange); default 2000, 200 with --queries.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        symbols: Option<u32>,
        /// How trades are spread over the symbols.
        #[arg(long, value_enum, default_value_t = k2::bench::Popularity::Uniform)]
        popularity: k2::bench::Popularity,
        /// Messages to preload and ingest.
        #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
        messages: u64,
        /// Partitions; trades are keyed by symbol (the mock broker keeps ~5 MiB per partition,
        /// so keep the fullest partition under ~25k trades).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(i32).range(1..))]
        partitions: i32,
        /// Timed runs of both the raw consumer and `k2 run` over the same
        /// preloaded messages; the figures are medians.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        runs: u32,
        /// Config file for `k2 run` (pipeline tuning; the Kafka, catalog and HTTP settings
        /// are the bench's own).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The `k2` binary to run as the pipeline (default: this one). To compare two builds
        /// over the same preloaded messages and the same raw consumer, in one run.
        #[arg(long)]
        k2_binary: Option<PathBuf>,
        /// Measure produce -> durable latency instead: produce this many messages a second to an
        /// empty topic while `k2 run` ingests them (--messages and --runs do not apply).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        rate: Option<u64>,
        /// With --rate: how long the load runs, in seconds. With --queries: how long each phase
        /// (ingestion alone, then with queries) runs.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
        seconds: u64,
        /// Measure hybrid queries instead: a history of --history trades over --days written
        /// into the table, then `k2 run` ingesting at --rate (default 20000) while the 15-minute
        /// recent query and a day of 1-minute OHLCV run back to back; their p50/p99 and the
        /// durable rate with and without queries.
        #[arg(long)]
        queries: bool,
        /// With --queries: trades in the table before K2 starts.
        #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..), requires = "queries")]
        history: u64,
        /// With --queries: days the history covers, ending now.
        #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..8), requires = "queries")]
        days: u32,
        /// With --queries: write every query of the query phase to this CSV file (when asked,
        /// which query, wall ms, rows, live rows, K2's phases) and `k2 run`'s log beside it
        /// (`<name>.k2-run.log`), to set slow queries against what K2 was doing.
        #[arg(long, requires = "queries")]
        timeline: Option<PathBuf>,
        /// Print the figures (medians and every run) as one JSON object on the last line.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let log_file = match &cli.command {
        Command::Demo {
            scenario,
            no_tui,
            dir,
            ..
        } if live_view(*scenario, *no_tui) => Some(dir.join("k2-demo.log")),
        _ => None,
    };
    init_tracing(log_file.as_deref());
    let system = actix_rt::System::new();
    let result = system.block_on(run(cli));
    if let Err(err) = result {
        eprintln!("k2: error: {err:#}");
        std::process::exit(1);
    }
}

/// Without `K2_LOG`: warnings, K2's own progress, and not the one line rdkafka
/// logs when it closes an already closed consumer (see `kafka::leave_group`).
const DEFAULT_LOG_FILTER: &str = "warn,k2=info,rdkafka::consumer::base_consumer=off";

/// Logs go to stderr, or to `file` (the live view owns the terminal).
fn init_tracing(file: Option<&std::path::Path>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("K2_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let opened = file.and_then(|path| {
        let _ = std::fs::create_dir_all(path.parent()?);
        std::fs::File::create(path).ok()
    });
    match opened {
        Some(log) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(log))
            .init(),
        // Colours only on a terminal: a log file or a pipe gets plain text.
        None => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init(),
    }
}

/// Whether `k2 demo` draws the live view: a scenario run in this process,
/// asked for, on a terminal.
fn live_view(scenario: Option<k2::demo::Scenario>, no_tui: bool) -> bool {
    scenario.is_some_and(|s| s != k2::demo::Scenario::KillRestart)
        && !no_tui
        && std::io::IsTerminal::is_terminal(&std::io::stdout())
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<K2Config> {
    K2Config::load(path).map_err(|err| anyhow::anyhow!("{err}"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let config = load_config(Some(&config))?;
            service::run(ServiceOptions {
                config,
                base_dir: std::env::current_dir()?,
                duration: None,
                progress: true,
                verdict: false,
                scenario: None,
                live_view: false,
            })
            .await?;
        }
        Command::Demo {
            scenario,
            no_tui,
            config,
            rate,
            duration,
            dir,
            listen,
        } => {
            let config_path = config.clone();
            let mut config = load_config(config.as_deref())?;
            config.kafka.brokers = k2::config::EMBEDDED_BROKERS.to_string();
            config.loadgen.enabled = true;
            if let Some(rate) = rate {
                config.loadgen.rate = rate;
            }
            if let Some(listen) = listen {
                config.http.listen = listen;
            }
            if scenario.is_some() && duration == 0 {
                anyhow::bail!(
                    "a demo scenario needs a --duration above 0: its fault comes at a quarter of it"
                );
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
            eprintln!(
                "k2 demo{}: embedded broker, {} trades/s, {}; Ctrl-C stops early",
                scenario.map_or(String::new(), |s| format!(" {}", s.name())),
                config.loadgen.rate,
                if duration == 0 {
                    "until Ctrl-C".to_string()
                } else {
                    format!("{duration} s")
                }
            );
            let setup = k2::demo::DemoSetup {
                config,
                config_file: config_path,
                dir: dir.canonicalize()?,
                run: (duration > 0).then(|| Duration::from_secs(duration)),
                binary: std::env::current_exe().context("cannot find the k2 binary to run as a child")?,
                live_view: live_view(scenario, no_tui),
            };
            if scenario == Some(k2::demo::Scenario::Tour) {
                let acts = k2::tour::run(&setup).await?;
                let failed: Vec<&str> = acts
                    .iter()
                    .filter(|a| !a.held())
                    .map(|a| a.name.as_str())
                    .collect();
                if !failed.is_empty() {
                    anyhow::bail!("the tour's verdict failed in: {}", failed.join(", "));
                }
                return Ok(());
            }
            let verdict = k2::demo::run_scenario(&setup, scenario).await?;
            if let Some(verdict) = verdict
                && !verdict.holds()
            {
                let failed = verdict.checks.iter().filter(|c| !c.held).count();
                anyhow::bail!(
                    "the demo lost {} trades to retention and {} otherwise, with {} duplicates; {failed} scenario checks failed",
                    verdict.lost_to_retention,
                    verdict.lost,
                    verdict.duplicates
                );
            }
        }
        Command::Broker { topics } => {
            let topics = topics
                .iter()
                .map(|t| parse_topic(t))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let broker = EmbeddedBroker::start(&topics)?;
            println!("{}", broker.bootstrap_servers());
            eprintln!(
                "k2 broker: mock Kafka cluster on {} with {}; Ctrl-C stops it",
                broker.bootstrap_servers(),
                topics
                    .iter()
                    .map(|(t, p)| format!("{t} ({p} partitions)"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            service::shutdown_signal().await;
        }
        Command::Loadgen {
            brokers,
            topic,
            rate,
            ramp_to,
            ramp_secs,
            burst_rate,
            burst_secs,
            burst_every,
            duration,
            total,
            ids_file,
            config,
            start_sequence,
            malformed_ratio,
            duplicate_ratio,
            gap_ratio,
            reference_share,
            seed,
        } => {
            let tiers = match &config {
                Some(path) => k2::shedding::TierTable::new(&load_config(Some(path))?.shedding),
                None => Default::default(),
            };
            // Written so that NaN fails too; the generator's own check would name reference_ratio.
            if !(0.0..=1.0).contains(&reference_share) {
                anyhow::bail!("--reference-share must be between 0 and 1, got {reference_share}");
            }
            let first_sequence = start_sequence
                .unwrap_or_else(|| k2::loadgen::run_start_sequence(std::time::SystemTime::now()));
            let seconds = |name: &str, s: f64| {
                Duration::try_from_secs_f64(s)
                    .map_err(|_| anyhow::anyhow!("{name} must be a number of seconds >= 0, got {s}"))
            };
            let shape = RateShape {
                ramp: match (ramp_to, ramp_secs) {
                    (Some(to), Some(s)) => Some(Ramp {
                        to,
                        over: seconds("--ramp-secs", s)?,
                    }),
                    _ => None,
                },
                burst: match (burst_rate, burst_secs, burst_every) {
                    (Some(rate), Some(lasting), Some(every)) => Some(Burst {
                        rate,
                        lasting: seconds("--burst-secs", lasting)?,
                        every: seconds("--burst-every", every)?,
                    }),
                    _ => None,
                },
            };
            let params = LoadgenParams {
                brokers,
                topic,
                rate,
                shape,
                duration: (duration > 0).then(|| Duration::from_secs(duration)),
                total,
                ids_file,
                tiers,
                generator: GeneratorParams {
                    seed,
                    malformed_ratio,
                    duplicate_ratio,
                    gap_ratio,
                    reference_ratio: reference_share,
                    first_sequence,
                    ..GeneratorParams::default()
                },
                progress: true,
            };
            params
                .generator
                .validate()
                .context("invalid load generator parameters")?;
            eprintln!(
                "k2 loadgen: each symbol's sequence numbers and Binance trade ids start at {first_sequence}"
            );
            let report = run_loadgen(params, async {
                service::shutdown_signal().await;
            })
            .await?;
            println!(
                "k2 loadgen: produced {} ({} malformed, {} duplicates, {} reference data; {} sequence numbers skipped), {} failed, in {:.1} s",
                report.produced,
                report.malformed,
                report.duplicates,
                report.reference,
                report.gaps,
                report.failed,
                report.elapsed.as_secs_f64()
            );
        }
        Command::Backfill {
            config: path,
            dry_run,
        } => {
            let config = load_config(Some(&path))?;
            if config.kafka.is_embedded() {
                anyhow::bail!(
                    "{}: kafka.brokers is \"embedded\", and an embedded broker lives only inside the K2 \
                     process that started it: no other process can read the shed records back from it. \
                     Set kafka.brokers (or K2_KAFKA__BROKERS) to the bootstrap servers that hold topic {}",
                    path.display(),
                    config.kafka.topic
                );
            }
            let options = BackfillOptions {
                dry_run,
                progress: true,
            };
            let report =
                k2::backfill::backfill(&config, &config.kafka.brokers, &std::env::current_dir()?, options)
                    .await?;
            k2::backfill::print_report(&report);
        }
        Command::Maintain { config: path, json } => {
            let config = load_config(Some(&path))?;
            let report = k2::maintain::maintain(&config, &std::env::current_dir()?, !json).await?;
            k2::maintain::print_report(&report);
            if json {
                println!("{}", serde_json::to_string(&report)?);
            }
            if report.end == k2::storage::maintenance::PassEnd::Failed {
                anyhow::bail!("table maintenance failed for at least one table (see above)");
            }
        }
        Command::Query {
            sql,
            config: path,
            server,
            direct,
        } => {
            let config = load_config(Some(&path))?;
            let answer = k2::query::cli::query(
                &config,
                &std::env::current_dir()?,
                &sql,
                server.as_deref(),
                direct,
            )
            .await?;
            println!("{}", k2::query::cli::render(&answer)?);
        }
        Command::Bench {
            workload,
            symbols,
            popularity,
            messages,
            partitions,
            runs,
            config,
            k2_binary,
            rate,
            seconds,
            queries,
            history,
            days,
            timeline,
            json,
        } => {
            if cfg!(debug_assertions) {
                eprintln!("k2 bench: warning: this is a debug build; use `cargo run --release -- bench`");
            }
            let k2_binary = match k2_binary {
                Some(path) => std::path::absolute(path)?,
                None => std::env::current_exe().context("failed to find the k2 binary")?,
            };
            let dir = tempfile_dir()?;
            if queries {
                let report = k2::bench::query::run(
                    k2::bench::query::QueryBenchParams {
                        history,
                        days,
                        symbols: symbols.unwrap_or(200),
                        partitions,
                        rate: rate.unwrap_or(20_000),
                        seconds,
                        k2_binary,
                        timeline: timeline.map(std::path::absolute).transpose()?,
                    },
                    &dir,
                )
                .await;
                return bench_done(&dir, report, k2::bench::query::print_report, json);
            }
            let symbols = symbols.unwrap_or(2_000);
            if let Some(rate) = rate {
                let report = k2::bench::latency::run(
                    k2::bench::latency::LatencyParams {
                        workload,
                        symbols,
                        popularity,
                        partitions,
                        rate,
                        seconds,
                        config_file: config,
                        k2_binary,
                    },
                    &dir,
                )
                .await;
                return bench_done(&dir, report, k2::bench::latency::print_report, json);
            }
            let report = k2::bench::run(
                k2::bench::BenchParams {
                    workload,
                    symbols,
                    popularity,
                    messages,
                    partitions,
                    runs,
                    config_file: config,
                    k2_binary,
                },
                &dir,
            )
            .await;
            return bench_done(&dir, report, k2::bench::print_report, json);
        }
    }
    Ok(())
}

/// Removes the bench's directory, then prints the report (and with
/// `--json`, the report as one JSON object on the last line).
fn bench_done<R: serde::Serialize>(
    dir: &std::path::Path,
    report: anyhow::Result<R>,
    print: fn(&R),
    json: bool,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    let report = report?;
    print(&report);
    if json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn parse_topic(spec: &str) -> anyhow::Result<(String, i32)> {
    match spec.split_once(':') {
        None => Ok((spec.to_string(), 1)),
        Some((name, partitions)) => {
            let partitions: i32 = partitions
                .parse()
                .ok()
                .filter(|p| *p > 0)
                .with_context(|| format!("--topic {spec}: partitions must be a positive integer"))?;
            if name.is_empty() {
                anyhow::bail!("--topic {spec}: the topic name is empty");
            }
            Ok((name.to_string(), partitions))
        }
    }
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("k2-bench-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    Ok(dir)
}
