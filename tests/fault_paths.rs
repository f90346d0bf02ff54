//! Exactly once under faults that strike at the wrong moment: a commit the
//! catalog reports but never made, a lane restart that a rebalance
//! supersedes while it waits, a catalog outage across a rejoin. Each test
//! injects the fault into a real pipeline (librdkafka's mock cluster, a
//! SQLite catalog in a temp dir) and checks the table against what was
//! produced: every trade once, every shed offset in the ledger, and every
//! partition's committed offset moving on.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use common::{TOPIC, assert_exactly_once, read_ids, read_tables, table_offsets, wait_for};
use k2::actors::supervisor::{ForceLevel, LaneState, PipelineStatus};
use k2::config::K2Config;
use k2::degradation::DegradationLevel;
use k2::faults::{Fault, FaultKind};
use k2::loadgen::{GeneratorParams, LoadgenParams, run_loadgen};
use k2::pipeline::Pipeline;
use k2::shedding::LedgerAction;
use k2::storage::catalog::open_catalog;
use k2::storage::reader::{scan_dead_letters, scan_shed_ledger};
use k2::storage::tables::{K2Table, TableIdents};

/// Trades whose ids have no order (ASX and COINBASE: `BHP-000000123`), so
/// deduplication goes through the process-wide exact window and Bloom
/// filters, the path a false commit corrupts. Symbol popularity is nearly
/// flat, so no partition outgrows what the mock broker retains (~5 MiB)
/// while a fault holds its lane: these tests are not about retention.
fn unordered_ids(seed: u64) -> GeneratorParams {
    let defaults = GeneratorParams::default();
    GeneratorParams {
        seed,
        zipf_exponent: 0.3,
        exchanges: defaults
            .exchanges
            .into_iter()
            .filter(|(exchange, _)| exchange != "BINANCE")
            .collect(),
        ..defaults
    }
}

fn produce(
    bootstrap: &str,
    ids: &std::path::Path,
    total: u64,
    rate: u64,
    generator: GeneratorParams,
) -> actix_rt::task::JoinHandle<anyhow::Result<k2::loadgen::LoadgenReport>> {
    actix_rt::spawn(run_loadgen(
        LoadgenParams {
            brokers: bootstrap.to_string(),
            topic: TOPIC.to_string(),
            rate,
            shape: Default::default(),
            duration: None,
            total: Some(total),
            ids_file: Some(ids.to_path_buf()),
            tiers: Default::default(),
            generator,
            progress: false,
        },
        futures::future::pending(),
    ))
}

/// Waits until the table records `produced` offsets in all (partitions
/// start at 0 on a fresh topic).
async fn wait_until_table_covers(config: &K2Config, dir: &std::path::Path, produced: u64, limit: Duration) {
    wait_for(
        limit,
        "the table's offsets cover every produced record",
        || async { table_offsets(config, dir).await.values().sum::<i64>() as u64 >= produced },
    )
    .await;
}

#[actix_rt::test]
async fn a_trades_commit_the_catalog_reports_but_never_made_loses_no_trade() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(4);
    let ids = dir.path().join("ids.csv");
    let mut config = common::config(dir.path(), "k2-lost-trades-commit");
    common::without_retention_headroom(&mut config);
    let pipeline = common::start(&config, &broker, dir.path(), "lost-commit").await;
    // The very first commit of the trades table is lost: the table has never
    // seen the partitions when the next commit comes.
    common::inject(
        &pipeline,
        Fault::LoseCommits {
            table: K2Table::Trades,
            commits: 1,
        },
    );
    let loadgen = produce(broker.bootstrap_servers(), &ids, 40_000, 8_000, unordered_ids(31));
    wait_for(Duration::from_secs(60), "a first commit that holds", || async {
        common::committed_trades(&config, dir.path()).await > 0
    })
    .await;
    // A later one is lost too: the table stands behind what K2 was told.
    common::inject(
        &pipeline,
        Fault::LoseCommits {
            table: K2Table::Trades,
            commits: 1,
        },
    );
    let report = loadgen.await.unwrap().unwrap();
    wait_until_table_covers(&config, dir.path(), report.produced, Duration::from_secs(120)).await;
    let status = pipeline.status().await.unwrap();
    pipeline.shutdown().await.unwrap();
    // Two lost commits (one may have been a snapshot expiry's), each found missing.
    assert!(
        status.committer.commits_not_persisted >= 1,
        "{:?}",
        status.committer
    );
    assert_exactly_once(&read_tables(&config, dir.path()).await, &read_ids(&ids));
}

#[actix_rt::test]
async fn a_ledger_commit_the_catalog_reports_but_never_made_loses_no_shed_offset() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(4);
    let ids = dir.path().join("ids.csv");
    let mut config = common::config(dir.path(), "k2-lost-ledger-commit");
    common::without_retention_headroom(&mut config);
    let pipeline = common::start(&config, &broker, dir.path(), "lost-ledger").await;
    // Tier-3 symbols are shed from the start, and the first ledger commit is lost.
    pipeline
        .supervisor
        .send(ForceLevel {
            level: DegradationLevel::Aggressive,
            reason: "test".to_string(),
            ttl: None,
        })
        .await
        .unwrap();
    common::inject(
        &pipeline,
        Fault::LoseCommits {
            table: K2Table::ShedLedger,
            commits: 1,
        },
    );
    let loadgen = produce(broker.bootstrap_servers(), &ids, 30_000, 8_000, unordered_ids(37));
    let report = loadgen.await.unwrap().unwrap();
    wait_until_table_covers(&config, dir.path(), report.produced, Duration::from_secs(120)).await;
    let status = pipeline.status().await.unwrap();
    pipeline.shutdown().await.unwrap();
    assert_eq!(
        status.committer.commits_not_persisted, 1,
        "{:?}",
        status.committer
    );

    // Every offset of every partition is a trade in the table, a dead letter,
    // or in the ledger: shedding deferred it, nothing lost it.
    let contents = read_tables(&config, dir.path()).await;
    let catalog = open_catalog(&config.catalog, dir.path()).await.unwrap();
    let idents = TableIdents::new(&config.catalog.namespace);
    let ledger = scan_shed_ledger(&catalog.load_table(&idents.shed_ledger).await.unwrap())
        .await
        .unwrap();
    let dead = scan_dead_letters(&catalog.load_table(&idents.dead_letters).await.unwrap())
        .await
        .unwrap();
    let mut accounted: BTreeSet<(i32, i64)> = contents.trades.positions.iter().copied().collect();
    let shed: BTreeSet<(i32, i64)> = ledger
        .iter()
        .filter(|e| e.action == LedgerAction::Shed)
        .flat_map(|e| e.offsets.iter().map(move |o| (e.partition, o)))
        .collect();
    assert!(!shed.is_empty(), "nothing was shed: the test proves nothing");
    accounted.extend(shed.iter().copied());
    accounted.extend(dead.iter().map(|d| (d.partition, d.offset)));
    let mut missing = Vec::new();
    for (partition, next) in contents.offsets.iter() {
        missing.extend((0..next.next_offset).filter(|o| !accounted.contains(&(partition, *o))));
    }
    assert!(
        missing.is_empty(),
        "{} offsets are neither in the table, nor dead letters, nor in the ledger (first: {:?})",
        missing.len(),
        missing.first()
    );
    // The trades that were not shed are in the table exactly once.
    let kept: HashSet<_> = contents.distinct();
    assert_eq!(kept.len(), contents.trades.keys.len(), "duplicates in the table");
}

fn lane(status: &PipelineStatus, partition: i32) -> &k2::actors::supervisor::LaneView {
    status
        .lanes
        .iter()
        .find(|l| l.partition == partition)
        .expect("the partition has a lane")
}

/// Waits until every partition's committed offset in the table moved past
/// where it stood at the start of the wait.
async fn every_partition_advances(
    config: &K2Config,
    dir: &std::path::Path,
    partitions: i32,
    limit: Duration,
) {
    let before = table_offsets(config, dir).await;
    let mut stuck: Vec<i32> = (0..partitions).collect();
    let deadline = std::time::Instant::now() + limit;
    while !stuck.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "partitions {stuck:?} did not commit for {limit:?} (offsets then {before:?}, now {:?})",
            table_offsets(config, dir).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = table_offsets(config, dir).await;
        stuck.retain(|p| now.get(p) <= before.get(p));
    }
}

/// Makes partition 0's sequencer panic and waits until its lane runs again.
async fn panic_and_restart(pipeline: &Pipeline, restarts_before: u64) {
    common::inject(
        pipeline,
        Fault::StagePanic {
            stage: k2::messages::Stage::Sequencer,
            partition: 0,
        },
    );
    wait_for(
        Duration::from_secs(60),
        "the lane rebuilt after the panic",
        || async {
            let status = pipeline.status().await.unwrap();
            let lane = lane(&status, 0);
            lane.restarts > restarts_before && lane.state == LaneState::Running
        },
    )
    .await;
}

#[actix_rt::test]
async fn a_restart_superseded_by_a_rejoin_during_its_backoff_does_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(4);
    let ids = dir.path().join("ids.csv");
    let mut config = common::config(dir.path(), "k2-superseded-restart");
    common::without_retention_headroom(&mut config);
    config.lanes.max_restarts = 20;
    let pipeline = common::start(&config, &broker, dir.path(), "superseded").await;
    let loadgen = produce(
        broker.bootstrap_servers(),
        &ids,
        300_000,
        5_000,
        unordered_ids(41),
    );
    wait_for(Duration::from_secs(60), "a first commit", || async {
        table_offsets(&config, dir.path()).await.len() == 4
    })
    .await;

    // Each panic doubles the backoff: after six, the next rebuild waits 6.4 s.
    for restarts in 0..6 {
        panic_and_restart(&pipeline, restarts).await;
    }
    common::inject(
        &pipeline,
        Fault::StagePanic {
            stage: k2::messages::Stage::Sequencer,
            partition: 0,
        },
    );
    wait_for(
        Duration::from_secs(30),
        "the lane waiting out its backoff",
        || async { lane(&pipeline.status().await.unwrap(), 0).state == LaneState::Restarting },
    )
    .await;
    // The group takes the partitions away and hands them back meanwhile: the
    // new assignment's lane supersedes the waiting rebuild.
    pipeline.rejoin_group();
    tokio::time::sleep(Duration::from_secs(8)).await;
    every_partition_advances(&config, dir.path(), 4, Duration::from_secs(30)).await;
    every_partition_advances(&config, dir.path(), 4, Duration::from_secs(30)).await;

    let report = loadgen.await.unwrap().unwrap();
    wait_until_table_covers(&config, dir.path(), report.produced, Duration::from_secs(120)).await;
    pipeline.shutdown().await.unwrap();
    assert_exactly_once(&read_tables(&config, dir.path()).await, &read_ids(&ids));
}

#[actix_rt::test]
async fn a_catalog_outage_across_a_rejoin_leaves_no_partition_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(4);
    let ids = dir.path().join("ids.csv");
    let mut config = common::config(dir.path(), "k2-outage-rejoin");
    common::without_retention_headroom(&mut config);
    config.lanes.max_restarts = 20;
    let pipeline = common::start(&config, &broker, dir.path(), "outage-rejoin").await;
    let loadgen = produce(
        broker.bootstrap_servers(),
        &ids,
        160_000,
        4_000,
        unordered_ids(43),
    );
    wait_for(Duration::from_secs(60), "a first commit", || async {
        table_offsets(&config, dir.path()).await.len() == 4
    })
    .await;

    // Partition 0's lane is rebuilt while the catalog is down: it waits for
    // the table, trying again every second.
    common::inject(&pipeline, Fault::CatalogDown);
    common::inject(
        &pipeline,
        Fault::StagePanic {
            stage: k2::messages::Stage::Sequencer,
            partition: 0,
        },
    );
    wait_for(
        Duration::from_secs(30),
        "the lane waiting for the catalog",
        || async {
            let status = pipeline.status().await.unwrap();
            lane(&status, 0)
                .last_error
                .as_deref()
                .is_some_and(|e| e.starts_with("waiting for the catalog"))
        },
    )
    .await;
    pipeline.rejoin_group();
    tokio::time::sleep(Duration::from_secs(6)).await;
    pipeline.faults.clear_kind(FaultKind::CatalogDown);
    every_partition_advances(&config, dir.path(), 4, Duration::from_secs(45)).await;
    every_partition_advances(&config, dir.path(), 4, Duration::from_secs(30)).await;

    let report = loadgen.await.unwrap().unwrap();
    wait_until_table_covers(&config, dir.path(), report.produced, Duration::from_secs(120)).await;
    pipeline.shutdown().await.unwrap();
    assert_exactly_once(&read_tables(&config, dir.path()).await, &read_ids(&ids));
}

/// The SQL catalog's real failure, on the real database: a deferred
/// constraint trigger makes PostgreSQL refuse the transaction at COMMIT, after
/// the catalog's UPDATE of the metadata pointer succeeded.
/// `iceberg-catalog-sql` 0.10.1 ignores that error (apache/iceberg-rust#3061)
/// and reports the commit as made; K2 must not believe it.
#[actix_rt::test]
#[ignore = "needs K2_TEST_POSTGRES_URL; ./scripts/test runs it"]
async fn commits_postgresql_refuses_at_commit_time_are_not_believed() {
    use sqlx::Executor as _;

    let url =
        std::env::var("K2_TEST_POSTGRES_URL").expect("K2_TEST_POSTGRES_URL names a PostgreSQL database");
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(4);
    let ids = dir.path().join("ids.csv");
    let mut config = common::config(dir.path(), "k2-pg-commit-fails");
    common::without_retention_headroom(&mut config);
    config.catalog.uri = url.clone();
    // A catalog name of its own: the trigger fails this run's commits only.
    let catalog_name = format!("k2test_{}", uuid::Uuid::now_v7().simple());
    config.catalog.name = catalog_name.clone();
    let pipeline = common::start(&config, &broker, dir.path(), "pg-commit-fails").await;

    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("PostgreSQL reachable");
    db.execute(
        r#"
        CREATE TABLE IF NOT EXISTS k2_test_failing_commits (catalog_name TEXT PRIMARY KEY);
        CREATE OR REPLACE FUNCTION k2_test_fail_commit() RETURNS trigger AS $$
        BEGIN
          IF EXISTS (SELECT 1 FROM k2_test_failing_commits WHERE catalog_name = NEW.catalog_name) THEN
            RAISE EXCEPTION 'k2 test: this COMMIT fails';
          END IF;
          RETURN NULL;
        END $$ LANGUAGE plpgsql;
        DROP TRIGGER IF EXISTS k2_test_fail_commit ON iceberg_tables;
        CREATE CONSTRAINT TRIGGER k2_test_fail_commit AFTER UPDATE ON iceberg_tables
          DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION k2_test_fail_commit();
        "#,
    )
    .await
    .expect("the failing-COMMIT trigger is installed");

    let loadgen = produce(broker.bootstrap_servers(), &ids, 60_000, 5_000, unordered_ids(47));
    wait_for(Duration::from_secs(60), "a first commit", || async {
        table_offsets(&config, dir.path()).await.len() == 4
    })
    .await;
    // Every COMMIT of this catalog fails for 6 seconds while trades arrive.
    sqlx::query("INSERT INTO k2_test_failing_commits (catalog_name) VALUES ($1)")
        .bind(&catalog_name)
        .execute(&db)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    sqlx::query("DELETE FROM k2_test_failing_commits WHERE catalog_name = $1")
        .bind(&catalog_name)
        .execute(&db)
        .await
        .unwrap();

    let report = loadgen.await.unwrap().unwrap();
    wait_until_table_covers(&config, dir.path(), report.produced, Duration::from_secs(120)).await;
    let status = pipeline.status().await.unwrap();
    pipeline.shutdown().await.unwrap();
    assert!(
        status.committer.commits_not_persisted > 0,
        "no commit was found missing while COMMIT failed: {:?}",
        status.committer
    );
    assert_exactly_once(&read_tables(&config, dir.path()).await, &read_ids(&ids));
}

// A replayed epoch, at the commit protocol's level.

mod replay {
    use std::sync::Arc;

    use iceberg::Catalog;
    use k2::config::CatalogConfig;
    use k2::faults::{FaultInjectingCatalog, Faults};
    use k2::model::{ProbableDuplicate, ReferenceRecord, SequenceEventRow, Side, SideRows, Trade};
    use k2::storage::catalog::open_catalog;
    use k2::storage::commit::{Committer, PartitionRange};
    use k2::storage::reader::committed_record_count;
    use k2::storage::tables::{K2Table, TableIdents, ensure_tables};
    use k2::storage::writer::{TableWriter, TradeBatchBuilder};

    const SIDE_TOPIC: &str = "t";

    /// A committer over a SQLite catalog in `dir`, with K2's tables.
    async fn committer(dir: &std::path::Path, faults: Arc<Faults>) -> Committer {
        let config = CatalogConfig::sqlite_in(dir);
        let idents = TableIdents::new(&config.namespace);
        let catalog: Arc<dyn Catalog> = Arc::new(FaultInjectingCatalog::new(
            open_catalog(&config, dir).await.unwrap(),
            faults,
            idents.clone(),
        ));
        ensure_tables(catalog.as_ref(), &idents).await.unwrap();
        Committer {
            catalog,
            idents,
            topic: SIDE_TOPIC.to_string(),
            writer_id: "w".to_string(),
            zstd_level: 1,
        }
    }

    fn trade(offset: i64) -> Trade {
        Trade {
            exchange: "ASX".into(),
            symbol: "BHP".into(),
            sequence: offset + 1,
            trade_id: format!("BHP-{offset}").into(),
            price: 45_00000000,
            quantity: 1_00000000,
            side: Side::Buy,
            event_time_us: k2::model::now_us(),
            ingest_time_us: k2::model::now_us(),
            partition: 0,
            offset,
        }
    }

    fn probable(offset: i64, kept: bool) -> ProbableDuplicate {
        ProbableDuplicate {
            exchange: "ASX".into(),
            symbol: "BHP".into(),
            trade_id: format!("BHP-{offset}"),
            topic: SIDE_TOPIC.into(),
            partition: 0,
            offset,
            kept,
            detected_at_us: k2::model::now_us(),
        }
    }

    /// Partition 0's records 0..10 as one range: `kept` trades written to a
    /// data file, and `probable` rows.
    async fn range(committer: &Committer, kept: &[i64], probable: Vec<ProbableDuplicate>) -> PartitionRange {
        let table = committer
            .catalog
            .load_table(&committer.idents.trades)
            .await
            .unwrap();
        let writer = TableWriter::new(&table, 1, 64 << 20).unwrap();
        let mut builder = TradeBatchBuilder::with_capacity(kept.len());
        for &offset in kept {
            builder.push(&trade(offset));
        }
        let files = writer
            .write(builder.finish(writer.arrow_schema()).unwrap())
            .await
            .unwrap();
        PartitionRange {
            partition: 0,
            first_offset: 0,
            next_offset: 10,
            files,
            rows: kept.len() as u64,
            side: SideRows {
                probable_duplicates: probable,
                ..SideRows::default()
            },
        }
    }

    async fn rows(committer: &Committer, table: K2Table) -> u64 {
        let table = committer
            .catalog
            .load_table(committer.idents.get(table))
            .await
            .unwrap();
        committed_record_count(&table)
    }

    #[actix_rt::test]
    async fn a_replayed_epoch_that_drops_a_probable_duplicate_records_it_even_below_the_side_tables_offset() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Arc::new(Faults::default());
        let committer = committer(dir.path(), faults.clone()).await;
        // The first attempt records a kept probable duplicate at offset 8,
        // then its trades commit does not persist.
        faults
            .inject(
                k2::faults::Fault::LoseCommits {
                    table: K2Table::Trades,
                    commits: 1,
                },
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        let first = range(&committer, &(0..10).collect::<Vec<_>>(), vec![probable(8, true)]).await;
        let _ = committer.commit(&[first]).await;
        assert_eq!(
            rows(&committer, K2Table::Trades).await,
            0,
            "the fault lost the commit"
        );
        assert_eq!(rows(&committer, K2Table::ProbableDuplicates).await, 1);
        // The replay judges offset 5 a probable duplicate this time (the
        // Bloom filters moved on meanwhile) and drops it.
        let kept: Vec<i64> = (0..10).filter(|&o| o != 5).collect();
        let replay = range(&committer, &kept, vec![probable(5, false), probable(8, true)]).await;
        let outcome = committer.commit(&[replay]).await.unwrap();
        assert_eq!(outcome.committed.get(&0), Some(&10));
        assert_eq!(rows(&committer, K2Table::Trades).await, 9);
        // The dropped trade has its row: 8 (first attempt) and 5 (replay).
        assert_eq!(
            rows(&committer, K2Table::ProbableDuplicates).await,
            2,
            "a trade was dropped with no row that says so"
        );
    }
    fn gap(received: i64, reported_offset: i64) -> SequenceEventRow {
        SequenceEventRow {
            kind: "gap",
            exchange: "ASX".into(),
            symbol: "BHP".into(),
            expected: Some(received - 1),
            received,
            missing: Some(1),
            previous: None,
            topic: SIDE_TOPIC.into(),
            partition: 0,
            offset: reported_offset - 1,
            reported_offset,
            detected_at_us: k2::model::now_us(),
        }
    }

    /// Partition 0's tail as a lane stops: an empty range at offset 10 with
    /// the gaps its closed reorder windows report, about record 9.
    fn tail() -> PartitionRange {
        PartitionRange {
            partition: 0,
            first_offset: 10,
            next_offset: 10,
            files: Vec::new(),
            rows: 0,
            side: SideRows {
                sequence_events: vec![gap(11, 9), gap(21, 9)],
                ..SideRows::default()
            },
        }
    }

    #[actix_rt::test]
    async fn a_lanes_tail_of_gaps_lands_below_the_side_tables_offset_once_even_when_retried() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Arc::new(Faults::default());
        let committer = committer(dir.path(), faults.clone()).await;
        // Records 0..10 commit with a gap closed at record 7: the side table
        // stands at 10 for partition 0.
        let mut first = range(&committer, &(0..10).collect::<Vec<_>>(), Vec::new()).await;
        first.side.sequence_events.push(gap(5, 7));
        committer.commit(&[first]).await.unwrap();
        assert_eq!(rows(&committer, K2Table::SequenceGaps).await, 1);

        // The lane stops: its tail lands although its rows are about record 9.
        committer.commit(&[tail()]).await.unwrap();
        assert_eq!(
            rows(&committer, K2Table::SequenceGaps).await,
            3,
            "the tail's gaps were dropped"
        );
        // The same tail again, as a retry after a commit that landed but was
        // not seen: nothing is written twice.
        committer.commit(&[tail()]).await.unwrap();
        assert_eq!(rows(&committer, K2Table::SequenceGaps).await, 3);

        // In one commit with the range before it, the tail lands too.
        let dir = tempfile::tempdir().unwrap();
        let committer = self::committer(dir.path(), faults).await;
        let mut before = range(&committer, &(0..10).collect::<Vec<_>>(), Vec::new()).await;
        before.side.sequence_events.push(gap(5, 7));
        committer.commit(&[before, tail()]).await.unwrap();
        assert_eq!(rows(&committer, K2Table::SequenceGaps).await, 3);
    }

    fn reference(offset: i64) -> ReferenceRecord {
        ReferenceRecord {
            exchange: "ASX".into(),
            symbol: "BHP".into(),
            name: Some("BHP Group".into()),
            currency: Some("AUD".into()),
            tick_size: 500_000,
            lot_size: 100_000_000,
            status: "trading".into(),
            effective_time_us: k2::model::now_us(),
            ingest_time_us: k2::model::now_us(),
            partition: 0,
            offset,
        }
    }

    #[actix_rt::test]
    async fn reference_data_of_a_replayed_epoch_lands_once() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Arc::new(Faults::default());
        let committer = committer(dir.path(), faults.clone()).await;
        // Records 3 and 7 are reference data; the first attempt writes them,
        // then its trades commit does not persist.
        faults
            .inject(
                k2::faults::Fault::LoseCommits {
                    table: K2Table::Trades,
                    commits: 1,
                },
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        let trades: Vec<i64> = (0..10).filter(|o| ![3, 7].contains(o)).collect();
        let mut first = range(&committer, &trades, Vec::new()).await;
        first.side.reference = vec![reference(3), reference(7)];
        let outcome = committer.commit(&[first]).await;
        assert!(outcome.is_err(), "the fault lost the trades commit: {outcome:?}");
        assert_eq!(rows(&committer, K2Table::Trades).await, 0);
        assert_eq!(rows(&committer, K2Table::Reference).await, 2);
        // The replay carries the same range: its reference rows are skipped.
        let mut replay = range(&committer, &trades, Vec::new()).await;
        replay.side.reference = vec![reference(3), reference(7)];
        let outcome = committer.commit(&[replay]).await.unwrap();
        assert_eq!(outcome.committed.get(&0), Some(&10));
        assert_eq!(outcome.reference, 0, "the replay wrote reference data again");
        assert_eq!(rows(&committer, K2Table::Trades).await, 8);
        assert_eq!(rows(&committer, K2Table::Reference).await, 2);
        // The next range's reference data lands.
        let next = PartitionRange {
            partition: 0,
            first_offset: 10,
            next_offset: 12,
            files: Vec::new(),
            rows: 0,
            side: SideRows {
                reference: vec![reference(10), reference(11)],
                ..SideRows::default()
            },
        };
        let outcome = committer.commit(&[next]).await.unwrap();
        assert_eq!((outcome.committed.get(&0), outcome.reference), (Some(&12), 2));
        assert_eq!(rows(&committer, K2Table::Reference).await, 4);
    }
}
