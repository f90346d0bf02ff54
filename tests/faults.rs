//! `/v1/faults` against a running pipeline: every kind is injected over
//! HTTP while trades flow, breaks the real component it names, ends (cleared,
//! expired or spent), and the table is exact at the end.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{read_ids, read_tables, spawn_loadgen, wait_for};
use k2::storage::catalog::open_catalog;
use k2::storage::reader::scan_dead_letters;
use k2::storage::tables::TableIdents;
use serde_json::Value;

const KEY: &str = "test-key-0123456789abcdef";
const FAULTS: &str = "/v1/faults";

fn resident_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

/// Injects over HTTP; the answer must be 201. Returns the fault's id.
async fn post(addr: &str, body: &str) -> u64 {
    let (status, answer) = common::api(addr, FAULTS, "POST", body, Some(KEY)).await;
    assert_eq!(status, 201, "{body}: {answer}");
    answer["id"].as_u64().unwrap()
}

async fn active_kinds(addr: &str) -> Vec<String> {
    let (status, answer) = common::api(addr, FAULTS, "GET", "", None).await;
    assert_eq!(status, 200);
    answer["faults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap().to_string())
        .collect()
}

async fn memory_signal(addr: &str) -> f64 {
    let (_, view) = common::api(addr, "/v1/degradation", "GET", "", None).await;
    view["signals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "memory_ratio")
        .and_then(|s| s["value"].as_f64())
        .unwrap()
}

/// Whether the broker answers a metadata request within a second.
async fn broker_answers(broker: &k2::embedded::EmbeddedBroker) -> Result<(), String> {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let bootstrap = broker.bootstrap_servers().to_string();
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .map_err(|e| e.to_string())?;
        client
            .fetch_metadata(Some(common::TOPIC), Duration::from_secs(1))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap()
}

#[actix_rt::test]
async fn bad_fault_requests_are_refused_with_the_reason_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(2);
    let config = common::config(dir.path(), "k2-fault-requests");
    let pipeline = common::start(&config, &broker, dir.path(), "fault-requests").await;
    let addr = common::serve_api(&pipeline, Some(KEY), true).await;
    let catalog_down = r#"{"kind": "catalog_down", "duration_s": 5}"#;

    let (status, body) = common::api(&addr, FAULTS, "POST", catalog_down, None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = common::api(&addr, FAULTS, "POST", catalog_down, Some("wrong-key-0123")).await;
    assert_eq!(status, 403, "{body}");
    let disabled = common::serve_api(&pipeline, Some(KEY), false).await;
    let (status, body) = common::api(&disabled, FAULTS, "POST", catalog_down, Some(KEY)).await;
    assert_eq!(status, 403);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("[faults] enabled = false"),
        "{body}"
    );
    let (_, listed) = common::api(&disabled, FAULTS, "GET", "", None).await;
    assert_eq!(listed["enabled"], Value::Bool(false));

    for (body, reason) in [
        ("not json", "bad body"),
        (r#"{"kind": "flood"}"#, "unknown variant `flood`"),
        (
            r#"{"kind": "catalog_down", "colour": "red"}"#,
            "unknown field `colour`",
        ),
        (
            r#"{"kind": "stage_panic", "target": {"stage": "sequencer"}}"#,
            "stage_panic needs `target.partition`",
        ),
        (
            r#"{"kind": "stage_panic", "target": {"stage": "supervisor", "partition": 0}}"#,
            "stage_panic cannot target the supervisor",
        ),
        (
            r#"{"kind": "slow_stage", "target": {"stage": "batcher"}, "params": {"delay_ms": 10}}"#,
            "slow_stage cannot target the batcher",
        ),
        (
            r#"{"kind": "slow_stage", "target": {"stage": "sequencer"}}"#,
            "slow_stage needs `params.delay_ms`",
        ),
        (
            r#"{"kind": "catalog_down", "params": {"latency_ms": 5}}"#,
            "catalog_down takes no `params.latency_ms`",
        ),
        (
            r#"{"kind": "poison", "target": {"partition": -1}, "params": {"records": 5}}"#,
            "`target.partition` -1 is negative",
        ),
        (
            r#"{"kind": "memory_pressure", "params": {"mib": 0}}"#,
            "`params.mib` 0 is out of range",
        ),
        (
            r#"{"kind": "catalog_down", "duration_s": 0}"#,
            "`duration_s` 0 is out of range",
        ),
        (
            r#"{"kind": "lose_commits", "params": {"commits": 1}}"#,
            "lose_commits needs `target.table`",
        ),
    ] {
        let (status, answer) = common::api(&addr, FAULTS, "POST", body, Some(KEY)).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(
            error.contains(reason),
            "{body}: {error:?} does not say {reason:?}"
        );
    }
    let (status, answer) = common::api(&addr, "/v1/faults/999", "DELETE", "", Some(KEY)).await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = common::api(&addr, "/v1/faults/abc", "DELETE", "", Some(KEY)).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        active_kinds(&addr).await.is_empty(),
        "a refused request left a fault"
    );
    assert!(!pipeline.faults.catalog_down());
    pipeline.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn every_fault_injected_over_http_breaks_k2_for_real_ends_and_leaves_the_table_exact() {
    const PARTITIONS: i32 = 4;
    const TOTAL: u64 = 60_000;
    const POISONED: u64 = 5;
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(PARTITIONS);
    let mut config = common::config(dir.path(), "k2-faults");
    common::without_retention_headroom(&mut config);
    let pipeline = common::start(&config, &broker, dir.path(), "faults").await;
    let addr = common::serve_api(&pipeline, Some(KEY), true).await;
    let ids = dir.path().join("ids.csv");
    let loadgen = spawn_loadgen(broker.bootstrap_servers(), &ids, TOTAL, 3_000);
    wait_for(Duration::from_secs(60), "trades committed", || async {
        common::committed_rows(&pipeline).await > 0
    })
    .await;

    // poison: the next 5 records of partition 1 arrive corrupted.
    post(
        &addr,
        r#"{"kind": "poison", "target": {"partition": 1}, "params": {"records": 5}}"#,
    )
    .await;
    // stage_panic: partition 2's sequencer panics; its lane is rebuilt.
    let incarnation = |status: &k2::actors::supervisor::PipelineStatus| {
        status
            .lanes
            .iter()
            .find(|l| l.partition == 2)
            .map(|l| l.incarnation)
    };
    let before = incarnation(&pipeline.status().await.unwrap()).unwrap();
    post(
        &addr,
        r#"{"kind": "stage_panic", "target": {"stage": "sequencer", "partition": 2}}"#,
    )
    .await;
    wait_for(Duration::from_secs(30), "partition 2's lane rebuilt", || async {
        incarnation(&pipeline.status().await.unwrap()).is_some_and(|i| i > before)
    })
    .await;
    wait_for(Duration::from_secs(30), "poison and panic spent", || async {
        active_kinds(&addr).await.is_empty()
    })
    .await;

    // memory_pressure: resident memory and the memory signal rise, and fall
    // once the fault is cleared. 512 MiB is an eighth of the default memory
    // budget (4 GiB), so the signal must rise by more than 0.05.
    let (rss, signal) = (resident_mib(), memory_signal(&addr).await);
    let pressure = post(&addr, r#"{"kind": "memory_pressure", "params": {"mib": 512}}"#).await;
    let held = resident_mib();
    // The rest of the process moves too (trades keep flowing): the margins
    // leave it a few tens of MiB either way.
    assert!(held >= rss + 450, "resident {rss} -> {held} MiB");
    wait_for(
        Duration::from_secs(10),
        "the memory signal sees the pressure",
        || async { memory_signal(&addr).await >= signal + 0.08 },
    )
    .await;
    let (status, cleared) =
        common::api(&addr, &format!("{FAULTS}/{pressure}"), "DELETE", "", Some(KEY)).await;
    assert_eq!((status, cleared["kind"].as_str()), (200, Some("memory_pressure")));
    let released = resident_mib();
    assert!(
        released + 350 <= held,
        "the pressure was not released: resident {held} -> {released} MiB"
    );

    // catalog_down, storage_down, commit_latency, slow_stage and
    // broker_down each last 2 s and expire by themselves.
    for body in [
        r#"{"kind": "catalog_down", "duration_s": 2}"#,
        r#"{"kind": "storage_down", "duration_s": 2}"#,
        r#"{"kind": "commit_latency", "params": {"latency_ms": 700}, "duration_s": 2}"#,
        r#"{"kind": "slow_stage", "target": {"stage": "deduplicator"}, "params": {"delay_ms": 300}, "duration_s": 2}"#,
        r#"{"kind": "broker_down", "duration_s": 2}"#,
    ] {
        let committed = common::committed_rows(&pipeline).await;
        post(&addr, body).await;
        assert_eq!(active_kinds(&addr).await.len(), 1, "{body}");
        if body.contains("broker_down") {
            assert!(broker_answers(&broker).await.is_err(), "the broker still answers");
        }
        wait_for(Duration::from_secs(10), "the fault expired", || async {
            active_kinds(&addr).await.is_empty()
        })
        .await;
        if body.contains("broker_down") {
            wait_for(Duration::from_secs(10), "the broker is back", || async {
                broker_answers(&broker).await.is_ok()
            })
            .await;
        }
        if common::committed_rows(&pipeline).await < TOTAL - POISONED {
            wait_for(Duration::from_secs(60), "commits resume", || async {
                common::committed_rows(&pipeline).await > committed
            })
            .await;
        }
    }
    let metrics = k2::metrics::install().render();
    for kind in [
        "poison",
        "stage_panic",
        "memory_pressure",
        "catalog_down",
        "broker_down",
    ] {
        assert!(
            metrics.contains(&format!("k2_faults_injected_total{{kind=\"{kind}\"}}")),
            "{kind} not counted"
        );
    }

    loadgen.await.unwrap().unwrap();
    wait_for(Duration::from_secs(120), "every trade accounted for", || async {
        common::committed_rows(&pipeline).await >= TOTAL - POISONED
    })
    .await;
    pipeline.shutdown().await.unwrap();

    let produced = read_ids(&ids);
    let contents = read_tables(&config, dir.path()).await;
    let distinct: HashSet<_> = contents.distinct();
    assert_eq!(
        contents.trades.keys.len(),
        distinct.len(),
        "duplicates in the table"
    );
    assert!(distinct.is_subset(&produced), "rows that were never produced");
    assert_eq!(
        produced.len() as u64 - distinct.len() as u64,
        POISONED,
        "missing beyond the poisoned records"
    );
    let catalog = open_catalog(&config.catalog, dir.path()).await.unwrap();
    let idents = TableIdents::new(&config.catalog.namespace);
    let dead = scan_dead_letters(&catalog.load_table(&idents.dead_letters).await.unwrap())
        .await
        .unwrap();
    assert_eq!(dead.len() as u64, POISONED, "{dead:?}");
    assert!(
        dead.iter()
            .all(|d| d.partition == 1 && d.reason == "invalid UTF-8 at byte 0"),
        "{dead:?}"
    );
}
