//! Tables K2 writes are read by independent readers: PyIceberg (in a venv
//! made by `scripts/test`, path in `K2_PYTHON`) finds the same rows, schema,
//! partition spec and `k2.offsets` summary in `market.trades`, and the same
//! reference data in `market.reference`. And the SQL catalog works on
//! PostgreSQL (`K2_TEST_POSTGRES_URL`).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{TOPIC, assert_exactly_once, committed_rows, read_tables, wait_for};
use k2::loadgen::{GeneratorParams, Spread};
use k2::storage::offsets::summary_key;

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run ./scripts/test, which provides it (see CONTRIBUTING.md)")
    })
}

/// Ingests `count` generated records, 2 % of them reference data; returns
/// the trades and the number of reference records produced.
async fn ingest(
    config: &k2::config::K2Config,
    dir: &std::path::Path,
    count: u64,
) -> (HashSet<k2::model::TradeKey>, u64) {
    let broker = common::broker(4);
    let generator = GeneratorParams {
        seed: 3,
        reference_ratio: 0.02,
        ..GeneratorParams::default()
    };
    let loaded = common::preload_to(&broker, count, generator, Spread::Even { partitions: 4 }).await;
    let pipeline = common::start(config, &broker, dir, "interop").await;
    let expected = loaded.valid.len() as u64;
    wait_for(Duration::from_secs(120), "trades committed", || async {
        committed_rows(&pipeline).await >= expected
    })
    .await;
    pipeline.shutdown().await.unwrap();
    (loaded.valid.into_iter().collect(), loaded.reference)
}

/// The schema a PyIceberg script printed, one `id name type required`
/// string per field.
fn schema_fields(found: &serde_json::Value) -> Vec<String> {
    found["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{} {} {} {}",
                f[0],
                f[1].as_str().unwrap(),
                f[2].as_str().unwrap(),
                f[3]
            )
        })
        .collect()
}

#[actix_rt::test]
#[ignore = "needs K2_PYTHON with PyIceberg; ./scripts/test runs it"]
async fn pyiceberg_reads_the_rows_schema_and_offsets_k2_wrote() {
    let python = required_env("K2_PYTHON");
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(dir.path(), "k2-interop");
    let (expected, reference) = ingest(&config, dir.path(), 20_000).await;
    let ours = read_tables(&config, dir.path()).await;
    assert_exactly_once(&ours, &expected);
    assert_eq!(ours.reference.len() as u64, reference);

    let found = common::pyiceberg(&python, "read_table.py", dir.path(), "market.trades", &[]);

    assert_eq!(found["rows"], expected.len());
    assert_eq!(found["distinct_keys"], expected.len());
    assert_eq!(
        schema_fields(&found),
        [
            "1 exchange string true",
            "2 symbol string true",
            "3 sequence long true",
            "4 trade_id string true",
            "5 price decimal(18, 8) true",
            "6 quantity decimal(18, 8) true",
            "7 side string true",
            "8 event_time timestamptz true",
            "9 ingest_time timestamptz true",
            "10 kafka_partition int true",
            "11 kafka_offset long true",
        ]
    );
    assert_eq!(found["partition_spec"], serde_json::json!([["event_day", "day"]]));
    let offsets_json = found["k2_summary"][summary_key(TOPIC)]
        .as_str()
        .expect("k2.offsets key present");
    assert_eq!(
        offsets_json,
        ours.offsets.to_json(),
        "PyIceberg sees the offsets K2 recorded"
    );

    let found = common::pyiceberg(&python, "read_reference.py", dir.path(), "market.reference", &[]);
    assert!(reference > 200, "{reference}");
    assert_eq!(found["rows"], reference);
    assert_eq!(found["distinct_positions"], reference);
    assert_eq!(
        schema_fields(&found),
        [
            "1 exchange string true",
            "2 symbol string true",
            "3 name string false",
            "4 currency string false",
            "5 tick_size decimal(18, 8) true",
            "6 lot_size decimal(18, 8) true",
            "7 status string true",
            "8 effective_time timestamptz true",
            "9 ingest_time timestamptz true",
            "10 kafka_partition int true",
            "11 kafka_offset long true",
        ]
    );
    // PyIceberg reads K2's decimals exactly: an ASX share ticks in cents
    // and trades in whole shares (the generator's universe).
    let sizes = found["sizes"].as_array().unwrap();
    let bhp = sizes
        .iter()
        .find(|s| s[0] == "ASX" && s[1] == "BHP")
        .expect("BHP, the most popular ASX symbol, has reference data");
    assert_eq!(
        (bhp[2].as_str(), bhp[3].as_str()),
        (Some("0.01000000"), Some("1.00000000")),
        "{bhp}"
    );
    assert!(
        found["statuses"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("trading")),
        "{found}"
    );
}

#[actix_rt::test]
#[ignore = "needs K2_TEST_POSTGRES_URL; ./scripts/test runs it"]
async fn sql_catalog_on_postgresql_ingests_exactly_once() {
    let url = required_env("K2_TEST_POSTGRES_URL");
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), "k2-postgres");
    config.catalog.uri = url;
    // A catalog name of its own keeps this run's tables apart from earlier runs'.
    config.catalog.name = format!("k2test_{}", uuid::Uuid::now_v7().simple());
    let (expected, reference) = ingest(&config, dir.path(), 20_000).await;
    let contents = read_tables(&config, dir.path()).await;
    assert_exactly_once(&contents, &expected);
    assert_eq!(contents.reference.len() as u64, reference);
    let next: i64 = contents.offsets.iter().map(|(_, o)| o.next_offset).sum();
    assert_eq!(next, 20_000);
}

/// Produces `count` canonical trades of `instruments` (exchange, symbol),
/// round robin, with event times from three hours ago on, some sharing a
/// time with the trade before (open and close then fall to the sequence),
/// and prices and quantities with all 8 decimal places used.
fn produce_spread_trades(bootstrap: &str, instruments: &[(&str, &str)], count: usize) {
    use rand::{Rng, SeedableRng};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("producer");
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let start = chrono::Utc::now() - chrono::Duration::hours(3);
    let step_us = 3 * 3_600_000_000i64 / count as i64;
    let mut time = start;
    for i in 0..count {
        let (exchange, symbol) = instruments[i % instruments.len()];
        if i % 5 != 4 {
            time += chrono::Duration::microseconds(rng.random_range(1..2 * step_us));
        }
        let units = |lo: i64, hi: i64, rng: &mut rand::rngs::StdRng| {
            let v = rng.random_range(lo * 100_000_000..hi * 100_000_000);
            format!("{}.{:08}", v / 100_000_000, v % 100_000_000)
        };
        let value = serde_json::json!({
            "exchange": exchange,
            "symbol": symbol,
            "sequence": i / instruments.len() + 1,
            "trade_id": format!("{symbol}-{i:08}"),
            "price": units(90, 110, &mut rng),
            "quantity": units(0, 5, &mut rng),
            "side": if i % 2 == 0 { "buy" } else { "sell" },
            "event_time": time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        })
        .to_string();
        let key = format!("{exchange}:{symbol}");
        producer
            .send(BaseRecord::to(TOPIC).key(&key).payload(&value))
            .expect("queued");
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("delivered");
}

#[actix_rt::test]
#[ignore = "needs K2_PYTHON with PyIceberg; ./scripts/test runs it"]
async fn ohlcv_and_vwap_agree_exactly_with_pyiceberg_and_pyarrow() {
    let python = required_env("K2_PYTHON");
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(2);
    let config = common::config(dir.path(), "k2-ohlcv");
    let instruments = [("BINANCE", "BTCUSDT"), ("ASX", "BHP")];
    let bootstrap = broker.bootstrap_servers().to_string();
    tokio::task::spawn_blocking(move || produce_spread_trades(&bootstrap, &instruments, 6_000))
        .await
        .unwrap();
    let pipeline = common::start(&config, &broker, dir.path(), "ohlcv").await;
    wait_for(Duration::from_secs(120), "trades committed", || async {
        committed_rows(&pipeline).await >= 6_000
    })
    .await;
    let addr = common::serve_api(&pipeline, None, false).await;
    for (interval, width_us) in [
        ("1m", 60_000_000i64),
        ("5m", 300_000_000),
        ("1h", 3_600_000_000),
        ("1d", 86_400_000_000),
    ] {
        let path = format!("/v1/ohlcv?exchange=BINANCE&symbol=BTCUSDT&interval={interval}");
        let (status, ours) = common::api(&addr, &path, "GET", "", None).await;
        assert_eq!(status, 200, "{ours}");
        let ours: Vec<serde_json::Value> = ours["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|bar| {
                let start = bar["start"].as_str().unwrap();
                let mut bar = bar.clone();
                bar["start_us"] = chrono::DateTime::parse_from_rfc3339(start)
                    .unwrap_or_else(|e| panic!("{start}: {e}"))
                    .timestamp_micros()
                    .into();
                bar.as_object_mut().unwrap().remove("start");
                bar
            })
            .collect();
        let width = width_us.to_string();
        let found = common::pyiceberg(
            &python,
            "ohlcv.py",
            dir.path(),
            "market.trades",
            &["BINANCE".as_ref(), "BTCUSDT".as_ref(), width.as_ref()],
        );
        assert_eq!(found["rows"], 3_000);
        let theirs = found["bars"].as_array().unwrap();
        if interval == "1m" {
            assert!(theirs.len() > 100, "{} one-minute bars", theirs.len());
        }
        assert_eq!(&ours, theirs, "{interval} bars differ");
    }
    pipeline.shutdown().await.unwrap();
}
