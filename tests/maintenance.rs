//! Table maintenance (issue: table health over days): a pass merges
//! manifests, compacts small files, expires snapshots with their files and
//! deletes old metadata and orphans, and through all of it the table holds
//! exactly the rows and offsets ingestion committed. Ingestion commits and
//! maintenance commits race without either failing for good, and a
//! `k2 maintain` killed with SIGKILL at any step leaves the table exact.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Array, RecordBatch};
use iceberg::Catalog;
use iceberg::spec::Operation;
use k2::config::{CatalogConfig, MaintenanceConfig};
use k2::model::{Side, SideRows, Trade};
use k2::query::recent::{Held, RecentFiles};
use k2::query::table::ManifestCache;
use k2::storage::catalog::{CatalogDb, open_catalog};
use k2::storage::commit::{Committer, PartitionRange};
use k2::storage::maintenance::{HeldTrades, Maintainer, MetadataSwap, PassEnd, PassScope, table_health};
use k2::storage::offsets::TopicOffsets;
use k2::storage::reader::scan_trade_keys;
use k2::storage::tables::{TableIdents, ensure_tables};
use k2::storage::writer::{TableWriter, TradeBatchBuilder};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const TOPIC: &str = "t";
const DAY_US: i64 = 86_400_000_000;

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run ./scripts/test, which provides it (see CONTRIBUTING.md)")
    })
}

fn catalog_config(dir: &Path) -> CatalogConfig {
    CatalogConfig::sqlite_in(dir)
}

/// Small thresholds, so a few dozen commits make work for every step.
fn maintenance_config() -> MaintenanceConfig {
    MaintenanceConfig {
        max_manifests: 4,
        small_file_bytes: 1 << 20,
        target_file_size_bytes: 8 << 20,
        min_files_to_compact: 2,
        retain_snapshots: 1,
        keep_metadata_files: 3,
        orphan_min_age_ms: 0,
        ..MaintenanceConfig::default()
    }
}

struct Fixture {
    committer: Committer,
    maintainer: Maintainer,
    catalog: Arc<dyn Catalog>,
    idents: TableIdents,
    /// Next offset per partition.
    next: BTreeMap<i32, i64>,
    /// Every committed trade id.
    committed: HashSet<String>,
}

impl Fixture {
    async fn new(dir: &Path, config: MaintenanceConfig) -> Fixture {
        Fixture::with_catalog(dir, catalog_config(dir), config).await
    }

    async fn with_catalog(dir: &Path, catalog_config: CatalogConfig, config: MaintenanceConfig) -> Fixture {
        let catalog = open_catalog(&catalog_config, dir).await.expect("catalog opens");
        let idents = TableIdents::new(&catalog_config.namespace);
        ensure_tables(catalog.as_ref(), &idents).await.expect("tables");
        Fixture {
            committer: Committer {
                catalog: catalog.clone(),
                idents: idents.clone(),
                topic: TOPIC.into(),
                writer_id: "test".into(),
                zstd_level: 1,
            },
            maintainer: maintainer_on(dir, &catalog_config, config).await,
            catalog,
            idents,
            next: BTreeMap::new(),
            committed: HashSet::new(),
        }
    }

    /// One ingestion epoch: `rows` trades on `partition`, spread over two
    /// days (two table partitions), in one small file per day.
    async fn commit(&mut self, partition: i32, rows: i64) {
        let first = *self.next.get(&partition).unwrap_or(&0);
        let range = write_range(&self.committer, partition, first, rows).await;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.committer.commit(std::slice::from_ref(&range)).await {
                Ok(outcome) => {
                    assert_eq!(outcome.committed.get(&partition), Some(&(first + rows)));
                    break;
                }
                // The committer actor retries a commit that lost too many
                // races; so does this loop (a maintenance rewrite may win).
                Err(err) if attempts < 20 => eprintln!("commit attempt {attempts} failed: {err}"),
                Err(err) => panic!("ingestion commit failed for good: {err}"),
            }
        }
        self.next.insert(partition, first + rows);
        self.committed
            .extend((first..first + rows).map(|o| trade_id(partition, o)));
    }

    async fn trades(&self) -> iceberg::table::Table {
        self.catalog
            .load_table(&self.idents.trades)
            .await
            .expect("trades table")
    }

    /// The table holds every committed trade once, and nothing else, and
    /// records the offsets ingestion reached.
    async fn assert_exact(&self) {
        let table = self.trades().await;
        let keys = scan_trade_keys(&table).await.expect("scan");
        let ids: Vec<&str> = keys.keys.iter().map(|k| k.2.as_str()).collect();
        let distinct: HashSet<&str> = ids.iter().copied().collect();
        assert_eq!(ids.len(), distinct.len(), "a trade appears twice");
        let expected: HashSet<&str> = self.committed.iter().map(String::as_str).collect();
        assert_eq!(
            distinct, expected,
            "the table's trades differ from the committed ones"
        );
        let offsets = TopicOffsets::from_table(&table, TOPIC).expect("offsets");
        for (&partition, &next) in &self.next {
            assert_eq!(
                offsets.next_offset(partition),
                Some(next),
                "partition {partition}"
            );
        }
    }
}

async fn maintainer(dir: &Path, config: MaintenanceConfig) -> Maintainer {
    maintainer_on(dir, &catalog_config(dir), config).await
}

async fn maintainer_on(dir: &Path, catalog_config: &CatalogConfig, config: MaintenanceConfig) -> Maintainer {
    Maintainer {
        catalog: open_catalog(catalog_config, dir).await.expect("catalog opens"),
        swap: MetadataSwap::connect(CatalogDb::new(catalog_config, dir).expect("catalog db"))
            .await
            .expect("catalog database"),
        config,
        zstd_level: 1,
        hold: Duration::ZERO,
        for_queries: None,
    }
}

fn trade_id(partition: i32, offset: i64) -> String {
    format!("T-{partition}-{offset}")
}

async fn write_range(committer: &Committer, partition: i32, first: i64, rows: i64) -> PartitionRange {
    let table = committer
        .catalog
        .load_table(&committer.idents.trades)
        .await
        .expect("trades table");
    let writer = TableWriter::new(&table, 1, 64 << 20).expect("writer");
    let now = k2::model::now_us();
    let mut builder = TradeBatchBuilder::with_capacity(rows as usize);
    for offset in first..first + rows {
        builder.push(&Trade {
            exchange: "ASX".into(),
            symbol: format!("S{}", offset % 7).into(),
            sequence: offset + 1,
            trade_id: trade_id(partition, offset).into(),
            price: 45_00000000 + offset as i128,
            quantity: 1_00000000,
            side: Side::Buy,
            event_time_us: now - (offset % 2) * DAY_US,
            ingest_time_us: now,
            partition,
            offset,
        });
    }
    let files = writer
        .write(builder.finish(writer.arrow_schema()).expect("batch"))
        .await
        .expect("data files");
    PartitionRange {
        partition,
        first_offset: first,
        next_offset: first + rows,
        files,
        rows: rows as u64,
        side: SideRows::default(),
    }
}

/// Every file under a table's directory, as `file://` URIs.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                dirs.push(entry.path());
            } else {
                out.push(format!("file://{}", entry.path().display()));
            }
        }
    }
    out
}

fn table_dir(table: &iceberg::table::Table) -> PathBuf {
    PathBuf::from(
        table
            .metadata()
            .location()
            .strip_prefix("file://")
            .expect("local warehouse"),
    )
}

/// Data files the current snapshot reads.
async fn live_data_files(table: &iceberg::table::Table) -> HashSet<String> {
    let mut out = HashSet::new();
    let Some(snapshot) = table.metadata().current_snapshot() else {
        return out;
    };
    let list = table
        .manifest_list_reader(snapshot)
        .load()
        .await
        .expect("manifest list");
    for manifest in list.entries() {
        let loaded = manifest.load_manifest(table.file_io()).await.expect("manifest");
        out.extend(
            loaded
                .entries()
                .iter()
                .filter(|e| e.is_alive())
                .map(|e| e.file_path().to_string()),
        );
    }
    out
}

/// PyIceberg, an independent reader, finds exactly the committed trades.
fn assert_pyiceberg_reads(dir: &Path, committed: &HashSet<String>) {
    let python = required_env("K2_PYTHON");
    let ids = dir.join("ids.csv");
    let text: String = committed
        .iter()
        .map(|id| format!("ASX,{},{id}\n", symbol_of(id)))
        .collect();
    std::fs::write(&ids, text).unwrap();
    let found = common::pyiceberg(
        &python,
        "compare_ids.py",
        dir,
        "market.trades",
        &[ids.as_os_str()],
    );
    assert_eq!(found["rows"], committed.len(), "{found}");
    assert_eq!(
        (&found["missing"], &found["duplicated"], &found["unknown"]),
        (&0.into(), &0.into(), &0.into()),
        "{found}"
    );
}

fn symbol_of(id: &str) -> String {
    let offset: i64 = id.rsplit('-').next().unwrap().parse().unwrap();
    format!("S{}", offset % 7)
}

/// A data file's rows, read from disk.
fn read_data_file(path: &str) -> RecordBatch {
    let file = std::fs::File::open(path.strip_prefix("file://").expect("local file")).expect("data file");
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("parquet")
        .build()
        .expect("reader");
    let batches: Vec<RecordBatch> = reader.map(|b| b.expect("batch")).collect();
    arrow_select::concat::concat_batches(&batches[0].schema(), &batches).expect("concat")
}

fn column_text(batch: &RecordBatch, name: &str) -> Vec<String> {
    let column = batch.column_by_name(name).expect("column");
    (0..column.len())
        .map(|row| arrow_cast::display::array_value_to_string(column.as_ref(), row).expect("value"))
        .collect()
}

#[actix_rt::test]
async fn compaction_takes_held_files_from_memory_and_hands_its_sorted_output_to_queries() {
    let dir = tempfile::tempdir().unwrap();
    let mut fx = Fixture::new(dir.path(), maintenance_config()).await;
    let held = RecentFiles::new(64 << 20, Duration::from_secs(600));
    held.queried();
    let manifests = Arc::new(ManifestCache::default());
    fx.maintainer.for_queries = Some(HeldTrades {
        table: fx.idents.trades.clone(),
        files: held.clone(),
        manifests: manifests.clone(),
    });
    for i in 0..6 {
        fx.commit(i % 2, 50).await;
    }
    // Every committed file held as a running K2 holds them (its exact rows),
    // then deleted from disk: the rewrite can only have taken it from memory.
    let inputs = live_data_files(&fx.trades().await).await;
    assert_eq!(inputs.len(), 12, "one file per commit and day");
    for path in &inputs {
        held.keep(path.clone(), &[read_data_file(path)]);
        std::fs::remove_file(path.strip_prefix("file://").unwrap()).unwrap();
    }

    let report = fx.maintainer.rewrite(&fx.idents.trades).await.expect("rewrite");
    assert_eq!((report.files_compacted, report.files_written), (12, 2));
    fx.assert_exact().await;

    for path in &inputs {
        assert!(
            matches!(held.rows(path, None, None), Held::NotKept),
            "a replaced file is forgotten"
        );
    }
    let outputs = live_data_files(&fx.trades().await).await;
    assert_eq!(outputs.len(), 2);
    for path in &outputs {
        let on_disk = read_data_file(path);
        let Held::Rows(rows) = held.rows(path, None, None) else {
            panic!("the compacted file {path} is held");
        };
        for column in [
            "exchange",
            "symbol",
            "event_time",
            "trade_id",
            "kafka_offset",
            "price",
        ] {
            assert_eq!(
                column_text(&rows, column),
                column_text(&on_disk, column),
                "held rows are the file's, in its order ({column})"
            );
        }
        // Sorted by symbol, so a query of one symbol takes a slice.
        let Held::Rows(s3) = held.rows(path, Some("ASX"), Some("S3")) else {
            panic!("S3 trades are in every file");
        };
        let expected = column_text(&on_disk, "symbol")
            .iter()
            .filter(|s| *s == "S3")
            .count();
        assert_eq!(s3.num_rows(), expected);
        assert!(column_text(&s3, "symbol").iter().all(|s| s == "S3"));
    }
    assert_eq!(held.files(), 2, "only the compacted files are held");

    // The merged manifest was parsed before the snapshot committed, with the
    // sequence numbers its list gave it: a query finds it parsed even once
    // its file is gone.
    let table = fx.trades().await;
    let snapshot = table.metadata().current_snapshot().unwrap().clone();
    let list = manifests.list(&table, &snapshot).await.expect("manifest list");
    let mut from_disk = Vec::new();
    for file in list.entries() {
        from_disk.push(file.load_manifest(table.file_io()).await.expect("manifest"));
        std::fs::remove_file(file.manifest_path.strip_prefix("file://").unwrap()).unwrap();
    }
    assert_eq!(from_disk.len(), 1, "the rewrite merged every manifest into one");
    let staged = manifests
        .manifests(&table, &list)
        .await
        .expect("the merged manifest was staged");
    assert_eq!(
        staged.iter().map(|m| m.as_ref()).collect::<Vec<_>>(),
        from_disk.iter().collect::<Vec<_>>()
    );
    let added: Vec<Option<i64>> = staged[0]
        .entries()
        .iter()
        .filter(|e| e.is_alive() && e.snapshot_id() == Some(snapshot.snapshot_id()))
        .map(|e| e.sequence_number())
        .collect();
    assert_eq!(
        added,
        vec![Some(snapshot.sequence_number()); 2],
        "the compacted files, at the rewrite's sequence number"
    );
}

#[actix_rt::test]
async fn a_rewrite_stages_no_manifests_while_no_query_comes() {
    let dir = tempfile::tempdir().unwrap();
    let mut fx = Fixture::new(dir.path(), maintenance_config()).await;
    let manifests = Arc::new(ManifestCache::default());
    fx.maintainer.for_queries = Some(HeldTrades {
        table: fx.idents.trades.clone(),
        files: RecentFiles::new(64 << 20, Duration::from_secs(600)),
        manifests: manifests.clone(),
    });
    for i in 0..6 {
        fx.commit(i % 2, 50).await;
    }
    let report = fx.maintainer.rewrite(&fx.idents.trades).await.expect("rewrite");
    assert_eq!(report.manifests_after, 1);
    let table = fx.trades().await;
    let snapshot = table.metadata().current_snapshot().unwrap().clone();
    let list = manifests.list(&table, &snapshot).await.expect("manifest list");
    for file in list.entries() {
        std::fs::remove_file(file.manifest_path.strip_prefix("file://").unwrap()).unwrap();
    }
    assert!(
        manifests.manifests(&table, &list).await.is_err(),
        "nothing staged: the manifest is read from its file, which is gone"
    );
}

#[actix_rt::test]
#[ignore = "needs K2_PYTHON with PyIceberg; ./scripts/test runs it"]
async fn a_pass_merges_compacts_expires_and_cleans_while_rows_and_offsets_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut fx = Fixture::new(dir.path(), maintenance_config()).await;
    for i in 0..24 {
        fx.commit(i % 2, 50).await;
    }
    let before = fx.trades().await;
    let health_before = table_health(&before).await.unwrap();
    assert_eq!(health_before.manifests, 24, "one manifest per ingestion commit");
    assert_eq!(health_before.data_files, 48, "one file per commit and day");
    let summary_before = before.metadata().current_snapshot().unwrap().summary().clone();
    // A file no commit took (a process killed after writing it).
    let orphan = write_range(&fx.committer, 5, 0, 10).await;

    let (end, reports) = fx
        .maintainer
        .run_pass(&fx.idents.all(), PassScope::Full, || true, |_| {})
        .await;
    assert_eq!(end, PassEnd::Done, "{reports:?}");
    let trades = &reports[0];
    assert_eq!(trades.table, fx.idents.trades.to_string());
    assert_eq!(trades.rewrite.manifests_before, 24);
    assert_eq!(trades.rewrite.manifests_after, 1);
    assert_eq!(trades.rewrite.files_compacted, 48);
    assert_eq!(trades.rewrite.files_written, 2, "one file per day partition");
    assert_eq!(trades.rewrite.rows_rewritten, 1_200);
    assert_eq!(trades.health.manifests, 1);
    assert_eq!(trades.health.data_files, 2);
    assert_eq!(trades.health.rows, 1_200);
    assert_eq!(trades.cleanup.snapshots_expired, 24, "retain_snapshots = 1");
    assert_eq!(trades.cleanup.data_files_deleted, 48, "the compacted small files");
    assert_eq!(
        trades.cleanup.orphans_deleted,
        orphan.files.len(),
        "the files no commit took"
    );
    fx.assert_exact().await;

    let after = fx.trades().await;
    let snapshot = after.metadata().current_snapshot().unwrap();
    assert_eq!(snapshot.summary().operation, Operation::Replace);
    let offsets_of = |s: &iceberg::spec::Summary| -> BTreeMap<String, String> {
        s.additional_properties
            .iter()
            .filter(|(k, _)| k.starts_with("k2.offsets."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert_eq!(
        offsets_of(snapshot.summary()),
        offsets_of(&summary_before),
        "the offsets are carried forward unchanged"
    );
    assert_eq!(snapshot.summary().additional_properties["total-records"], "1200");
    assert_eq!(snapshot.summary().additional_properties["total-data-files"], "2");

    // On disk: the live data files, one manifest, one manifest list, at most
    // `keep_metadata_files` metadata.json; nothing else.
    let on_disk = files_under(&table_dir(&after));
    let live = live_data_files(&after).await;
    let data_on_disk: HashSet<String> = on_disk
        .iter()
        .filter(|f| f.ends_with(".parquet"))
        .cloned()
        .collect();
    assert_eq!(data_on_disk, live, "data files on disk are exactly the live ones");
    for file in &orphan.files {
        assert!(!on_disk.contains(&file.file_path().to_string()));
    }
    let metadata_files = on_disk.iter().filter(|f| f.ends_with(".metadata.json")).count();
    assert_eq!(metadata_files, 3, "keep_metadata_files = 3");
    let (lists, manifests): (Vec<&String>, Vec<&String>) = on_disk
        .iter()
        .filter(|f| f.ends_with(".avro"))
        .partition(|f| f.contains("/snap-"));
    assert_eq!((lists.len(), manifests.len()), (1, 1), "{on_disk:#?}");

    // Ingestion goes on on top of the replace snapshot; a second pass has
    // nothing to compact until enough small files gather.
    fx.commit(0, 50).await;
    fx.commit(1, 50).await;
    fx.assert_exact().await;
    assert_pyiceberg_reads(dir.path(), &fx.committed);
}

#[actix_rt::test]
#[ignore = "needs K2_PYTHON with PyIceberg; ./scripts/test runs it"]
async fn maintenance_and_ingestion_commits_race_and_neither_loses() {
    let dir = tempfile::tempdir().unwrap();
    let mut fx = Fixture::new(dir.path(), maintenance_config()).await;
    fx.commit(0, 10).await;
    let maintainer = maintainer(
        dir.path(),
        MaintenanceConfig {
            max_manifests: 2,
            retain_snapshots: 3,
            orphan_min_age_ms: 3_600_000,
            ..maintenance_config()
        },
    )
    .await;
    let idents = fx.idents.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Rewrites so far: ingestion goes on until maintenance has rewritten the
    // table a few times under it, however fast passes run on this machine.
    let rewritten = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let passes = {
        let (stop, rewritten, maintainer, idents) = (stop.clone(), rewritten.clone(), &maintainer, &idents);
        async move {
            let (mut rewrites, mut conflicts, mut passes) = (0, 0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (end, reports) = maintainer
                    .run_pass(&idents.all()[..1], PassScope::Full, || true, |_| {})
                    .await;
                passes += 1;
                let report = &reports[0];
                assert_ne!(end, PassEnd::Failed, "{report:?}");
                rewrites += usize::from(report.rewrite.snapshot_id.is_some());
                rewritten.store(rewrites, std::sync::atomic::Ordering::Relaxed);
                conflicts += report.rewrite.conflicts;
            }
            (passes, rewrites, conflicts)
        }
    };
    let ingest = async {
        let mut i = 0;
        while i < 60 || (rewritten.load(std::sync::atomic::Ordering::Relaxed) < 3 && i < 600) {
            fx.commit(i % 3, 20).await;
            i += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    let ((passes, rewrites, conflicts), ()) = futures::join!(passes, ingest);
    eprintln!("{passes} passes, {rewrites} rewrites, {conflicts} rewrite races lost and rebased");
    assert!(rewrites >= 3, "maintenance rewrote the table while ingestion ran");
    fx.assert_exact().await;
    let (end, reports) = maintainer
        .run_pass(&idents.all()[..1], PassScope::Full, || true, |_| {})
        .await;
    assert_eq!(end, PassEnd::Done, "{reports:?}");
    assert_eq!(reports[0].health.manifests, 1, "{reports:?}");
    assert!(reports[0].health.snapshots <= 3, "{reports:?}");
    fx.assert_exact().await;
    assert_pyiceberg_reads(dir.path(), &fx.committed);
}

/// Refuses the first `conflicts` commits as the SQL catalog refuses one
/// whose table another writer moved after the transaction last read it.
#[derive(Debug)]
struct Conflicting {
    inner: std::sync::Arc<dyn iceberg::Catalog>,
    conflicts: std::sync::atomic::AtomicU32,
}

k2::catalog_wrapper!(Conflicting, inner, |this, commit| {
    use std::sync::atomic::Ordering::SeqCst;
    if this
        .conflicts
        .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return Err(iceberg::Error::new(
            iceberg::ErrorKind::CatalogCommitConflicts,
            "Requirement failed: Branch or tag `main`'s snapshot has changed",
        ));
    }
    this.inner.update_table(commit).await
});

#[actix_rt::test]
async fn an_expiry_the_catalog_refuses_for_a_concurrent_commit_is_planned_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = MaintenanceConfig {
        retain_snapshots: 3,
        ..maintenance_config()
    };
    let mut fx = Fixture::new(dir.path(), config.clone()).await;
    for i in 0..8 {
        fx.commit(i % 2, 40).await;
    }
    let mut maintainer = maintainer(dir.path(), config).await;
    maintainer.catalog = std::sync::Arc::new(Conflicting {
        inner: maintainer.catalog.clone(),
        conflicts: std::sync::atomic::AtomicU32::new(2),
    });
    let report = maintainer
        .expire(&fx.idents.trades)
        .await
        .expect("the expiry is planned again after the refusals");
    assert_eq!(report.snapshots_expired, 5, "8 snapshots, 3 kept: {report:?}");
    assert_eq!(fx.trades().await.metadata().snapshots().count(), 3);
    fx.assert_exact().await;
}

#[actix_rt::test]
async fn a_rewrite_rebases_onto_commits_made_while_it_worked() {
    let dir = tempfile::tempdir().unwrap();
    let mut fx = Fixture::new(dir.path(), maintenance_config()).await;
    for i in 0..8 {
        fx.commit(i % 2, 40).await;
    }
    // Holds after writing its files, before committing: ingestion commits twice meanwhile.
    let mut slow = maintainer(dir.path(), maintenance_config()).await;
    slow.hold = Duration::from_millis(1_500);
    let trades = fx.idents.trades.clone();
    let before = fx.trades().await;
    let (report, ()) = futures::join!(slow.rewrite(&trades), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        fx.commit(0, 40).await;
        fx.commit(1, 40).await;
    });
    let report = report.expect("the rewrite commits on top of the new snapshots");
    assert_eq!(report.manifests_before, 8);
    assert_eq!(report.files_compacted, 16);
    assert_eq!(
        report.manifests_after, 3,
        "its merged manifest and the two added while it worked: {report:?}"
    );
    fx.assert_exact().await;
    let table = fx.trades().await;
    assert_eq!(table_health(&table).await.unwrap().manifests, 3);
    let version = |t: &iceberg::table::Table| {
        let name = t
            .metadata_location()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_string();
        name[..5].parse::<u32>().unwrap()
    };
    assert_eq!(
        version(&table),
        version(&before) + 3,
        "two ingestion commits and the rewrite, each a new metadata file"
    );
    assert!(
        table.metadata().metadata_log().len() >= 3,
        "the previous metadata files are logged"
    );
    assert_eq!(
        table.metadata().current_snapshot().unwrap().summary().operation,
        Operation::Replace
    );
}

#[actix_rt::test]
async fn a_rewrite_that_loses_to_another_gives_up_and_deletes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut fx = Fixture::new(dir.path(), maintenance_config()).await;
    for i in 0..8 {
        fx.commit(i % 2, 40).await;
    }
    let mut slow = maintainer(dir.path(), maintenance_config()).await;
    slow.hold = Duration::from_millis(1_500);
    let fast = maintainer(dir.path(), maintenance_config()).await;
    let trades = fx.idents.trades.clone();
    let (lost, won) = futures::join!(slow.rewrite(&trades), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        fast.rewrite(&trades).await
    });
    assert!(won.expect("the first rewrite commits").snapshot_id.is_some());
    let err = lost.expect_err("the second finds its manifests replaced");
    assert!(err.to_string().contains("another writer rewrote"), "{err}");
    fx.assert_exact().await;
    // The loser's compacted files are gone; the small files wait for expiry.
    let table = fx.trades().await;
    let live = live_data_files(&table).await;
    let not_live: Vec<String> = files_under(&table_dir(&table))
        .into_iter()
        .filter(|f| f.ends_with(".parquet") && !live.contains(f))
        .collect();
    // Live: the two compacted files; on disk besides them: only the 16 small
    // files the snapshots before the rewrite still read.
    assert_eq!(live.len(), 2);
    assert_eq!(not_live.len(), 16, "{not_live:#?}");
}

#[actix_rt::test]
async fn the_metadata_swap_refuses_a_table_that_moved() {
    let dir = tempfile::tempdir().unwrap();
    let mut fx = Fixture::new(dir.path(), maintenance_config()).await;
    fx.commit(0, 10).await;
    let before = fx.trades().await;
    fx.commit(0, 10).await;
    let now = fx.trades().await;
    let swapped = fx
        .maintainer
        .swap
        .swap(
            &fx.idents.trades,
            before.metadata_location().unwrap(),
            before.metadata_location().unwrap(),
        )
        .await
        .unwrap();
    assert!(!swapped, "the pointer had moved on");
    assert_eq!(
        fx.trades().await.metadata_location(),
        now.metadata_location(),
        "nothing changed"
    );
    fx.assert_exact().await;
}

#[actix_rt::test]
#[ignore = "needs K2_TEST_POSTGRES_URL; ./scripts/test runs it"]
async fn maintenance_swaps_the_pointer_on_a_postgresql_catalog_too() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = CatalogConfig {
        uri: required_env("K2_TEST_POSTGRES_URL"),
        // A catalog name of its own keeps this run's tables apart from earlier runs'.
        name: format!("k2test_{}", uuid::Uuid::now_v7().simple()),
        ..catalog_config(dir.path())
    };
    let mut fx = Fixture::with_catalog(dir.path(), catalog, maintenance_config()).await;
    for i in 0..10 {
        fx.commit(i % 2, 30).await;
    }
    let before = fx.trades().await;
    let swapped = fx
        .maintainer
        .swap
        .swap(&fx.idents.trades, "not-where-it-points", "anywhere")
        .await
        .unwrap();
    assert!(!swapped, "a stale expected location does not swap");
    let report = fx.maintainer.rewrite(&fx.idents.trades).await.expect("rewrite");
    assert_eq!((report.manifests_before, report.manifests_after), (10, 1));
    assert_ne!(fx.trades().await.metadata_location(), before.metadata_location());
    fx.assert_exact().await;
    fx.commit(0, 30).await;
    fx.assert_exact().await;
}

/// Lines of a `k2 maintain` log that mark where it holds.
const HOLDS: [&str; 3] = [
    "at=\"rewrite files written\"",
    "at=\"rewrite committed\"",
    "at=\"snapshots expired\"",
];

#[actix_rt::test]
#[ignore = "needs K2_PYTHON with PyIceberg; ./scripts/test runs it"]
async fn sigkill_at_every_step_of_k2_maintain_leaves_the_table_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut fx = Fixture::new(dir.path(), maintenance_config()).await;
    let config = common::write_run_config(
        dir.path(),
        "embedded",
        "g",
        "\n[maintenance]\nmax_manifests = 4\nsmall_file_bytes = 1048576\ntarget_file_size_bytes = 8388608\n\
         min_files_to_compact = 2\nretain_snapshots = 1\nkeep_metadata_files = 3\norphan_min_age_ms = 0\n",
    );
    for (round, hold) in HOLDS.iter().enumerate() {
        for i in 0..12 {
            fx.commit(i % 2, 30).await;
        }
        let log_path = dir.path().join(format!("maintain-{round}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_k2"))
            .args(["maintain", "--config"])
            .arg(&config)
            .current_dir(dir.path())
            .env_remove("K2_CONFIG")
            .env("K2_LOG", "warn,k2=info")
            .env("K2_FAULTS__HOLD_IN_MAINTENANCE_MS", "2000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("k2 maintain starts");
        let deadline = Instant::now() + Duration::from_secs(60);
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        while !log().contains(hold) {
            assert!(
                child.try_wait().unwrap().is_none(),
                "k2 maintain exited:\n{}",
                log()
            );
            assert!(Instant::now() < deadline, "no {hold} within 60 s:\n{}", log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        eprintln!("killed k2 maintain holding at {hold}");
        fx.assert_exact().await;
        // Ingestion goes on after the kill.
        fx.commit(0, 30).await;
        fx.assert_exact().await;
    }
    // A run to the end tidies what the kills left: no orphan remains.
    let output = Command::new(env!("CARGO_BIN_EXE_k2"))
        .args(["maintain", "--json", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env_remove("K2_CONFIG")
        .output()
        .expect("k2 maintain runs");
    assert!(
        output.status.success(),
        "k2 maintain failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    fx.assert_exact().await;
    let table = fx.trades().await;
    let live = live_data_files(&table).await;
    let data_on_disk: HashSet<String> = files_under(&table_dir(&table))
        .into_iter()
        .filter(|f| f.ends_with(".parquet"))
        .collect();
    assert_eq!(data_on_disk, live, "no orphan data file is left");
    assert_eq!(table_health(&table).await.unwrap().manifests, 1);
    assert_pyiceberg_reads(dir.path(), &fx.committed);
}

#[actix_rt::test]
async fn a_running_pipeline_maintains_its_tables_in_the_background_and_only_merges_at_soft() {
    use k2::actors::supervisor::{ClearForce, ForceLevel};
    use k2::degradation::DegradationLevel;

    common::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(4);
    let ids = dir.path().join("ids.csv");
    let mut config = common::config(dir.path(), "k2-maintain");
    // The level is forced here; the embedded broker's retention would raise it on its own.
    common::without_retention_headroom(&mut config);
    config.commit.interval_ms = 100;
    config.batcher.max_age_ms = 100;
    config.maintenance = MaintenanceConfig {
        interval_ms: 300,
        retain_snapshots: 5,
        orphan_min_age_ms: 3_600_000,
        ..maintenance_config()
    };
    let pipeline = common::start(&config, &broker, dir.path(), "maintain").await;
    let loadgen = common::spawn_loadgen(broker.bootstrap_servers(), &ids, 60_000, 5_000);
    let status = pipeline.maintenance.clone();
    common::wait_for(Duration::from_secs(60), "a pass that compacted", || {
        let view = status.view();
        async move { view.last_compaction_at.is_some() && view.passes >= 3 }
    })
    .await;
    let view = status.view();
    assert!(view.last_error.is_none(), "{view:?}");
    let trades = &view.tables["market.trades"];
    assert!(trades.manifests <= 4 + 10, "{view:?}");
    assert!(trades.snapshots <= 5 + 10, "{view:?}");
    let metrics = k2::metrics::install().render();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("k2_table_manifests{table=\"market.trades\"}")),
        "k2_table_manifests is exported"
    );

    // At SOFT only light passes run: manifests are merged, nothing is compacted.
    pipeline
        .supervisor
        .send(ForceLevel {
            level: DegradationLevel::Soft,
            reason: "test".into(),
            ttl: None,
        })
        .await
        .unwrap();
    common::wait_for(Duration::from_secs(30), "a light pass", || {
        let view = status.view();
        async move { view.light_passes >= 1 }
    })
    .await;
    let compacted = status.view().files_compacted;
    let light = status.view().light_passes;
    common::wait_for(Duration::from_secs(30), "two more light passes", || {
        let view = status.view();
        async move { view.light_passes >= light + 2 }
    })
    .await;
    let view = status.view();
    assert_eq!(view.state, "light", "{view:?}");
    assert_eq!(
        view.files_compacted, compacted,
        "nothing is compacted at SOFT: {view:?}"
    );
    assert!(view.last_error.is_none(), "{view:?}");
    assert!(
        view.tables["market.trades"].manifests <= 4 + 10,
        "manifests are still merged at SOFT: {view:?}"
    );
    pipeline.supervisor.send(ClearForce).await.unwrap();
    let passes = status.view().passes;
    common::wait_for(
        Duration::from_secs(30),
        "passes after the force is cleared",
        || {
            let view = status.view();
            async move { view.passes > passes + 1 }
        },
    )
    .await;

    loadgen.await.unwrap().unwrap();
    let expected = common::read_ids(&ids);
    common::wait_for(Duration::from_secs(90), "every trade committed", || {
        let (config, dir) = (config.clone(), dir.path().to_path_buf());
        let want = expected.len() as u64;
        async move { common::committed_trades(&config, &dir).await >= want }
    })
    .await;
    pipeline.shutdown().await.unwrap();
    let contents = common::read_tables(&config, dir.path()).await;
    common::assert_exactly_once(&contents, &expected);
}
