//! Black-box tests of the ingestion backbone against librdkafka's mock
//! cluster (real Kafka protocol) and a real Iceberg SQL catalog in a temp
//! dir: every accepted trade lands exactly once, malformed records land in
//! `k2.dead_letters`, across stops, restarts and rebalances.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{assert_exactly_once, committed_rows, read_ids, read_tables, spawn_loadgen, wait_for};
use k2::loadgen::{GeneratorParams, Spread};

fn generator(malformed_ratio: f64, seed: u64) -> GeneratorParams {
    GeneratorParams {
        seed,
        malformed_ratio,
        ..GeneratorParams::default()
    }
}

#[actix_rt::test]
async fn malformed_records_are_dead_lettered_and_valid_trades_land_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    // Spread evenly, 16 partitions keep each under the mock broker's ~5 MiB retention.
    let broker = common::broker(16);
    let loaded = common::preload_to(
        &broker,
        200_000,
        generator(0.01, 7),
        Spread::Even { partitions: 16 },
    )
    .await;
    let valid: HashSet<k2::model::TradeKey> = loaded.valid.iter().cloned().collect();
    assert_eq!(
        valid.len(),
        loaded.valid.len(),
        "generator produced duplicate ids"
    );
    assert!(
        loaded.malformed > 1_000,
        "expected ~1% malformed, got {}",
        loaded.malformed
    );

    let mut config = common::config(dir.path(), "k2-ingest");
    common::without_retention_headroom(&mut config);
    let pipeline = common::start(&config, &broker, dir.path(), "ingest").await;
    let expected_rows = valid.len() as u64;
    wait_for(Duration::from_secs(240), "all valid trades committed", || async {
        committed_rows(&pipeline).await >= expected_rows
    })
    .await;
    let status = pipeline.status().await.unwrap();
    pipeline.shutdown().await.unwrap();

    let contents = read_tables(&config, dir.path()).await;
    assert_exactly_once(&contents, &valid);
    assert_eq!(
        contents.dead_letters, loaded.malformed,
        "dead letters != malformed messages produced"
    );
    assert_eq!(status.committer.dead_letters_committed, loaded.malformed);
    let next_offsets: i64 = contents.offsets.iter().map(|(_, o)| o.next_offset).sum();
    assert_eq!(
        next_offsets, 200_000,
        "recorded offsets must cover every produced message"
    );
    assert_eq!(contents.offsets.iter().count(), 16);
}

#[actix_rt::test]
async fn stop_without_final_commit_then_restart_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(8);
    let ids = dir.path().join("ids.csv");
    let loadgen = spawn_loadgen(broker.bootstrap_servers(), &ids, 60_000, 15_000);

    let mut config = common::config(dir.path(), "k2-restart");
    common::without_retention_headroom(&mut config);
    let first = common::start(&config, &broker, dir.path(), "first").await;
    wait_for(Duration::from_secs(60), "first commits", || async {
        committed_rows(&first).await >= 5_000
    })
    .await;
    let committed_before_crash = committed_rows(&first).await;
    first.abort().await;

    let report = loadgen.await.unwrap().unwrap();
    assert_eq!(report.produced, 60_000);
    assert!(
        committed_before_crash < 60_000,
        "the crash must happen mid-stream (committed {committed_before_crash})"
    );

    let second = common::start(&config, &broker, dir.path(), "second").await;
    let expected = read_ids(&ids);
    assert_eq!(expected.len(), 60_000);
    wait_for(
        Duration::from_secs(180),
        "every trade committed after restart",
        || async {
            let contents = read_tables(&config, dir.path()).await;
            contents.trades.keys.len() >= 60_000
        },
    )
    .await;
    second.shutdown().await.unwrap();
    assert_exactly_once(&read_tables(&config, dir.path()).await, &expected);
}

#[actix_rt::test]
async fn two_instances_in_one_group_with_a_rebalance_write_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(8);
    let ids = dir.path().join("ids.csv");
    // Production outlasts the cooperative rebalance (two rounds, ~10 s on
    // the mock broker), so b has something of its own to commit.
    let loadgen = spawn_loadgen(broker.bootstrap_servers(), &ids, 200_000, 10_000);

    let mut config = common::config(dir.path(), "k2-rebalance");
    common::without_retention_headroom(&mut config);
    let a = common::start(&config, &broker, dir.path(), "a").await;
    wait_for(Duration::from_secs(60), "instance a commits", || async {
        committed_rows(&a).await > 0
    })
    .await;
    // Joining mid-stream makes the group rebalance: a gives up half its partitions.
    let b = common::start(&config, &broker, dir.path(), "b").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while committed_rows(&b).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "instance b owns no partitions or commits nothing: {:#?}",
            b.status().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a_lanes = a.status().await.unwrap().lanes.len();
    let b_lanes = b.status().await.unwrap().lanes.len();
    assert!(
        a_lanes > 0 && b_lanes > 0,
        "partitions split between a ({a_lanes}) and b ({b_lanes})"
    );
    assert_eq!(a_lanes + b_lanes, 8);

    let report = loadgen.await.unwrap().unwrap();
    assert_eq!(report.produced, 200_000);
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while read_tables(&config, dir.path()).await.trades.keys.len() < 200_000 {
        if std::time::Instant::now() > deadline {
            let lanes = |s: k2::actors::supervisor::PipelineStatus| {
                s.lanes
                    .iter()
                    .map(|l| {
                        format!(
                            "p{} {:?} at {:?} of {:?} ({:?})",
                            l.partition, l.state, l.position, l.high_watermark, l.last_error
                        )
                    })
                    .collect::<Vec<_>>()
            };
            panic!(
                "not every trade committed within 180 s; table offsets {:?}\na: {:?}\nb: {:?}",
                read_tables(&config, dir.path()).await.offsets.to_json(),
                lanes(a.status().await.unwrap()),
                lanes(b.status().await.unwrap())
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let contents = read_tables(&config, dir.path()).await;
    assert_exactly_once(&contents, &read_ids(&ids));
    let writers: HashSet<&str> = contents.offsets.iter().map(|(_, o)| o.writer.as_str()).collect();
    assert!(
        writers.contains("a") && writers.contains("b"),
        "both instances advanced offsets: {writers:?}"
    );
}

/// When input stops, a lane that read up to the high watermark flushes at
/// once and the committer commits a quarter interval after its last commit
/// instead of a whole one: with batch age at ten minutes and the interval at
/// 40 s, every trade is committed, exactly once, within 30 s of the start,
/// before either would fire.
#[actix_rt::test]
async fn the_tail_is_committed_when_input_stops_without_waiting_out_age_or_interval() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(4);
    let loaded = common::preload_to(
        &broker,
        20_000,
        generator(0.0, 11),
        Spread::Even { partitions: 4 },
    )
    .await;
    let valid: HashSet<k2::model::TradeKey> = loaded.valid.iter().cloned().collect();

    let mut config = common::config(dir.path(), "k2-tail");
    config.commit.interval_ms = 40_000;
    config.batcher.max_age_ms = 600_000;
    config.batcher.max_rows = 1_000_000;
    assert!(config.batcher.idle_flush_ms > 0, "on by default");
    let pipeline = common::start(&config, &broker, dir.path(), "tail").await;
    let expected_rows = valid.len() as u64;
    wait_for(Duration::from_secs(30), "the tail committed", || async {
        committed_rows(&pipeline).await >= expected_rows
    })
    .await;
    pipeline.shutdown().await.unwrap();
    let contents = read_tables(&config, dir.path()).await;
    assert_exactly_once(&contents, &valid);
}
