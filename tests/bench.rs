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
    assert!(
        run.startup_cpu_s > 0.0 && run.startup_cpu_s <= run.cpu_s,
        "{run:?}"
    );
    assert!(run.steady_cpu_us_per_trade > 0.0, "{run:?}");
    assert!(run.system_cpu_s <= run.cpu_s && run.minor_faults > 0, "{run:?}");
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

#[actix_rt::test]
async fn a_tiny_latency_bench_makes_every_message_durable_and_reports_ordered_quantiles() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        "[batcher]\nmax_age_ms = 100\n\n[commit]\ninterval_ms = 300\n",
    )
    .unwrap();
    let report = k2::bench::latency::run(
        k2::bench::latency::LatencyParams {
            workload: Workload::Canonical,
            symbols: 50,
            popularity: Popularity::Uniform,
            partitions: 4,
            rate: 2_000,
            seconds: 3,
            config_file: Some(config),
            k2_binary: env!("CARGO_BIN_EXE_k2").into(),
        },
        dir.path(),
    )
    .await
    .expect("the latency bench runs");

    // The rate is held within the load generator's pacing.
    assert!((5_000..=6_500).contains(&report.produced), "{report:?}");
    assert!(report.latency_p50_s > 0.0, "{report:?}");
    assert!(
        report.latency_p50_s <= report.latency_p99_s && report.latency_p99_s <= report.latency_max_s,
        "{report:?}"
    );
    // A message is read before it is durable: the position and the
    // committed offset come from the same reads of /v1/pipeline.
    assert!(
        report.consumed_p50_s <= report.latency_p50_s && report.consumed_p99_s <= report.latency_p99_s,
        "{report:?}"
    );
    // Batches of 100 ms and commits every 300 ms: nothing waits for seconds.
    assert!(report.latency_max_s < 10.0, "{report:?}");
    assert_eq!(report.target_p99_s, 1.3);
    assert!(report.commits >= 2, "{report:?}");
    assert!(
        report.cpu_us_per_trade > 0.0 && report.peak_rss_bytes > 1 << 20,
        "{report:?}"
    );
}

#[actix_rt::test]
async fn a_tiny_query_bench_times_both_queries_while_k2_ingests() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let timeline = out.path().join("queries.csv");
    let report = k2::bench::query::run(
        k2::bench::query::QueryBenchParams {
            history: 20_000,
            days: 2,
            symbols: 20,
            partitions: 2,
            rate: 1_000,
            seconds: 2,
            k2_binary: env!("CARGO_BIN_EXE_k2").into(),
            timeline: Some(timeline.clone()),
        },
        dir.path(),
    )
    .await
    .expect("the query bench runs");

    for latencies in [&report.recent_15m, &report.ohlcv_day_1m] {
        assert!(latencies.queries > 0, "{report:?}");
        assert!(
            latencies.p50_ms > 0.0
                && latencies.p50_ms <= latencies.p99_ms
                && latencies.p99_ms <= latencies.max_ms,
            "{report:?}"
        );
    }
    // 500 trades of a symbol a day: a day of 1-minute bars has hundreds.
    assert!(report.ohlcv_day_1m.mean_rows > 100.0, "{report:?}");
    // The last 15 minutes hold the history's few and what K2 ingested.
    assert!(report.recent_15m.mean_rows > 0.0, "{report:?}");
    assert!(
        report.ingest_alone_msgs_per_s > 0.0 && report.ingest_querying_msgs_per_s > 0.0,
        "{report:?}"
    );
    // The timeline has every answer, with K2's phases, and k2 run's log is beside it.
    let text = std::fs::read_to_string(&timeline).unwrap();
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(
        rows.len(),
        report.recent_15m.queries + report.ohlcv_day_1m.queries,
        "{text}"
    );
    assert!(
        rows.iter()
            .all(|row| row.split(',').count() == 9 && !row.split(',').nth(7).unwrap().is_empty()),
        "{text}"
    );
    let log = std::fs::read_to_string(out.path().join("queries.k2-run.log")).unwrap();
    assert!(log.contains("INFO"), "{log}");
}
