//! What writing a lane's batch of trades costs (`TableWriter::write`: Arrow
//! batch → ZSTD Parquet data file in a local warehouse), against what
//! iceberg's partition splitter costs on the same batch: a partition value
//! per row, grouped and filtered. A batch whose trades fall within one day
//! (nearly every batch) no longer goes through the splitter, so the second
//! figure is the work the write now skips. 20,000 trades of the load
//! generator's mix (the same event time, as in a live lane's batch).

use std::hint::black_box;
use std::time::Duration;

use arrow_array::RecordBatch;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use iceberg::arrow::RecordBatchPartitionSplitter;

use k2::config::CatalogConfig;
use k2::decode::{DecoderConfig, Record, TradeDecoder};
use k2::loadgen::{GeneratorParams, TradeGenerator};
use k2::storage::catalog::open_catalog;
use k2::storage::tables::{TableIdents, ensure_tables};
use k2::storage::writer::{TableWriter, TradeBatchBuilder};

const TRADES: usize = 20_000;

fn batch(writer: &TableWriter) -> RecordBatch {
    let mut generator = TradeGenerator::new(GeneratorParams::default());
    let decoder = TradeDecoder::new(DecoderConfig::default());
    let now = k2::model::now_us();
    let mut builder = TradeBatchBuilder::with_capacity(TRADES);
    for offset in 0..TRADES {
        let message = generator.next_message(now);
        match decoder.decode_record(&message.payload, 0, offset as i64, now) {
            Ok(Record::Trade(trade)) => builder.push(&trade),
            other => panic!("the generator's default mix is trades, got {other:?}"),
        }
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
    let batch = batch(&writer);
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
    group.bench_function("partition_splitter_alone", |b| {
        b.iter(|| black_box(splitter.split(black_box(&batch)).expect("split")))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
