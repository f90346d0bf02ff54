//! Runs K2 as a service: the embedded broker and load generator when the
//! config says `brokers = "embedded"`, the pipeline, the HTTP server and a
//! one-line progress display, until Ctrl-C (or the demo's duration); then a
//! final commit. `k2 run` and `k2 demo` are both this.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use tracing::{info, warn};

use crate::config::K2Config;
use crate::embedded::EmbeddedBroker;
use crate::loadgen::{GeneratorParams, LoadgenParams, LoadgenReport, run_loadgen};
use crate::model::TradeKey;
use crate::pipeline::{self, Pipeline, PipelineParams};
use crate::shedding::{LedgerAction, OffsetRanges, Priority, ShedEntry};
use crate::storage::reader::{
    committed_record_count, scan_dead_letters, scan_reference_positions, scan_shed_ledger, scan_trade_keys,
};
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
    /// A failure demo to run (`k2 demo <scenario>`); its checks join the
    /// verdict. Needs `verdict` and a duration.
    pub scenario: Option<crate::demo::Scenario>,
    /// Show the live terminal view instead of the progress line (a scenario
    /// on a terminal; logs should go to a file meanwhile).
    pub live_view: bool,
}

/// What the verdict table shows.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Verdict {
    pub produced: u64,
    /// Of `produced`, the valid trades (from the ids file).
    pub produced_valid: u64,
    /// Of `produced`, the reference-data records (the ids file's LOW lines).
    pub produced_reference: u64,
    pub committed_rows: u64,
    pub distinct_trades: u64,
    /// Rows of `market.reference`.
    pub reference_rows: u64,
    pub dead_lettered: u64,
    /// Of the produced valid trades, those that are dead letters: corrupted
    /// on the way (the `poison` fault), not malformed by the generator.
    pub valid_dead_lettered: u64,
    /// Records shed by load shedding and recorded in `k2.shed_ledger`, not
    /// yet backfilled: deferred, not lost.
    pub shed_ledgered: u64,
    /// Shed records the demo's backfill ingested (`overload`).
    pub backfilled: u64,
    /// Rows beyond the first of one trade in `market.trades`, or of one
    /// Kafka position in `market.reference`.
    pub duplicates: u64,
    /// Records Kafka deleted before K2 read them, each range reported in
    /// `k2.dead_letters` (retention outran the lag).
    pub lost_to_retention: u64,
    /// Records still in Kafka past the table's offsets: the demo stopped
    /// before K2 read them (it waits up to a minute after the generator
    /// stops). Shown apart from losses: against an external Kafka the next
    /// run reads them; the embedded broker ends with the demo.
    pub unread_in_kafka: u64,
    /// Produced trades and reference records that are nowhere: not
    /// committed, not shed, not lost to retention, not waiting in Kafka.
    /// Anything here is a bug.
    pub lost: u64,
    /// Rows of `k2.sequence_gaps` (gaps and resets).
    pub sequence_events: u64,
    /// Rows of `k2.probable_duplicates`.
    pub probable_duplicates: u64,
    /// The produced valid trades of each priority (from the ids file) and
    /// what became of them: what shedding deferred, and what is committed.
    /// LOW counts the reference records, committed to `market.reference`.
    pub by_priority: BTreeMap<Priority, PriorityCounts>,
    /// The failure demo's own checks (`k2 demo <scenario>`).
    pub checks: Vec<crate::demo::Check>,
}

/// Produced valid records of one priority: trades, or (LOW) reference records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PriorityCounts {
    pub produced: u64,
    /// Of `produced`, the records at offsets `k2.shed_ledger` records as
    /// shed (whether or not backfilled since).
    pub shed: u64,
    /// Of `shed`, the records in their table (the backfill ingested them).
    pub shed_committed: u64,
    /// Of `produced`, the records in their table.
    pub committed: u64,
}

impl PriorityCounts {
    fn count(&mut self, shed: bool, in_table: bool) {
        self.produced += 1;
        if shed {
            self.shed += 1;
            self.shed_committed += u64::from(in_table);
        }
        self.committed += u64::from(in_table);
    }
}

/// The offsets each partition's ledger entries shed, merged and in order.
fn shed_offsets(ledger: &[ShedEntry], topic: &str) -> HashMap<i32, OffsetRanges> {
    let mut by_partition: HashMap<i32, Vec<&OffsetRanges>> = HashMap::new();
    for entry in ledger
        .iter()
        .filter(|e| e.action == LedgerAction::Shed && e.topic == topic)
    {
        by_partition
            .entry(entry.partition)
            .or_default()
            .push(&entry.offsets);
    }
    by_partition
        .into_iter()
        .map(|(partition, sets)| (partition, OffsetRanges::union(sets)))
        .collect()
}

fn is_shed(shed: &HashMap<i32, OffsetRanges>, partition: i32, offset: i64) -> bool {
    shed.get(&partition).is_some_and(|ranges| ranges.contains(offset))
}

pub async fn run(options: ServiceOptions) -> anyhow::Result<Option<Verdict>> {
    let mut config = options.config.clone();
    if options.scenario == Some(crate::demo::Scenario::Overload) {
        crate::demo::overload_config(&mut config);
    }
    let handle = crate::metrics::install();
    let handle_for_view = handle.clone();
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
    if let Some(broker) = &broker {
        pipeline.faults.set_broker_control(broker.control());
    }
    let query = crate::query::QueryEngine::new(
        pipeline.catalog.clone(),
        pipeline.tables.clone(),
        &config.kafka.topic,
        Some(pipeline.live.clone()),
        Some(pipeline.catalog_db.clone()),
        config.query.clone(),
    )
    .await?;
    let (server, addr) = web::serve(
        AppState {
            supervisor: pipeline.supervisor.clone(),
            metrics: handle,
            catalog: pipeline.catalog.clone(),
            tables: pipeline.tables.clone(),
            maintenance: pipeline.maintenance.clone(),
            api_key: config.http.mutation_key().map(str::to_string),
            faults: pipeline.faults.clone(),
            faults_enabled: config.faults.enabled,
            query,
        },
        &config.http.listen,
    )?;
    let server_handle = server.handle();
    actix_rt::spawn(server);
    info!(%addr, "HTTP control plane listening");
    eprintln!(
        "k2: HTTP on http://{addr} (/health /ready /metrics /v1/pipeline /v1/degradation /v1/faults /v1/trades /v1/ohlcv /v1/query)"
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut stop_tx = Some(stop_tx);
    let base_dir = options.base_dir.clone();
    let ids_file = options.base_dir.join("data").join("produced-trade-ids.csv");
    let loadgen = if let Some(partitions) = partitions.filter(|_| config.loadgen.enabled) {
        wait_for_lanes(&pipeline, partitions as usize, Duration::from_secs(60)).await;
        if options.verdict {
            std::fs::create_dir_all(ids_file.parent().expect("has a parent"))?;
            let _ = std::fs::remove_file(&ids_file);
        }
        let params = LoadgenParams {
            rate: match options.scenario {
                Some(crate::demo::Scenario::Overload) => (config.loadgen.rate / 5).max(1),
                _ => config.loadgen.rate,
            },
            shape: match (options.scenario, options.duration) {
                (Some(crate::demo::Scenario::Overload), Some(run)) => {
                    crate::demo::overload_shape(config.loadgen.rate, run)
                }
                _ => Default::default(),
            },
            ..LoadgenParams::from_config(&config, &brokers, options.verdict.then(|| ids_file.clone()))
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
    const FRAME: Duration = Duration::from_millis(500);
    let mut view = if options.live_view {
        match crate::tui::LiveView::start(FRAME) {
            Ok(view) => Some(view),
            Err(err) => {
                warn!(error = %err, "cannot draw the live view; plain progress instead");
                None
            }
        }
    } else {
        None
    };
    let progress = progress.filter(|_| view.is_none());
    let mut scenario = options
        .scenario
        .zip(options.duration)
        .map(|(scenario, run)| crate::demo::ScenarioRun::new(scenario, run, view.is_none()));
    let mut ticker = tokio::time::interval(FRAME);
    let stop_signal = shutdown_signal();
    tokio::pin!(stop_signal);
    loop {
        tokio::select! {
            signal = &mut stop_signal => {
                eprintln!("\nk2: {signal} received, committing what was consumed and stopping");
                break;
            }
            _ = ticker.tick() => {
                if let Some(scenario) = &mut scenario {
                    let outcome = scenario.tick(&pipeline, started.elapsed()).await;
                    if outcome.stop_load && let Some(stop) = stop_tx.take() {
                        let _ = stop.send(());
                    }
                    if outcome.done {
                        break;
                    }
                }
                if let Some(bar) = &progress
                    && let Ok(status) = pipeline.status().await {
                        bar.set_message(progress_line(&status, started.elapsed()));
                        bar.tick();
                    }
                if let Some(live) = &mut view {
                    let title = format!(
                        "{} {:.0} s of {}",
                        options.scenario.map_or("demo", |s| s.name()),
                        started.elapsed().as_secs_f64(),
                        options.duration.map_or("until Ctrl-C".to_string(), |d| format!("{} s", d.as_secs()))
                    );
                    let messages = scenario.as_ref().map_or(&[][..], |s| &s.messages[..]);
                    draw_frame(live, &pipeline, &handle_for_view, title, messages).await;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
        }
    }
    // The normal screen again: the rest is plain lines and the verdict.
    drop(view);

    if let Some(scenario) = &scenario {
        scenario.end(&pipeline);
    }
    if let Some(stop) = stop_tx.take() {
        let _ = stop.send(());
    }
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
    if let Some(scenario) = &mut scenario {
        scenario.watch(&pipeline).await;
    }
    // The overload demo ends as an operator would: `k2 backfill` ingests
    // what the ledger deferred, beside the running pipeline.
    let backfilled = if options.scenario == Some(crate::demo::Scenario::Overload) && report.is_some() {
        let backfill_options = crate::backfill::BackfillOptions {
            dry_run: false,
            progress: false,
        };
        let backfill = crate::backfill::backfill(&config, &brokers, &base_dir, backfill_options)
            .await
            .context("the backfill failed")?;
        eprintln!(
            "k2 demo: backfill ingested {} shed records ({} were in the table already, {} expired)",
            backfill.records_committed, backfill.records_present, backfill.expired
        );
        backfill.records_committed
    } else {
        0
    };
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
            let mut verdict =
                verdict(&report, &ids_file, catalog.as_ref(), &tables, topic, &log_ends).await?;
            verdict.backfilled = backfilled;
            if let Some(scenario) = &scenario {
                verdict.checks = scenario.checks(&verdict);
            }
            print_verdict(&verdict);
            Ok(Some(verdict))
        }
        _ => Ok(None),
    }
}

/// Draws one frame of the live view from the pipeline's status, its
/// degradation view, the active faults and the shed counters.
async fn draw_frame(
    view: &mut crate::tui::LiveView,
    pipeline: &Pipeline,
    metrics: &metrics_exporter_prometheus::PrometheusHandle,
    title: String,
    messages: &[String],
) {
    let (Ok(status), Ok(degradation)) = (
        pipeline.status().await,
        pipeline
            .supervisor
            .send(crate::actors::supervisor::GetDegradation)
            .await,
    ) else {
        return;
    };
    let faults = pipeline.faults.list();
    let snapshot = crate::tui::Snapshot {
        title,
        status: &status,
        degradation: &degradation,
        faults: &faults,
        shed: crate::tui::shed_by_priority(&metrics.render()),
        messages,
    };
    if let Err(err) = view.draw(&snapshot) {
        warn!(error = %err, "failed to draw the live view");
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
    let profile = crate::loadgen::message_profile(&GeneratorParams::from_config(&config.loadgen));
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

pub(crate) async fn verdict(
    report: &LoadgenReport,
    ids_file: &std::path::Path,
    catalog: &dyn iceberg::Catalog,
    tables: &crate::storage::tables::TableIdents,
    topic: &str,
    log_ends: &std::collections::BTreeMap<i32, i64>,
) -> anyhow::Result<Verdict> {
    // The ids file's LOW lines are reference records, known by their Kafka
    // position; the others are trades, known by their key.
    let (produced_reference, produced_trades): (Vec<_>, Vec<_>) = crate::loadgen::read_ids_file(ids_file)?
        .into_iter()
        .partition(|line| line.is_reference());
    let produced: HashSet<&TradeKey> = produced_trades.iter().map(|t| &t.key).collect();
    let produced_positions: HashSet<(i32, i64)> = produced_reference
        .iter()
        .map(|r| (r.partition, r.offset))
        .collect();
    let reference_rows = scan_reference_positions(&catalog.load_table(&tables.reference).await?).await?;
    let reference_committed: HashSet<(i32, i64)> = reference_rows.iter().copied().collect();
    let trades = catalog.load_table(&tables.trades).await?;
    let keys = scan_trade_keys(&trades).await?;
    let recorded = crate::storage::offsets::TopicOffsets::from_table(&trades, topic)?;
    let unread: u64 = log_ends
        .iter()
        .map(|(p, end)| (end - recorded.next_offset(*p).unwrap_or(0)).max(0) as u64)
        .sum();
    let committed: HashSet<&TradeKey> = keys.keys.iter().collect();
    let dead_letters = catalog.load_table(&tables.dead_letters).await?;
    let dead_rows = scan_dead_letters(&dead_letters).await?;
    let lost_to_retention: u64 = dead_rows
        .iter()
        .filter_map(|row| retention_loss(&row.reason))
        .sum();
    // Dead letters that did not decode, beyond the generator's malformed
    // messages, were valid trades corrupted on the way.
    let undecodable = dead_rows
        .iter()
        .filter(|row| retention_loss(&row.reason).is_none())
        .count() as u64;
    let valid_dead_lettered = undecodable.saturating_sub(report.malformed);
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
    let missing_trades = produced.iter().filter(|id| !committed.contains(**id)).count();
    let missing_reference = produced_positions.difference(&reference_committed).count();
    let missing = (missing_trades + missing_reference) as u64;
    let shed = shed_offsets(&ledger, topic);
    let mut by_priority: BTreeMap<Priority, PriorityCounts> = BTreeMap::new();
    for trade in &produced_trades {
        by_priority.entry(trade.priority).or_default().count(
            is_shed(&shed, trade.partition, trade.offset),
            committed.contains(&trade.key),
        );
    }
    for reference in &produced_reference {
        let position = (reference.partition, reference.offset);
        by_priority.entry(Priority::Low).or_default().count(
            is_shed(&shed, position.0, position.1),
            reference_committed.contains(&position),
        );
    }
    let duplicates = (keys.keys.len() - committed.len()) + (reference_rows.len() - reference_committed.len());
    Ok(Verdict {
        produced: report.produced,
        produced_valid: produced.len() as u64,
        produced_reference: produced_positions.len() as u64,
        committed_rows: keys.keys.len() as u64,
        distinct_trades: committed.len() as u64,
        reference_rows: reference_rows.len() as u64,
        dead_lettered: committed_record_count(&dead_letters),
        valid_dead_lettered,
        shed_ledgered,
        backfilled: 0,
        duplicates: duplicates as u64,
        lost_to_retention,
        unread_in_kafka: unread,
        // A shed record is missing from its table on purpose, and ledgered;
        // a record lost to retention is missing and reported; one not read
        // before the demo stopped is still in Kafka.
        lost: missing.saturating_sub(shed_ledgered + lost_to_retention + unread + valid_dead_lettered),
        sequence_events: committed_record_count(&sequence_events),
        probable_duplicates: committed_record_count(&probable_duplicates),
        by_priority,
        checks: Vec::new(),
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

    /// Nothing lost, nothing duplicated, and every check of the demo held.
    pub fn holds(&self) -> bool {
        !self.lost_anything() && self.duplicates == 0 && self.checks.iter().all(|c| c.held)
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
    println!("    reference data           {:>8}", v.produced_reference);
    println!("  committed rows             {:>8}", v.committed_rows);
    println!("  distinct trades committed  {:>8}", v.distinct_trades);
    println!(
        "  reference data rows        {:>8}  (market.reference)",
        v.reference_rows
    );
    println!("  dead-lettered              {:>8}", v.dead_lettered);
    if v.valid_dead_lettered > 0 {
        println!(
            "    valid trades corrupted   {:>8}  (they did not decode; their reason is in k2.dead_letters)",
            v.valid_dead_lettered
        );
    }
    println!("  shed (ledgered)            {:>8}", v.shed_ledgered);
    if v.backfilled > 0 {
        println!("  backfilled                 {:>8}", v.backfilled);
    }
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
    if !v.by_priority.is_empty() {
        println!("  by priority   produced      shed  shed, now in table  committed");
        println!("  -----------  --------  --------  ------------------  ---------");
        for (priority, counts) in v.by_priority.iter().rev() {
            println!(
                "  {:<11}  {:>8}  {:>8}  {:>18}  {:>9}",
                priority.as_str(),
                counts.produced,
                counts.shed,
                counts.shed_committed,
                counts.committed
            );
        }
        println!();
    }
    if !v.checks.is_empty() {
        crate::demo::print_checks(&v.checks);
    }
    if !v.holds() {
        println!("{red}  verdict: FAILED{plain}");
    } else {
        println!(
            "{green}  verdict: every produced trade and reference record is committed, deferred (ledgered) or a dead letter{plain}"
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
    use super::{is_shed, retention_loss, shed_offsets};
    use crate::degradation::DegradationLevel;
    use crate::shedding::{LedgerAction, OffsetRanges, Priority, ShedEntry};

    fn entry(action: LedgerAction, topic: &str, partition: i32, offsets: &str) -> ShedEntry {
        let offsets: OffsetRanges = offsets.parse().unwrap();
        ShedEntry {
            entry_id: ShedEntry::entry_id(topic, partition, offsets.first().unwrap(), Priority::High),
            action,
            topic: topic.into(),
            partition,
            records: offsets.count(),
            offsets,
            priority: Priority::High,
            level: DegradationLevel::CircuitBreak,
            detail: None,
            recorded_at_us: 0,
        }
    }

    #[test]
    fn a_trade_is_shed_if_a_shed_entry_of_its_topic_and_partition_covers_its_offset() {
        let ledger = [
            entry(LedgerAction::Shed, "t", 0, "10-19,30"),
            entry(LedgerAction::Shed, "t", 0, "15-25"),
            entry(LedgerAction::Shed, "t", 1, "5"),
            // A backfill row and another topic's entry say nothing of what was shed here.
            entry(LedgerAction::Backfilled, "t", 2, "0-99"),
            entry(LedgerAction::Shed, "other", 3, "0-99"),
        ];
        let shed = shed_offsets(&ledger, "t");
        assert_eq!(shed[&0].ranges(), [(10, 25), (30, 30)]);
        for (partition, offset, expected) in [
            (0, 9, false),
            (0, 10, true),
            (0, 22, true),
            (0, 25, true),
            (0, 26, false),
            (0, 30, true),
            (0, 31, false),
            (1, 5, true),
            (1, 4, false),
            (2, 50, false),
            (3, 50, false),
        ] {
            assert_eq!(
                is_shed(&shed, partition, offset),
                expected,
                "p{partition} @{offset}"
            );
        }
    }

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
