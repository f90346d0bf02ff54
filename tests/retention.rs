//! When Kafka deletes records before K2 read them (retention outran the lag),
//! K2 must report the lost offset range loudly and account for it, never
//! skip it in silence. The mock broker keeps only ~5 MiB per partition, which
//! makes the situation easy to create: commit some, stop, produce far more
//! than the partition keeps, start again.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{TOPIC, committed_rows, wait_for};
use k2::faults::{Fault, FaultKind};
use k2::loadgen::{GeneratorParams, Spread, preload};
use k2::storage::catalog::open_catalog;
use k2::storage::reader::{scan_dead_letters, scan_trade_keys};
use k2::storage::tables::TableIdents;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const BEFORE: i64 = 20_000;
const AFTER: i64 = 120_000;

async fn produce(bootstrap: String, count: i64, seed: u64) {
    let generator = GeneratorParams {
        seed,
        malformed_ratio: 0.0,
        ..GeneratorParams::default()
    };
    produce_with(bootstrap, count, generator).await;
}

/// Trade ids come from per-symbol sequences, so two runs of the default
/// universe repeat ids (the deduplicator rightly drops the repeats): a run
/// that must not overlap an earlier one gets symbols of its own.
async fn produce_with(bootstrap: String, count: i64, generator: GeneratorParams) {
    tokio::task::spawn_blocking(move || preload(&bootstrap, TOPIC, count as u64, generator, Spread::ByKey))
        .await
        .unwrap()
        .unwrap();
}

#[actix_rt::test]
async fn offsets_deleted_by_retention_are_reported_as_a_lost_range() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(1);
    let mut config = common::config(dir.path(), "k2-retention");
    common::without_retention_headroom(&mut config);

    produce(broker.bootstrap_servers().to_string(), BEFORE, 21).await;
    let first = common::start(&config, &broker, dir.path(), "first").await;
    wait_for(
        Duration::from_secs(120),
        "the first records committed",
        || async { committed_rows(&first).await >= BEFORE as u64 },
    )
    .await;
    first.shutdown().await.unwrap();

    // ~17 MiB into one partition while nobody reads: the oldest are deleted.
    produce(broker.bootstrap_servers().to_string(), AFTER, 22).await;
    let second = common::start(&config, &broker, dir.path(), "second").await;
    let total = BEFORE + AFTER;
    let status = catch_up_and_stop(second, total).await;

    let lost = reported_loss(&status);

    assert_only_the_lost_range_is_missing(&config, dir.path(), BEFORE, lost, total).await;
}

/// The path a running lane takes when retention overtakes it: a catalog
/// outage pauses the partition, producers keep writing far more than the
/// partition keeps, and when the catalog returns the lane's next offset is
/// gone. librdkafka stops the partition (offset out of range), the lane asks
/// for a rejoin, and the new lane starts at the log start and records the
/// lost range. Everything K2 had consumed before the pause is committed.
#[actix_rt::test]
async fn a_lane_paused_while_retention_overtakes_it_resumes_at_the_log_start_and_reports_the_lost_range() {
    const DURING: i64 = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(1);
    let mut config = common::config(dir.path(), "k2-retention-running");
    common::without_retention_headroom(&mut config);
    config.breaker.open_ms = 500;

    produce(broker.bootstrap_servers().to_string(), BEFORE, 31).await;
    let pipeline = common::start(&config, &broker, dir.path(), "running").await;
    wait_for(
        Duration::from_secs(120),
        "the first records committed",
        || async { committed_rows(&pipeline).await >= BEFORE as u64 },
    )
    .await;

    let first_incarnation = pipeline.status().await.unwrap().lanes[0].incarnation;
    // Records consumed during the outage cannot commit: the lane pauses.
    common::inject(&pipeline, Fault::CatalogDown);
    let own_symbols = GeneratorParams {
        seed: 32,
        malformed_ratio: 0.0,
        exchanges: vec![("COINBASE".to_string(), vec!["OUTAGE-USD".to_string()])],
        ..GeneratorParams::default()
    };
    produce_with(broker.bootstrap_servers().to_string(), DURING, own_symbols).await;
    wait_for(
        Duration::from_secs(60),
        "the lane consumed what was produced during the outage and paused",
        || async {
            let status = pipeline.status().await.unwrap();
            let lane = &status.lanes[0];
            lane.paused && lane.position == Some(BEFORE + DURING)
        },
    )
    .await;

    // Far more than the partition keeps, while the lane is paused.
    produce(broker.bootstrap_servers().to_string(), AFTER, 33).await;
    let total = BEFORE + DURING + AFTER;
    let status = pipeline.status().await.unwrap();
    assert_eq!(
        status.lanes[0].position,
        Some(BEFORE + DURING),
        "a paused lane does not read"
    );
    assert_eq!(
        status.committer.committed_offsets.get(&0),
        Some(&BEFORE),
        "nothing commits while the catalog is down"
    );

    pipeline.faults.clear_kind(FaultKind::CatalogDown);
    let status = catch_up_and_stop(pipeline, total).await;

    let resumed = BEFORE + DURING;
    let lost = reported_loss(&status);
    assert_eq!(
        status.lanes[0].incarnation, first_incarnation,
        "the partition restarted alone, under the same lane (no rejoin, no rebuild)"
    );

    assert_only_the_lost_range_is_missing(&config, dir.path(), resumed, lost, total).await;
}

/// A lane of a partition the table has never seen starts at the log start.
/// If retention deletes that before the lane reads its first record (here
/// its fetches fail while far more than the partition keeps arrives), the
/// lost range counts from where the lane began: before, the lane took the
/// first record it got as its start, and the range vanished without a trace.
#[actix_rt::test]
async fn retention_deleting_a_new_partitions_first_records_before_its_lane_reads_one_is_a_lost_range() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(1);
    let mut config = common::config(dir.path(), "k2-retention-fresh");
    common::without_retention_headroom(&mut config);
    let pipeline = common::start(&config, &broker, dir.path(), "fresh").await;
    wait_for(Duration::from_secs(60), "the lane running", || async {
        let status = pipeline.status().await.unwrap();
        status.lanes.len() == 1 && status.lanes[0].state == k2::actors::supervisor::LaneState::Running
    })
    .await;
    // The lane has noted the log start (0) before its first poll.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Every fetch fails for a while (each error costs librdkafka a fetch
    // backoff), while ~17 MiB arrive in a partition that keeps 5 MiB.
    broker.request_errors(
        RDKafkaApiKey::Fetch,
        vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 40],
    );
    produce(broker.bootstrap_servers().to_string(), AFTER, 41).await;
    assert_eq!(
        pipeline.status().await.unwrap().lanes[0].position,
        None,
        "the lane read a record before retention deleted the first ones: the drill needs longer fetch failures"
    );

    let status = catch_up_and_stop(pipeline, AFTER).await;
    let lost = reported_loss(&status);
    assert_only_the_lost_range_is_missing(&config, dir.path(), 0, lost, AFTER).await;
}

/// The records partition 0's lane reported lost: some (retention deleted
/// records it had not read), and fewer than the last batch produced (the
/// mock keeps the newest).
fn reported_loss(status: &k2::actors::supervisor::PipelineStatus) -> i64 {
    let lost = status.lanes[0].lost_records as i64;
    assert!(
        lost > 0,
        "retention must have deleted records the lane had not read"
    );
    assert!(
        lost < AFTER,
        "the mock keeps the newest records ({lost} reported lost)"
    );
    lost
}

/// Waits until partition 0's committed offset reaches `total`, then stops
/// the pipeline and returns its last status.
async fn catch_up_and_stop(
    pipeline: k2::pipeline::Pipeline,
    total: i64,
) -> k2::actors::supervisor::PipelineStatus {
    wait_for(
        Duration::from_secs(180),
        "the partition caught up to the end",
        || async {
            let status = pipeline.status().await.unwrap();
            status.committer.committed_offsets.get(&0) == Some(&total)
        },
    )
    .await;
    let status = pipeline.status().await.unwrap();
    pipeline.shutdown().await.unwrap();
    status
}

/// The trades table holds offsets `0..total` exactly once except
/// `[from, from + lost)`, and one dead letter at `from` names that range.
async fn assert_only_the_lost_range_is_missing(
    config: &k2::config::K2Config,
    dir: &std::path::Path,
    from: i64,
    lost: i64,
    total: i64,
) {
    let catalog = open_catalog(&config.catalog, dir).await.unwrap();
    let idents = TableIdents::new(&config.catalog.namespace);
    let trades = scan_trade_keys(&catalog.load_table(&idents.trades).await.unwrap())
        .await
        .unwrap();
    let offsets: BTreeSet<i64> = trades.positions.iter().map(|(_, o)| *o).collect();
    assert_eq!(
        offsets.len(),
        trades.positions.len(),
        "an offset was committed twice"
    );
    let expected: BTreeSet<i64> = (0..from).chain(from + lost..total).collect();
    assert_eq!(
        offsets, expected,
        "the table holds everything except the lost range, exactly once"
    );

    let dead = scan_dead_letters(&catalog.load_table(&idents.dead_letters).await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        dead.len(),
        1,
        "one dead letter accounts for the lost range: {dead:?}"
    );
    assert_eq!(dead[0].offset, from);
    let range = format!("[{from}, {})", from + lost);
    assert!(
        dead[0].reason.starts_with("retention") && dead[0].reason.contains(&range),
        "the dead letter names the lost range {range}: {}",
        dead[0].reason
    );
}
