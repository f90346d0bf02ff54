//! Cost of decoding one Kafka payload into a `Trade`, per wire format.
//!
//! The decoder runs for every message on the consumer's core, so its cost per trade
//! bounds a lane's throughput. Each case decodes 1000 distinct, realistic payloads
//! built before timing starts.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use k2::decode::{DecoderConfig, TradeDecoder, TradeFormat};

const BATCH: usize = 1000;
/// 2026-11-23T10:15:30Z, the "now" every payload is near.
const NOW_US: i64 = 1_795_428_930_000_000;
const SYMBOLS: [&str; 8] = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "BRK.B"];

fn canonical_payloads() -> Vec<Vec<u8>> {
    (0..BATCH)
        .map(|i| {
            let micros = 123_456 + i * 7;
            format!(
                concat!(
                    r#"{{"exchange":"NASDAQ","symbol":"{}","sequence":{},"trade_id":"{}","#,
                    r#""price":"{}.{:02}","quantity":"{}","side":"{}","#,
                    r#""event_time":"2026-11-23T10:15:{:02}.{:06}Z","#,
                    r#""ingest_time":"2026-11-23T10:15:{:02}.{:06}Z"}}"#
                ),
                SYMBOLS[i % SYMBOLS.len()],
                1_000_000 + i,
                9_000_000_000_u64 + i as u64,
                100 + i % 400,
                i % 100,
                1 + i % 500,
                if i % 3 == 0 { "sell" } else { "buy" },
                i % 60,
                micros,
                i % 60,
                micros + 900,
            )
            .into_bytes()
        })
        .collect()
}

fn binance_payloads() -> Vec<Vec<u8>> {
    (0..BATCH)
        .map(|i| {
            let trade_time_ms = NOW_US / 1000 - 30_000 + i as i64 * 17;
            format!(
                concat!(
                    r#"{{"e":"trade","E":{},"s":"{}USDT","t":{},"p":"{}.{:08}","#,
                    r#""q":"0.{:05}","T":{},"m":{},"M":true}}"#
                ),
                trade_time_ms + 3,
                ["BTC", "ETH", "BNB", "SOL"][i % 4],
                3_500_000_000_u64 + i as u64,
                60_000 + i % 2000,
                (i * 7919) % 100_000_000,
                1 + (i * 31) % 99_999,
                trade_time_ms,
                i % 2 == 0,
            )
            .into_bytes()
        })
        .collect()
}

fn bench_trade_decoder(c: &mut Criterion) {
    let canonical = canonical_payloads();
    let binance = binance_payloads();
    let decoder = |format| {
        TradeDecoder::new(DecoderConfig {
            format,
            ..DecoderConfig::default()
        })
    };
    let cases = [
        ("canonical", decoder(TradeFormat::Canonical), &canonical),
        ("binance", decoder(TradeFormat::Binance), &binance),
        ("auto_canonical", decoder(TradeFormat::Auto), &canonical),
        ("auto_binance", decoder(TradeFormat::Auto), &binance),
    ];
    // A benchmark of the error path would measure nothing useful.
    for (name, decoder, payloads) in &cases {
        for (offset, payload) in payloads.iter().enumerate() {
            if let Err(err) = decoder.decode_record(payload, 0, offset as i64, NOW_US) {
                panic!("{name} payload {offset} does not decode: {err}");
            }
        }
    }

    let mut group = c.benchmark_group("TradeDecoder");
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, decoder, payloads) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| {
                for (offset, payload) in payloads.iter().enumerate() {
                    let _ = black_box(decoder.decode_record(black_box(payload), 0, offset as i64, NOW_US));
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_trade_decoder);
criterion_main!(benches);
