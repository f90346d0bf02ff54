//! `k2 bench` end to end, tiny: the embedded broker, the raw consumer and
//! this build's `k2 run` as a child process.

use k2::bench::{BenchParams, Popularity, Workload};

#[actix_rt::test]
async fn a_tiny_bench_commits_every_message_and_reports_sane_figures() {
    let dir = tempfile::tempdir().unwrap();
    // Commit often, so that the run takes seconds, not the default cadence.
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        "[batcher]\nmax_age_ms = 100\n\n[commit]\ninterval_ms = 200\n",
    )
    .unwrap();
    let report = k2::bench::run(
        BenchParams {
            workload: Workload::Canonical,
            symbols: 50,
            popularity: Popularity::Uniform,
            messages: 2_000,
            partitions: 4,
            runs: 1,
            config_file: Some(config),
            k2_binary: env!("CARGO_BIN_EXE_k2").into(),
        },
        dir.path(),
    )
    .await
    .expect("the bench runs");

    assert_eq!(report.per_run.len(), 1);
    let run = &report.per_run[0];
    assert_eq!(run.rows_committed, 2_000, "every message committed, once");
    assert!(run.commits >= 1, "{run:?}");
    assert!(run.raw_join_s > 0.0 && run.raw_steady_s > 0.0, "{run:?}");
    assert!(
        run.pipeline_join_s > 0.0 && run.pipeline_steady_s > 0.0,
        "{run:?}"
    );
    assert!(run.tail_s > 0.0 && run.tail_s <= run.pipeline_steady_s, "{run:?}");
    assert!(run.cpu_s > 0.0 && run.cpu_us_per_trade > 0.0, "{run:?}");
    assert!(run.peak_rss_bytes > 1 << 20, "{run:?}");
    assert!(run.ratio.is_finite() && run.ratio > 0.0, "{run:?}");
    assert!(
        run.commit_p50_s > 0.0 && run.commit_p50_s <= run.commit_p99_s,
        "{run:?}"
    );
    // With one run, the medians are that run.
    assert_eq!(report.median.tail_s, run.tail_s);
    assert_eq!(report.median.rows_committed, 2_000);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["workload"], "canonical");
    assert_eq!(json["per_run"].as_array().map(Vec::len), Some(1));
    // Nothing is left behind: the run's directory is gone with its catalog.
    assert!(!dir.path().join("run-1").exists());
}
