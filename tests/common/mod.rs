//! Shared scaffolding for the black-box tests: an embedded Kafka-protocol
//! broker, a temp warehouse with a SQLite catalog, and ways to wait for and
//! read what the pipeline committed.

#![allow(dead_code)]

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k2::config::K2Config;
use k2::embedded::EmbeddedBroker;
use k2::model::TradeKey;
use k2::pipeline::{self, Pipeline, PipelineParams};
use k2::storage::catalog::open_catalog;
use k2::storage::offsets::TopicOffsets;
use k2::storage::reader::{TradeKeys, committed_record_count, scan_trade_keys};
use k2::storage::tables::TableIdents;

pub const TOPIC: &str = "market.trades.raw";

pub fn broker(partitions: i32) -> EmbeddedBroker {
    EmbeddedBroker::start(&[(TOPIC.to_string(), partitions)]).expect("embedded broker starts")
}

/// Produces `count` generated trades to [`TOPIC`] of `broker`, off the async
/// runtime (librdkafka's producer blocks).
pub async fn preload_to(
    broker: &EmbeddedBroker,
    count: u64,
    generator: k2::loadgen::GeneratorParams,
    spread: k2::loadgen::Spread,
) -> k2::loadgen::PreloadReport {
    let bootstrap = broker.bootstrap_servers().to_string();
    tokio::task::spawn_blocking(move || k2::loadgen::preload(&bootstrap, TOPIC, count, generator, spread))
        .await
        .expect("the preload task ran")
        .expect("preload")
}

/// A config for tests: small, fast commits into a catalog under `dir`.
pub fn config(dir: &Path, group: &str) -> K2Config {
    let mut config = K2Config::default();
    config.kafka.topic = TOPIC.to_string();
    config.kafka.group_id = group.to_string();
    config.catalog = k2::config::CatalogConfig::sqlite_in(dir);
    config.commit.interval_ms = 200;
    config.batcher.max_age_ms = 100;
    config.batcher.max_rows = 5_000;
    config.lanes.arbiters = 2;
    config.http.listen = "127.0.0.1:0".to_string();
    config
}

/// Injects `fault` into `pipeline` for as long as a test runs (an hour;
/// clear it by id or kind sooner) and returns its id.
pub fn inject(pipeline: &Pipeline, fault: k2::faults::Fault) -> u64 {
    pipeline
        .faults
        .inject(fault, Duration::from_secs(3600))
        .expect("fault injected")
        .id
}

/// Keeps the retention headroom from raising the level. For tests of faults
/// that stall lanes long enough to come close to what the mock broker
/// retains (~5 MiB a partition): the level would rightly climb and shed, and
/// those tests check that every trade is committed (tests/overload.rs covers
/// the headroom).
pub fn without_retention_headroom(config: &mut K2Config) {
    for headroom in [
        &mut config.degradation.retention_headroom_ratio,
        &mut config.degradation.retention_headroom_s,
    ] {
        headroom.escalate = [k2::degradation::NEVER_BELOW; 4];
        headroom.recover = [k2::degradation::NEVER_BELOW; 4];
    }
}

/// Logs go to the test's captured output (shown when it fails); `K2_LOG`
/// sets the filter, as for the binary.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("K2_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,k2=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

pub async fn start(config: &K2Config, broker: &EmbeddedBroker, dir: &Path, instance: &str) -> Pipeline {
    init_logs();
    k2::metrics::install();
    let pipeline = pipeline::start(PipelineParams {
        config: config.clone(),
        brokers: broker.bootstrap_servers().to_string(),
        base_dir: dir.to_path_buf(),
        instance: instance.to_string(),
    })
    .await
    .expect("pipeline starts");
    pipeline.faults.set_broker_control(broker.control());
    pipeline
}

/// What the catalog under `config` holds.
pub struct TableContents {
    pub trades: TradeKeys,
    /// (partition, offset) of every row of `market.reference`.
    pub reference: Vec<(i32, i64)>,
    pub dead_letters: u64,
    pub offsets: TopicOffsets,
}

impl TableContents {
    pub fn distinct(&self) -> HashSet<TradeKey> {
        self.trades.keys.iter().cloned().collect()
    }
}

pub async fn read_tables(config: &K2Config, dir: &Path) -> TableContents {
    let catalog = open_catalog(&config.catalog, dir).await.expect("catalog opens");
    let idents = TableIdents::new(&config.catalog.namespace);
    let trades = catalog
        .load_table(&idents.trades)
        .await
        .expect("trades table loads");
    let dead_letters = catalog
        .load_table(&idents.dead_letters)
        .await
        .expect("dead-letter table loads");
    let reference = catalog
        .load_table(&idents.reference)
        .await
        .expect("reference table loads");
    TableContents {
        trades: scan_trade_keys(&trades).await.expect("trades scan"),
        reference: k2::storage::reader::scan_reference_positions(&reference)
            .await
            .expect("reference scan"),
        dead_letters: committed_record_count(&dead_letters),
        offsets: TopicOffsets::from_table(&trades, TOPIC).expect("offsets parse"),
    }
}

/// Polls `check` every 100 ms until it returns true or `limit` passes.
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows the pipeline's committer has made durable so far.
pub async fn committed_rows(pipeline: &Pipeline) -> u64 {
    pipeline
        .status()
        .await
        .map(|s| s.committer.rows_committed)
        .unwrap_or(0)
}

/// The trades of an ids file written by the load generator.
pub fn read_ids(path: &Path) -> HashSet<TradeKey> {
    k2::loadgen::read_ids_file(path)
        .expect("ids file readable")
        .into_iter()
        .filter(|line| !line.is_reference())
        .map(|trade| trade.key)
        .collect()
}

/// The Kafka positions (partition, offset) of the reference data of an ids
/// file written by the load generator.
pub fn read_reference_ids(path: &Path) -> HashSet<(i32, i64)> {
    k2::loadgen::read_ids_file(path)
        .expect("ids file readable")
        .into_iter()
        .filter(|line| line.is_reference())
        .map(|line| (line.partition, line.offset))
        .collect()
}

/// Asserts the table holds exactly `expected`: every trade once, nothing else.
pub fn assert_exactly_once(contents: &TableContents, expected: &HashSet<TradeKey>) {
    let distinct = contents.distinct();
    let rows = contents.trades.keys.len();
    assert_eq!(
        rows,
        distinct.len(),
        "{} duplicate rows in the table",
        rows - distinct.len()
    );
    let missing = expected.difference(&distinct).count();
    let extra = distinct.difference(expected).count();
    assert_eq!(missing, 0, "{missing} produced trades are missing from the table");
    assert_eq!(extra, 0, "{extra} rows in the table were never produced");
}

/// Writes `<dir>/k2.toml` for `k2 run`: the broker, a SQLite catalog under
/// `dir`, fast commits, HTTP on a free port, no level raised by retention
/// headroom, then `extra` (more sections).
pub fn write_run_config(dir: &Path, bootstrap: &str, group: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("k2.toml");
    let text = format!(
        r#"
[kafka]
brokers = "{bootstrap}"
topic = "{TOPIC}"
group_id = "{group}"
session_timeout_ms = 6000

[lanes]
arbiters = 2

[batcher]
max_rows = 5000
max_age_ms = 100

[commit]
interval_ms = 200

[catalog]
uri = "sqlite:{dir}/catalog.db"
warehouse = "{dir}/warehouse"

[http]
listen = "127.0.0.1:0"

# These tests check that every trade is committed; a kill or an outage that
# comes close to what the mock broker retains would rightly raise the level
# and shed (tests/overload.rs covers that).
[degradation.retention_headroom_ratio]
escalate = [-1.0, -1.0, -1.0, -1.0]
recover = [-1.0, -1.0, -1.0, -1.0]

[degradation.retention_headroom_s]
escalate = [-1.0, -1.0, -1.0, -1.0]
recover = [-1.0, -1.0, -1.0, -1.0]
{extra}"#,
        dir = dir.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts the `k2 run` binary with `config`, its stderr in `<dir>/<name>.log`.
pub fn spawn_k2(config: &Path, dir: &Path, name: &str) -> Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Command::new(env!("CARGO_BIN_EXE_k2"))
        .args(["run", "--config"])
        .arg(config)
        .current_dir(dir)
        .env_remove("K2_CONFIG")
        .env("K2_LOG", "warn,k2=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("k2 binary starts")
}

/// Trades committed so far, or 0 while no process has created the catalog
/// and tables yet.
pub async fn committed_trades(config: &K2Config, dir: &Path) -> u64 {
    if !dir.join("catalog.db").exists() {
        return 0;
    }
    let Ok(catalog) = open_catalog(&config.catalog, dir).await else {
        return 0;
    };
    let idents = TableIdents::new(&config.catalog.namespace);
    match catalog.load_table(&idents.trades).await {
        Ok(table) => committed_record_count(&table),
        Err(_) => 0,
    }
}

/// What a process started by [`spawn_k2`] logged.
pub fn process_log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Sends SIGTERM (a clean stop: final commit) and waits for a zero exit.
pub fn stop_k2(mut child: Child, dir: &Path, name: &str) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill(1) runs");
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(
        exit.success(),
        "k2 run exited with {exit} after SIGTERM:\n{}",
        process_log(dir, name)
    );
}

/// Produces `total` trades at `rate` in the background, recording their ids.
pub fn spawn_loadgen(
    bootstrap: &str,
    ids: &std::path::Path,
    total: u64,
    rate: u64,
) -> actix_rt::task::JoinHandle<anyhow::Result<k2::loadgen::LoadgenReport>> {
    let generator = k2::loadgen::GeneratorParams {
        seed: 11,
        ..k2::loadgen::GeneratorParams::default()
    };
    spawn_loadgen_with(bootstrap, ids, total, rate, generator)
}

/// [`spawn_loadgen`] with the generator's parameters given.
pub fn spawn_loadgen_with(
    bootstrap: &str,
    ids: &std::path::Path,
    total: u64,
    rate: u64,
    generator: k2::loadgen::GeneratorParams,
) -> actix_rt::task::JoinHandle<anyhow::Result<k2::loadgen::LoadgenReport>> {
    let params = k2::loadgen::LoadgenParams {
        brokers: bootstrap.to_string(),
        topic: TOPIC.to_string(),
        rate,
        shape: Default::default(),
        duration: None,
        total: Some(total),
        ids_file: Some(ids.to_path_buf()),
        tiers: Default::default(),
        generator,
        progress: false,
    };
    actix_rt::spawn(k2::loadgen::run_loadgen(params, futures::future::pending()))
}

/// Serves the control plane of `pipeline` on a free port; returns its address.
pub async fn serve_api(pipeline: &Pipeline, api_key: Option<&str>, faults_enabled: bool) -> String {
    serve_api_with(pipeline, api_key, faults_enabled, Default::default()).await
}

/// [`serve_api`] with the query limits given.
pub async fn serve_api_with(
    pipeline: &Pipeline,
    api_key: Option<&str>,
    faults_enabled: bool,
    limits: k2::config::QueryConfig,
) -> String {
    use k2::web::{self, AppState};
    let query = k2::query::QueryEngine::new(
        pipeline.catalog.clone(),
        pipeline.tables.clone(),
        TOPIC,
        Some(pipeline.live.clone()),
        Some(pipeline.catalog_db.clone()),
        limits,
    )
    .await
    .expect("the query engine starts");
    let (server, addr) = web::serve(
        AppState {
            supervisor: pipeline.supervisor.clone(),
            metrics: k2::metrics::install(),
            catalog: pipeline.catalog.clone(),
            tables: pipeline.tables.clone(),
            maintenance: pipeline.maintenance.clone(),
            api_key: api_key.map(str::to_string),
            faults: pipeline.faults.clone(),
            faults_enabled,
            query,
        },
        "127.0.0.1:0",
    )
    .expect("HTTP server binds");
    actix_rt::spawn(server);
    addr.to_string()
}

/// One JSON request to the control plane at `addr`, with the API key if
/// given; the status and the JSON answer.
pub async fn api(
    addr: &str,
    path: &str,
    method: &str,
    body: &str,
    key: Option<&str>,
) -> (u16, serde_json::Value) {
    let (addr, path, method, body) = (
        addr.to_string(),
        path.to_string(),
        method.to_string(),
        body.to_string(),
    );
    let key = key.map(str::to_string);
    let (status, text) = tokio::task::spawn_blocking(move || {
        let mut headers: Vec<(&str, &str)> = key.iter().map(|k| ("X-API-Key", k.as_str())).collect();
        headers.push(("Content-Type", "application/json"));
        http(&addr, &method, &path, &headers, &body)
    })
    .await
    .unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, json)
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("HTTP server reachable");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).expect("request sent");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response read");
    let status = response[9..12].parse().expect("status code");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The next offset the trades table records for each partition (empty
/// while no process has created the catalog and tables yet).
pub async fn table_offsets(config: &K2Config, dir: &Path) -> std::collections::BTreeMap<i32, i64> {
    let sqlite_without_file = config.catalog.uri.starts_with("sqlite:") && !dir.join("catalog.db").exists();
    if sqlite_without_file {
        return Default::default();
    }
    let Ok(catalog) = open_catalog(&config.catalog, dir).await else {
        return Default::default();
    };
    let idents = TableIdents::new(&config.catalog.namespace);
    let Ok(table) = catalog.load_table(&idents.trades).await else {
        return Default::default();
    };
    TopicOffsets::from_table(&table, TOPIC)
        .map(|offsets| offsets.iter().map(|(p, o)| (p, o.next_offset)).collect())
        .unwrap_or_default()
}

/// Runs `tests/interop/<script>` with `python` (PyIceberg) on the SQLite
/// catalog and warehouse under `dir`, on `table`, plus `extra` arguments;
/// returns the JSON object it prints.
pub fn pyiceberg(
    python: &str,
    script: &str,
    dir: &Path,
    table: &str,
    extra: &[&std::ffi::OsStr],
) -> serde_json::Value {
    let warehouse = dir.join("warehouse").canonicalize().expect("warehouse exists");
    let output = Command::new(python)
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/interop")
                .join(script),
        )
        .arg(dir.join("catalog.db"))
        .arg(format!("file://{}", warehouse.display()))
        .arg(table)
        .args(extra)
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "PyIceberg failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the script prints JSON")
}
