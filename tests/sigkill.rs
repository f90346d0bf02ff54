//! The `k2 run` binary killed with SIGKILL mid-stream and started again
//! against the same broker and catalog: the table holds every trade exactly
//! once. The broker is librdkafka's mock cluster in this test process; the
//! K2 processes reach it over TCP like any Kafka.

mod common;

use std::time::Duration;

use common::{
    TOPIC, assert_exactly_once, committed_trades, process_log, read_ids, read_tables, spawn_k2, stop_k2,
    wait_for, write_run_config,
};
use k2::loadgen::{GeneratorParams, LoadgenParams, run_loadgen};

const TOTAL: u64 = 60_000;

#[actix_rt::test]
async fn sigkill_mid_stream_then_restart_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(8);
    let ids = dir.path().join("ids.csv");
    let loadgen = actix_rt::spawn(run_loadgen(
        LoadgenParams {
            brokers: broker.bootstrap_servers().to_string(),
            topic: TOPIC.to_string(),
            rate: 10_000,
            shape: Default::default(),
            duration: None,
            total: Some(TOTAL),
            ids_file: Some(ids.clone()),
            tiers: Default::default(),
            generator: GeneratorParams {
                seed: 23,
                malformed_ratio: 0.0,
                ..GeneratorParams::default()
            },
            progress: false,
        },
        futures::future::pending(),
    ));

    let config_path = write_run_config(dir.path(), broker.bootstrap_servers(), "k2-sigkill", "");
    let config = k2::config::K2Config::load(Some(&config_path)).expect("test config loads");

    let mut first = spawn_k2(&config_path, dir.path(), "first");
    wait_for(Duration::from_secs(90), "the first process commits", || async {
        committed_trades(&config, dir.path()).await >= 5_000
    })
    .await;
    first.kill().expect("SIGKILL delivered"); // Child::kill sends SIGKILL on Unix
    first.wait().unwrap();
    let before_kill = read_tables(&config, dir.path()).await.trades.keys.len() as u64;

    let report = loadgen.await.unwrap().unwrap();
    assert_eq!(report.produced, TOTAL);
    assert!(
        before_kill < TOTAL,
        "the kill must land mid-stream (committed {before_kill})"
    );

    let mut second = spawn_k2(&config_path, dir.path(), "second");
    let expected = read_ids(&ids);
    assert_eq!(expected.len() as u64, TOTAL);
    let mut done = false;
    for _ in 0..2400 {
        if committed_trades(&config, dir.path()).await >= TOTAL {
            done = true;
            break;
        }
        if let Some(status) = second.try_wait().unwrap() {
            panic!(
                "the restarted process exited ({status}):\n{}",
                process_log(dir.path(), "second")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        done,
        "the restarted process did not commit every trade within 240 s:\n{}",
        process_log(dir.path(), "second")
    );

    // A clean stop of the restarted process (SIGTERM) commits and exits 0.
    stop_k2(second, dir.path(), "second");
    assert_exactly_once(&read_tables(&config, dir.path()).await, &expected);
}
