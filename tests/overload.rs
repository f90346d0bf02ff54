//! Overload, black box: input far beyond what K2 ingests fills the broker's
//! retained range; the retention headroom raises the level, shedding by key
//! keeps up, and every offset ends up committed, ledgered or a dead letter
//! (backfill then ingests what was shed). And retention overtaking one
//! partition restarts that partition alone: the other lanes keep their
//! incarnations and keep committing.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use common::{TOPIC, read_ids, read_tables, table_offsets, wait_for};
use k2::backfill::{BackfillOptions, backfill};
use k2::config::K2Config;
use k2::degradation::{DegradationLevel, NEVER};
use k2::faults::Fault;
use k2::loadgen::{GeneratorParams, LoadgenParams, Spread, preload, run_loadgen};
use k2::messages::Stage;
use k2::model::TradeKey;
use k2::shedding::LedgerAction;
use k2::storage::catalog::open_catalog;
use k2::storage::reader::{DeadLetterRow, scan_dead_letters, scan_shed_ledger};
use k2::storage::tables::TableIdents;

/// What K2's own tables say about every offset of the topic.
struct Accounting {
    trades: Vec<(i32, i64)>,
    distinct_keys: HashSet<TradeKey>,
    rows: usize,
    dead: Vec<DeadLetterRow>,
    shed: BTreeSet<(i32, i64)>,
    offsets: BTreeMap<i32, i64>,
}

impl Accounting {
    async fn read(config: &K2Config, dir: &std::path::Path) -> Self {
        let contents = read_tables(config, dir).await;
        let catalog = open_catalog(&config.catalog, dir).await.unwrap();
        let idents = TableIdents::new(&config.catalog.namespace);
        let ledger = scan_shed_ledger(&catalog.load_table(&idents.shed_ledger).await.unwrap())
            .await
            .unwrap();
        let open = k2::backfill::open_entries(ledger);
        let dead = scan_dead_letters(&catalog.load_table(&idents.dead_letters).await.unwrap())
            .await
            .unwrap();
        Self {
            trades: contents.trades.positions.clone(),
            distinct_keys: contents.distinct(),
            rows: contents.trades.keys.len(),
            dead,
            shed: open
                .iter()
                .filter(|e| e.action == LedgerAction::Shed)
                .flat_map(|e| e.offsets.iter().map(move |o| (e.partition, o)))
                .collect(),
            offsets: contents.offsets.iter().map(|(p, o)| (p, o.next_offset)).collect(),
        }
    }

    /// Offsets Kafka deleted before K2 read them, from the retention dead
    /// letters ("retention: Kafka deleted offsets [from, to) ...").
    fn lost_to_retention(&self) -> BTreeSet<(i32, i64)> {
        let mut lost = BTreeSet::new();
        for row in self.dead.iter().filter(|d| d.reason.starts_with("retention:")) {
            let range = &row.reason[row.reason.find('[').unwrap() + 1..row.reason.find(')').unwrap()];
            let (from, to) = range.split_once(", ").unwrap();
            let (from, to): (i64, i64) = (from.parse().unwrap(), to.parse().unwrap());
            lost.extend((from..to).map(|o| (row.partition, o)));
        }
        lost
    }

    /// Offsets below the table's offsets that are in none of K2's tables.
    fn unaccounted(&self) -> Vec<(i32, i64)> {
        let mut accounted: BTreeSet<(i32, i64)> = self.trades.iter().copied().collect();
        accounted.extend(self.shed.iter().copied());
        accounted.extend(self.dead.iter().map(|d| (d.partition, d.offset)));
        accounted.extend(self.lost_to_retention());
        let mut missing = Vec::new();
        for (&partition, &next) in &self.offsets {
            missing.extend(
                (0..next)
                    .filter(|o| !accounted.contains(&(partition, *o)))
                    .map(|o| (partition, o)),
            );
        }
        missing
    }
}

/// Highest level a transition reached, and whether retention headroom caused one.
async fn level_history(pipeline: &k2::pipeline::Pipeline) -> (DegradationLevel, bool) {
    let view = pipeline
        .supervisor
        .send(k2::actors::supervisor::GetDegradation)
        .await
        .unwrap();
    let highest = view
        .transitions
        .iter()
        .map(|t| t.to)
        .max()
        .unwrap_or(DegradationLevel::Normal);
    let by_headroom = view
        .transitions
        .iter()
        .any(|t| t.cause.starts_with("retention_headroom"));
    (highest, by_headroom)
}

#[actix_rt::test]
async fn a_backlog_near_what_the_broker_retains_raises_the_level_on_retention_headroom_and_sheds_by_key_losing_nothing()
 {
    const PARTITIONS: i32 = 8;
    // ~80% of what the mock broker retains per partition (~29,000 records
    // of this size) is waiting when K2 starts, as after an outage, and more
    // keeps arriving: K2 could not read it all before retention caught up
    // if it ingested everything. Every shed record stays retained for the
    // backfill.
    const BACKLOG: u64 = 8 * 23_000;
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let loaded = tokio::task::spawn_blocking(move || {
        preload(
            &bootstrap,
            TOPIC,
            BACKLOG,
            GeneratorParams {
                seed: 53,
                malformed_ratio: 0.005,
                ..GeneratorParams::default()
            },
            Spread::Blocks {
                partitions: PARTITIONS,
                block: 1_000,
            },
        )
    })
    .await
    .unwrap()
    .unwrap();

    let mut config = common::config(dir.path(), "k2-overload");
    // AGGRESSIVE once 60% of the retained range waits unread (the default
    // waits for 80%), and only the retention headroom may raise the level.
    config.degradation.retention_headroom_ratio.escalate = [0.6, 0.5, 0.4, 0.3];
    config.degradation.retention_headroom_ratio.recover = [0.7, 0.6, 0.5, 0.4];
    for lag in [
        &mut config.degradation.total_lag_records,
        &mut config.degradation.partition_lag_records,
    ] {
        lag.escalate = [NEVER; 4];
        lag.recover = [NEVER; 4];
    }
    let pipeline = common::start(&config, &broker, dir.path(), "overload").await;
    // Every lane reads one chunk a second until the level is up: K2 is
    // slower than the backlog, as the scenario needs. Unslowed, it can read
    // the whole backlog in fewer ticks of the supervisor than the headroom
    // takes to show (a retention loss it would not have suffered).
    let slow = common::inject(
        &pipeline,
        Fault::SlowStage {
            stage: Stage::PartitionConsumer,
            partition: None,
            delay: Duration::from_secs(1),
        },
    );
    // New trades keep arriving, on an exchange of their own (ids never
    // repeat the backlog's) whose symbols are all tier 3.
    let live = dir.path().join("live.csv");
    let report = run_loadgen(
        LoadgenParams {
            brokers: broker.bootstrap_servers().to_string(),
            topic: TOPIC.to_string(),
            rate: 1_000,
            shape: Default::default(),
            duration: None,
            total: Some(8_000),
            ids_file: Some(live.clone()),
            tiers: Default::default(),
            generator: GeneratorParams {
                seed: 57,
                zipf_exponent: 0.0,
                exchanges: vec![("LIVE".to_string(), (0..32).map(|i| format!("S{i:02}")).collect())],
                ..GeneratorParams::default()
            },
            progress: false,
        },
        futures::future::pending(),
    )
    .await
    .unwrap();
    let total = BACKLOG + report.produced;
    wait_for(
        Duration::from_secs(60),
        "AGGRESSIVE by retention headroom",
        || async {
            let (highest, by_headroom) = level_history(&pipeline).await;
            by_headroom && highest >= DegradationLevel::Aggressive
        },
    )
    .await;
    pipeline.faults.clear(slow).expect("the slow stage was active");
    wait_for(Duration::from_secs(240), "every offset accounted for", || async {
        table_offsets(&config, dir.path()).await.values().sum::<i64>() as u64 >= total
    })
    .await;
    let (highest, by_headroom) = level_history(&pipeline).await;
    let early_shed: u64 = k2::metrics::install()
        .render()
        .lines()
        .filter(|l| l.starts_with("k2_early_shed_records_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum();
    pipeline.shutdown().await.unwrap();

    assert!(by_headroom, "the retention headroom raised no level");
    assert!(
        highest >= DegradationLevel::Aggressive,
        "the level only reached {highest}"
    );
    assert!(early_shed > 0, "nothing was shed by key");
    let accounting = Accounting::read(&config, dir.path()).await;
    assert_eq!(
        accounting.lost_to_retention().len(),
        0,
        "records lost to retention"
    );
    assert!(!accounting.shed.is_empty(), "nothing in the ledger");
    let unaccounted = accounting.unaccounted();
    assert!(
        unaccounted.is_empty(),
        "{} offsets are neither committed, ledgered nor dead letters (first {:?})",
        unaccounted.len(),
        unaccounted.first()
    );
    assert_eq!(accounting.rows, accounting.distinct_keys.len(), "duplicates");
    // committed + shed + dead-lettered = produced.
    let dead = accounting.dead.len();
    assert_eq!(
        (accounting.rows + accounting.shed.len() + dead) as u64,
        total,
        "committed {} + shed {} + dead-lettered {dead}",
        accounting.rows,
        accounting.shed.len()
    );

    // The backfill ingests every shed trade: committed + dead-lettered = produced.
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
    .expect("backfill runs");
    assert_eq!(report.expired, 0, "{report:?}");
    let after = Accounting::read(&config, dir.path()).await;
    assert!(after.shed.is_empty(), "entries still open after the backfill");
    assert_eq!(
        after.rows,
        after.distinct_keys.len(),
        "duplicates after the backfill"
    );
    let produced: HashSet<TradeKey> = loaded.valid.iter().cloned().chain(read_ids(&live)).collect();
    assert_eq!(after.distinct_keys, produced, "the table after the backfill");
    assert_eq!((after.rows + after.dead.len()) as u64, total);
}

/// Produces `count` generated trades into `partition` alone, as fast as the
/// producer goes.
fn burst_into(bootstrap: &str, partition: i32, count: u64, seed: u64) -> Vec<TradeKey> {
    use rdkafka::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    // An exchange of its own: the other producer's generator numbers trades
    // the same way, and equal ids would be dropped as duplicates.
    let mut generator = k2::loadgen::TradeGenerator::new(GeneratorParams {
        seed,
        exchanges: vec![(
            "BURST".to_string(),
            ["AAA", "BBB", "CCC", "DDD"].map(String::from).to_vec(),
        )],
        ..GeneratorParams::default()
    });
    let mut ids = Vec::new();
    for _ in 0..count {
        let message = generator.next_message(k2::model::now_us());
        loop {
            let record = BaseRecord::to(TOPIC)
                .partition(partition)
                .key(message.key.as_str())
                .payload(message.payload.as_slice());
            match producer.send(record) {
                Ok(()) => break,
                Err(_) => {
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
        producer.poll(Duration::ZERO);
        if let Some(id) = message.trade {
            ids.push(id);
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    ids
}

#[actix_rt::test]
async fn retention_overtaking_one_partition_restarts_it_alone_while_seven_others_commit_throughout() {
    const PARTITIONS: i32 = 8;
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(PARTITIONS);
    let ids = dir.path().join("ids.csv");
    let mut config = common::config(dir.path(), "k2-one-partition");
    // Neither shedding nor the level may rescue partition 0 here.
    config.shedding.by_key = false;
    common::without_retention_headroom(&mut config);
    let pipeline = common::start(&config, &broker, dir.path(), "one-partition").await;
    let loadgen = actix_rt::spawn(run_loadgen(
        LoadgenParams {
            brokers: broker.bootstrap_servers().to_string(),
            topic: TOPIC.to_string(),
            rate: 2_000,
            shape: Default::default(),
            duration: None,
            total: Some(90_000),
            ids_file: Some(ids.clone()),
            tiers: Default::default(),
            generator: GeneratorParams {
                seed: 59,
                zipf_exponent: 0.3,
                ..GeneratorParams::default()
            },
            progress: false,
        },
        futures::future::pending(),
    ));
    wait_for(Duration::from_secs(60), "every partition committed", || async {
        table_offsets(&config, dir.path()).await.len() == PARTITIONS as usize
    })
    .await;
    let incarnations: BTreeMap<i32, u64> = pipeline
        .status()
        .await
        .unwrap()
        .lanes
        .iter()
        .map(|l| (l.partition, l.incarnation))
        .collect();

    // Partition 0's lane reads one chunk every two seconds while far more
    // than the broker retains (~29,000 records) arrives on it.
    let slow = common::inject(
        &pipeline,
        Fault::SlowStage {
            stage: Stage::PartitionConsumer,
            partition: Some(0),
            delay: Duration::from_secs(2),
        },
    );
    let bootstrap = broker.bootstrap_servers().to_string();
    let burst = tokio::task::spawn_blocking(move || burst_into(&bootstrap, 0, 80_000, 61));
    // While retention overtakes partition 0, the other seven keep committing.
    let before = table_offsets(&config, dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut advanced: BTreeSet<i32> = BTreeSet::new();
    while Instant::now() < deadline && advanced.len() < PARTITIONS as usize - 1 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = table_offsets(&config, dir.path()).await;
        advanced.extend((1..PARTITIONS).filter(|p| now.get(p) > before.get(p)));
    }
    assert_eq!(
        advanced.len(),
        PARTITIONS as usize - 1,
        "partitions that committed: {advanced:?}"
    );
    let burst_ids = burst.await.unwrap();
    // Partition 0 reads again: it finds its next offset gone and restarts alone.
    pipeline.faults.clear(slow);
    let report = loadgen.await.unwrap().unwrap();
    let produced_total = report.produced + burst_ids.len() as u64;
    wait_for(Duration::from_secs(180), "every offset accounted for", || async {
        table_offsets(&config, dir.path()).await.values().sum::<i64>() as u64 >= produced_total
    })
    .await;
    let status = pipeline.status().await.unwrap();
    pipeline.shutdown().await.unwrap();

    for lane in status.lanes.iter().filter(|l| l.partition != 0) {
        assert_eq!(
            Some(&lane.incarnation),
            incarnations.get(&lane.partition),
            "partition {}'s lane was rebuilt or reassigned: {lane:?}",
            lane.partition
        );
    }
    let zero = status.lanes.iter().find(|l| l.partition == 0).unwrap();
    assert!(
        zero.lost_records > 0,
        "retention did not overtake partition 0: {zero:?}"
    );
    let accounting = Accounting::read(&config, dir.path()).await;
    let lost = accounting.lost_to_retention();
    assert!(lost.iter().all(|(p, _)| *p == 0), "other partitions lost records");
    assert!(!lost.is_empty());
    let unaccounted = accounting.unaccounted();
    let zero_rows: BTreeSet<i64> = accounting
        .trades
        .iter()
        .filter(|(p, _)| *p == 0)
        .map(|(_, o)| *o)
        .collect();
    let zero_dead: Vec<(i64, &str)> = accounting
        .dead
        .iter()
        .filter(|d| d.partition == 0)
        .map(|d| (d.offset, d.reason.as_str()))
        .collect();
    assert!(
        unaccounted.is_empty(),
        "{} offsets unaccounted (first {:?}, last {:?}); partition 0: {} rows in {:?}..={:?}, next {:?}, dead letters {zero_dead:?}",
        unaccounted.len(),
        unaccounted.first(),
        unaccounted.last(),
        zero_rows.len(),
        zero_rows.first(),
        zero_rows.last(),
        accounting.offsets.get(&0)
    );
    assert_eq!(accounting.rows, accounting.distinct_keys.len(), "duplicates");
    // Every trade of the seven other partitions is there.
    let produced: HashSet<TradeKey> = read_ids(&ids).into_iter().chain(burst_ids).collect();
    let missing = produced.difference(&accounting.distinct_keys).count();
    assert_eq!(
        (missing + accounting.rows) as u64,
        produced.len() as u64,
        "trades in the table that were never produced"
    );
    assert!(
        missing as u64 <= lost.len() as u64,
        "{missing} missing, {} lost to retention",
        lost.len()
    );
}
