//! Cost per record of the load shedder at each level: a 2,000-trade chunk
//! (the default `lanes.chunk_max_records`) over the default tiers, with the
//! load generator's mix of exchanges and symbols (tier 1, tier 2 and tier 3
//! interleaved, as on a live partition).

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

use k2::actors::load_shedder::shed;
use k2::degradation::DegradationLevel;
use k2::loadgen::{GeneratorParams, TradeGenerator};
use k2::shedding::{SheddingConfig, TierTable};

const CHUNK: usize = 2_000;

fn chunk() -> Vec<k2::model::Trade> {
    let decoder = k2::decode::TradeDecoder::new(k2::decode::DecoderConfig {
        format: k2::decode::TradeFormat::Auto,
        max_event_time_skew_ms: 86_400_000,
        binance_exchange: "BINANCE".into(),
    });
    let mut generator = TradeGenerator::new(GeneratorParams::default());
    let now = k2::model::now_us();
    (0..CHUNK as i64)
        .map(|offset| {
            let message = generator.next_message(now);
            decoder
                .decode(&message.payload, 0, offset, now)
                .expect("generated trades decode")
        })
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
