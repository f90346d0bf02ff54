//! Round trips of the Redis state store against a local server
//! (`K2_BENCH_REDIS_URL`, default `redis://127.0.0.1:6379/0`).
//!
//! A commit epoch stages the state of every symbol its records touched in one
//! pipelined round and promotes it in another; a lane start loads it. Each
//! case moves 10,000 symbols' sequence states (the old platform's target: one
//! pipelined round of 10,000 sequence checks in < 100 ms).

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use k2::state::{RedisStore, Staged, StateStore};

const SYMBOLS: usize = 10_000;

fn redis_store(c: &mut Criterion) {
    let url = std::env::var("K2_BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_string());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let store = runtime
        .block_on(RedisStore::connect(&url, Duration::from_secs(5)))
        .unwrap_or_else(|err| panic!("this benchmark needs Redis: {err}"));
    let scope = format!("k2bench-{}:t:0:sequencer", uuid::Uuid::now_v7().simple());
    // A sequence state as the sequencer stores it: the highest number and no open gap.
    let entries: Vec<(String, Vec<u8>)> = (0..SYMBOLS)
        .map(|i| {
            let value = format!(r#"{{"high":{},"pending":[]}}"#, 1_000_000 + i);
            (format!("BINANCE\u{1f}SYM{i:05}"), value.into_bytes())
        })
        .collect();
    let mut offset = 0;

    let mut group = c.benchmark_group("RedisStore");
    group.throughput(Throughput::Elements(SYMBOLS as u64));
    group.bench_function("stage_10k_symbols", |b| {
        b.iter(|| {
            offset += 1;
            let staged = Staged {
                scope: scope.clone(),
                base: Some(offset - 1),
                offset,
                entries: entries.clone(),
            };
            runtime.block_on(store.stage("bench", &[staged])).unwrap();
        })
    });
    group.bench_function("stage_and_promote_10k_symbols", |b| {
        b.iter(|| {
            offset += 1;
            let staged = Staged {
                scope: scope.clone(),
                base: None,
                offset,
                entries: entries.clone(),
            };
            runtime.block_on(async {
                store.stage("bench", &[staged]).await.unwrap();
                store.promote("bench", &[(scope.clone(), offset)]).await.unwrap();
            });
        })
    });
    group.bench_function("load_10k_symbols", |b| {
        b.iter(|| {
            let loaded = runtime.block_on(store.load(&scope, offset)).unwrap();
            assert_eq!(loaded.map(|l| l.len()), Some(SYMBOLS));
        })
    });
    group.finish();
}

criterion_group!(benches, redis_store);
criterion_main!(benches);
