//! What writing a lane's batch of trades costs (`TableWriter::write`: Arrow
//! batch → ZSTD Parquet data file in a local warehouse), against what
//! iceberg's partition splitter costs on the same batch: a partition value
//! per row, grouped and filtered. A batch whose trades fall within one day
//! (nearly every batch) no longer goes through the splitter, so the second
//! figure is the work the write now skips. 20,000 trades of the load
//! generator's mix (the same event time, as in a live lane's batch).
//!
//! `Buffer` compares how a lane's batcher collects those trades: one Arrow
//! builder that starts at 2,048 rows and grows by doubling (as lanes did
//! until round seven of docs/perf.md) against `TradeBuffer`'s fixed chunks,
//! and writes the chunks as one file. In this loop the allocator hands back
//! the same memory every iteration, so the page faults a growing builder
//! causes in `k2 run` do not show here: only its copies do.

use std::hint::black_box;
use std::time::Duration;

use arrow_array::RecordBatch;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use iceberg::arrow::RecordBatchPartitionSplitter;

use k2::config::CatalogConfig;
use k2::decode::{DecoderConfig, Record, TradeDecoder};
use k2::loadgen::{GeneratorParams, TradeGenerator};
use k2::model::Trade;
use k2::storage::catalog::open_catalog;
use k2::storage::tables::{TableIdents, ensure_tables};
use k2::storage::writer::{TRADE_BUFFER_CHUNK_ROWS, TableWriter, TradeBatchBuilder, TradeBuffer};

const TRADES: usize = 20_000;

fn trades() -> Vec<Trade> {
    let mut generator = TradeGenerator::new(GeneratorParams::default());
    let decoder = TradeDecoder::new(DecoderConfig::default());
    let now = k2::model::now_us();
    (0..TRADES)
        .map(|offset| {
            let message = generator.next_message(now);
            match decoder.decode_record(&message.payload, 0, offset as i64, now) {
                Ok(Record::Trade(trade)) => trade,
                other => panic!("the generator's default mix is trades, got {other:?}"),
            }
        })
        .collect()
}

fn batch(writer: &TableWriter, trades: &[Trade]) -> RecordBatch {
    let mut builder = TradeBatchBuilder::with_capacity(trades.len());
    for trade in trades {
        builder.push(trade);
    }
    builder.finish(writer.arrow_schema()).expect("batch")
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let table = rt.block_on(async {
        let config = CatalogConfig::sqlite_in(dir.path());
        let catalog = open_catalog(&config, dir.path()).await.expect("catalog opens");
        let idents = TableIdents::new(&config.namespace);
        ensure_tables(catalog.as_ref(), &idents).await.expect("tables");
        catalog.load_table(&idents.trades).await.expect("trades table")
    });
    let writer = TableWriter::new(&table, 1, 64 << 20).expect("writer");
    let trades = trades();
    let batch = batch(&writer, &trades);
    let schema = writer.arrow_schema().clone();
    let metadata = table.metadata();
    let splitter = RecordBatchPartitionSplitter::try_new_with_computed_values(
        metadata.current_schema().clone(),
        metadata.default_partition_spec().clone(),
    )
    .expect("splitter");

    let mut group = c.benchmark_group("TableWriter");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(TRADES as u64));
    group.bench_function("write_one_day_batch", |b| {
        b.iter(|| rt.block_on(writer.write(batch.clone())).expect("data file"))
    });
    let chunks = {
        let mut buffer = TradeBuffer::new();
        for trade in &trades {
            buffer.push(trade);
        }
        buffer.finish(&schema).expect("batches")
    };
    group.bench_function("write_chunks_as_one_file", |b| {
        b.iter(|| rt.block_on(writer.write_all(&chunks)).expect("data file"))
    });
    group.bench_function("partition_splitter_alone", |b| {
        b.iter(|| black_box(splitter.split(black_box(&batch)).expect("split")))
    });
    group.finish();

    let mut group = c.benchmark_group("Buffer");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(TRADES as u64));
    group.bench_function("growing_builder", |b| {
        b.iter(|| {
            let mut builder = TradeBatchBuilder::with_capacity(TRADE_BUFFER_CHUNK_ROWS);
            for trade in &trades {
                builder.push(trade);
            }
            black_box(builder.finish(&schema).expect("batch"))
        })
    });
    group.bench_function("chunked_buffer", |b| {
        b.iter(|| {
            let mut buffer = TradeBuffer::new();
            for trade in &trades {
                buffer.push(trade);
            }
            black_box(buffer.finish(&schema).expect("batches"))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
