//! Cost per record of the lane's sequencing and exact dedup stages.
//!
//! Each case feeds 10,000 records over 100 symbols of one exchange, in order
//! per symbol, to state that has already seen the symbols (the steady state
//! of a running lane).

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::sync::{Arc, Mutex};

use k2::dedup::{DedupConfig, LaneIds, OrderedIds, UnorderedWindows};
use k2::model::{Side, Trade};
use k2::sequence::{RecordPosition, SequenceConfig, SequenceTracker};
use k2::state::Checkpoint;

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

fn trade(symbol: &str, trade_id: String, offset: i64) -> Trade {
    Trade {
        exchange: "BINANCE".into(),
        symbol: symbol.into(),
        sequence: offset,
        trade_id: trade_id.into(),
        price: 1,
        quantity: 1,
        side: Side::Buy,
        event_time_us: k2::model::now_us(),
        ingest_time_us: k2::model::now_us(),
        partition: 0,
        offset,
    }
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
    group.finish();

    // The deduplicator's whole per-record path: check, epoch log, and the
    // commit (replay into the committed copy, or moving ids without order
    // into the shared windows) once per 10,000 records.
    let mut group = c.benchmark_group("LaneIds");
    group.throughput(Throughput::Elements(RECORDS));
    for (name, numeric) in [
        ("numeric_ids_with_commit", true),
        ("unordered_ids_with_commit", false),
    ] {
        group.bench_function(name, |b| {
            let trades = |round: u64| -> Vec<Trade> {
                stream(round * RECORDS / SYMBOLS)
                    .into_iter()
                    .enumerate()
                    .map(|(i, (s, id))| {
                        let offset = (round * RECORDS) as i64 + i as i64;
                        let trade_id = if numeric {
                            id.to_string()
                        } else {
                            format!("{}-{id:09}", names[s])
                        };
                        trade(&names[s], trade_id, offset)
                    })
                    .collect()
            };
            let windows = Arc::new(UnorderedWindows::new(&DedupConfig::default()));
            let mut round = 0;
            b.iter_batched_ref(
                || {
                    round += 2;
                    let mut ids = LaneIds::new("bench:0:dedup".into(), windows.clone(), 0);
                    for t in &trades(round - 1) {
                        ids.check(t, true);
                    }
                    let ids = Mutex::new(ids);
                    ids.stage(round as i64 * RECORDS as i64);
                    ids.committed(round as i64 * RECORDS as i64, true);
                    (ids, trades(round))
                },
                |(ids, records)| {
                    {
                        let lane = ids.get_mut().unwrap();
                        for t in records.iter() {
                            black_box(lane.check(t, true));
                        }
                    }
                    let next = records.last().map_or(0, |t| t.offset + 1);
                    black_box(ids.stage(next));
                    ids.committed(next, true);
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

/// Resident bytes of this process (Linux `/proc/self/statm`).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Memory of the exact recent window per id, printed once for 1M and for
/// the default capacity, 10M: resident bytes added by committing ids
/// without order (keys like the canonical format's
/// `ASX\x1fBHP\x1fBHP-000000123`) less the Bloom filters' own bytes, and
/// the window's heap bytes by its allocations.
fn recent_window_memory(_: &mut Criterion) {
    // The larger first: the smaller then reuses freed pages, so its resident
    // figure reads low; its allocation figure holds.
    for ids in [10_000_000u64, 1_000_000] {
        let config = DedupConfig {
            recent_max_entries: ids,
            ..DedupConfig::default()
        };
        let before = rss_bytes();
        let windows = Arc::new(UnorderedWindows::new(&config));
        let lane = Mutex::new(LaneIds::new("mem:0:dedup".into(), windows.clone(), 0));
        for i in 0..ids {
            let t = trade("BHP", format!("BHP-{i:09}"), i as i64);
            lane.lock().unwrap().check(&t, true);
            if i % 10_000 == 9_999 {
                lane.committed(i as i64 + 1, true);
            }
        }
        let resident = rss_bytes().saturating_sub(before);
        let bloom = windows.long_window().memory_bytes() as u64;
        println!(
            "recent window: {} ids, {:.1} resident bytes per id without the Bloom filters \
             ({:.1} by its allocations; Bloom: {} bytes)",
            windows.recent_len(),
            resident.saturating_sub(bloom) as f64 / ids as f64,
            windows.recent_memory_bytes() as f64 / windows.recent_len() as f64,
            bloom,
        );
        drop(lane);
        drop(windows);
    }
}

criterion_group!(benches, sequencer, dedup, recent_window_memory);
criterion_main!(benches);
