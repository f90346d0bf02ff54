//! Degradation and supervision, black box: levels forced over HTTP during
//! ingestion shed by priority into `k2.shed_ledger` exactly and backfill
//! restores it; a catalog outage pauses consumption and loses nothing; a
//! panicking stage rebuilds its lane, and a lane that keeps failing is
//! marked failed while the others run on; a lane that cannot read its
//! offsets because the catalog is down (after a rebuild or an assignment)
//! waits for it without spending its restarts.
//!
//! The shedding counters are read from the process's metrics, so the tests
//! that shed live in this file alone (one test binary, one recorder).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::{
    assert_exactly_once, http, read_ids, read_reference_ids, read_tables, spawn_loadgen, spawn_loadgen_with,
    wait_for,
};
use k2::backfill::{BackfillOptions, backfill};
use k2::faults::{Fault, FaultKind};
use k2::pipeline::Pipeline;
use k2::shedding::{LedgerAction, ShedEntry};
use k2::storage::catalog::open_catalog;
use k2::storage::reader::scan_shed_ledger;
use k2::storage::tables::TableIdents;

const KEY: &str = "test-key-0123456789abcdef";

/// `k2_shed_records_total` by priority, from the metrics text.
fn shed_metric_by_priority() -> BTreeMap<String, u64> {
    k2::tui::shed_by_priority(&k2::metrics::install().render())
}

/// The tests of this file run one at a time: the shedding counters are the
/// process's, and a catalog outage can raise the level and shed too.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `k2_shed_records_total` by priority, less what `baseline` had.
fn shed_since(baseline: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    shed_metric_by_priority()
        .into_iter()
        .map(|(priority, n)| {
            let before = baseline.get(&priority).copied().unwrap_or(0);
            (priority, n - before)
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Waits until records of `priority` have been shed since `baseline` (the
/// level in force sheds it and the load is still running).
async fn shed_some(priority: &'static str, baseline: &BTreeMap<String, u64>) {
    wait_for(
        Duration::from_secs(60),
        &format!("{priority} records shed"),
        || async { shed_since(baseline).contains_key(priority) },
    )
    .await;
}

/// The ledger's "shed" entries, one per entry id.
async fn shed_entries(config: &k2::config::K2Config, dir: &std::path::Path) -> Vec<ShedEntry> {
    let catalog = open_catalog(&config.catalog, dir).await.unwrap();
    let idents = TableIdents::new(&config.catalog.namespace);
    let table = catalog.load_table(&idents.shed_ledger).await.unwrap();
    let mut seen = HashSet::new();
    scan_shed_ledger(&table)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == LedgerAction::Shed && seen.insert(e.entry_id.clone()))
        .collect()
}

#[actix_rt::test]
async fn levels_forced_over_http_shed_by_priority_into_the_ledger_and_backfill_restores_every_trade() {
    let _serial = SERIAL.lock().await;
    let baseline = shed_metric_by_priority();
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(8);
    let ids = dir.path().join("ids.csv");
    let config = common::config(dir.path(), "k2-degrade");
    let pipeline = common::start(&config, &broker, dir.path(), "degrade").await;
    let addr = common::serve_api(&pipeline, Some(KEY), true).await;

    // Mutations are guarded, and bad requests say what is wrong.
    let force = r#"{"level": "AGGRESSIVE", "reason": "drill", "ttl_s": 300}"#;
    let (status, body) = common::api(&addr, "/v1/degradation", "PUT", force, None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = common::api(
        &addr,
        "/v1/degradation",
        "PUT",
        force,
        Some("wrong-key-0123456789"),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = common::api(
        &addr,
        "/v1/degradation",
        "PUT",
        r#"{"level": "PANIC", "reason": "x"}"#,
        Some(KEY),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("`PANIC`"), "{body}");
    let (status, body) =
        common::api(&addr, "/v1/degradation", "PUT", r#"{"level": "SOFT"}"#, Some(KEY)).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("reason"), "{body}");
    let (status, body) = common::api(
        &addr,
        "/v1/degradation",
        "DELETE",
        "",
        Some("wrong-key-0123456789"),
    )
    .await;
    assert_eq!(status, 403, "{body}");

    // 3 % of the records are reference data: LOW, shed from GRACEFUL up.
    let generator = k2::loadgen::GeneratorParams {
        seed: 11,
        reference_ratio: 0.03,
        ..k2::loadgen::GeneratorParams::default()
    };
    let loadgen = spawn_loadgen_with(broker.bootstrap_servers(), &ids, 60_000, 10_000, generator);
    // At NORMAL reference data is written: the first of it is committed
    // before GRACEFUL starts shedding it (a slow machine reads late). Each
    // level then holds until it has shed what it sheds first, so the drill
    // fits in the 6 s of load however late it starts (more load would
    // outgrow what the embedded broker retains on its hottest partition).
    wait_for(
        Duration::from_secs(60),
        "reference data committed at NORMAL",
        || async { pipeline.status().await.unwrap().committer.reference_committed > 0 },
    )
    .await;
    let graceful = r#"{"level": "GRACEFUL", "reason": "drill 0"}"#;
    let (status, body) = common::api(&addr, "/v1/degradation", "PUT", graceful, Some(KEY)).await;
    assert_eq!(status, 200, "{body}");
    shed_some("LOW", &baseline).await;
    let (status, body) = common::api(&addr, "/v1/degradation", "PUT", force, Some(KEY)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["level"], "AGGRESSIVE");
    assert_eq!(body["mode"]["mode"], "forced");
    assert_eq!(body["mode"]["reason"], "drill");
    shed_some("NORMAL", &baseline).await;
    let circuit = r#"{"level": "CIRCUIT_BREAK", "reason": "drill 2"}"#;
    let (status, body) = common::api(&addr, "/v1/degradation", "PUT", circuit, Some(KEY)).await;
    assert_eq!(status, 200, "{body}");
    shed_some("HIGH", &baseline).await;
    let (status, body) = common::api(&addr, "/v1/degradation", "DELETE", "", Some(KEY)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["mode"]["mode"], "auto");
    let (status, body) = common::api(&addr, "/v1/degradation", "GET", "", None).await;
    assert_eq!(status, 200);
    let transitions: Vec<(String, String)> = body["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["from"].as_str().unwrap().into(),
                t["to"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        transitions.starts_with(&[
            ("NORMAL".into(), "GRACEFUL".into()),
            ("GRACEFUL".into(), "AGGRESSIVE".into()),
            ("AGGRESSIVE".into(), "CIRCUIT_BREAK".into()),
        ]),
        "{transitions:?}"
    );
    assert_eq!(
        body["signals"].as_array().unwrap().len(),
        k2::degradation::Signal::ALL.len()
    );

    let report = loadgen.await.unwrap().unwrap();
    let produced = read_ids(&ids);
    let produced_reference = read_reference_ids(&ids);
    assert!(produced_reference.len() > 1_000, "{}", produced_reference.len());
    // Offsets start at 0 in every partition: committed offsets summing to
    // what was produced account for every record (written or shed).
    wait_for(Duration::from_secs(120), "every record accounted for", || async {
        let status = pipeline.status().await.unwrap();
        let committed: i64 = status.committer.committed_offsets.values().sum();
        committed as u64 >= report.produced
    })
    .await;
    pipeline.shutdown().await.unwrap();

    // What was shed, by priority, is exactly what the ledger holds.
    let entries = shed_entries(&config, dir.path()).await;
    let mut ledger: BTreeMap<String, u64> = BTreeMap::new();
    for entry in &entries {
        assert_eq!(entry.records, entry.offsets.count());
        *ledger.entry(entry.priority.to_string()).or_default() += entry.records;
    }
    let metric = shed_since(&baseline);
    assert_eq!(ledger, metric, "ledger by priority != shed counters");
    assert!(ledger.get("LOW").copied().unwrap_or(0) > 0, "{ledger:?}");
    assert!(ledger.get("NORMAL").copied().unwrap_or(0) > 0, "{ledger:?}");
    assert!(ledger.get("HIGH").copied().unwrap_or(0) > 0, "{ledger:?}");
    assert!(!ledger.contains_key("CRITICAL"), "tier 1 is never shed");

    // Shed records are not in the trades table; together with it they are
    // every produced trade.
    let contents = read_tables(&config, dir.path()).await;
    let shed_positions: HashSet<(i32, i64)> = entries
        .iter()
        .flat_map(|e| e.offsets.iter().map(move |o| (e.partition, o)))
        .collect();
    let written: HashSet<(i32, i64)> = contents.trades.positions.iter().copied().collect();
    assert!(
        shed_positions.is_disjoint(&written),
        "a shed record was also written"
    );
    let written_reference: HashSet<(i32, i64)> = contents.reference.iter().copied().collect();
    assert_eq!(
        written_reference.len(),
        contents.reference.len(),
        "reference data written twice"
    );
    assert!(
        shed_positions.is_disjoint(&written_reference),
        "shed reference data was also written"
    );
    assert!(written_reference.is_subset(&produced_reference));
    assert!(
        !written_reference.is_empty() && written_reference.len() < produced_reference.len(),
        "reference data is written at NORMAL and shed from GRACEFUL up: {} of {}",
        written_reference.len(),
        produced_reference.len()
    );
    assert_eq!(
        (shed_positions.len() + written.len() + written_reference.len()) as u64,
        (produced.len() + produced_reference.len()) as u64,
        "shed + written != produced"
    );

    // Backfill restores every trade exactly once; a second run changes nothing.
    let report = backfill(
        &config,
        broker.bootstrap_servers(),
        dir.path(),
        BackfillOptions {
            dry_run: false,
            progress: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(report.entries_closed as usize, entries.len());
    assert_eq!(
        report.records_committed as usize,
        shed_positions.len(),
        "present {} expired {} dead {} closed {}",
        report.records_present,
        report.expired,
        report.dead_letters,
        report.entries_closed
    );
    let contents = read_tables(&config, dir.path()).await;
    assert_exactly_once(&contents, &produced);
    let mut reference = contents.reference.clone();
    reference.sort_unstable();
    let mut expected_reference: Vec<(i32, i64)> = produced_reference.into_iter().collect();
    expected_reference.sort_unstable();
    assert_eq!(
        reference, expected_reference,
        "after the backfill, market.reference holds every produced reference record once"
    );
    let before = snapshot_ids(&config, dir.path()).await;
    let again = backfill(
        &config,
        broker.bootstrap_servers(),
        dir.path(),
        BackfillOptions {
            dry_run: false,
            progress: false,
        },
    )
    .await
    .unwrap();
    assert_eq!((again.entries_closed, again.records_committed), (0, 0));
    assert_eq!(
        snapshot_ids(&config, dir.path()).await,
        before,
        "a second backfill committed"
    );
}

async fn snapshot_ids(config: &k2::config::K2Config, dir: &std::path::Path) -> Vec<Option<i64>> {
    let catalog = open_catalog(&config.catalog, dir).await.unwrap();
    let idents = TableIdents::new(&config.catalog.namespace);
    let mut out = Vec::new();
    for ident in [&idents.trades, &idents.shed_ledger] {
        let table = catalog.load_table(ident).await.unwrap();
        out.push(table.metadata().current_snapshot_id());
    }
    out
}

/// A pipeline ingesting `total` trades at 8,000/s with a short catalog
/// breaker open period, past its first commit (its lanes read their offsets),
/// ready for an outage.
struct Ingesting {
    dir: tempfile::TempDir,
    broker: k2::embedded::EmbeddedBroker,
    ids: std::path::PathBuf,
    config: k2::config::K2Config,
    pipeline: Pipeline,
    loadgen: actix_rt::task::JoinHandle<anyhow::Result<k2::loadgen::LoadgenReport>>,
}

async fn ingesting(
    partitions: i32,
    group: &str,
    total: u64,
    tune: impl FnOnce(&mut k2::config::K2Config),
) -> Ingesting {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(partitions);
    let ids = dir.path().join("ids.csv");
    let mut config = common::config(dir.path(), group);
    config.breaker.open_ms = 500;
    // These tests are about pausing and waiting, not shedding.
    common::without_retention_headroom(&mut config);
    tune(&mut config);
    let pipeline = common::start(&config, &broker, dir.path(), group).await;
    let loadgen = spawn_loadgen(broker.bootstrap_servers(), &ids, total, 8_000);
    wait_for(Duration::from_secs(60), "a first commit", || async {
        pipeline.status().await.unwrap().committer.rows_committed > 0
    })
    .await;
    Ingesting {
        dir,
        broker,
        ids,
        config,
        pipeline,
        loadgen,
    }
}

/// Brings the catalog back, lets the load generator finish and waits until
/// every trade it produced is committed and `settled` holds. Returns the
/// produced trades.
async fn end_outage(
    pipeline: &Pipeline,
    loadgen: actix_rt::task::JoinHandle<anyhow::Result<k2::loadgen::LoadgenReport>>,
    ids: &std::path::Path,
    settled: impl Fn(&k2::actors::supervisor::PipelineStatus) -> bool,
) -> HashSet<k2::model::TradeKey> {
    pipeline.faults.clear_kind(FaultKind::CatalogDown);
    loadgen.await.unwrap().unwrap();
    let produced = read_ids(ids);
    let expected = produced.len() as u64;
    wait_for(
        Duration::from_secs(120),
        "every trade committed after the outage",
        || async {
            let status = pipeline.status().await.unwrap();
            status.committer.rows_committed >= expected && settled(&status)
        },
    )
    .await;
    produced
}

#[actix_rt::test]
async fn a_catalog_outage_pauses_consumption_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    // Production outlasts the outage, so lag can grow while partitions pause.
    let Ingesting {
        dir,
        broker: _broker,
        ids,
        config,
        pipeline,
        loadgen,
    } = ingesting(4, "k2-outage", 100_000, |_| {}).await;

    common::inject(&pipeline, Fault::CatalogDown);
    wait_for(Duration::from_secs(30), "partitions paused", || async {
        let status = pipeline.status().await.unwrap();
        !status.lanes.is_empty() && status.lanes.iter().all(|l| l.paused)
    })
    .await;
    let view = pipeline
        .supervisor
        .send(k2::actors::supervisor::GetDegradation)
        .await
        .unwrap();
    assert!(!view.paused_partitions.is_empty());
    // Paused lanes stop moving while the producer keeps going: lag grows.
    let positions = |s: &k2::actors::supervisor::PipelineStatus| -> Vec<Option<i64>> {
        s.lanes.iter().map(|l| l.position).collect()
    };
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let first = pipeline.status().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let second = pipeline.status().await.unwrap();
    assert_eq!(
        positions(&first),
        positions(&second),
        "paused lanes kept consuming"
    );
    let lag = |s: &k2::actors::supervisor::PipelineStatus| s.lanes.iter().filter_map(|l| l.lag).sum::<i64>();
    let lag_before = lag(&second);
    wait_for(
        Duration::from_secs(15),
        "lag to grow during the outage",
        || async { lag(&pipeline.status().await.unwrap()) > lag_before },
    )
    .await;
    assert_eq!(
        second.committer.rows_committed, first.committer.rows_committed,
        "nothing commits while down"
    );
    let view = pipeline
        .supervisor
        .send(k2::actors::supervisor::GetDegradation)
        .await
        .unwrap();
    assert_eq!(view.catalog_breaker, k2::breaker::BreakerState::Open);
    assert!(
        view.level >= k2::degradation::DegradationLevel::Soft,
        "{:?}",
        view.level
    );

    let produced = end_outage(&pipeline, loadgen, &ids, |s| s.lanes.iter().all(|l| !l.paused)).await;
    pipeline.shutdown().await.unwrap();
    assert_exactly_once(&read_tables(&config, dir.path()).await, &produced);
}

#[actix_rt::test]
async fn a_panicking_stage_rebuilds_its_lane_and_a_lane_that_keeps_failing_is_marked_failed() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(4);
    let ids = dir.path().join("ids.csv");
    let mut config = common::config(dir.path(), "k2-panic");
    config.lanes.max_restarts = 1;
    let pipeline = common::start(&config, &broker, dir.path(), "panic").await;
    let addr = common::serve_api(&pipeline, None, true).await;
    let loadgen = spawn_loadgen(broker.bootstrap_servers(), &ids, 30_000, 10_000);
    tokio::time::sleep(Duration::from_millis(800)).await;

    common::inject(
        &pipeline,
        Fault::StagePanic {
            stage: k2::messages::Stage::Deduplicator,
            partition: 0,
        },
    );
    wait_for(
        Duration::from_secs(30),
        "the lane rebuilt after the panic",
        || async {
            let status = pipeline.status().await.unwrap();
            status.lanes.iter().any(|l| {
                l.partition == 0 && l.restarts == 1 && l.state == k2::actors::supervisor::LaneState::Running
            })
        },
    )
    .await;
    loadgen.await.unwrap().unwrap();
    let produced = read_ids(&ids);
    let expected = produced.len() as u64;
    wait_for(Duration::from_secs(120), "every trade committed", || async {
        pipeline.status().await.unwrap().committer.rows_committed >= expected
    })
    .await;

    // A second failure within the window exceeds max_restarts = 1.
    common::inject(
        &pipeline,
        Fault::StagePanic {
            stage: k2::messages::Stage::Batcher,
            partition: 0,
        },
    );
    let more = dir.path().join("more.csv");
    let loadgen = spawn_loadgen(broker.bootstrap_servers(), &more, 10_000, 10_000);
    wait_for(Duration::from_secs(30), "the lane marked failed", || async {
        pipeline.status().await.unwrap().failed_lanes == 1
    })
    .await;
    loadgen.await.unwrap().unwrap();
    let status = pipeline.status().await.unwrap();
    let failed: Vec<i32> = status
        .lanes
        .iter()
        .filter(|l| l.state == k2::actors::supervisor::LaneState::Failed)
        .map(|l| l.partition)
        .collect();
    assert_eq!(failed, vec![0]);
    assert_eq!(status.lane_restarts, 1);
    let (code, body) = tokio::task::spawn_blocking(move || http(&addr, "GET", "/ready", &[], ""))
        .await
        .unwrap();
    assert_eq!(code, 503, "{body}");
    // The other lanes keep running: their partitions are committed to the end.
    wait_for(Duration::from_secs(60), "the healthy lanes caught up", || async {
        let status = pipeline.status().await.unwrap();
        status.lanes.iter().filter(|l| l.partition != 0).all(|l| {
            l.high_watermark.is_some()
                && status.committer.committed_offsets.get(&l.partition) >= l.high_watermark.as_ref()
        })
    })
    .await;
    pipeline.shutdown().await.unwrap();
    // Everything committed before the failure is there exactly once.
    let contents = read_tables(&config, dir.path()).await;
    let distinct: HashSet<_> = contents.trades.keys.iter().collect();
    assert_eq!(distinct.len(), contents.trades.keys.len(), "duplicates");
    assert!(
        produced.iter().all(|k| distinct.contains(k)),
        "a trade of the first batch is missing"
    );
    let by_partition: HashMap<i32, usize> =
        contents
            .trades
            .positions
            .iter()
            .fold(HashMap::new(), |mut m, (p, _)| {
                *m.entry(*p).or_default() += 1;
                m
            });
    assert!(by_partition.len() >= 3);
}

fn lane(
    status: &k2::actors::supervisor::PipelineStatus,
    partition: i32,
) -> &k2::actors::supervisor::LaneView {
    status
        .lanes
        .iter()
        .find(|l| l.partition == partition)
        .expect("the partition has a lane")
}

#[actix_rt::test]
async fn a_lane_rebuilt_while_the_catalog_is_down_waits_for_it_without_spending_its_restarts() {
    let _serial = SERIAL.lock().await;
    use k2::actors::supervisor::LaneState;

    let Ingesting {
        dir,
        broker: _broker,
        ids,
        config,
        pipeline,
        loadgen,
    } = ingesting(2, "k2-rebuild-outage", 40_000, |c| c.lanes.max_restarts = 2).await;

    // The lane panics and, with the catalog down, cannot read where to restart.
    let first = lane(&pipeline.status().await.unwrap(), 0).incarnation;
    common::inject(
        &pipeline,
        Fault::StagePanic {
            stage: k2::messages::Stage::Deduplicator,
            partition: 0,
        },
    );
    common::inject(&pipeline, Fault::CatalogDown);
    // Each failed read starts a new incarnation; twice the restart budget of
    // tries would have marked the lane failed had they counted as restarts.
    wait_for(
        Duration::from_secs(60),
        "the lane tried the table more often than its restart budget",
        || async {
            let status = pipeline.status().await.unwrap();
            let lane = lane(&status, 0);
            lane.incarnation >= first + 2 * (config.lanes.max_restarts as u64 + 1)
        },
    )
    .await;
    let status = pipeline.status().await.unwrap();
    let waiting = lane(&status, 0);
    assert_eq!(waiting.state, LaneState::Restarting, "{waiting:?}");
    assert_eq!(
        waiting.restarts, 1,
        "waiting for the catalog spent restarts: {waiting:?}"
    );
    assert!(
        waiting
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("waiting for the catalog")),
        "{waiting:?}"
    );
    assert_eq!(status.failed_lanes, 0);

    let produced = end_outage(&pipeline, loadgen, &ids, |s| {
        lane(s, 0).state == LaneState::Running
    })
    .await;
    assert_eq!(lane(&pipeline.status().await.unwrap(), 0).restarts, 1);
    pipeline.shutdown().await.unwrap();
    assert_exactly_once(&read_tables(&config, dir.path()).await, &produced);
}

#[actix_rt::test]
async fn partitions_assigned_while_the_catalog_is_down_start_when_it_returns() {
    let _serial = SERIAL.lock().await;
    use k2::actors::supervisor::LaneState;

    let Ingesting {
        dir,
        broker,
        ids,
        config,
        pipeline: first,
        loadgen,
    } = ingesting(4, "k2-join-outage", 40_000, |_| {}).await;

    // A second process joins that cannot reach the catalog: the rebalance
    // hands it partitions whose offsets it cannot read. (With cooperative
    // rebalancing the first process keeps its other partitions running.)
    let second = common::start(&config, &broker, dir.path(), "second").await;
    common::inject(&second, Fault::CatalogDown);
    wait_for(
        Duration::from_secs(60),
        "the group split the partitions; the second process's lanes wait for the catalog",
        || async {
            let (a, b) = (first.status().await.unwrap(), second.status().await.unwrap());
            a.lanes.len() + b.lanes.len() == 4
                && !a.lanes.is_empty()
                && !b.lanes.is_empty()
                && a.lanes.iter().all(|l| l.state == LaneState::Running)
                && b.lanes.iter().all(|l| {
                    l.state == LaneState::Restarting
                        && l.last_error
                            .as_deref()
                            .is_some_and(|e| e.starts_with("waiting for the catalog"))
                })
        },
    )
    .await;
    let status = second.status().await.unwrap();
    assert_eq!(status.failed_lanes, 0);
    assert!(status.lanes.iter().all(|l| l.restarts == 0), "{:?}", status.lanes);

    second.faults.clear_kind(FaultKind::CatalogDown);
    loadgen.await.unwrap().unwrap();
    let produced = read_ids(&ids);
    let expected = produced.len() as u64;
    wait_for(
        Duration::from_secs(120),
        "every trade committed by the two processes",
        || async {
            let running = second
                .status()
                .await
                .unwrap()
                .lanes
                .iter()
                .all(|l| l.state == LaneState::Running);
            running && common::committed_trades(&config, dir.path()).await >= expected
        },
    )
    .await;
    second.shutdown().await.unwrap();
    first.shutdown().await.unwrap();
    assert_exactly_once(&read_tables(&config, dir.path()).await, &produced);
}
