//! Cost per key of the long-window Bloom tier ([`LongWindow`]).
//!
//! The window is sized as in production for 10⁹ keys over 24 hours (41.7M keys per hourly generation,
//! 75 MB of bits) and one generation is filled to that capacity before measuring, so lookups miss the
//! CPU caches (32 MiB of L3 on the machine of `docs/benchmarks.md`) as they do in production. Each case
//! checks or inserts a batch of 10,000 keys of that hour.

use std::hint::black_box;
use std::io::Write as _;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use k2::bloom::{LongWindow, LongWindowConfig};

const WINDOW_HOURS: u32 = 24;
const CAPACITY: u64 = 1_000_000_000;
const PER_HOUR: u64 = CAPACITY / WINDOW_HOURS as u64;
const BATCH: u64 = 10_000;
const FPR_PROBES: u64 = 1_000_000;
/// 2026-01-01T10:00:00Z: every key is in this hour.
const HOUR_US: i64 = 1_767_261_600_000_000;

fn key(buf: &mut Vec<u8>, id: u64) -> &[u8] {
    buf.clear();
    let _ = write!(buf, "BINANCE\x1fBTCUSDT\x1f{id}");
    buf
}

fn batch(ids: impl Iterator<Item = u64>) -> Vec<(Vec<u8>, i64)> {
    let mut buf = Vec::new();
    ids.map(|id| (key(&mut buf, id).to_vec(), HOUR_US + id as i64))
        .collect()
}

fn filled_window() -> LongWindow {
    let window = LongWindow::new(&LongWindowConfig {
        window_hours: WINDOW_HOURS,
        capacity: CAPACITY,
        false_positive_rate: 0.001,
    });
    let mut buf = Vec::new();
    for id in 0..PER_HOUR {
        window.insert(key(&mut buf, id), HOUR_US + id as i64);
    }
    let mut false_positives = 0u64;
    for id in PER_HOUR..PER_HOUR + FPR_PROBES {
        false_positives += u64::from(window.contains(key(&mut buf, id), HOUR_US + id as i64));
    }
    eprintln!(
        "LongWindow: {PER_HOUR} keys in one generation, {:.1} MB, {:.2} bits/entry, \
         false-positive rate {:.5} on {FPR_PROBES} absent keys (configured 0.00100)",
        window.memory_bytes() as f64 / 1e6,
        window.bits_per_entry(),
        false_positives as f64 / FPR_PROBES as f64,
    );
    window
}

fn long_window(c: &mut Criterion) {
    let window = filled_window();
    // Spread over the whole filled id range, so the bits checked are spread over the whole filter.
    let present = batch((0..BATCH).map(|i| i * (PER_HOUR / BATCH)));
    let absent = batch((0..BATCH).map(|i| PER_HOUR + FPR_PROBES + i));
    let new = batch((0..BATCH).map(|i| PER_HOUR + 2 * FPR_PROBES + i));

    let mut group = c.benchmark_group("LongWindow");
    group.throughput(Throughput::Elements(BATCH));
    group.bench_function("contains_present", |b| {
        b.iter(|| {
            for (key, t) in &present {
                black_box(window.contains(key, *t));
            }
        })
    });
    group.bench_function("contains_absent", |b| {
        b.iter(|| {
            for (key, t) in &absent {
                black_box(window.contains(key, *t));
            }
        })
    });
    // Every iteration sets the same 10,000 keys' bits again: an insert does the same work (hash, one
    // atomic OR per hash function) whether or not the bits were set, and the filter's fill stays put.
    group.bench_function("insert", |b| {
        b.iter(|| {
            for (key, t) in &new {
                black_box(window.insert(key, *t));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, long_window);
criterion_main!(benches);
