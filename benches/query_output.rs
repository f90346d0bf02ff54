//! What answering a query in each format costs (`query::output::encode`):
//! 9,000 trades of the load generator's mix, about what
//! `/v1/trades/recent` returns for one symbol in `k2 bench --queries`, in the
//! trades table's Arrow schema (two exact decimals, two timestamps with a
//! time zone), as JSON, CSV and an Arrow IPC stream. The HTTP worker encodes
//! every answer, beside the query threads and ingestion.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use k2::decode::{DecoderConfig, Record, TradeDecoder};
use k2::loadgen::{GeneratorParams, TradeGenerator};
use k2::query::QueryAnswer;
use k2::query::output::{Format, encode};
use k2::storage::tables::trades_schema;
use k2::storage::writer::TradeBatchBuilder;

const TRADES: usize = 9_000;

fn answer() -> QueryAnswer {
    let schema = Arc::new(iceberg::arrow::schema_to_arrow_schema(&trades_schema()).expect("arrow schema"));
    let mut generator = TradeGenerator::new(GeneratorParams::default());
    let decoder = TradeDecoder::new(DecoderConfig::default());
    let now = k2::model::now_us();
    let mut builder = TradeBatchBuilder::with_capacity(TRADES);
    for offset in 0..TRADES {
        // A trade a millisecond and a bit apart, as a symbol's recent window has them.
        let at = now - (TRADES - offset) as i64 * 1_123;
        let message = generator.next_message(at);
        match decoder.decode_record(&message.payload, 0, offset as i64, now) {
            Ok(Record::Trade(trade)) => builder.push(&trade),
            other => panic!("the generator's default mix is trades, got {other:?}"),
        }
    }
    let batch: RecordBatch = builder.finish(&schema).expect("batch");
    QueryAnswer {
        schema,
        rows: batch.num_rows(),
        batches: vec![batch],
        truncated: false,
        snapshot_id: Some(1),
        live_rows: 0,
        timings: Default::default(),
    }
}

fn bench(c: &mut Criterion) {
    let answer = answer();
    let mut group = c.benchmark_group("QueryOutput");
    group.throughput(Throughput::Elements(TRADES as u64));
    group.measurement_time(Duration::from_secs(5));
    for (name, format) in [
        ("json", Format::Json),
        ("csv", Format::Csv),
        ("arrow_ipc", Format::Arrow),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| black_box(encode(&answer, format).expect("encode")))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
