//! Cost per record of the lane's sequencing and exact dedup stages.
//!
//! Each case feeds 10,000 records over 100 symbols of one exchange, in order
//! per symbol, to state that has already seen the symbols (the steady state
//! of a running lane).

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use k2::dedup::{OrderedIds, RecentIds};
use k2::sequence::{RecordPosition, SequenceConfig, SequenceTracker};

const RECORDS: u64 = 10_000;
const SYMBOLS: u64 = 100;

fn symbols() -> Vec<String> {
    (0..SYMBOLS).map(|i| format!("SYM{i:03}")).collect()
}

/// (symbol index, per-symbol sequence) for `RECORDS` records starting after `start`.
fn stream(start: u64) -> Vec<(usize, u64)> {
    (0..RECORDS)
        .map(|i| ((i % SYMBOLS) as usize, start + i / SYMBOLS + 1))
        .collect()
}

fn at(offset: i64) -> RecordPosition {
    RecordPosition {
        partition: 0,
        offset,
        detected_at_us: 0,
    }
}

fn sequencer(c: &mut Criterion) {
    let names = symbols();
    let mut group = c.benchmark_group("Sequencer");
    group.throughput(Throughput::Elements(RECORDS));
    group.bench_function("in_order_window_64", |b| {
        b.iter_batched_ref(
            || {
                let mut tracker = SequenceTracker::new(SequenceConfig {
                    reorder_window: 64,
                    ..SequenceConfig::default()
                });
                let mut events = Vec::new();
                for (s, seq) in stream(0) {
                    tracker.observe("BINANCE", &names[s], seq as i64, at(0), &mut events);
                }
                (tracker, events, stream(RECORDS / SYMBOLS))
            },
            |(tracker, events, records)| {
                for (i, &(s, seq)) in records.iter().enumerate() {
                    black_box(tracker.observe("BINANCE", &names[s], seq as i64, at(i as i64), events));
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn dedup(c: &mut Criterion) {
    let names = symbols();
    let mut group = c.benchmark_group("ExactDedup");
    group.throughput(Throughput::Elements(RECORDS));
    group.bench_function("ordered_ids", |b| {
        b.iter_batched_ref(
            || {
                let mut ids = OrderedIds::default();
                for (s, id) in stream(0) {
                    ids.insert("BINANCE", &names[s], id);
                }
                (ids, stream(RECORDS / SYMBOLS))
            },
            |(ids, records)| {
                for &(s, id) in records.iter() {
                    black_box(ids.insert("BINANCE", &names[s], id));
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("recent_window_1m", |b| {
        let ids: Vec<String> = (0..2 * RECORDS).map(|i| (i + 1).to_string()).collect();
        b.iter_batched_ref(
            || {
                let mut window = RecentIds::new(1_000_000);
                for (i, (s, _)) in stream(0).into_iter().enumerate() {
                    window.insert("NASDAQ", &names[s], &ids[i]);
                }
                (window, stream(RECORDS / SYMBOLS))
            },
            |(window, records)| {
                for (i, &(s, _)) in records.iter().enumerate() {
                    black_box(window.insert("NASDAQ", &names[s], &ids[RECORDS as usize + i]));
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, sequencer, dedup);
criterion_main!(benches);
