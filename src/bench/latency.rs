//! `k2 bench --rate N`: produce → durable latency at a steady input rate.
//!
//! `k2 run` starts as its own process against an empty topic of the embedded
//! broker and joins the group. The load generator then produces at `N`
//! messages a second for the given time, in this process, while the bench
//! reads `k2 run`'s `/v1/pipeline` every 50 ms and keeps, per partition,
//! when each committed offset first showed (K2 reports an offset committed
//! once the commit is read back from the catalog). When every message is
//! durable, `k2 run` is stopped and the topic is read back: a message's
//! latency is the first time its partition's committed offset passed it,
//! minus its Kafka timestamp (the producer sets it when the message is
//! produced). Reading every 50 ms makes each latency up to 50 ms too long,
//! never too short.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use serde::Serialize;

use super::{
    Launch, Popularity, RunningChild, Scrape, TOPIC, Workload, cpu_seconds, generator_params, http_get,
    peak_rss_of, popularity_name, spawn_k2_run, unix_now_s, workload_name,
};
use crate::config::K2Config;
use crate::embedded::EmbeddedBroker;
use crate::loadgen::{LoadgenParams, run_loadgen};

/// How often the committed offsets are read.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long the lanes may take to start after `k2 run` opened its port.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the last message may take to become durable after the load stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

pub struct LatencyParams {
    pub workload: Workload,
    pub symbols: u32,
    pub popularity: Popularity,
    pub partitions: i32,
    /// Messages a second.
    pub rate: u64,
    /// How long the load runs.
    pub seconds: u64,
    pub config_file: Option<PathBuf>,
    pub k2_binary: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyReport {
    pub workload: Workload,
    pub symbols: u32,
    pub popularity: Popularity,
    pub partitions: i32,
    pub rate: u64,
    pub seconds: u64,
    pub produced: u64,
    /// What the load generator achieved.
    pub produced_msgs_per_s: f64,
    pub latency_p50_s: f64,
    pub latency_p99_s: f64,
    pub latency_max_s: f64,
    /// Of the latency: produce → read by the lane's PartitionConsumer (its
    /// position, from `/v1/pipeline`, first past the message).
    pub consumed_p50_s: f64,
    pub consumed_p99_s: f64,
    /// `commit.interval_ms` + 1 s: the p99 the performance work aims at.
    pub target_p99_s: f64,
    /// Latencies are measured up to this much too long.
    pub resolution_s: f64,
    /// CPU of `k2 run` from its start until the last message was durable,
    /// over the messages (idle time included: at a steady rate it runs all along).
    pub cpu_s: f64,
    pub cpu_us_per_trade: f64,
    pub peak_rss_bytes: u64,
    pub commits: u64,
    pub commit_p50_s: f64,
    pub commit_p99_s: f64,
    /// Data files the batchers wrote for those commits.
    pub data_files: u64,
}

pub async fn run(params: LatencyParams, data_dir: &Path) -> anyhow::Result<LatencyReport> {
    if params.rate == 0 || params.seconds == 0 || params.symbols == 0 || params.partitions < 1 {
        anyhow::bail!("k2 bench --rate needs a rate, --seconds, a symbol and a partition above zero");
    }
    let config = K2Config::load(params.config_file.as_deref()).map_err(|err| anyhow::anyhow!("{err}"))?;
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), params.partitions)])?;
    let brokers = broker.bootstrap_servers().to_string();
    let dir = data_dir.join("latency");
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let launch = Launch {
        binary: params.k2_binary.clone(),
        config_file: params.config_file.clone(),
        brokers: brokers.clone(),
        dir: dir.clone(),
        overrides: Vec::new(),
        log_name: super::LOG_FILE.to_string(),
    };
    eprintln!(
        "k2 bench: starting k2 run ({}) on an empty topic of {} partitions",
        params.k2_binary.display(),
        params.partitions
    );
    let partitions = params.partitions;
    let (child, addr) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut child = spawn_k2_run(&launch)?;
        let addr = child.http_addr()?;
        wait_for_lanes(&mut child, addr, partitions)?;
        Ok((child, addr))
    })
    .await??;

    eprintln!(
        "k2 bench: producing {} {} trades a second for {} s over {} symbols ({})",
        params.rate,
        workload_name(params.workload),
        params.seconds,
        params.symbols,
        popularity_name(params.popularity)
    );
    // Set to the number produced once the load stops.
    let produced = Arc::new(AtomicU64::new(u64::MAX));
    let watcher = {
        let produced = produced.clone();
        tokio::task::spawn_blocking(move || watch_committed(child, addr, partitions, &produced))
    };
    let load = run_loadgen(
        LoadgenParams {
            brokers: brokers.clone(),
            topic: TOPIC.to_string(),
            rate: params.rate,
            shape: Default::default(),
            duration: Some(Duration::from_secs(params.seconds)),
            total: None,
            ids_file: None,
            tiers: Default::default(),
            generator: generator_params(params.workload, params.symbols, params.popularity),
            progress: false,
        },
        futures::future::pending(),
    )
    .await;
    let load = match load {
        Ok(load) => load,
        Err(err) => {
            // The watcher stops (and so stops k2 run) once it knows the count.
            produced.store(0, Ordering::Relaxed);
            let _ = watcher.await;
            return Err(err.context("the load generator failed"));
        }
    };
    if load.failed > 0 {
        produced.store(0, Ordering::Relaxed);
        let _ = watcher.await;
        anyhow::bail!("{} messages could not be produced", load.failed);
    }
    produced.store(load.produced, Ordering::Relaxed);
    eprintln!(
        "k2 bench: produced {} messages in {:.1} s; waiting until they are durable",
        load.produced,
        load.elapsed.as_secs_f64()
    );
    let watched = watcher.await??;

    let (durable_at, consumed_at) = (watched.durable_at, watched.consumed_at);
    let (latencies, mut to_consumed) =
        tokio::task::spawn_blocking(move || read_latencies(&brokers, partitions, &durable_at, &consumed_at))
            .await??;
    drop(broker);
    if latencies.len() as u64 != load.produced {
        anyhow::bail!(
            "read back {} of {} messages: the embedded broker keeps ~5 MiB per partition; \
             lower --rate or --seconds, or raise --partitions",
            latencies.len(),
            load.produced
        );
    }
    let mut sorted = latencies;
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| nearest_rank(&sorted, q);
    to_consumed.sort_by(f64::total_cmp);
    let consumed = |q: f64| nearest_rank(&to_consumed, q);
    let quantile = |q: f64| watched.scrape.commit_quantile(q).unwrap_or(f64::NAN);
    Ok(LatencyReport {
        workload: params.workload,
        symbols: params.symbols,
        popularity: params.popularity,
        partitions: params.partitions,
        rate: params.rate,
        seconds: params.seconds,
        produced: load.produced,
        produced_msgs_per_s: load.produced as f64 / load.elapsed.as_secs_f64().max(1e-9),
        latency_p50_s: at(0.5),
        latency_p99_s: at(0.99),
        latency_max_s: at(1.0),
        consumed_p50_s: consumed(0.5),
        consumed_p99_s: consumed(0.99),
        target_p99_s: config.commit.interval_ms as f64 / 1000.0 + 1.0,
        resolution_s: POLL_INTERVAL.as_secs_f64(),
        cpu_s: watched.cpu_s,
        cpu_us_per_trade: watched.cpu_s * 1e6 / load.produced.max(1) as f64,
        peak_rss_bytes: watched.peak_rss_bytes,
        commits: watched.scrape.commits,
        commit_p50_s: quantile(0.5),
        commit_p99_s: quantile(0.99),
        data_files: watched.scrape.data_files_written,
    })
}

/// Waits until `k2 run` runs a lane for every partition.
pub(super) fn wait_for_lanes(
    child: &mut RunningChild,
    addr: SocketAddr,
    partitions: i32,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    loop {
        child.check_running("before its lanes started")?;
        if let Ok(body) = http_get(addr, "/v1/pipeline") {
            let status: serde_json::Value =
                serde_json::from_str(&body).context("/v1/pipeline is not JSON")?;
            let running = status["lanes"].as_array().map_or(0, |lanes| {
                lanes.iter().filter(|l| l["state"] == "running").count()
            });
            if running == partitions as usize {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "k2 run did not start a lane for each of {partitions} partitions in {} s; its log:\n{}",
                JOIN_TIMEOUT.as_secs(),
                child.log_tail()
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// When each partition's committed offset first showed: (unix seconds,
/// next offset), in order.
type DurableAt = BTreeMap<i32, Vec<(f64, i64)>>;

struct Watched {
    durable_at: DurableAt,
    /// The same for each lane's position (next offset to read).
    consumed_at: DurableAt,
    scrape: Scrape,
    cpu_s: f64,
    peak_rss_bytes: u64,
}

/// Reads the committed offsets every [`POLL_INTERVAL`] until they cover
/// `produced` messages (known once the load stopped; 0: give up), then takes
/// `k2 run`'s CPU time, peak RSS and metrics and stops it. Blocking.
fn watch_committed(
    mut child: RunningChild,
    addr: SocketAddr,
    partitions: i32,
    produced: &AtomicU64,
) -> anyhow::Result<Watched> {
    let mut durable_at = DurableAt::new();
    let mut consumed_at = DurableAt::new();
    let mut drain_deadline = None;
    loop {
        child.check_running("before every message was durable")?;
        let target = produced.load(Ordering::Relaxed);
        if target == 0 {
            anyhow::bail!("stopped: the load generator failed");
        }
        if let Ok(body) = http_get(addr, "/v1/pipeline") {
            let now = unix_now_s();
            let status: serde_json::Value =
                serde_json::from_str(&body).context("/v1/pipeline is not JSON")?;
            for lane in status["lanes"].as_array().into_iter().flatten() {
                if let (Some(partition), Some(position)) =
                    (lane["partition"].as_i64(), lane["position"].as_i64())
                {
                    let seen = consumed_at.entry(partition as i32).or_default();
                    if seen.last().is_none_or(|&(_, last)| position > last) {
                        seen.push((now, position));
                    }
                }
                let (Some(partition), Some(next)) =
                    (lane["partition"].as_i64(), lane["committed_offset"].as_i64())
                else {
                    continue;
                };
                let seen = durable_at.entry(partition as i32).or_default();
                if seen.last().is_none_or(|&(_, last)| next > last) {
                    seen.push((now, next));
                }
            }
            let committed: i64 = durable_at
                .values()
                .filter_map(|s| s.last())
                .map(|&(_, n)| n)
                .sum();
            if target != u64::MAX && committed as u64 >= target {
                break;
            }
        }
        if target != u64::MAX {
            let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN_TIMEOUT);
            if Instant::now() > deadline {
                anyhow::bail!(
                    "k2 run made {} of {target} messages of {partitions} partitions durable within {} s of the \
                     load's end; its log:\n{}",
                    durable_at
                        .values()
                        .filter_map(|s| s.last())
                        .map(|&(_, n)| n)
                        .sum::<i64>(),
                    DRAIN_TIMEOUT.as_secs(),
                    child.log_tail()
                );
            }
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    let pid = child.child.id();
    let cpu_s = cpu_seconds(pid).context("failed to read the CPU time of k2 run")?;
    let peak_rss_bytes = peak_rss_of(&pid.to_string());
    let scrape = Scrape::parse(&http_get(addr, "/metrics").context("failed to read k2 run's /metrics")?);
    child.stop()?;
    Ok(Watched {
        durable_at,
        consumed_at,
        scrape,
        cpu_s,
        peak_rss_bytes,
    })
}

/// Reads the topic from the start and gives each message's latency: when
/// its offset first showed committed, minus its Kafka timestamp. Blocking.
/// Also gives, for the messages whose consumption was seen, produce →
/// consumed.
fn read_latencies(
    brokers: &str,
    partitions: i32,
    durable_at: &DurableAt,
    consumed_at: &DurableAt,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("k2-bench-latency-{}", uuid::Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .context("failed to create the consumer that reads the topic back")?;
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0i64;
    for partition in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(TOPIC, partition, Duration::from_secs(10))
            .with_context(|| format!("failed to read the watermarks of partition {partition}"))?;
        if low > 0 {
            anyhow::bail!(
                "the embedded broker deleted the first {low} messages of partition {partition} (it keeps ~5 MiB \
                 per partition); lower --rate or --seconds, or raise --partitions"
            );
        }
        remaining += high;
        assignment.add_partition_offset(TOPIC, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut latencies = Vec::with_capacity(remaining as usize);
    let mut to_consumed = Vec::with_capacity(remaining as usize);
    let deadline = Instant::now() + Duration::from_secs(300);
    while remaining > 0 {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                remaining -= 1;
                let produced_ms = message
                    .timestamp()
                    .to_millis()
                    .context("a message without a timestamp")?;
                let durable = durable_at
                    .get(&message.partition())
                    .and_then(|seen| first_past(seen, message.offset()))
                    .with_context(|| {
                        format!(
                            "offset {} of partition {} never showed committed",
                            message.offset(),
                            message.partition()
                        )
                    })?;
                let produced_s = produced_ms as f64 / 1000.0;
                latencies.push((durable - produced_s).max(0.0));
                if let Some(consumed) = consumed_at
                    .get(&message.partition())
                    .and_then(|seen| first_past(seen, message.offset()))
                {
                    to_consumed.push((consumed - produced_s).max(0.0));
                }
            }
            Some(Err(err)) => anyhow::bail!("reading the topic back: {err}"),
            None if Instant::now() > deadline => anyhow::bail!("reading the topic back took over 300 s"),
            None => {}
        }
    }
    Ok((latencies, to_consumed))
}

/// The `q` quantile of `sorted` by nearest rank; NaN if it is empty.
fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let last = sorted.len().saturating_sub(1);
    sorted
        .get((last as f64 * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// When the committed offset first passed `offset`.
fn first_past(seen: &[(f64, i64)], offset: i64) -> Option<f64> {
    let at = seen.partition_point(|&(_, next)| next <= offset);
    seen.get(at).map(|&(t, _)| t)
}

pub fn print_report(r: &LatencyReport) {
    println!(
        "k2 bench --rate: {} {} trades a second for {} s ({} produced, {:.0} msg/s achieved), {} symbols ({}), {} \
         partitions",
        r.rate,
        workload_name(r.workload),
        r.seconds,
        r.produced,
        r.produced_msgs_per_s,
        r.symbols,
        popularity_name(r.popularity),
        r.partitions
    );
    println!(
        "  produce -> durable   p50 {:.2} s, p99 {:.2} s (target <= {:.1} s), max {:.2} s (read every {:.0} ms)",
        r.latency_p50_s,
        r.latency_p99_s,
        r.target_p99_s,
        r.latency_max_s,
        r.resolution_s * 1000.0
    );
    println!(
        "  produce -> consumed  p50 {:.2} s, p99 {:.2} s (read by the lane's PartitionConsumer)",
        r.consumed_p50_s, r.consumed_p99_s
    );
    println!(
        "  k2 run               {:.1} µs CPU/trade ({:.1} s), peak RSS {:.0} MiB",
        r.cpu_us_per_trade,
        r.cpu_s,
        r.peak_rss_bytes as f64 / (1024.0 * 1024.0)
    );
    println!(
        "  commits              {} (p50 {:.3} s, p99 {:.3} s), {} data files",
        r.commits, r.commit_p50_s, r.commit_p99_s, r.data_files
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_durable_when_its_partitions_committed_offset_first_passes_it() {
        let seen = [(10.0, 5), (11.0, 9), (12.5, 20)];
        assert_eq!(first_past(&seen, 0), Some(10.0));
        assert_eq!(first_past(&seen, 4), Some(10.0));
        assert_eq!(
            first_past(&seen, 5),
            Some(11.0),
            "next offset 5 does not cover offset 5"
        );
        assert_eq!(first_past(&seen, 19), Some(12.5));
        assert_eq!(first_past(&seen, 20), None);
    }

    #[test]
    fn quantiles_take_the_nearest_rank_and_nothing_of_an_empty_list() {
        let sorted = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(nearest_rank(&sorted, 0.5), 3.0);
        assert_eq!(nearest_rank(&sorted, 0.99), 5.0);
        assert_eq!(nearest_rank(&sorted, 1.0), 5.0);
        assert_eq!(nearest_rank(&sorted, 0.0), 1.0);
        assert!(nearest_rank(&[], 0.5).is_nan());
    }
}
