//! `k2 backfill` against librdkafka's mock cluster and a real Iceberg SQL
//! catalog: shed trades end up in `market.trades` exactly once, the offsets
//! the pipeline resumes from never move, a rerun changes nothing, a crash
//! between the trades commit and the closing rows is harmless, and offsets
//! Kafka deleted are closed as expired.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{TOPIC, assert_exactly_once, read_tables};
use iceberg::Catalog;
use iceberg::table::Table;
use k2::backfill::{BACKFILL_RUN_KEY, BackfillOptions, BackfillReport, backfill, open_entries};
use k2::config::K2Config;
use k2::decode::{DecoderConfig, Record, TradeDecoder};
use k2::degradation::DegradationLevel;
use k2::embedded::EmbeddedBroker;
use k2::loadgen::{GeneratorParams, Spread, preload};
use k2::model::{SideRows, Trade, TradeKey, now_us};
use k2::shedding::{LedgerAction, OffsetRanges, Priority, ShedEntry};
use k2::storage::catalog::open_catalog;
use k2::storage::commit::{Committer, PartitionRange};
use k2::storage::offsets::summary_key;
use k2::storage::reader::scan_shed_ledger;
use k2::storage::tables::{TableIdents, ensure_tables};
use k2::storage::writer::{TableWriter, TradeBatchBuilder};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

const PARTITIONS: i32 = 2;
/// Offsets per shed entry: one entry per chunk and priority, as the shedder writes them.
const CHUNK: i64 = 100;

/// Produces `count` valid trades spread evenly over `partitions`.
async fn produce(broker: &EmbeddedBroker, partitions: i32, count: u64) {
    let bootstrap = broker.bootstrap_servers().to_string();
    let generator = GeneratorParams {
        seed: 5,
        malformed_ratio: 0.0,
        ..GeneratorParams::default()
    };
    tokio::task::spawn_blocking(move || {
        preload(&bootstrap, TOPIC, count, generator, Spread::Even { partitions })
    })
    .await
    .unwrap()
    .unwrap();
}

/// Every trade Kafka holds, decoded, in partition and offset order.
async fn read_back(broker: &EmbeddedBroker, partitions: i32) -> Vec<Trade> {
    let bootstrap = broker.bootstrap_servers().to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "backfill-test-reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let decoder = TradeDecoder::new(DecoderConfig::default());
        let mut trades = Vec::new();
        for partition in 0..partitions {
            let (low, high) = consumer
                .fetch_watermarks(TOPIC, partition, Duration::from_secs(10))
                .unwrap();
            let mut assignment = TopicPartitionList::new();
            assignment
                .add_partition_offset(TOPIC, partition, Offset::Offset(low))
                .unwrap();
            consumer.assign(&assignment).unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut next = low;
            while next < high {
                assert!(
                    Instant::now() < deadline,
                    "timed out reading partition {partition} back"
                );
                let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                    continue;
                };
                let message = message.unwrap();
                let payload = message.payload().unwrap();
                match decoder.decode_record(payload, partition, message.offset(), now_us()) {
                    Ok(Record::Trade(trade)) => trades.push(trade),
                    other => panic!("the generator made a trade, read back {other:?}"),
                }
                next = message.offset() + 1;
            }
        }
        trades
    })
    .await
    .unwrap()
}

fn key(trade: &Trade) -> TradeKey {
    (
        trade.exchange.to_string(),
        trade.symbol.to_string(),
        trade.trade_id.to_string(),
    )
}

fn shed_entry(partition: i32, offsets: OffsetRanges, priority: Priority) -> ShedEntry {
    let first = offsets.first().unwrap();
    ShedEntry {
        entry_id: ShedEntry::entry_id(TOPIC, partition, first, priority),
        action: LedgerAction::Shed,
        topic: TOPIC.to_string(),
        partition,
        records: offsets.count(),
        offsets,
        priority,
        level: DegradationLevel::Aggressive,
        detail: None,
        recorded_at_us: now_us(),
    }
}

/// The catalog of a test, with K2's tables.
struct Tables {
    catalog: std::sync::Arc<dyn Catalog>,
    idents: TableIdents,
    committer: Committer,
}

impl Tables {
    async fn open(config: &K2Config, dir: &std::path::Path) -> Self {
        let catalog = open_catalog(&config.catalog, dir).await.unwrap();
        let idents = TableIdents::new(&config.catalog.namespace);
        ensure_tables(catalog.as_ref(), &idents).await.unwrap();
        let committer = Committer {
            catalog: catalog.clone(),
            idents: idents.clone(),
            topic: TOPIC.to_string(),
            writer_id: "pipeline".to_string(),
            zstd_level: 3,
        };
        Self {
            catalog,
            idents,
            committer,
        }
    }

    async fn trades(&self) -> Table {
        self.catalog.load_table(&self.idents.trades).await.unwrap()
    }

    async fn ledger(&self) -> Table {
        self.catalog.load_table(&self.idents.shed_ledger).await.unwrap()
    }

    async fn trade_files(&self, trades: &[&Trade]) -> Vec<iceberg::spec::DataFile> {
        let writer = TableWriter::new(&self.trades().await, 3, 64 << 20).unwrap();
        let mut builder = TradeBatchBuilder::with_capacity(trades.len());
        for trade in trades {
            builder.push(trade);
        }
        writer
            .write(builder.finish(writer.arrow_schema()).unwrap())
            .await
            .unwrap()
    }

    /// Commits one epoch per partition over `[0, next_offset)`, as the
    /// pipeline would: the trades not shed, and the shed entries.
    async fn commit_epoch(&self, partition: i32, next_offset: i64, kept: &[&Trade], shed: Vec<ShedEntry>) {
        let range = PartitionRange {
            partition,
            first_offset: 0,
            next_offset,
            files: self.trade_files(kept).await,
            rows: kept.len() as u64,
            side: SideRows {
                shed,
                ..SideRows::default()
            },
        };
        let outcome = self.committer.commit(&[range]).await.unwrap();
        assert_eq!(outcome.committed.get(&partition), Some(&next_offset));
    }
}

/// The offsets summary a table's current snapshot carries, verbatim.
fn offsets_summary(table: &Table) -> Option<String> {
    table.metadata().current_snapshot().and_then(|s| {
        s.summary()
            .additional_properties
            .get(&summary_key(TOPIC))
            .cloned()
    })
}

fn snapshot_id(table: &Table) -> Option<i64> {
    table.metadata().current_snapshot_id()
}

async fn run(
    config: &K2Config,
    broker: &EmbeddedBroker,
    dir: &std::path::Path,
    dry_run: bool,
) -> BackfillReport {
    backfill(
        config,
        broker.bootstrap_servers(),
        dir,
        BackfillOptions {
            dry_run,
            progress: false,
        },
    )
    .await
    .unwrap()
}

/// A topic of 2 × 500 trades; in each partition, every other chunk of 100
/// offsets was shed at AGGRESSIVE: NORMAL offsets (≡ 1 mod 4) and LOW ones
/// (≡ 3 mod 4) in two interleaved entries. Partition 1's last 50 offsets are
/// in an epoch whose shed rows were committed but whose trades were not.
struct Scenario {
    all: Vec<Trade>,
    shed: Vec<ShedEntry>,
    /// The shed entry of the uncommitted epoch.
    pending: ShedEntry,
    /// Trades the table should hold once everything committed is backfilled.
    expected: HashSet<TradeKey>,
}

const PER_PARTITION: i64 = 500;
const UNCOMMITTED_TAIL: i64 = 50;

async fn scenario(broker: &EmbeddedBroker, tables: &Tables) -> Scenario {
    produce(broker, PARTITIONS, (PER_PARTITION * PARTITIONS as i64) as u64).await;
    let all = read_back(broker, PARTITIONS).await;
    assert_eq!(all.len() as i64, PER_PARTITION * PARTITIONS as i64);

    let mut shed_all = Vec::new();
    let mut expected = HashSet::new();
    let mut pending = None;
    for partition in 0..PARTITIONS {
        let next_offset = if partition == 1 {
            PER_PARTITION - UNCOMMITTED_TAIL
        } else {
            PER_PARTITION
        };
        let trades: Vec<&Trade> = all.iter().filter(|t| t.partition == partition).collect();
        let shed_chunk = |offset: i64| (offset / CHUNK) % 2 == 1 && offset < next_offset;
        let mut entries = Vec::new();
        for chunk in (0..next_offset).step_by(CHUNK as usize) {
            for (priority, residue) in [(Priority::Normal, 1), (Priority::Low, 3)] {
                let mut offsets = OffsetRanges::default();
                for offset in chunk..(chunk + CHUNK).min(next_offset) {
                    if shed_chunk(offset) && offset % 4 == residue {
                        offsets.push(offset);
                    }
                }
                if !offsets.is_empty() {
                    entries.push(shed_entry(partition, offsets, priority));
                }
            }
        }
        let is_shed = |offset: i64| entries.iter().any(|e: &ShedEntry| e.offsets.contains(offset));
        let kept: Vec<&Trade> = trades
            .iter()
            .copied()
            .filter(|t| t.offset < next_offset && !is_shed(t.offset))
            .collect();
        expected.extend(trades.iter().filter(|t| t.offset < next_offset).map(|t| key(t)));
        tables
            .commit_epoch(partition, next_offset, &kept, entries.clone())
            .await;
        shed_all.extend(entries);

        if partition == 1 {
            // The next epoch's shed rows made it to the ledger; its trades
            // commit never happened (a crash), so the pipeline replays it.
            let mut offsets = OffsetRanges::default();
            for offset in (next_offset..PER_PARTITION).filter(|o| o % 4 == 1) {
                offsets.push(offset);
            }
            let entry = shed_entry(partition, offsets, Priority::Normal);
            let writer = TableWriter::new(&tables.ledger().await, 3, 64 << 20).unwrap();
            let files = writer
                .write(
                    k2::storage::writer::shed_ledger_batch(
                        std::slice::from_ref(&entry),
                        writer.arrow_schema(),
                    )
                    .unwrap(),
                )
                .await
                .unwrap();
            tables
                .committer
                .append_keeping_offsets_retrying(&tables.idents.shed_ledger, files, &HashMap::new())
                .await
                .unwrap();
            pending = Some(entry);
        }
    }
    Scenario {
        all,
        shed: shed_all,
        pending: pending.unwrap(),
        expected,
    }
}

#[actix_rt::test]
async fn backfill_commits_every_shed_trade_once_keeps_the_offsets_and_a_rerun_changes_nothing() {
    common::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(PARTITIONS);
    let config = common::config(dir.path(), "k2-backfill");
    let tables = Tables::open(&config, dir.path()).await;
    let scenario = scenario(&broker, &tables).await;
    let shed_records: u64 = scenario.shed.iter().map(|e| e.offsets.count()).sum();
    assert!(
        scenario.shed.len() >= 8 && shed_records >= 200,
        "the scenario sheds something"
    );

    let before = read_tables(&config, dir.path()).await;
    assert_eq!(
        before.trades.keys.len() as u64 + shed_records,
        scenario.expected.len() as u64,
        "the table lacks exactly the shed trades before the backfill"
    );
    let (trades_before, ledger_before) = (tables.trades().await, tables.ledger().await);

    // A dry run lists and counts, and changes nothing.
    let dry = run(&config, &broker, dir.path(), true).await;
    assert_eq!(dry.open.len(), scenario.shed.len());
    assert_eq!(dry.open_records, shed_records);
    assert_eq!((dry.entries_pending, dry.expired, dry.entries_closed), (1, 0, 0));
    assert_eq!(snapshot_id(&tables.trades().await), snapshot_id(&trades_before));
    assert_eq!(snapshot_id(&tables.ledger().await), snapshot_id(&ledger_before));

    let report = run(&config, &broker, dir.path(), false).await;
    assert_eq!(report.entries_closed, scenario.shed.len() as u64);
    assert_eq!(report.records_committed, shed_records);
    assert_eq!(
        (report.records_present, report.dead_letters, report.expired),
        (0, 0, 0)
    );
    assert_eq!(
        report.entries_pending, 1,
        "the uncommitted epoch's entry is left to the pipeline"
    );

    let after = read_tables(&config, dir.path()).await;
    assert_exactly_once(&after, &scenario.expected);
    let pending_keys: HashSet<TradeKey> = scenario
        .all
        .iter()
        .filter(|t| t.partition == 1 && scenario.pending.offsets.contains(t.offset))
        .map(key)
        .collect();
    assert!(after.distinct().is_disjoint(&pending_keys));
    let trades_after = tables.trades().await;
    assert_eq!(
        after.offsets, before.offsets,
        "the pipeline's restart offsets moved"
    );
    assert_eq!(offsets_summary(&trades_after), offsets_summary(&trades_before));
    assert!(
        trades_after
            .metadata()
            .current_snapshot()
            .unwrap()
            .summary()
            .additional_properties
            .contains_key(BACKFILL_RUN_KEY)
    );

    // Every handled entry has its closing row; only the pending one is open.
    let ledger_after = tables.ledger().await;
    assert_eq!(offsets_summary(&ledger_after), offsets_summary(&ledger_before));
    let rows = scan_shed_ledger(&ledger_after).await.unwrap();
    let closing: HashMap<&str, &ShedEntry> = rows
        .iter()
        .filter(|r| r.action == LedgerAction::Backfilled)
        .map(|r| (r.entry_id.as_str(), r))
        .collect();
    assert_eq!(closing.len(), scenario.shed.len());
    for entry in &scenario.shed {
        let row = closing[entry.entry_id.as_str()];
        assert_eq!(
            (row.partition, &row.offsets, row.priority),
            (entry.partition, &entry.offsets, entry.priority)
        );
        assert_eq!(row.records, entry.offsets.count());
        let detail = format!(
            "committed {}, already present 0, dead letters 0, expired 0",
            entry.offsets.count()
        );
        assert_eq!(row.detail.as_deref(), Some(detail.as_str()));
    }
    let still_open = open_entries(rows);
    assert_eq!(still_open, vec![scenario.pending.clone()]);

    // A rerun finds nothing to do and commits nothing.
    let again = run(&config, &broker, dir.path(), false).await;
    assert_eq!(
        (again.open.len(), again.entries_closed, again.records_committed),
        (0, 0, 0)
    );
    assert_eq!(again.entries_pending, 1);
    assert_eq!(snapshot_id(&tables.trades().await), snapshot_id(&trades_after));
    assert_eq!(snapshot_id(&tables.ledger().await), snapshot_id(&ledger_after));
}

#[actix_rt::test]
async fn a_crash_between_the_trades_commit_and_the_closing_rows_is_harmless() {
    common::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(PARTITIONS);
    let config = common::config(dir.path(), "k2-backfill-crash");
    let tables = Tables::open(&config, dir.path()).await;
    let scenario = scenario(&broker, &tables).await;

    // An earlier backfill committed one entry's trades, then died before
    // writing its closing row.
    let crashed = &scenario.shed[1];
    let its_trades: Vec<&Trade> = scenario
        .all
        .iter()
        .filter(|t| t.partition == crashed.partition && crashed.offsets.contains(t.offset))
        .collect();
    assert_eq!(its_trades.len() as u64, crashed.offsets.count());
    let offsets_before = offsets_summary(&tables.trades().await);
    let files = tables.trade_files(&its_trades).await;
    tables
        .committer
        .append_keeping_offsets_retrying(
            &tables.idents.trades,
            files,
            &HashMap::from([(BACKFILL_RUN_KEY.to_string(), "crashed".to_string())]),
        )
        .await
        .unwrap();
    assert_eq!(offsets_summary(&tables.trades().await), offsets_before);

    let report = run(&config, &broker, dir.path(), false).await;
    assert_eq!(report.entries_closed, scenario.shed.len() as u64);
    assert_eq!(report.records_present, crashed.offsets.count());
    let outcome = report
        .closed
        .iter()
        .find(|o| o.entry_id == crashed.entry_id)
        .unwrap();
    assert_eq!((outcome.committed, outcome.present), (0, crashed.offsets.count()));

    let after = read_tables(&config, dir.path()).await;
    assert_exactly_once(&after, &scenario.expected);
    assert_eq!(offsets_summary(&tables.trades().await), offsets_before);
    let open = open_entries(scan_shed_ledger(&tables.ledger().await).await.unwrap());
    assert_eq!(open, vec![scenario.pending.clone()]);
}

#[actix_rt::test]
async fn entries_kafka_no_longer_holds_are_closed_as_expired() {
    common::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(1);
    let config = common::config(dir.path(), "k2-backfill-expired");
    let tables = Tables::open(&config, dir.path()).await;
    // ~7 MiB into one partition: the mock broker keeps ~5 MiB and deletes
    // the oldest records.
    const TOTAL: i64 = 50_000;
    produce(&broker, 1, TOTAL as u64).await;
    let retained = read_back(&broker, 1).await;
    let low = retained[0].offset;
    assert!(
        low > 1_000,
        "the broker deleted the oldest records (low watermark {low})"
    );

    let range = |first: i64, last: i64| -> OffsetRanges {
        let mut offsets = OffsetRanges::default();
        (first..=last).for_each(|o| offsets.push(o));
        offsets
    };
    let gone = shed_entry(0, range(10, 109), Priority::Low);
    let straddling = shed_entry(0, range(low - 5, low + 4), Priority::Normal);
    let kept = shed_entry(0, range(TOTAL - 100, TOTAL - 91), Priority::Normal);
    let not_shed = retained.iter().find(|t| t.offset == TOTAL - 1).unwrap();
    tables
        .commit_epoch(
            0,
            TOTAL,
            &[not_shed],
            vec![gone.clone(), straddling.clone(), kept.clone()],
        )
        .await;

    let dry = run(&config, &broker, dir.path(), true).await;
    assert_eq!((dry.open_records, dry.expired), (120, 105));

    let report = run(&config, &broker, dir.path(), false).await;
    assert_eq!(report.entries_closed, 3);
    assert_eq!((report.records_committed, report.expired), (15, 105));
    let outcome = |entry: &ShedEntry| {
        let o = report
            .closed
            .iter()
            .find(|o| o.entry_id == entry.entry_id)
            .unwrap();
        (o.committed, o.expired)
    };
    assert_eq!(outcome(&gone), (0, 100));
    assert_eq!(outcome(&straddling), (5, 5));
    assert_eq!(outcome(&kept), (10, 0));

    let expected: HashSet<TradeKey> = retained
        .iter()
        .filter(|t| {
            t.offset == TOTAL - 1 || straddling.offsets.contains(t.offset) || kept.offsets.contains(t.offset)
        })
        .map(key)
        .collect();
    assert_exactly_once(&read_tables(&config, dir.path()).await, &expected);
    let rows = scan_shed_ledger(&tables.ledger().await).await.unwrap();
    let closing = rows
        .iter()
        .find(|r| r.action == LedgerAction::Backfilled && r.entry_id == gone.entry_id)
        .unwrap();
    assert_eq!(closing.records, 0);
    assert_eq!(
        closing.detail.as_deref(),
        Some("committed 0, already present 0, dead letters 0, expired 100")
    );
}

#[actix_rt::test]
async fn records_that_no_longer_decode_are_dead_letters_and_their_entry_is_closed() {
    common::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(1);
    let config = common::config(dir.path(), "k2-backfill-dead-letters");
    let tables = Tables::open(&config, dir.path()).await;
    produce(&broker, 1, 200).await;
    let all = read_back(&broker, 1).await;

    let range = |first: i64, last: i64| -> OffsetRanges {
        let mut offsets = OffsetRanges::default();
        (first..=last).for_each(|o| offsets.push(o));
        offsets
    };
    // Recorded three days before its trades happened: judged as at that
    // time, every one is beyond the one-day event-time skew.
    let mut undecodable = shed_entry(0, range(10, 29), Priority::Normal);
    undecodable.recorded_at_us -= 3 * 86_400_000_000;
    let fine = shed_entry(0, range(50, 59), Priority::Low);
    let kept: Vec<&Trade> = all
        .iter()
        .filter(|t| !undecodable.offsets.contains(t.offset) && !fine.offsets.contains(t.offset))
        .collect();
    tables
        .commit_epoch(0, 200, &kept, vec![undecodable.clone(), fine.clone()])
        .await;

    let report = run(&config, &broker, dir.path(), false).await;
    assert_eq!(report.entries_closed, 2);
    assert_eq!(
        (report.records_committed, report.dead_letters, report.expired),
        (10, 20, 0)
    );
    let dead = report
        .closed
        .iter()
        .find(|o| o.entry_id == undecodable.entry_id)
        .unwrap();
    assert_eq!((dead.committed, dead.dead_letters), (0, 20));

    let mut expected: HashSet<TradeKey> = kept.iter().map(|t| key(t)).collect();
    expected.extend(all.iter().filter(|t| fine.offsets.contains(t.offset)).map(key));
    assert_exactly_once(&read_tables(&config, dir.path()).await, &expected);
    let rows = scan_shed_ledger(&tables.ledger().await).await.unwrap();
    let closing = rows
        .iter()
        .find(|r| r.action == LedgerAction::Backfilled && r.entry_id == undecodable.entry_id)
        .unwrap();
    assert_eq!(
        closing.detail.as_deref(),
        Some("committed 0, already present 0, dead letters 20, expired 0")
    );
    assert!(open_entries(rows).is_empty());
}

#[test]
fn the_command_refuses_an_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k2.toml");
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbrokers = \"embedded\"\n\n[catalog]\nuri = \"sqlite:{0}/catalog.db\"\nwarehouse = \"{0}/warehouse\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_k2"))
        .args(["backfill", "--config"])
        .arg(&path)
        .env_remove("K2_CONFIG")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("kafka.brokers is \"embedded\"") && stderr.contains("K2_KAFKA__BROKERS"),
        "{stderr}"
    );
    assert!(!dir.path().join("catalog.db").exists(), "nothing was opened");
}
