//! The failure demos (`k2 demo <scenario>`), shortened: the real fault
//! strikes the running embedded demo, every check of the scenario holds,
//! and the verdict read back from the tables finds nothing lost or
//! duplicated. `poison` and `broker-outage` run alone for 16 s; the others
//! run inside `k2 demo tour`, 10 s each (overload until it is back at
//! NORMAL).

use std::time::Duration;

use k2::config::{EMBEDDED_BROKERS, K2Config};
use k2::demo::Scenario;
use k2::service::{ServiceOptions, Verdict, run};

async fn demo(scenario: Scenario) -> Verdict {
    let dir = tempfile::tempdir().unwrap();
    let mut config = K2Config::default();
    config.kafka.brokers = EMBEDDED_BROKERS.to_string();
    config.loadgen.enabled = true;
    config.loadgen.rate = 2_000;
    config.http.listen = "127.0.0.1:0".to_string();
    k2::metrics::install();
    run(ServiceOptions {
        config,
        base_dir: dir.path().to_path_buf(),
        duration: Some(Duration::from_secs(16)),
        progress: false,
        verdict: true,
        scenario: Some(scenario),
        live_view: false,
    })
    .await
    .expect("the demo runs")
    .expect("the demo gives a verdict")
}

fn assert_holds(verdict: &Verdict, checks: usize) {
    assert_eq!(verdict.checks.len(), checks, "{:#?}", verdict.checks);
    let failed: Vec<_> = verdict.checks.iter().filter(|c| !c.held).collect();
    assert!(failed.is_empty(), "failed checks: {failed:#?}");
    assert!(verdict.produced > 5_000, "{verdict:?}");
    assert_eq!(
        (verdict.lost, verdict.lost_to_retention, verdict.duplicates),
        (0, 0, 0),
        "{verdict:?}"
    );
    assert!(verdict.holds());
}

#[actix_rt::test]
async fn poison_dead_letters_the_corrupted_records_and_loses_no_lane() {
    let verdict = demo(Scenario::Poison).await;
    assert_holds(&verdict, 4);
    assert_eq!(verdict.valid_dead_lettered, 20);
}

#[actix_rt::test]
async fn a_broker_outage_stalls_reading_and_everything_resumes() {
    let verdict = demo(Scenario::BrokerOutage).await;
    assert_holds(&verdict, 4);
}

#[actix_rt::test]
async fn the_tour_tells_four_acts_and_every_run_in_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = K2Config::default();
    config.kafka.brokers = EMBEDDED_BROKERS.to_string();
    config.loadgen.enabled = true;
    config.loadgen.rate = 2_000;
    config.http.listen = "127.0.0.1:0".to_string();
    k2::metrics::install();
    let setup = k2::demo::DemoSetup {
        config,
        config_file: None,
        dir: dir.path().to_path_buf(),
        run: Some(Duration::from_secs(10)),
        binary: env!("CARGO_BIN_EXE_k2").into(),
        live_view: false,
    };
    let runs = k2::tour::run(&setup).await.expect("the tour runs");
    let names: Vec<(usize, &str)> = runs.iter().map(|r| (r.act, r.name.as_str())).collect();
    assert_eq!(
        names,
        [
            (1, "demo"),
            (2, "actor-crash"),
            (3, "catalog-outage"),
            (3, "kill-restart"),
            (4, "overload")
        ]
    );
    // Each scenario's own checks: actor-crash (only the crashed lane
    // rebuilt), catalog-outage (partitions paused, memory flat, commits
    // resumed), kill-restart (killed mid-stream, every offset committed
    // after, a clean stop) and overload (CIRCUIT_BREAK, NORMAL again, shed
    // and backfilled, no CRITICAL trade shed, every shed trade in the table).
    for (run, checks) in runs.iter().zip([0, 4, 5, 3, 8]) {
        assert!(run.verdict.produced > 5_000, "{}: {:?}", run.name, run.verdict);
        assert_holds(&run.verdict, checks);
    }
    let overload = &runs[4].verdict;
    assert!(overload.backfilled > 0, "{overload:?}");
    assert_eq!(overload.shed_ledgered, 0, "{overload:?}");
    // Each run kept its own tables.
    for dir_name in [
        "1a-demo",
        "2a-actor-crash",
        "3a-catalog-outage",
        "3b-kill-restart",
        "4a-overload",
    ] {
        assert!(dir.path().join("tour").join(dir_name).is_dir(), "{dir_name}");
    }
}
