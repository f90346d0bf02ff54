//! Table health over a long run: thousands of ingestion commits of small
//! files (a day of K2 at the default interval, compressed), with table
//! maintenance running beside them as `k2 run` runs it, or without it.
//!
//! ```text
//! cargo bench --bench table_health -- --commits 10000            # with maintenance
//! cargo bench --bench table_health -- --commits 3000 --before    # expiry only, as before
//! ```
//!
//! Commits start every `--commit-interval-ms` (50: the default 2 s interval
//! compressed 40×) and a pass runs every `--interval-ms` (3000: 60 s, the
//! default until 2026-12-07, compressed 20×; the default is 20 s since, and
//! `--interval-ms 1000` compresses that).
//!
//! Every `--window` commits it prints the mean and median commit time of
//! the window, the current snapshot's manifests, the live data files, the
//! metadata directory's size and the snapshots held; at the end, the last
//! window's commit time over the first's. Under `cargo test` (no `--bench`
//! argument) it runs 120 commits and checks the bounds maintenance promises.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use iceberg::Catalog;
use iceberg::transaction::{ApplyTransactionAction as _, Transaction};
use k2::config::{CatalogConfig, MaintenanceConfig};
use k2::model::{Side, SideRows, Trade};
use k2::storage::catalog::{CatalogDb, open_catalog};
use k2::storage::commit::{Committer, PartitionRange};
use k2::storage::maintenance::{Maintainer, MetadataSwap, PassScope, TableHealth, table_health};
use k2::storage::tables::{TableIdents, ensure_tables};
use k2::storage::writer::{TableWriter, TradeBatchBuilder};

/// Partitions per commit (one small file each), rows per partition.
const PARTITIONS: i32 = 4;
const ROWS: i64 = 125;

struct Args {
    commits: usize,
    window: usize,
    before: bool,
    /// Milliseconds between maintenance passes.
    interval_ms: u64,
    /// Milliseconds from one commit's start to the next (the committer's interval).
    commit_interval_ms: u64,
    /// Unreferenced files older than this are deleted.
    orphan_min_age_ms: u64,
    quick: bool,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let quick = !argv.iter().any(|a| a == "--bench");
    let value = |name: &str| {
        argv.iter()
            .position(|a| a == name)
            .and_then(|i| argv.get(i + 1))
            .map(|v| {
                v.parse::<u64>()
                    .unwrap_or_else(|_| panic!("{name} takes a number, got {v}"))
            })
    };
    let commits = value("--commits").unwrap_or(if quick { 120 } else { 10_000 }) as usize;
    Args {
        commits,
        window: value("--window").unwrap_or(if quick { 40 } else { 1_000 }) as usize,
        before: argv.iter().any(|a| a == "--before"),
        interval_ms: value("--interval-ms").unwrap_or(if quick { 200 } else { 3_000 }),
        commit_interval_ms: value("--commit-interval-ms").unwrap_or(if quick { 0 } else { 50 }),
        orphan_min_age_ms: value("--orphan-min-age-ms").unwrap_or(if quick { 1_000 } else { 60_000 }),
        quick,
    }
}

fn trade(partition: i32, offset: i64, now: i64) -> Trade {
    Trade {
        exchange: "ASX".into(),
        symbol: format!("S{}", offset % 50).into(),
        sequence: offset + 1,
        trade_id: format!("{partition}-{offset}").into(),
        price: 45_00000000 + (offset % 1000) as i128,
        quantity: 1_00000000,
        side: Side::Buy,
        event_time_us: now,
        ingest_time_us: now,
        partition,
        offset,
    }
}

async fn epoch(committer: &Committer, commit: i64) -> Vec<PartitionRange> {
    let table = committer
        .catalog
        .load_table(&committer.idents.trades)
        .await
        .expect("trades table");
    let writer = TableWriter::new(&table, 1, 64 << 20).expect("writer");
    let now = k2::model::now_us();
    let mut ranges = Vec::new();
    for partition in 0..PARTITIONS {
        let first = commit * ROWS;
        let mut builder = TradeBatchBuilder::with_capacity(ROWS as usize);
        for offset in first..first + ROWS {
            builder.push(&trade(partition, offset, now));
        }
        let files = writer
            .write(builder.finish(writer.arrow_schema()).expect("batch"))
            .await
            .expect("data file");
        ranges.push(PartitionRange {
            partition,
            first_offset: first,
            next_offset: first + ROWS,
            files,
            rows: ROWS as u64,
            side: SideRows::default(),
        });
    }
    ranges
}

/// What the committer did before table maintenance existed: every 50
/// commits, expire all but 100 snapshots and delete nothing.
async fn expire_only(catalog: &dyn Catalog, idents: &TableIdents) {
    let table = catalog.load_table(&idents.trades).await.expect("table");
    if table.metadata().snapshots().count() <= 100 {
        return;
    }
    let tx = Transaction::new(&table);
    let tx = tx
        .expire_snapshots()
        .expire_older_than_ms(chrono::Utc::now().timestamp_millis())
        .retain_last(100)
        .apply(tx)
        .expect("expire action");
    tx.commit(catalog).await.expect("expiry");
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    let dir = tempfile::tempdir().expect("temp dir");
    if std::env::var_os("K2_BENCH_KEEP_DIR").is_some() {
        eprintln!("table health: working in {} (kept)", dir.path().display());
    }
    let catalog_config = CatalogConfig::sqlite_in(dir.path());
    let catalog = open_catalog(&catalog_config, dir.path()).await.expect("catalog");
    let idents = TableIdents::new(&catalog_config.namespace);
    ensure_tables(catalog.as_ref(), &idents).await.expect("tables");
    let committer = Committer {
        catalog: catalog.clone(),
        idents: idents.clone(),
        topic: "t".into(),
        writer_id: "bench".into(),
        zstd_level: 1,
    };
    let maintainer = Arc::new(Maintainer {
        catalog: open_catalog(&catalog_config, dir.path()).await.expect("catalog"),
        swap: MetadataSwap::connect(CatalogDb::new(&catalog_config, dir.path()).expect("db"))
            .await
            .expect("catalog database"),
        config: MaintenanceConfig {
            orphan_min_age_ms: args.orphan_min_age_ms,
            ..MaintenanceConfig::default()
        },
        zstd_level: 1,
        hold: Duration::ZERO,
        for_queries: None,
    });
    let done = Arc::new(AtomicBool::new(false));
    let background = (!args.before).then(|| {
        let (maintainer, done, tables) = (maintainer.clone(), done.clone(), idents.all());
        let interval = Duration::from_millis(args.interval_ms);
        tokio::spawn(async move {
            let (mut passes, mut failed) = (0u64, 0u64);
            while !done.load(Relaxed) {
                tokio::time::sleep(interval).await;
                let (end, reports) = maintainer
                    .run_pass(&tables, PassScope::Full, || !done.load(Relaxed), |_| {})
                    .await;
                passes += 1;
                if let Some(err) = reports.iter().find_map(|r| r.error.clone()) {
                    eprintln!("maintenance pass {passes} failed ({end:?}): {err}");
                    failed += 1;
                }
            }
            (passes, failed)
        })
    });

    println!(
        "table health: {} commits of {PARTITIONS} small files ({} rows) every {} ms, {}",
        args.commits,
        PARTITIONS as i64 * ROWS,
        args.commit_interval_ms,
        if args.before {
            "expiry only (before)".to_string()
        } else {
            format!("maintenance every {} ms", args.interval_ms)
        }
    );
    println!(
        "{:>8} {:>10} {:>12} {:>10} {:>11} {:>15} {:>10}",
        "commits", "mean ms", "median ms", "manifests", "data files", "metadata bytes", "snapshots"
    );
    let started = Instant::now();
    let mut windows: Vec<(f64, TableHealth)> = Vec::new();
    let mut durations = Vec::with_capacity(args.window);
    let pace = Duration::from_millis(args.commit_interval_ms);
    let mut next_start = Instant::now();
    for commit in 0..args.commits {
        if let Some(wait) = next_start.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        next_start = Instant::now() + pace;
        let ranges = epoch(&committer, commit as i64).await;
        let t = Instant::now();
        let mut attempts = 0;
        while let Err(err) = committer.commit(&ranges).await {
            attempts += 1;
            assert!(attempts < 20, "commit {commit} failed for good: {err}");
        }
        durations.push(t.elapsed().as_secs_f64() * 1e3);
        if args.before && (commit + 1) % 50 == 0 {
            expire_only(catalog.as_ref(), &idents).await;
        }
        if durations.len() == args.window {
            let mean = durations.iter().sum::<f64>() / durations.len() as f64;
            let median = median(&mut durations);
            let table = catalog.load_table(&idents.trades).await.expect("table");
            let health = table_health(&table).await.expect("health");
            println!(
                "{:>8} {:>10.1} {:>12.1} {:>10} {:>11} {:>15} {:>10}",
                commit + 1,
                mean,
                median,
                health.manifests,
                health.data_files,
                health.metadata_bytes,
                health.snapshots
            );
            windows.push((median, health));
            durations.clear();
        }
    }
    done.store(true, Relaxed);
    if std::env::var_os("K2_BENCH_KEEP_DIR").is_some() {
        let _ = dir.keep();
        return;
    }
    let (passes, failed) = match background {
        Some(task) => task.await.expect("maintenance task"),
        None => (0, 0),
    };
    let (first, last) = (&windows[0], &windows[windows.len() - 1]);
    println!(
        "{} commits in {:.0} s, {passes} maintenance passes ({failed} failed); median commit time last window / first: {:.2}",
        args.commits,
        started.elapsed().as_secs_f64(),
        last.0 / first.0
    );
    if !args.before {
        // One last pass, as the next interval would run: the table ends with
        // one manifest and the retained snapshots, however long the run.
        let (end, reports) = maintainer
            .run_pass(&idents.all(), PassScope::Full, || true, |_| {})
            .await;
        let health = &reports[0].health;
        println!(
            "after a final pass ({}): {} manifests, {} data files, {} metadata bytes, {} snapshots",
            end.as_str(),
            health.manifests,
            health.data_files,
            health.metadata_bytes,
            health.snapshots
        );
        if args.quick {
            assert!(passes > 0, "maintenance ran beside ingestion");
            assert_eq!(failed, 0, "every pass beside ingestion succeeded");
            assert_eq!(health.manifests, 1, "{health:?}");
            assert!(
                health.snapshots <= maintainer.config.retain_snapshots,
                "{health:?}"
            );
            assert!(reports.iter().all(|r| r.error.is_none()), "{reports:?}");
        }
    }
}
