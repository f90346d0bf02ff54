//! Black-box tests of the ingestion backbone against librdkafka's mock
//! cluster (real Kafka protocol) and a real Iceberg SQL catalog in a temp
//! dir: every accepted trade lands exactly once, malformed records land in
//! `k2.dead_letters`, across stops, restarts and rebalances.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{assert_exactly_once, committed_rows, read_ids, read_tables, spawn_loadgen, wait_for};
use k2::faults::Fault;
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

#[actix_rt::test]
async fn batchers_keep_writing_while_a_commit_is_in_flight_and_a_lane_rebuilt_meanwhile_starts_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(4);
    let ids = dir.path().join("ids.csv");
    let mut config = common::config(dir.path(), "k2-commit-in-flight");
    common::without_retention_headroom(&mut config);
    let pipeline = common::start(&config, &broker, dir.path(), "in-flight").await;
    // Every commit stays in flight 1.5 s before it reaches the catalog.
    common::inject(
        &pipeline,
        Fault::CommitLatency {
            latency: Duration::from_millis(1_500),
        },
    );
    // The load starts once the lanes run, so it lasts through several commits.
    wait_for(Duration::from_secs(60), "every lane running", || async {
        let lanes = pipeline.status().await.unwrap().lanes;
        lanes.len() == 4
            && lanes
                .iter()
                .all(|l| l.state == k2::actors::supervisor::LaneState::Running)
    })
    .await;
    let loadgen = spawn_loadgen(broker.bootstrap_servers(), &ids, 60_000, 12_000);

    // Files the lanes flushed after the running commit took its own are
    // accepted into the next one: the batchers did not wait for it.
    wait_for(
        Duration::from_secs(60),
        "files accepted while a commit is in flight",
        || async {
            let committer = pipeline.status().await.unwrap().committer;
            committer.commit_in_flight_ms.is_some_and(|ms| ms >= 300) && committer.pending_rows > 0
        },
    )
    .await;

    // Partition 0's lane is rebuilt while a commit that carries its range
    // waits to reach the catalog: the new lane starts where the table stands
    // once that commit landed, so the table never refuses its first range.
    wait_for(Duration::from_secs(60), "a first commit", || async {
        committed_rows(&pipeline).await > 0
    })
    .await;
    wait_for(Duration::from_secs(30), "a commit that just started", || async {
        let committer = pipeline.status().await.unwrap().committer;
        committer.commit_in_flight_ms.is_some_and(|ms| ms < 700) && committer.in_flight_rows > 0
    })
    .await;
    common::inject(
        &pipeline,
        Fault::StagePanic {
            stage: k2::messages::Stage::Sequencer,
            partition: 0,
        },
    );

    let report = loadgen.await.unwrap().unwrap();
    assert_eq!(report.produced, 60_000);
    wait_for(Duration::from_secs(120), "every trade committed", || async {
        committed_rows(&pipeline).await >= 60_000
    })
    .await;
    let status = pipeline.status().await.unwrap();
    pipeline.shutdown().await.unwrap();
    assert_exactly_once(&read_tables(&config, dir.path()).await, &read_ids(&ids));
    let lane0 = status.lanes.iter().find(|l| l.partition == 0).unwrap();
    assert_eq!(
        lane0.restarts, 1,
        "partition 0's lane was rebuilt once, for the panic"
    );
    assert_eq!(status.committer.fenced, 0, "no range was refused");
}

/// A pipeline on a 4-partition broker whose gaps are reported once one more
/// record of their symbol follows the one that showed them.
async fn gap_reporting_pipeline(
    dir: &std::path::Path,
    name: &str,
) -> (
    k2::config::K2Config,
    k2::embedded::EmbeddedBroker,
    k2::pipeline::Pipeline,
) {
    let broker = common::broker(4);
    let mut config = common::config(dir, &format!("k2-{name}"));
    common::without_retention_headroom(&mut config);
    config.sequence.reorder_window = 1;
    let pipeline = common::start(&config, &broker, dir, name).await;
    (config, broker, pipeline)
}

/// Every row of `k2.sequence_gaps`.
async fn sequence_events(
    config: &k2::config::K2Config,
    dir: &std::path::Path,
) -> Vec<k2::model::SequenceEventRow> {
    let catalog = k2::storage::catalog::open_catalog(&config.catalog, dir)
        .await
        .unwrap();
    let idents = k2::storage::tables::TableIdents::new(&config.catalog.namespace);
    k2::storage::reader::scan_sequence_events(
        &catalog.load_table(&idents.sequence_gaps).await.unwrap(),
        iceberg::expr::Predicate::AlwaysTrue,
    )
    .await
    .unwrap()
}

#[actix_rt::test]
async fn a_feed_that_repeats_and_skips_trades_lands_each_trade_once_and_every_skipped_number_as_a_gap() {
    use k2::loadgen::{LoadgenParams, run_loadgen};

    let dir = tempfile::tempdir().unwrap();
    let (config, broker, pipeline) = gap_reporting_pipeline(dir.path(), "odd-feed").await;
    let ids = dir.path().join("ids.csv");
    let report = run_loadgen(
        LoadgenParams {
            brokers: broker.bootstrap_servers().to_string(),
            topic: common::TOPIC.to_string(),
            rate: 5_000,
            shape: Default::default(),
            duration: None,
            total: Some(20_000),
            ids_file: Some(ids.clone()),
            tiers: Default::default(),
            generator: GeneratorParams {
                seed: 71,
                duplicate_ratio: 0.05,
                gap_ratio: 0.01,
                ..GeneratorParams::default()
            },
            progress: false,
        },
        futures::future::pending(),
    )
    .await
    .unwrap();
    assert!(report.duplicates > 500 && report.gaps > 100, "{report:?}");
    let produced = read_ids(&ids);
    assert_eq!(produced.len() as u64, report.produced - report.duplicates);
    wait_for(Duration::from_secs(120), "every trade committed", || async {
        committed_rows(&pipeline).await >= produced.len() as u64
    })
    .await;
    // The in-memory state store closes open gap windows as the lanes stop.
    pipeline.shutdown().await.unwrap();

    assert_exactly_once(&read_tables(&config, dir.path()).await, &produced);
    let events = sequence_events(&config, dir.path()).await;
    let reported: i64 = events
        .iter()
        .filter(|e| e.kind == "gap")
        .filter_map(|e| e.missing)
        .sum();
    // Every skipped number that two later trades of its symbol followed had
    // its window closed while the lane ran: each is one missing record in
    // the table. The windows still open when the lanes stop are closed and
    // reported at shutdown, on each lane's last, empty range (its tail): so
    // every skipped number is reported, once.
    let mut sequences: std::collections::HashMap<(String, String), Vec<i64>> = Default::default();
    for (exchange, symbol, trade_id) in &produced {
        let digits = trade_id.trim_start_matches(|c: char| !c.is_ascii_digit());
        sequences
            .entry((exchange.clone(), symbol.clone()))
            .or_default()
            .push(digits.parse().unwrap());
    }
    let (mut closed, mut skipped) = (0i64, 0i64);
    for numbers in sequences.values_mut() {
        numbers.sort_unstable();
        for (i, pair) in numbers.windows(2).enumerate() {
            let missing = pair[1] - pair[0] - 1;
            skipped += missing;
            if i + 2 < numbers.len() {
                closed += missing;
            }
        }
    }
    assert_eq!(skipped as u64, report.gaps, "the ids show every skipped number");
    assert!(closed > 100, "{closed} closed gaps");
    assert_eq!(
        reported, skipped,
        "missing records reported; {closed} of them in gaps closed while the lanes ran"
    );
}

/// A second `k2 loadgen` run against the same topic starts its sequences
/// (and Binance trade ids) above the first's, as the CLI does by default:
/// none of its trades is taken for a duplicate of the first run's, and the
/// jump between the runs is one gap per symbol.
#[actix_rt::test]
async fn a_second_loadgen_run_on_the_same_topic_lands_every_trade_of_both_runs() {
    use k2::loadgen::{LoadgenParams, run_loadgen, run_start_sequence};

    let dir = tempfile::tempdir().unwrap();
    let (config, broker, pipeline) = gap_reporting_pipeline(dir.path(), "two-runs").await;
    let ids = dir.path().join("ids.csv");
    let second_start = run_start_sequence(std::time::SystemTime::now());
    for first_sequence in [1, second_start] {
        run_loadgen(
            LoadgenParams {
                brokers: broker.bootstrap_servers().to_string(),
                topic: common::TOPIC.to_string(),
                rate: 0,
                shape: Default::default(),
                duration: None,
                total: Some(6_000),
                ids_file: Some(ids.clone()),
                tiers: Default::default(),
                generator: GeneratorParams {
                    // The same seed: the same symbols in the same order, so
                    // only the id space tells the runs apart.
                    seed: 5,
                    malformed_ratio: 0.0,
                    first_sequence,
                    ..GeneratorParams::default()
                },
                progress: false,
            },
            futures::future::pending(),
        )
        .await
        .unwrap();
    }
    let produced = read_ids(&ids);
    assert_eq!(produced.len(), 12_000, "two runs of 6,000 distinct trades");
    wait_for(Duration::from_secs(120), "both runs committed", || async {
        committed_rows(&pipeline).await >= 12_000
    })
    .await;
    pipeline.shutdown().await.unwrap();
    assert_exactly_once(&read_tables(&config, dir.path()).await, &produced);

    // Symbols with a trade in the first run and at least three in the
    // second: the gap at the jump closed while the lanes ran.
    let trades = k2::loadgen::read_ids_file(&ids).unwrap();
    let mut runs: std::collections::HashMap<(String, String), (usize, usize)> = Default::default();
    for trade in &trades {
        let (exchange, symbol, _) = &trade.key;
        let counts = runs.entry((exchange.clone(), symbol.clone())).or_default();
        if trade
            .key
            .2
            .trim_start_matches(|c: char| !c.is_ascii_digit())
            .len()
            < 10
        {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
    }
    let in_both = runs.values().filter(|(a, b)| *a > 0 && *b > 0).count();
    let closed = runs.values().filter(|(a, b)| *a > 0 && *b >= 3).count();
    let events = sequence_events(&config, dir.path()).await;
    let jumps = events
        .iter()
        .filter(|e| e.kind == "gap" && e.received == second_start)
        .count();
    assert!(closed > 10, "{closed} symbols traded in both runs");
    assert!(
        (closed..=in_both).contains(&jumps),
        "{jumps} gaps at the jump; {closed} closed while the lanes ran, {in_both} symbols in both runs"
    );
    assert_eq!(
        events.iter().filter(|e| e.kind == "gap").count(),
        jumps,
        "no gap other than the jump between the runs"
    );
}
