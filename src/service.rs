//! Runs K2 as a service: the embedded broker and load generator when the
//! config says `brokers = "embedded"`, the pipeline, the HTTP server and a
//! one-line progress display, until Ctrl-C (or the demo's duration); then a
//! final commit. `k2 run` and `k2 demo` are both this.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use tracing::{info, warn};

use crate::config::K2Config;
use crate::embedded::EmbeddedBroker;
use crate::loadgen::{GeneratorParams, LoadgenParams, LoadgenReport, run_loadgen};
use crate::pipeline::{self, Pipeline, PipelineParams};
use crate::shedding::LedgerAction;
use crate::storage::reader::{committed_record_count, scan_dead_letters, scan_shed_ledger, scan_trade_keys};
use crate::web::{self, AppState};

pub struct ServiceOptions {
    pub config: K2Config,
    pub base_dir: PathBuf,
    /// Stop by itself after this long (the demo); None = until Ctrl-C.
    pub duration: Option<Duration>,
    pub progress: bool,
    /// Print the verdict table (produced / committed / dead-lettered /
    /// duplicates / lost) at the end. Embedded mode only.
    pub verdict: bool,
}

/// What the verdict table shows.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Verdict {
    pub produced: u64,
    pub produced_valid: u64,
    pub committed_rows: u64,
    pub distinct_trades: u64,
    pub dead_lettered: u64,
    /// Records shed by load shedding and recorded in `k2.shed_ledger`, not
    /// yet backfilled: deferred, not lost.
    pub shed_ledgered: u64,
    pub duplicates: u64,
    /// Records Kafka deleted before K2 read them, each range reported in
    /// `k2.dead_letters` (retention outran the lag).
    pub lost_to_retention: u64,
    /// Records still in Kafka past the table's offsets: the demo stopped
    /// before K2 read them (it waits up to a minute after the generator
    /// stops). Shown apart from losses: against an external Kafka the next
    /// run reads them; the embedded broker ends with the demo.
    pub unread_in_kafka: u64,
    /// Produced trades that are nowhere: not committed, not shed, not lost
    /// to retention, not waiting in Kafka. Anything here is a bug.
    pub lost: u64,
    /// Rows of `k2.sequence_gaps` (gaps and resets).
    pub sequence_events: u64,
    /// Rows of `k2.probable_duplicates`.
    pub probable_duplicates: u64,
}

pub async fn run(options: ServiceOptions) -> anyhow::Result<Option<Verdict>> {
    let config = options.config.clone();
    let handle = crate::metrics::install();
    let embedded = config.kafka.is_embedded();
    let partitions = embedded.then(|| embedded_partitions(&config));
    let broker = if let Some(partitions) = partitions {
        let broker = EmbeddedBroker::start(&[(config.kafka.topic.clone(), partitions)])?;
        info!(
            bootstrap = broker.bootstrap_servers(),
            "embedded Kafka broker started"
        );
        Some(broker)
    } else {
        None
    };
    let brokers = broker.as_ref().map_or(config.kafka.brokers.clone(), |b| {
        b.bootstrap_servers().to_string()
    });

    let pipeline = pipeline::start(PipelineParams {
        config: config.clone(),
        brokers: brokers.clone(),
        base_dir: options.base_dir.clone(),
        instance: instance_name(),
    })
    .await?;
    let (server, addr) = web::serve(
        AppState {
            supervisor: pipeline.supervisor.clone(),
            metrics: handle,
            catalog: pipeline.catalog.clone(),
            tables: pipeline.tables.clone(),
            maintenance: pipeline.maintenance.clone(),
            api_key: config.http.mutation_key().map(str::to_string),
        },
        &config.http.listen,
    )?;
    let server_handle = server.handle();
    actix_rt::spawn(server);
    info!(%addr, "HTTP control plane listening");
    eprintln!("k2: HTTP on http://{addr} (/health /ready /metrics /v1/pipeline /v1/degradation)");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ids_file = options.base_dir.join("data").join("produced-trade-ids.csv");
    let loadgen = if let Some(partitions) = partitions.filter(|_| config.loadgen.enabled) {
        wait_for_lanes(&pipeline, partitions as usize, Duration::from_secs(60)).await;
        if options.verdict {
            std::fs::create_dir_all(ids_file.parent().expect("has a parent"))?;
            let _ = std::fs::remove_file(&ids_file);
        }
        let params = LoadgenParams {
            brokers,
            topic: config.kafka.topic.clone(),
            rate: config.loadgen.rate,
            duration: None,
            total: None,
            ids_file: options.verdict.then(|| ids_file.clone()),
            generator: GeneratorParams {
                seed: config.loadgen.seed,
                malformed_ratio: config.loadgen.malformed_ratio,
                ..GeneratorParams::default()
            },
            progress: false,
        };
        Some(actix_rt::spawn(run_loadgen(params, async move {
            let _ = stop_rx.await;
        })))
    } else {
        None
    };

    let progress = options.progress.then(|| {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}").expect("static template"),
        );
        bar
    });
    let deadline = options.duration.map(|d| Instant::now() + d);
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let stop_signal = shutdown_signal();
    tokio::pin!(stop_signal);
    loop {
        tokio::select! {
            signal = &mut stop_signal => {
                eprintln!("\nk2: {signal} received, committing what was consumed and stopping");
                break;
            }
            _ = ticker.tick() => {
                if let Some(bar) = &progress
                    && let Ok(status) = pipeline.status().await {
                        bar.set_message(progress_line(&status, started.elapsed()));
                        bar.tick();
                    }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
        }
    }

    let _ = stop_tx.send(());
    let report: Option<LoadgenReport> = match loadgen {
        Some(task) => match task.await {
            Ok(Ok(report)) => Some(report),
            Ok(Err(err)) => {
                warn!(error = %err, "load generator failed");
                None
            }
            Err(err) => {
                warn!(error = %err, "load generator task failed");
                None
            }
        },
        None => None,
    };
    if options.verdict && report.is_some() {
        // Let the lanes drain what the generator produced before the final commit.
        wait_until_caught_up(&pipeline, Duration::from_secs(60)).await;
    }
    // Where each partition ends: with the generator stopped, what lies
    // between the table's offsets and these was not read before the stop.
    let log_ends: std::collections::BTreeMap<i32, i64> = match pipeline.status().await {
        Ok(status) => status
            .lanes
            .iter()
            .filter_map(|l| Some((l.partition, l.high_watermark?)))
            .collect(),
        Err(_) => Default::default(),
    };
    let verdict_inputs = (pipeline.catalog.clone(), pipeline.tables.clone(), log_ends);
    pipeline.shutdown().await.context("shutdown failed")?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    server_handle.stop(true).await;
    drop(broker);

    match (options.verdict, report) {
        (true, Some(report)) => {
            let (catalog, tables, log_ends) = verdict_inputs;
            let topic = &config.kafka.topic;
            let verdict = verdict(&report, &ids_file, catalog.as_ref(), &tables, topic, &log_ends).await?;
            print_verdict(&verdict);
            Ok(Some(verdict))
        }
        _ => Ok(None),
    }
}

/// Partitions of the embedded topic: enough for the load generator's rate to
/// leave K2 `kafka.embedded_lag_budget_s` of lag before the broker's
/// retention drops unread records, with a warning when even the most
/// partitions the embedded broker takes cannot.
fn embedded_partitions(config: &K2Config) -> i32 {
    let minimum = config.kafka.embedded_partitions;
    if !config.loadgen.enabled {
        return minimum;
    }
    let profile = crate::loadgen::message_profile(&GeneratorParams {
        seed: config.loadgen.seed,
        malformed_ratio: config.loadgen.malformed_ratio,
        ..GeneratorParams::default()
    });
    let load = crate::embedded::TopicLoad {
        rate: config.loadgen.rate,
        record_bytes: profile.average_bytes + crate::supervision::RECORD_OVERHEAD_BYTES,
        hottest_key_share: profile.hottest_key_share,
    };
    let budget = config.kafka.embedded_lag_budget_s as f64;
    let sizing = crate::embedded::size_topic(load, budget, minimum);
    if sizing.partitions > minimum {
        info!(
            partitions = sizing.partitions,
            rate = config.loadgen.rate,
            lag_budget_s = budget,
            "embedded topic sized for the load generator's rate"
        );
    }
    if !sizing.holds_budget {
        let hottest = format!("{:.0}%", 100.0 * profile.hottest_key_share);
        warn!(
            rate = config.loadgen.rate,
            partitions = sizing.partitions,
            hottest_key_share = hottest,
            retained_lag_s = format!("{:.1}", sizing.lag_budget_s),
            "at this rate the embedded broker retains only this much lag on its fullest partition (5 MiB per \
             partition); if K2 falls further behind, it sheds by priority, and what the broker drops unread \
             is reported as lost to retention"
        );
        eprintln!(
            "k2: warning: at {} trades/s the embedded broker retains {:.1} s of lag on its fullest partition \
             (5 MiB a partition, {} partitions, the most popular symbol {hottest} of the trades), less than \
             kafka.embedded_lag_budget_s = {}; K2 sheds by priority to stay inside it, and reports anything \
             the broker drops unread",
            config.loadgen.rate, sizing.lag_budget_s, sizing.partitions, budget
        );
    }
    sizing.partitions
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM (what `docker stop` and Kubernetes
/// send), naming the signal.
pub async fn shutdown_signal() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops K2 cleanly");
            let _ = tokio::signal::ctrl_c().await;
            return "Ctrl-C";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        _ = term.recv() => "SIGTERM",
    }
}

/// Waits until every lane's committed offset reaches its high watermark.
/// Holds the load generator until every partition of the embedded topic has
/// a lane: trades produced during the group join would pile up unread, and
/// on the fullest partition the broker's retention could delete them before
/// any lane began (a lane owes only what its partition holds when it starts).
async fn wait_for_lanes(pipeline: &Pipeline, partitions: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(status) = pipeline.status().await
            && status.lanes.len() >= partitions
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    warn!(
        partitions,
        "not every partition had a lane within {limit:?}; starting the load generator anyway"
    );
}

async fn wait_until_caught_up(pipeline: &Pipeline, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut previous_positions = None;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(status) = pipeline.status().await else {
            continue;
        };
        let positions: Vec<_> = status
            .lanes
            .iter()
            .map(|l| (l.position, l.high_watermark))
            .collect();
        // A lane with no position read nothing: caught up only while its
        // partition is empty (keys may leave some partitions without records).
        let caught_up = !status.lanes.is_empty()
            && status.lanes.iter().all(|l| match (l.position, l.high_watermark) {
                (Some(position), Some(high)) => position >= high,
                (None, Some(high)) => high == 0,
                (_, None) => false,
            });
        if caught_up && previous_positions.as_ref() == Some(&positions) {
            return;
        }
        previous_positions = Some(positions);
    }
    warn!("lanes did not catch up within {limit:?}; committing what was consumed");
}

fn progress_line(status: &crate::actors::supervisor::PipelineStatus, elapsed: Duration) -> String {
    let consumed: u64 = status.lanes.iter().map(|l| l.consumed).sum();
    let lag: i64 = status.lanes.iter().filter_map(|l| l.lag).sum();
    let rate = consumed as f64 / elapsed.as_secs_f64().max(0.001);
    format!(
        "{} | lanes {} | consumed {consumed} ({rate:.0}/s) | committed {} rows in {} commits | dead letters {} | lag {lag} | restarts {}",
        status.degradation_level,
        status.lanes.len(),
        status.committer.rows_committed,
        status.committer.commits,
        status.committer.dead_letters_committed,
        status.lane_restarts,
    )
}

async fn verdict(
    report: &LoadgenReport,
    ids_file: &std::path::Path,
    catalog: &dyn iceberg::Catalog,
    tables: &crate::storage::tables::TableIdents,
    topic: &str,
    log_ends: &std::collections::BTreeMap<i32, i64>,
) -> anyhow::Result<Verdict> {
    let produced_ids = std::fs::read_to_string(ids_file)
        .with_context(|| format!("failed to read {}", ids_file.display()))?;
    let produced: HashSet<&str> = produced_ids.lines().filter(|l| !l.is_empty()).collect();
    let trades = catalog.load_table(&tables.trades).await?;
    let keys = scan_trade_keys(&trades).await?;
    let recorded = crate::storage::offsets::TopicOffsets::from_table(&trades, topic)?;
    let unread: u64 = log_ends
        .iter()
        .map(|(p, end)| (end - recorded.next_offset(*p).unwrap_or(0)).max(0) as u64)
        .sum();
    let committed: HashSet<String> = keys.keys.iter().map(|(e, s, t)| format!("{e},{s},{t}")).collect();
    let dead_letters = catalog.load_table(&tables.dead_letters).await?;
    let lost_to_retention: u64 = scan_dead_letters(&dead_letters)
        .await?
        .iter()
        .filter_map(|row| retention_loss(&row.reason))
        .sum();
    let sequence_events = catalog.load_table(&tables.sequence_gaps).await?;
    let probable_duplicates = catalog.load_table(&tables.probable_duplicates).await?;
    let ledger = scan_shed_ledger(&catalog.load_table(&tables.shed_ledger).await?).await?;
    let closed: HashSet<&str> = ledger
        .iter()
        .filter(|e| e.action == LedgerAction::Backfilled)
        .map(|e| e.entry_id.as_str())
        .collect();
    let mut open = HashSet::new();
    let shed_ledgered: u64 = ledger
        .iter()
        .filter(|e| e.action == LedgerAction::Shed && !closed.contains(e.entry_id.as_str()))
        .filter(|e| open.insert(e.entry_id.as_str()))
        .map(|e| e.records)
        .sum();
    let missing = produced.iter().filter(|id| !committed.contains(**id)).count() as u64;
    Ok(Verdict {
        produced: report.produced,
        produced_valid: produced.len() as u64,
        committed_rows: keys.keys.len() as u64,
        distinct_trades: committed.len() as u64,
        dead_lettered: committed_record_count(&dead_letters),
        shed_ledgered,
        duplicates: (keys.keys.len() - committed.len()) as u64,
        lost_to_retention,
        unread_in_kafka: unread,
        // A shed trade is missing from the table on purpose, and ledgered; a
        // trade lost to retention is missing and reported; one not read
        // before the demo stopped is still in Kafka.
        lost: missing.saturating_sub(shed_ledgered + lost_to_retention + unread),
        sequence_events: committed_record_count(&sequence_events),
        probable_duplicates: committed_record_count(&probable_duplicates),
    })
}

/// The records a retention dead letter reports lost: its reason reads
/// "retention: Kafka deleted offsets [from, to) (N records) ...".
fn retention_loss(reason: &str) -> Option<u64> {
    let rest = reason.strip_prefix("retention: ")?;
    let count = rest.split_once(") (")?.1.split_once(" records")?.0;
    count.parse().ok()
}

impl Verdict {
    /// Whether anything produced is neither committed, nor deferred by
    /// shedding, nor a dead letter that failed decoding.
    pub fn lost_anything(&self) -> bool {
        self.lost > 0 || self.lost_to_retention > 0
    }
}

pub fn print_verdict(v: &Verdict) {
    use std::io::IsTerminal as _;
    let colour = std::io::stdout().is_terminal();
    let (red, green, plain) = if colour {
        ("\x1b[31m", "\x1b[32m", "\x1b[0m")
    } else {
        ("", "", "")
    };
    let mark = |bad: bool| if bad { red } else { green };
    println!();
    println!("  verdict                    records");
    println!("  ------------------------- --------");
    println!("  produced                   {:>8}", v.produced);
    println!("    valid trades             {:>8}", v.produced_valid);
    println!("  committed rows             {:>8}", v.committed_rows);
    println!("  distinct trades committed  {:>8}", v.distinct_trades);
    println!("  dead-lettered              {:>8}", v.dead_lettered);
    println!("  shed (ledgered)            {:>8}", v.shed_ledgered);
    println!(
        "  unread in Kafka            {:>8}  (the demo stopped before K2 read them)",
        v.unread_in_kafka
    );
    println!(
        "{}  duplicates                 {:>8}{plain}",
        mark(v.duplicates > 0),
        v.duplicates
    );
    println!(
        "{}  lost to retention          {:>8}{plain}  (reported in k2.dead_letters)",
        mark(v.lost_to_retention > 0),
        v.lost_to_retention
    );
    println!(
        "{}  lost, unexplained          {:>8}{plain}",
        mark(v.lost > 0),
        v.lost
    );
    println!("  sequence gaps and resets   {:>8}", v.sequence_events);
    println!("  probable duplicates        {:>8}", v.probable_duplicates);
    println!();
    if v.lost_anything() || v.duplicates > 0 {
        println!("{red}  verdict: FAILED{plain}");
    } else {
        println!(
            "{green}  verdict: every produced trade is committed, deferred (ledgered) or a dead letter{plain}"
        );
    }
    println!();
}

/// Names this process in the offsets it records: host and pid.
pub fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "k2".to_string());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::retention_loss;

    #[test]
    fn the_count_of_a_retention_dead_letter_is_read_from_its_reason() {
        assert_eq!(
            retention_loss(
                "retention: Kafka deleted offsets [1447, 11222) (9775 records) before K2 read them"
            ),
            Some(9775)
        );
        assert_eq!(retention_loss("invalid JSON at line 1"), None);
    }
}
