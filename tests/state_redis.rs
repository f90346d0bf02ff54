//! Sequence and dedup state in Redis (`K2_TEST_REDIS_URL`, the machine's
//! server in `./scripts/test`), across two `k2 run` processes: the second
//! continues exactly where the first committed — it reports the gap that
//! spans the restart, reports no false gap, and drops a duplicate of a trade
//! the first process committed. With state that did not survive, all three
//! would go wrong. Also: the store's stage / promote / load protocol against
//! the real server, and `GET /v1/sequence/gaps` on the second process.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::{
    TOPIC, committed_trades, process_log, read_tables, spawn_k2, stop_k2, wait_for, write_run_config,
};
use iceberg::expr::Predicate;
use k2::state::{RedisStore, Staged, StateStore};
use k2::storage::catalog::open_catalog;
use k2::storage::reader::scan_sequence_events;
use k2::storage::tables::TableIdents;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

fn redis_url() -> String {
    std::env::var("K2_TEST_REDIS_URL")
        .expect("K2_TEST_REDIS_URL must name a Redis server (./scripts/test sets it)")
}

/// Keys of this run only: a prefix no other run uses.
fn unique_prefix() -> String {
    format!("k2test-{}", uuid::Uuid::now_v7().simple())
}

fn staged(scope: &str, base: Option<i64>, offset: i64, entries: &[(&str, &[u8])]) -> Staged {
    Staged {
        scope: scope.to_string(),
        base,
        offset,
        entries: entries.iter().map(|(f, v)| (f.to_string(), v.to_vec())).collect(),
    }
}

#[actix_rt::test]
#[ignore = "needs K2_TEST_REDIS_URL; ./scripts/test runs it"]
async fn redis_store_puts_staged_state_in_force_only_on_its_base() {
    let store = RedisStore::connect(&redis_url(), Duration::from_secs(5))
        .await
        .unwrap();
    let scope = format!("{}:t:0:dedup", unique_prefix());
    assert!(
        store.load(&scope, 0).await.unwrap().is_none(),
        "a new scope has no state"
    );

    store
        .stage("a", &[staged(&scope, None, 10, &[("X\u{1f}S", b"one")])])
        .await
        .unwrap();
    assert!(
        store.load(&scope, 10).await.unwrap().is_some(),
        "a lost promotion is completed by the load"
    );
    store
        .stage("a", &[staged(&scope, Some(10), 20, &[("X\u{1f}T", b"two")])])
        .await
        .unwrap();
    store.promote("a", &[(scope.clone(), 20)]).await.unwrap();
    // A zombie that built on an older state never comes into force.
    store
        .stage("z", &[staged(&scope, Some(5), 30, &[("X\u{1f}S", b"bad")])])
        .await
        .unwrap();
    store.promote("z", &[(scope.clone(), 30)]).await.unwrap();
    assert!(store.load(&scope, 30).await.unwrap().is_none());

    let mut state = store.load(&scope, 20).await.unwrap().expect("state at 20");
    state.sort();
    assert_eq!(
        state,
        [
            ("X\u{1f}S".to_string(), b"one".to_vec()),
            ("X\u{1f}T".to_string(), b"two".to_vec())
        ]
    );
    assert!(
        store.load(&scope, 10).await.unwrap().is_none(),
        "the state moved on from 10"
    );
}

#[actix_rt::test]
#[ignore = "needs K2_TEST_REDIS_URL; ./scripts/test runs it"]
async fn an_unreachable_redis_stops_k2_at_start_up_with_a_clear_error() {
    let err = match RedisStore::connect("redis://127.0.0.1:1/0", Duration::from_secs(2)).await {
        Ok(_) => panic!("nothing listens on port 1"),
        Err(err) => err.to_string(),
    };
    assert!(
        err.starts_with("state store redis at redis://127.0.0.1:1/0: "),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:1", "redis://127.0.0.1:1/0", "unused");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_k2"))
        .args(["run", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env_remove("K2_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("failed to open the state store")
            && stderr.contains("redis at redis://127.0.0.1:1/0"),
        "{stderr}"
    );
}

/// A `k2 run` config with Redis state and a short reorder window.
fn write_config(dir: &Path, bootstrap: &str, redis_url: &str, prefix: &str) -> std::path::PathBuf {
    let state = format!(
        r#"
[sequence]
reorder_window = 4

[state]
backend = "redis"
redis_url = "{redis_url}"
key_prefix = "{prefix}"
"#
    );
    write_run_config(dir, bootstrap, "k2-state", &state)
}

/// Canonical trades of ASX `symbol` whose trade id is the sequence number
/// (so dedup is exact), keyed by symbol (one partition per symbol).
async fn produce(producer: &FutureProducer, symbol: &str, sequences: impl IntoIterator<Item = i64>) {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    for seq in sequences {
        let payload = format!(
            r#"{{"exchange":"ASX","symbol":"{symbol}","sequence":{seq},"trade_id":"{seq}","price":"45.12","quantity":"100","side":"buy","event_time":"{now}"}}"#
        );
        producer
            .send(
                FutureRecord::to(TOPIC).key(symbol).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(err, _)| err)
            .expect("produce");
    }
}

/// `GET path` on the process's HTTP server; returns (status, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The address `k2 run` logged it listens on.
fn http_addr(dir: &Path, name: &str) -> Option<String> {
    let log = process_log(dir, name);
    let line = log.lines().find(|l| l.contains("HTTP control plane listening"))?;
    let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
    Some(addr.to_string())
}

#[actix_rt::test]
#[ignore = "needs K2_TEST_REDIS_URL; ./scripts/test runs it"]
async fn a_second_process_continues_the_first_ones_sequence_and_dedup_state() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(2);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    let config_path = write_config(
        dir.path(),
        broker.bootstrap_servers(),
        &redis_url(),
        &unique_prefix(),
    );
    let config = k2::config::K2Config::load(Some(&config_path)).expect("test config loads");

    // First process: AAA and BBB 1..=100, gap-free.
    produce(&producer, "AAA", 1..=100).await;
    produce(&producer, "BBB", 1..=100).await;
    let first = spawn_k2(&config_path, dir.path(), "first");
    wait_for(
        Duration::from_secs(90),
        "the first process commits 200 trades",
        || async { committed_trades(&config, dir.path()).await >= 200 },
    )
    .await;
    stop_k2(first, dir.path(), "first");

    // While no process runs: AAA misses 101..=104; BBB's trade 50 arrives
    // again, then BBB continues without a gap.
    produce(&producer, "AAA", 105..=150).await;
    produce(&producer, "BBB", std::iter::once(50).chain(101..=150)).await;
    let second = spawn_k2(&config_path, dir.path(), "second");
    wait_for(
        Duration::from_secs(90),
        "the second process commits 296 trades",
        || async { committed_trades(&config, dir.path()).await >= 296 },
    )
    .await;

    let addr = http_addr(dir.path(), "second").expect("the second process logs its HTTP address");
    let mut gaps = serde_json::Value::Null;
    for _ in 0..100 {
        let (status, body) = http_get(&addr, "/v1/sequence/gaps?exchange=ASX&symbol=AAA");
        assert_eq!(status, 200, "{body}");
        gaps = serde_json::from_str(&body).unwrap();
        if gaps["count"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let event = &gaps["events"][0];
    assert_eq!(gaps["count"], 1, "{gaps}");
    assert_eq!(
        (
            &event["kind"],
            &event["expected"],
            &event["received"],
            &event["missing"]
        ),
        (&"gap".into(), &101.into(), &105.into(), &4.into()),
        "{gaps}"
    );
    let (status, body) = http_get(&addr, "/v1/sequence/gaps?since=yesterday");
    assert_eq!(status, 400);
    assert!(body.contains("`since` must be an RFC 3339 timestamp"), "{body}");
    let (status, body) = http_get(&addr, "/v1/sequence/gaps?symbl=AAA");
    assert_eq!(status, 400);
    assert!(body.contains("unknown field `symbl`"), "{body}");
    stop_k2(second, dir.path(), "second");

    // The tables: every trade once (BBB 50 not twice), one gap, nothing else.
    let contents = read_tables(&config, dir.path()).await;
    assert_eq!(
        contents.trades.keys.len(),
        296,
        "{:?}",
        contents.trades.keys.len()
    );
    assert_eq!(contents.distinct().len(), 296, "no duplicate let through");
    let catalog = open_catalog(&config.catalog, dir.path()).await.unwrap();
    let idents = TableIdents::new(&config.catalog.namespace);
    let events = scan_sequence_events(
        &catalog.load_table(&idents.sequence_gaps).await.unwrap(),
        Predicate::AlwaysTrue,
    )
    .await
    .unwrap();
    let summary: Vec<_> = events
        .iter()
        .map(|e| (e.kind, e.symbol.as_str(), e.expected, e.received, e.missing))
        .collect();
    assert_eq!(
        summary,
        [("gap", "AAA", Some(101), 105, Some(4))],
        "exactly the gap that spans the restart:\n{}",
        process_log(dir.path(), "second")
    );
}
