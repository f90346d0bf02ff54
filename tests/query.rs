//! Hybrid queries over HTTP: during ingestion every consumed trade is in
//! `/v1/trades` within 100 ms, exactly once, and stays exactly once across
//! the commits that make it durable; SQL that writes is refused, and SQL
//! that runs away is cut off by the row, time and memory limits.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::{committed_rows, wait_for};
use k2::model::TradeKey;

/// The tests of this file run one at a time: the visibility test's 100 ms
/// must not be spent waiting for a core a runaway query of another holds.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A GET or POST to the API; the status, the headers' text and the body.
async fn request(addr: &str, method: &str, path: &str, accept: &str, body: &str) -> (u16, String) {
    let (addr, method, path, accept, body) = (
        addr.to_string(),
        method.to_string(),
        path.to_string(),
        accept.to_string(),
        body.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        common::http(
            &addr,
            &method,
            &path,
            &[("Accept", accept.as_str()), ("Content-Type", "application/json")],
            &body,
        )
    })
    .await
    .unwrap()
}

async fn get_json(addr: &str, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = request(addr, "GET", path, "application/json", "").await;
    let json = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    (status, json)
}

async fn sql(addr: &str, sql: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({ "sql": sql }).to_string();
    let (status, text) = request(addr, "POST", "/v1/query", "application/json", &body).await;
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, json)
}

/// Each partition's offsets in an answer of `/v1/trades`, sorted.
fn offsets_by_partition(answer: &serde_json::Value) -> BTreeMap<i64, Vec<i64>> {
    let mut found: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for row in answer["rows"].as_array().expect("rows") {
        found
            .entry(row["kafka_partition"].as_i64().unwrap())
            .or_default()
            .push(row["kafka_offset"].as_i64().unwrap());
    }
    for offsets in found.values_mut() {
        offsets.sort_unstable();
    }
    found
}

#[actix_rt::test]
async fn a_consumed_trade_is_in_v1_trades_within_100ms_and_once_across_its_commits() {
    let _serial = SERIAL.lock().await;
    const TOTAL: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(4);
    let mut config = common::config(dir.path(), "k2-query");
    // Rows wait in buffers and in pending files long enough to be seen there.
    config.batcher.max_age_ms = 400;
    config.commit.interval_ms = 700;
    // Compaction replaces files that queries take from memory while they run.
    config.maintenance.interval_ms = 1_000;
    let pipeline = common::start(&config, &broker, dir.path(), "query").await;
    let addr = common::serve_api(&pipeline, None, false).await;
    wait_for(Duration::from_secs(60), "lanes running", || async {
        pipeline.status().await.unwrap().lanes.len() == 4
    })
    .await;
    let ids = dir.path().join("ids.csv");
    let load = common::spawn_loadgen(broker.bootstrap_servers(), &ids, TOTAL, 4_000);

    let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
    let mut snapshots = HashSet::new();
    let (mut polls, mut with_live, mut with_held, mut late) = (0, 0, 0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "ingestion did not finish in 60 s");
        // Where each lane had read to; 100 ms later a query must show it all.
        let positions: BTreeMap<i64, i64> = pipeline
            .status()
            .await
            .unwrap()
            .lanes
            .iter()
            .filter_map(|l| Some((l.partition as i64, l.position?)))
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (status, answer) = get_json(&addr, "/v1/trades?limit=100000").await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["truncated"], false);
        polls += 1;
        if answer["live_rows"].as_u64().unwrap() > 0 {
            with_live += 1;
        }
        if pipeline.live.recent().files() > 0 {
            with_held += 1;
        }
        if let Some(snapshot) = answer["snapshot_id"].as_i64() {
            snapshots.insert(snapshot);
        }
        let found = offsets_by_partition(&answer);
        for (partition, offsets) in &found {
            // Every record is a trade: a partition's visible trades are
            // offsets 0..n, each once, with no hole a commit could open.
            let expected: Vec<i64> = (0..offsets.len() as i64).collect();
            assert_eq!(offsets, &expected, "partition {partition}: not each offset once");
            let before = seen.insert(*partition, offsets.len()).unwrap_or(0);
            assert!(
                offsets.len() >= before,
                "partition {partition}: {before} trades visible, then only {}",
                offsets.len()
            );
        }
        for (partition, position) in positions {
            let visible = found.get(&partition).map_or(0, |o| o.len() as i64);
            if visible < position {
                late.push((partition, position, visible));
            }
        }
        let loaded = load.is_finished();
        if loaded && committed_rows(&pipeline).await >= TOTAL && answer["live_rows"] == 0 {
            assert_eq!(answer["row_count"], TOTAL);
            break;
        }
    }
    assert!(
        late.is_empty(),
        "consumed but not visible 100 ms later (partition, position, visible): {late:?}"
    );
    assert!(
        snapshots.len() >= 3,
        "the polls spanned {} commits",
        snapshots.len()
    );
    assert!(
        with_live >= 3,
        "only {with_live} of {polls} polls saw uncommitted rows"
    );
    assert!(
        with_held >= 3,
        "only {with_held} of {polls} polls came while committed files were held in memory"
    );
    let compacted = pipeline.maintenance.view().files_compacted;
    assert!(compacted > 0, "no file was compacted while the polls ran");

    // The last answer is the produced trades, each once.
    let (_, answer) = get_json(&addr, "/v1/trades?limit=100000").await;
    let produced = common::read_ids(&ids);
    let listed: Vec<TradeKey> = answer["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["exchange"].as_str().unwrap().to_string(),
                r["symbol"].as_str().unwrap().to_string(),
                r["trade_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(listed.len(), produced.len());
    assert_eq!(listed.into_iter().collect::<HashSet<_>>(), produced);
    pipeline.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn sql_that_writes_is_refused_and_sql_that_runs_away_is_cut_off() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(2);
    let config = common::config(dir.path(), "k2-query-sql");
    let generator = k2::loadgen::GeneratorParams {
        seed: 5,
        ..Default::default()
    };
    common::preload_to(
        &broker,
        3_000,
        generator,
        k2::loadgen::Spread::Even { partitions: 2 },
    )
    .await;
    let pipeline = common::start(&config, &broker, dir.path(), "query-sql").await;
    wait_for(Duration::from_secs(60), "trades committed", || async {
        committed_rows(&pipeline).await >= 3_000
    })
    .await;
    let limits = k2::config::QueryConfig {
        max_rows: 1_000,
        timeout_ms: 1_500,
        memory_limit_bytes: 8 << 20,
        threads: 1,
        ..Default::default()
    };
    let addr = common::serve_api_with(&pipeline, None, false, limits).await;

    for statement in [
        "DROP TABLE market.trades",
        "CREATE TABLE t AS SELECT 1",
        "INSERT INTO live SELECT * FROM live",
        "DELETE FROM market.trades",
        "COPY (SELECT 1) TO '/tmp/k2-query-copy.csv'",
        "SET datafusion.execution.batch_size = 1",
        "CREATE VIEW v AS SELECT 1",
    ] {
        let (status, body) = sql(&addr, statement).await;
        assert_eq!(status, 400, "{statement}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("only queries"),
            "{statement}: {body}"
        );
    }
    assert!(!std::path::Path::new("/tmp/k2-query-copy.csv").exists());
    let (status, body) = sql(&addr, "SELEC 1").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = sql(&addr, "SELECT * FROM market.nope").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("nope"), "{body}");
    let (status, body) = request(
        &addr,
        "POST",
        "/v1/query",
        "application/json",
        r#"{"query": "SELECT 1"}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("sql"), "{body}");

    // Too many rows: cut at max_rows, and said so.
    let (status, body) = sql(&addr, "SELECT * FROM market.trades").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["row_count"], 1_000);
    assert_eq!(body["truncated"], true);
    assert_eq!(body["rows"].as_array().unwrap().len(), 1_000);
    // The tables K2 keeps beside the trades are there too.
    let (status, body) = sql(&addr, "SELECT count(*) AS n FROM market.trades").await;
    assert_eq!(
        (status, &body["rows"][0]["n"]),
        (200, &serde_json::json!(3_000)),
        "{body}"
    );
    let (status, body) = sql(&addr, "SELECT count(*) AS n FROM k2.dead_letters").await;
    assert_eq!(status, 200, "{body}");
    // EXPLAIN ANALYZE runs the query and shows the plan with its metrics.
    let (status, body) = sql(
        &addr,
        "EXPLAIN ANALYZE SELECT count(*) FROM market.trades WHERE symbol = 'BHP'",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["rows"].to_string().contains("TradesScan"), "{body}");

    // Forever: stopped at the time limit.
    let started = Instant::now();
    let (status, body) = sql(&addr, "SELECT count(*) FROM generate_series(1, 100000000000)").await;
    assert_eq!(status, 504, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("query.timeout_ms"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Too much memory: refused at the limit, the process unharmed.
    let (status, body) = sql(
        &addr,
        "SELECT value, count(*) FROM generate_series(1, 20000000) GROUP BY value",
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("memory"), "{body}");
    let (status, _) = get_json(&addr, "/health").await;
    assert_eq!(status, 200);
    let (_, metrics) = request(&addr, "GET", "/metrics", "text/plain", "").await;
    for outcome in ["timeout", "memory", "bad_request", "truncated"] {
        assert!(
            metrics.lines().any(|l| l.starts_with("k2_queries_total")
                && l.contains(r#"endpoint="sql""#)
                && l.contains(&format!(r#"outcome="{outcome}""#))),
            "no sql {outcome} in /metrics"
        );
    }

    // Formats by Accept; a bad parameter names itself.
    let (status, csv) = request(&addr, "GET", "/v1/trades?limit=3", "text/csv", "").await;
    assert_eq!(status, 200, "{csv}");
    assert!(
        csv.starts_with("exchange,symbol,sequence,trade_id,price"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 4, "{csv}");
    let (status, body) = request(&addr, "GET", "/v1/trades", "application/xml", "").await;
    assert_eq!(status, 406, "{body}");
    for (path, named) in [
        ("/v1/trades?from=yesterday", "`from`"),
        ("/v1/trades?limit=0", "`limit`"),
        ("/v1/trades?limit=1001", "`limit`"),
        ("/v1/trades?symbol=", "`symbol`"),
        ("/v1/trades?sym=BTCUSDT", "`sym`"),
        (
            "/v1/trades?from=2026-12-04T10:00:00Z&to=2026-12-04T09:00:00Z",
            "`from`",
        ),
        ("/v1/trades/recent?minutes=0", "`minutes`"),
        ("/v1/ohlcv?interval=2m", "`interval`"),
        ("/v1/ohlcv?symbol=BTCUSDT", "`interval`"),
    ] {
        let (status, body) = get_json(&addr, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body["error"].as_str().unwrap().contains(named), "{path}: {body}");
    }
    pipeline.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn recent_trades_are_the_newest_in_event_time_order() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(2);
    let config = common::config(dir.path(), "k2-query-recent");
    let pipeline = common::start(&config, &broker, dir.path(), "query-recent").await;
    let addr = common::serve_api(&pipeline, None, false).await;
    let ids = dir.path().join("ids.csv");
    common::spawn_loadgen(broker.bootstrap_servers(), &ids, 2_000, 2_000)
        .await
        .unwrap()
        .unwrap();
    wait_for(Duration::from_secs(60), "trades committed", || async {
        committed_rows(&pipeline).await >= 2_000
    })
    .await;
    let (status, all) = get_json(&addr, "/v1/trades/recent?minutes=15&limit=2000").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["truncated"], false);
    assert_eq!(all["row_count"], 2_000);
    let (_, few) = get_json(&addr, "/v1/trades/recent?minutes=15&limit=10").await;
    assert_eq!(few["truncated"], true);
    let key = |r: &serde_json::Value| {
        let time = r["event_time"].as_str().unwrap();
        (
            chrono::DateTime::parse_from_rfc3339(time)
                .unwrap_or_else(|e| panic!("{time}: {e}"))
                .timestamp_micros(),
            r["kafka_partition"].as_i64().unwrap(),
            r["kafka_offset"].as_i64().unwrap(),
        )
    };
    let few: Vec<_> = few["rows"].as_array().unwrap().iter().map(key).collect();
    let mut sorted = few.clone();
    sorted.sort();
    assert_eq!(few, sorted, "in event-time order");
    // The ten newest of all 2,000.
    let (_, newest) = sql(
        &addr,
        "SELECT event_time, kafka_partition, kafka_offset FROM market.trades \
         ORDER BY event_time DESC, kafka_partition DESC, kafka_offset DESC LIMIT 10",
    )
    .await;
    let mut newest: Vec<_> = newest["rows"].as_array().unwrap().iter().map(key).collect();
    newest.reverse();
    assert_eq!(few, newest);

    // `k2 query` prints a table: from the running K2, or from the catalog.
    let config_file = common::write_run_config(dir.path(), broker.bootstrap_servers(), "unused", "");
    let sql =
        "SELECT count(*) AS n, count(DISTINCT concat(exchange, symbol, trade_id)) AS ids FROM market.trades";
    // Off the test's runtime: the pipeline (and its catalog) runs on it.
    let k2_query = |args: Vec<String>| {
        let config_file = config_file.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_k2"))
                .arg("query")
                .args(args)
                .arg("--config")
                .arg(&config_file)
                .output()
                .expect("k2 query runs")
        })
    };
    let server = format!("http://{addr}");
    for (extra, source) in [
        (
            vec!["--server".to_string(), server.clone()],
            format!("from K2 at {server}"),
        ),
        (
            vec!["--direct".to_string()],
            "from the catalog, committed rows only".to_string(),
        ),
    ] {
        let output = k2_query([vec![sql.to_string()], extra].concat()).await.unwrap();
        let printed = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{printed}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(printed.contains("| 2000 | 2000 |"), "{printed}");
        assert!(printed.contains(&source), "{printed}");
    }
    let refused = k2_query(vec!["DROP TABLE market.trades".into(), "--server".into(), server])
        .await
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("only queries"), "{said}");
    pipeline.shutdown().await.unwrap();
}
