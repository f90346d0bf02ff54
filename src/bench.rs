//! `k2 bench`: end-to-end throughput on the embedded broker.
//!
//! Preloads messages (spread over enough partitions that the mock broker's
//! ~5 MiB-per-partition retention keeps them all), then, in the same run,
//! times (1) a raw rdkafka consumer that only counts the messages and (2)
//! the full pipeline from start until the commit that makes all of them
//! durable. The ratio of the two is the figure that matters on a shared,
//! noisy machine.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;

use crate::config::K2Config;
use crate::embedded::EmbeddedBroker;
use crate::loadgen::{GeneratorParams, Spread, preload};
use crate::pipeline::{self, PipelineParams};
use crate::storage::reader::committed_record_count;

/// Consecutive trades of a symbol that go to one partition in the preload.
const BLOCK: u64 = 1_000;

#[derive(Debug, Clone)]
pub struct BenchParams {
    pub messages: u64,
    pub partitions: i32,
    /// Timed repetitions of both measurements; the report gives medians.
    pub runs: u32,
    pub config: K2Config,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub messages: u64,
    pub partitions: i32,
    pub payload_bytes: u64,
    pub raw_seconds: f64,
    pub raw_msgs_per_s: f64,
    pub pipeline_seconds: f64,
    pub pipeline_msgs_per_s: f64,
    pub pipeline_mb_per_s: f64,
    pub ratio: f64,
    pub runs: u32,
    pub raw_runs_s: Vec<f64>,
    pub pipeline_runs_s: Vec<f64>,
    pub commits: u64,
    pub rows_committed: u64,
    pub data_files: u64,
    pub avg_file_bytes: u64,
    pub peak_rss_bytes: u64,
}

const TOPIC: &str = "k2.bench.trades";

pub async fn run(params: BenchParams, data_dir: &Path) -> anyhow::Result<BenchReport> {
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), params.partitions)])?;
    let brokers = broker.bootstrap_servers().to_string();
    eprintln!(
        "k2 bench: preloading {} messages into {} partitions",
        params.messages, params.partitions
    );
    let (messages, partitions) = (params.messages, params.partitions);
    let loaded = {
        let brokers = brokers.clone();
        tokio::task::spawn_blocking(move || {
            preload(
                &brokers,
                TOPIC,
                messages,
                GeneratorParams {
                    malformed_ratio: 0.0,
                    ..Default::default()
                },
                // Evenly over the partitions, so every one stays under the mock broker's
                // retention, in runs of 1,000 trades per symbol, so a lane sees each symbol
                // mostly in order (one sequence gap per run), as a keyed feed would.
                Spread::Blocks {
                    partitions,
                    block: BLOCK,
                },
            )
        })
        .await??
    };
    if loaded.valid.len() as u64 != messages {
        anyhow::bail!("preload produced {} of {messages} messages", loaded.valid.len());
    }
    let retained = {
        let brokers = brokers.clone();
        tokio::task::spawn_blocking(move || retained_messages(&brokers, partitions)).await??
    };
    if retained != messages {
        anyhow::bail!(
            "the embedded broker kept {retained} of {messages} messages (it keeps ~5 MiB per partition): \
             use more --partitions or fewer --messages"
        );
    }

    let runs = params.runs.max(1);
    let (mut raw_runs, mut pipeline_runs) = (Vec::new(), Vec::new());
    let mut last = None;
    for run in 1..=runs {
        eprintln!("k2 bench: run {run}/{runs}: raw consume");
        let raw = {
            let brokers = brokers.clone();
            tokio::task::spawn_blocking(move || raw_consume(&brokers, messages)).await??
        };
        eprintln!("k2 bench: run {run}/{runs}: pipeline");
        let run_dir = data_dir.join(format!("run-{run}"));
        let timed = time_pipeline(&params.config, &brokers, &run_dir, messages).await?;
        eprintln!(
            "k2 bench: run {run}/{runs}: raw {:.2} s, pipeline {:.2} s, ratio {:.2}",
            raw.as_secs_f64(),
            timed.seconds,
            raw.as_secs_f64() / timed.seconds
        );
        raw_runs.push(raw.as_secs_f64());
        pipeline_runs.push(timed.seconds);
        // Each run's warehouse is only needed for its own figures.
        let _ = std::fs::remove_dir_all(&run_dir);
        last = Some(timed);
    }
    drop(broker);
    let timed = last.context("no bench run")?;
    let (raw_seconds, pipeline_seconds) = (median(&raw_runs), median(&pipeline_runs));
    Ok(BenchReport {
        messages,
        partitions,
        payload_bytes: loaded.bytes,
        raw_seconds,
        raw_msgs_per_s: messages as f64 / raw_seconds,
        pipeline_seconds,
        pipeline_msgs_per_s: messages as f64 / pipeline_seconds,
        pipeline_mb_per_s: loaded.bytes as f64 / 1e6 / pipeline_seconds,
        ratio: raw_seconds / pipeline_seconds,
        runs,
        raw_runs_s: raw_runs,
        pipeline_runs_s: pipeline_runs,
        commits: timed.commits,
        rows_committed: timed.rows,
        data_files: timed.data_files,
        avg_file_bytes: timed.avg_file_bytes,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// One timed pipeline run and what its last snapshot says.
struct PipelineRun {
    seconds: f64,
    commits: u64,
    rows: u64,
    data_files: u64,
    avg_file_bytes: u64,
}

/// Starts the pipeline with a fresh group and catalog under `dir` and times
/// it until every preloaded message is committed.
async fn time_pipeline(
    config: &K2Config,
    brokers: &str,
    dir: &Path,
    messages: u64,
) -> anyhow::Result<PipelineRun> {
    let mut config = config.clone();
    config.kafka.topic = TOPIC.to_string();
    config.kafka.group_id = format!("k2-bench-{}", uuid::Uuid::now_v7());
    config.catalog.uri = "sqlite:catalog.db".to_string();
    config.catalog.warehouse = "warehouse".to_string();
    crate::metrics::install();
    let started = Instant::now();
    let pipeline = pipeline::start(PipelineParams {
        config,
        brokers: brokers.to_string(),
        base_dir: dir.to_path_buf(),
        instance: "k2-bench".to_string(),
    })
    .await?;
    let deadline = started + Duration::from_secs(600);
    let status = loop {
        let status = pipeline.status().await?;
        if status.committer.rows_committed >= messages {
            break status;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "pipeline committed {} of {messages} rows in 600 s",
                status.committer.rows_committed
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    let trades = pipeline.catalog.load_table(&pipeline.tables.trades).await?;
    pipeline.shutdown().await?;

    let summary = trades
        .metadata()
        .current_snapshot()
        .map(|s| s.summary().additional_properties.clone())
        .unwrap_or_default();
    let number = |key: &str| summary.get(key).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let data_files = number("total-data-files");
    Ok(PipelineRun {
        seconds,
        commits: status.committer.commits,
        rows: committed_record_count(&trades),
        data_files,
        avg_file_bytes: number("total-files-size").checked_div(data_files).unwrap_or(0),
    })
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Consumes `messages` with a bare consumer that only counts them. Like the
/// pipeline, it joins a consumer group first, so both timings include the
/// group join (~3 s on the mock broker).
fn raw_consume(brokers: &str, messages: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("k2-bench-raw-{}", uuid::Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .create()
        .context("failed to create the raw consumer")?;
    consumer.subscribe(&[TOPIC])?;
    let mut count = 0u64;
    while count < messages {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(_)) => count += 1,
            Some(Err(err)) => anyhow::bail!("raw consumer error: {err}"),
            None if started.elapsed() > Duration::from_secs(300) => {
                anyhow::bail!("raw consumer got {count} of {messages} messages in 300 s")
            }
            None => {}
        }
    }
    Ok(started.elapsed())
}

/// Messages the broker still holds in the bench topic (high − low watermark, summed).
fn retained_messages(brokers: &str, partitions: i32) -> anyhow::Result<u64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("failed to create a client to read watermarks")?;
    let mut total = 0;
    for partition in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(TOPIC, partition, Duration::from_secs(10))
            .with_context(|| format!("failed to read the watermarks of partition {partition}"))?;
        total += (high - low).max(0) as u64;
    }
    Ok(total)
}

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

pub fn print_report(r: &BenchReport) {
    println!(
        "k2 bench: {} messages, {} partitions, {:.1} MB payload",
        r.messages,
        r.partitions,
        r.payload_bytes as f64 / 1e6
    );
    println!(
        "  raw consume      {:>10.0} msg/s  ({:.2} s)",
        r.raw_msgs_per_s, r.raw_seconds
    );
    println!(
        "  pipeline         {:>10.0} msg/s  ({:.2} s, {:.1} MB/s)",
        r.pipeline_msgs_per_s, r.pipeline_seconds, r.pipeline_mb_per_s
    );
    println!(
        "  ratio            {:>10.2}  (medians of {} runs; raw {:?} s, pipeline {:?} s)",
        r.ratio,
        r.runs,
        rounded(&r.raw_runs_s),
        rounded(&r.pipeline_runs_s)
    );
    println!("  commits          {:>10}", r.commits);
    println!("  rows committed   {:>10}", r.rows_committed);
    println!(
        "  data files       {:>10}  (avg {:.1} KiB)",
        r.data_files,
        r.avg_file_bytes as f64 / 1024.0
    );
    println!(
        "  peak RSS         {:>10.1} MiB",
        r.peak_rss_bytes as f64 / (1024.0 * 1024.0)
    );
}

fn rounded(values: &[f64]) -> Vec<f64> {
    values.iter().map(|v| (v * 100.0).round() / 100.0).collect()
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
