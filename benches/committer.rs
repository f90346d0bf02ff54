//! What reading a commit back costs (ADR 0006): one epoch committed to a
//! SQLite catalog in a temp dir (one data file of 1,000 trades, through the
//! fence, with the read-back), against the read-back alone on the same
//! table. Snapshots are expired every 50 commits, keeping 100, as when
//! these figures were first taken.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

use k2::config::CatalogConfig;
use k2::model::{Side, SideRows, Trade};
use k2::storage::catalog::open_catalog;
use k2::storage::commit::{Committer, PartitionRange};
use k2::storage::tables::{TableIdents, ensure_tables};
use k2::storage::writer::{TableWriter, TradeBatchBuilder};

const TRADES_PER_COMMIT: i64 = 1_000;

fn trade(offset: i64, now: i64) -> Trade {
    Trade {
        exchange: "ASX".into(),
        symbol: "BHP".into(),
        sequence: offset + 1,
        trade_id: format!("BHP-{offset}").into(),
        price: 45_00000000,
        quantity: 1_00000000,
        side: Side::Buy,
        event_time_us: now,
        ingest_time_us: now,
        partition: 0,
        offset,
    }
}

/// Keeps the newest 100 snapshots, as the figures in ADR 0006 were taken
/// (table maintenance now also merges manifests; see benches/table_health.rs).
async fn expire(committer: &Committer) {
    use iceberg::transaction::{ApplyTransactionAction as _, Transaction};
    let table = committer
        .catalog
        .load_table(&committer.idents.trades)
        .await
        .expect("trades table");
    let tx = Transaction::new(&table);
    let tx = tx
        .expire_snapshots()
        .expire_older_than_ms(chrono::Utc::now().timestamp_millis())
        .retain_last(100)
        .apply(tx)
        .expect("expire action");
    tx.commit(committer.catalog.as_ref())
        .await
        .expect("snapshot expiry");
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let committer = rt.block_on(async {
        let config = CatalogConfig::sqlite_in(dir.path());
        let catalog = open_catalog(&config, dir.path()).await.expect("catalog opens");
        let idents = TableIdents::new(&config.namespace);
        ensure_tables(catalog.as_ref(), &idents).await.expect("tables");
        Arc::new(Committer {
            catalog,
            idents,
            topic: "t".into(),
            writer_id: "bench".into(),
            zstd_level: 1,
        })
    });
    let next = Cell::new(0i64);
    let commits = Cell::new(0u64);
    let range = || {
        rt.block_on(async {
            commits.set(commits.get() + 1);
            if commits.get().is_multiple_of(50) {
                expire(&committer).await;
            }
            let first = next.get();
            next.set(first + TRADES_PER_COMMIT);
            let table = committer
                .catalog
                .load_table(&committer.idents.trades)
                .await
                .expect("trades table");
            let writer = TableWriter::new(&table, 1, 64 << 20).expect("writer");
            let now = k2::model::now_us();
            let mut builder = TradeBatchBuilder::with_capacity(TRADES_PER_COMMIT as usize);
            for offset in first..first + TRADES_PER_COMMIT {
                builder.push(&trade(offset, now));
            }
            let files = writer
                .write(builder.finish(writer.arrow_schema()).expect("batch"))
                .await
                .expect("data file");
            PartitionRange {
                partition: 0,
                first_offset: first,
                next_offset: first + TRADES_PER_COMMIT,
                files,
                rows: TRADES_PER_COMMIT as u64,
                side: SideRows::default(),
            }
        })
    };

    let mut group = c.benchmark_group("Committer");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(1));
    group.bench_function("commit_with_read_back", |b| {
        b.iter_batched(
            range,
            |range| {
                rt.block_on(committer.commit(std::slice::from_ref(&range)))
                    .expect("commit")
            },
            BatchSize::PerIteration,
        )
    });
    let table = rt
        .block_on(committer.catalog.load_table(&committer.idents.trades))
        .expect("trades table");
    group.bench_function("read_back_alone", |b| {
        b.iter(|| {
            rt.block_on(committer.verify(&table))
                .expect("the commit is there")
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
