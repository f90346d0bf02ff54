//! Cost per record of the load shedder at each level: a 2,000-trade chunk
//! (the default `lanes.chunk_max_records`) over the default tiers, with the
//! load generator's mix of exchanges and symbols (tier 1, tier 2 and tier 3
//! interleaved, as on a live partition).
//!
//! And what shedding by key saves a lane: the same 2,000 raw messages taken
//! by a lane at CIRCUIT_BREAK (`EarlyShed::offer` on every key, decoding
//! only the kept ones) against decoding them all, as a lane at NORMAL does.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

use k2::actors::load_shedder::shed;
use k2::degradation::DegradationLevel;
use k2::loadgen::{GeneratorParams, TradeGenerator};
use k2::shedding::{EarlyShed, SheddingConfig, TierTable};

const CHUNK: usize = 2_000;

fn decoder() -> k2::decode::TradeDecoder {
    k2::decode::TradeDecoder::new(k2::decode::DecoderConfig {
        format: k2::decode::TradeFormat::Auto,
        max_event_time_skew_ms: 86_400_000,
        binance_exchange: "BINANCE".into(),
    })
}

/// (key, payload) of `CHUNK` generated messages.
fn messages() -> Vec<(String, Vec<u8>)> {
    let mut generator = TradeGenerator::new(GeneratorParams::default());
    let now = k2::model::now_us();
    (0..CHUNK)
        .map(|_| {
            let message = generator.next_message(now);
            (message.key, message.payload)
        })
        .collect()
}

fn chunk() -> Vec<k2::model::Trade> {
    let decoder = decoder();
    let now = k2::model::now_us();
    messages()
        .iter()
        .enumerate()
        .map(
            |(offset, (_, payload))| match decoder.decode_record(payload, 0, offset as i64, now) {
                Ok(k2::decode::Record::Trade(trade)) => trade,
                other => panic!("generated trades decode to trades, got {other:?}"),
            },
        )
        .collect()
}

fn bench(c: &mut Criterion) {
    let tiers = TierTable::new(&SheddingConfig::default());
    let trades = chunk();
    let mut group = c.benchmark_group("load_shedder");
    group.throughput(Throughput::Elements(CHUNK as u64));
    for level in [
        DegradationLevel::Normal,
        DegradationLevel::Aggressive,
        DegradationLevel::CircuitBreak,
    ] {
        let (kept, entries) = shed(trades.clone(), level, &tiers, "t");
        eprintln!(
            "{level}: kept {} of {CHUNK}, {} ledger entries, {} shed",
            kept.len(),
            entries.len(),
            entries.iter().map(|e| e.records).sum::<u64>()
        );
        group.bench_function(level.as_str(), |b| {
            b.iter_batched(
                || trades.clone(),
                |trades| black_box(shed(trades, level, &tiers, "t")),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();

    let messages = messages();
    let decoder = decoder();
    let now = k2::model::now_us();
    let mut group = c.benchmark_group("EarlyShed");
    group.throughput(Throughput::Elements(CHUNK as u64));
    let take = |level: DegradationLevel| {
        let mut early = EarlyShed::default();
        let mut decoded = Vec::new();
        for (offset, (key, payload)) in messages.iter().enumerate() {
            if !early.offer(&tiers, level, Some(key.as_bytes()), offset as i64) {
                decoded.push(decoder.decode_record(payload, 0, offset as i64, now));
            }
        }
        (early.finish("t", 0, level), decoded)
    };
    let ((entries, _), decoded) = take(DegradationLevel::CircuitBreak);
    eprintln!(
        "CIRCUIT_BREAK by key: {} of {CHUNK} decoded, {} shed",
        decoded.len(),
        entries.iter().map(|e| e.records).sum::<u64>()
    );
    group.bench_function("circuit_break_by_key", |b| {
        b.iter(|| black_box(take(DegradationLevel::CircuitBreak)))
    });
    group.bench_function("normal_decode_all", |b| {
        b.iter(|| black_box(take(DegradationLevel::Normal)))
    });
    group.finish();

    // Only the records CIRCUIT_BREAK sheds (tiers 2 and 3): how fast a lane
    // skips what it does not ingest.
    let shed_only: Vec<&(String, Vec<u8>)> = messages
        .iter()
        .filter(|(key, _)| {
            EarlyShed::default().offer(&tiers, DegradationLevel::CircuitBreak, Some(key.as_bytes()), 0)
        })
        .collect();
    let mut group = c.benchmark_group("EarlyShed skip");
    group.throughput(Throughput::Elements(shed_only.len() as u64));
    group.bench_function("circuit_break_shed_records", |b| {
        b.iter(|| {
            let mut early = EarlyShed::default();
            for (offset, (key, _)) in shed_only.iter().enumerate() {
                black_box(early.offer(
                    &tiers,
                    DegradationLevel::CircuitBreak,
                    Some(key.as_bytes()),
                    offset as i64,
                ));
            }
            black_box(early.finish("t", 0, DegradationLevel::CircuitBreak))
        })
    });
    group.bench_function("decode_the_same_records", |b| {
        b.iter(|| {
            for (offset, (_, payload)) in shed_only.iter().enumerate() {
                black_box(decoder.decode_record(payload, 0, offset as i64, now)).ok();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
