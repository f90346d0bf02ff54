//! Cost per key of the long-window Bloom tier ([`LongWindow`]).
//!
//! The window is sized as in production for 10⁹ keys over 24 hours (41.7M keys per hourly generation,
//! 75 MB of bits) and one generation is filled to that capacity before measuring. Each case checks or
//! inserts the next 10,000 keys of a pool of 1M keys of that hour, cycling: the pool's bits are spread
//! over the whole filter, far more than the CPU caches hold (32 MiB of L3 on the machine of
//! `docs/benchmarks.md`), so lookups miss the caches as they do in production. A pool as small as one
//! batch would keep its bits in L3 from one iteration to the next.

use std::hint::black_box;
use std::io::Write as _;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use k2::bloom::{LongWindow, LongWindowConfig};

const WINDOW_HOURS: u32 = 24;
const CAPACITY: u64 = 1_000_000_000;
const PER_HOUR: u64 = CAPACITY / WINDOW_HOURS as u64;
const BATCH: u64 = 10_000;
const POOL: u64 = 1_000_000;
const FPR_PROBES: u64 = 1_000_000;
/// 2026-01-01T10:00:00Z: every key is in this hour.
const HOUR_US: i64 = 1_767_261_600_000_000;

fn key(buf: &mut Vec<u8>, id: u64) -> &[u8] {
    buf.clear();
    let _ = write!(buf, "BINANCE\x1fBTCUSDT\x1f{id}");
    buf
}

/// Keys stored back to back, so that reading them is sequential and leaves the caches to the filter.
struct Pool {
    bytes: Vec<u8>,
    /// Key `i` is `bytes[bounds[i]..bounds[i + 1]]`.
    bounds: Vec<usize>,
    next: usize,
}

impl Pool {
    fn new(ids: impl Iterator<Item = u64>) -> Self {
        let mut buf = Vec::new();
        let mut pool = Pool {
            bytes: Vec::new(),
            bounds: vec![0],
            next: 0,
        };
        for id in ids {
            pool.bytes.extend_from_slice(key(&mut buf, id));
            pool.bounds.push(pool.bytes.len());
        }
        pool
    }

    /// Calls `f` with the next `BATCH` keys and an event time in `HOUR_US`, wrapping around the pool.
    fn batch(&mut self, mut f: impl FnMut(&[u8], i64)) {
        for _ in 0..BATCH {
            let key = &self.bytes[self.bounds[self.next]..self.bounds[self.next + 1]];
            f(key, HOUR_US + self.next as i64);
            self.next = (self.next + 1) % (self.bounds.len() - 1);
        }
    }
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
    // The event time of a pool key is not the one it was inserted with, but it is in the same hour,
    // which is all a lookup uses.
    let mut present = Pool::new((0..POOL).map(|i| i * (PER_HOUR / POOL)));
    let mut absent = Pool::new(PER_HOUR + FPR_PROBES..PER_HOUR + FPR_PROBES + POOL);
    let mut new = Pool::new(PER_HOUR + FPR_PROBES + POOL..PER_HOUR + FPR_PROBES + 2 * POOL);

    let mut group = c.benchmark_group("LongWindow");
    group.throughput(Throughput::Elements(BATCH));
    group.bench_function("contains_present", |b| {
        b.iter(|| {
            present.batch(|key, t| {
                black_box(window.contains(key, t));
            })
        })
    });
    group.bench_function("contains_absent", |b| {
        b.iter(|| {
            absent.batch(|key, t| {
                black_box(window.contains(key, t));
            })
        })
    });
    // Last, as it adds up to 1M keys (2.4%) to the filled generation.
    group.bench_function("insert", |b| {
        b.iter(|| {
            new.batch(|key, t| {
                black_box(window.insert(key, t));
            })
        })
    });
    group.finish();
}

criterion_group!(benches, long_window);
criterion_main!(benches);
