//! `k2 bench --queries`: hybrid-query latency over a large table while K2
//! ingests, and what the queries cost ingestion.
//!
//! 1. History: `--history` trades (10M) over `--days` (7, ending now) and
//!    `--symbols` (200) are written straight into `market.trades` with K2's
//!    writer, one file and one commit per day, sorted by symbol and event time
//!    within the day (the layout a compaction with a sort order leaves) in
//!    row groups of 16K rows, so that a symbol's rows of a day sit in a row
//!    group or two.
//! 2. `k2 run` starts as its own process on that catalog against an empty
//!    topic, with its default config (table maintenance included: a day of
//!    history is one file, too large to compact), is queried once (a K2 that
//!    serves queries keeps what it commits for them), and the load generator
//!    produces `--rate` (20K) trades a second of the same symbols for the
//!    whole run.
//! 3. For `--seconds`, ingestion alone; then for `--seconds`, queries back to
//!    back over HTTP, alternating the 15-minute recent trades of a symbol and
//!    a day of 1-minute OHLCV of a symbol (symbols in turn). Each phase's
//!    durable rate comes from the committed offsets `/v1/pipeline` reports.
//!
//! Latencies are wall time of the HTTP request, measured by this process on
//! the same two cores as `k2 run` and the broker.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use iceberg::Catalog;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::{
    Launch, Popularity, TOPIC, Workload, generator_params, http_get, http_get_with_head, spawn_k2_run,
};
use crate::config::CatalogConfig;
use crate::embedded::EmbeddedBroker;
use crate::loadgen::{LoadgenParams, run_loadgen};
use crate::model::{Side, Trade};
use crate::storage::catalog::open_catalog;
use crate::storage::tables::{TableIdents, ensure_tables};
use crate::storage::writer::{SORTED_ROW_GROUP_ROWS, TableWriter, TradeBatchBuilder};

const DAY_US: i64 = 86_400_000_000;

pub struct QueryBenchParams {
    pub history: u64,
    pub days: u32,
    pub symbols: u32,
    pub partitions: i32,
    /// Trades a second produced while K2 runs.
    pub rate: u64,
    /// Length of each phase (ingestion alone, then with queries).
    pub seconds: u64,
    pub k2_binary: std::path::PathBuf,
    /// Where to write every query of the query phase (CSV) and, beside it,
    /// `k2 run`'s log, so that slow queries can be set against what K2 did
    /// at the time (commits, maintenance steps).
    pub timeline: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latencies {
    pub queries: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Mean rows (trades, or bars) per answer.
    pub mean_rows: f64,
    /// Inside `k2 run`, by phase (its `Server-Timing` header): copying live
    /// rows, loading the table, executing, encoding.
    pub phases: Vec<PhaseLatency>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseLatency {
    pub phase: String,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// One answer: when it was asked, wall time seen here, rows, and K2's own
/// phases.
struct Sample {
    at: chrono::DateTime<chrono::Utc>,
    ms: f64,
    rows: u64,
    live_rows: u64,
    phases: Vec<(String, f64)>,
}

/// The phases of a `Server-Timing` header (`name;dur=ms, ...`) in the
/// answer's head; none if it has no such header.
fn server_timing(head: &str) -> Vec<(String, f64)> {
    let Some(value) = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("server-timing").then_some(value)
    }) else {
        return Vec::new();
    };
    value
        .split(',')
        .filter_map(|metric| {
            let mut parts = metric.split(';').map(str::trim);
            let name = parts.next()?.to_string();
            let ms = parts.find_map(|p| p.strip_prefix("dur="))?.parse().ok()?;
            Some((name, ms))
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct QueryBenchReport {
    pub history_rows: u64,
    pub days: u32,
    pub symbols: u32,
    pub history_build_s: f64,
    pub rate: u64,
    pub seconds: u64,
    /// Durable trades a second while nothing queried.
    pub ingest_alone_msgs_per_s: f64,
    /// Durable trades a second while the queries ran.
    pub ingest_querying_msgs_per_s: f64,
    /// Mean uncommitted rows in a query's cut.
    pub mean_live_rows: f64,
    pub recent_15m: Latencies,
    pub ohlcv_day_1m: Latencies,
    pub target_p99_ms: f64,
}

pub async fn run(params: QueryBenchParams, data_dir: &Path) -> anyhow::Result<QueryBenchReport> {
    if params.history == 0
        || params.days == 0
        || params.symbols == 0
        || params.rate == 0
        || params.seconds == 0
    {
        anyhow::bail!(
            "k2 bench --queries needs --history, --days, --symbols, --rate and --seconds above zero"
        );
    }
    let dir = data_dir.join("queries");
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let generator = generator_params(Workload::Canonical, params.symbols, Popularity::Uniform);
    let (exchange, symbols) = generator.exchanges[0].clone();

    let started = Instant::now();
    build_history(&dir, &exchange, &symbols, params.history, params.days).await?;
    let history_build_s = started.elapsed().as_secs_f64();
    eprintln!(
        "k2 bench: history of {} trades written in {history_build_s:.1} s",
        params.history
    );

    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), params.partitions)])?;
    let brokers = broker.bootstrap_servers().to_string();
    let launch = Launch {
        binary: params.k2_binary.clone(),
        config_file: None,
        brokers: brokers.clone(),
        dir: dir.clone(),
        overrides: Vec::new(),
        log_name: super::LOG_FILE.to_string(),
    };
    let partitions = params.partitions;
    let (mut child, addr) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut child = spawn_k2_run(&launch)?;
        let addr = child.http_addr()?;
        super::latency::wait_for_lanes(&mut child, addr, partitions)?;
        Ok((child, addr))
    })
    .await??;

    // A K2 that serves queries: one now, before ingestion, so that it keeps
    // the files it commits for them from the start (query.recent_idle_ms).
    {
        let path = format!(
            "/v1/trades/recent?exchange={exchange}&symbol={}&minutes=1",
            symbols[0]
        );
        tokio::task::spawn_blocking(move || http_get(addr, &path)).await??;
    }
    let phase = Duration::from_secs(params.seconds);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let load = actix_rt::spawn(run_loadgen(
        LoadgenParams {
            brokers,
            topic: TOPIC.to_string(),
            rate: params.rate,
            shape: Default::default(),
            duration: Some(phase * 2 + Duration::from_secs(10)),
            total: None,
            ids_file: None,
            tiers: Default::default(),
            generator,
            progress: false,
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    eprintln!(
        "k2 bench: producing {} trades a second; {} s of ingestion alone, then {} s with queries",
        params.rate, params.seconds, params.seconds
    );
    // Warm-up: lanes running and the first commits behind.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let alone = {
        let before = durable(addr).await?;
        let t = Instant::now();
        tokio::time::sleep(phase).await;
        (durable(addr).await? - before) as f64 / t.elapsed().as_secs_f64()
    };
    let measured = {
        let symbols = symbols.clone();
        let exchange = exchange.clone();
        tokio::task::spawn_blocking(move || query_phase(addr, &exchange, &symbols, phase))
    };
    let before = durable(addr).await?;
    let t = Instant::now();
    let (recent, ohlcv) = measured.await??;
    let querying = (durable(addr).await? - before) as f64 / t.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    let _ = load.await;
    tokio::task::spawn_blocking(move || child.stop()).await??;
    drop(broker);
    if let Some(path) = &params.timeline {
        write_timeline(path, &recent, &ohlcv)?;
        let log = log_beside(path);
        std::fs::copy(dir.join(super::LOG_FILE), &log)
            .with_context(|| format!("failed to copy k2 run's log to {}", log.display()))?;
        eprintln!(
            "k2 bench: every query in {}, k2 run's log in {}",
            path.display(),
            log.display()
        );
    }
    let answers = recent.len() + ohlcv.len();
    let live = recent.iter().chain(&ohlcv).map(|s| s.live_rows).sum::<u64>() as f64 / answers.max(1) as f64;
    Ok(QueryBenchReport {
        history_rows: params.history,
        days: params.days,
        symbols: params.symbols,
        history_build_s,
        rate: params.rate,
        seconds: params.seconds,
        ingest_alone_msgs_per_s: alone,
        ingest_querying_msgs_per_s: querying,
        mean_live_rows: live,
        recent_15m: latencies(&recent),
        ohlcv_day_1m: latencies(&ohlcv),
        target_p99_ms: 50.0,
    })
}

/// Trades `k2 run` has made durable so far: the sum of committed offsets.
async fn durable(addr: SocketAddr) -> anyhow::Result<i64> {
    let body = tokio::task::spawn_blocking(move || http_get(addr, "/v1/pipeline")).await??;
    let status: serde_json::Value = serde_json::from_str(&body).context("/v1/pipeline is not JSON")?;
    Ok(status["lanes"]
        .as_array()
        .map(|lanes| lanes.iter().filter_map(|l| l["committed_offset"].as_i64()).sum())
        .unwrap_or(0))
}

/// Queries back to back for `length`: recent and OHLCV in turn, a symbol
/// each. Returns the answers of each.
fn query_phase(
    addr: SocketAddr,
    exchange: &str,
    symbols: &[String],
    length: Duration,
) -> anyhow::Result<(Vec<Sample>, Vec<Sample>)> {
    let (mut recent, mut ohlcv) = (Vec::new(), Vec::new());
    let end = Instant::now() + length;
    let mut turn = 0usize;
    while Instant::now() < end {
        let symbol = &symbols[turn % symbols.len()];
        let recent_turn = turn.is_multiple_of(2);
        let path = if recent_turn {
            format!("/v1/trades/recent?exchange={exchange}&symbol={symbol}&minutes=15&limit=100000")
        } else {
            let now = chrono::Utc::now();
            let from = (now - chrono::Duration::days(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let to = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            format!("/v1/ohlcv?exchange={exchange}&symbol={symbol}&interval=1m&from={from}&to={to}")
        };
        let at = chrono::Utc::now();
        let t = Instant::now();
        let (head, body) = http_get_with_head(addr, &path).with_context(|| format!("GET {path}"))?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let answer: serde_json::Value = serde_json::from_str(&body).context("a query answer is not JSON")?;
        let sample = Sample {
            at,
            ms,
            rows: answer["row_count"].as_u64().unwrap_or(0),
            live_rows: answer["live_rows"].as_u64().unwrap_or(0),
            phases: server_timing(&head),
        };
        if recent_turn {
            recent.push(sample);
        } else {
            ohlcv.push(sample);
        }
        turn += 1;
    }
    Ok((recent, ohlcv))
}

/// `k2 run`'s log beside the timeline: `queries.csv` → `queries.k2-run.log`.
fn log_beside(timeline: &Path) -> std::path::PathBuf {
    timeline.with_extension("k2-run.log")
}

/// Every answer in the order asked, one CSV row each: when (UTC, as `k2
/// run`'s log writes it), which query, wall ms, rows, live rows in its cut,
/// then K2's phases in ms (`Server-Timing`; empty where an answer had none).
fn write_timeline(path: &Path, recent: &[Sample], ohlcv: &[Sample]) -> anyhow::Result<()> {
    const PHASES: [&str; 4] = ["live", "load", "execute", "encode"];
    let mut answers: Vec<(&str, &Sample)> = recent
        .iter()
        .map(|s| ("recent_15m", s))
        .chain(ohlcv.iter().map(|s| ("ohlcv_day_1m", s)))
        .collect();
    answers.sort_by_key(|(_, s)| s.at);
    let mut out = String::from("at,query,ms,rows,live_rows,live_ms,load_ms,execute_ms,encode_ms\n");
    for (query, s) in answers {
        out.push_str(&format!(
            "{},{query},{:.1},{},{}",
            s.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            s.ms,
            s.rows,
            s.live_rows
        ));
        for phase in PHASES {
            out.push(',');
            if let Some((_, ms)) = s.phases.iter().find(|(p, _)| p == phase) {
                out.push_str(&format!("{ms:.1}"));
            }
        }
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("failed to write {}", path.display()))
}

fn latencies(samples: &[Sample]) -> Latencies {
    let mean_rows = samples.iter().map(|s| s.rows as f64).sum::<f64>() / samples.len().max(1) as f64;
    let mut phases: Vec<PhaseLatency> = Vec::new();
    if let Some(first) = samples.first() {
        for (phase, _) in &first.phases {
            let of_phase: Vec<f64> = samples
                .iter()
                .filter_map(|s| s.phases.iter().find(|(p, _)| p == phase).map(|(_, ms)| *ms))
                .collect();
            phases.push(PhaseLatency {
                phase: phase.clone(),
                p50_ms: quantile(of_phase.clone(), 0.5),
                p99_ms: quantile(of_phase, 0.99),
            });
        }
    }
    let wall: Vec<f64> = samples.iter().map(|s| s.ms).collect();
    Latencies {
        queries: samples.len(),
        p50_ms: quantile(wall.clone(), 0.5),
        p99_ms: quantile(wall.clone(), 0.99),
        max_ms: quantile(wall, 1.0),
        mean_rows,
        phases,
    }
}

/// The `q` quantile (nearest rank) of `values`; NaN if there are none.
fn quantile(mut values: Vec<f64>, q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// Writes `total` trades over the `days` before now into `market.trades`
/// of the catalog under `dir`, one commit per day.
async fn build_history(
    dir: &Path,
    exchange: &str,
    symbols: &[String],
    total: u64,
    days: u32,
) -> anyhow::Result<()> {
    let config = CatalogConfig {
        uri: format!("sqlite:{}", dir.join("catalog.db").display()),
        warehouse: dir.join("warehouse").display().to_string(),
        ..CatalogConfig::default()
    };
    std::fs::create_dir_all(dir.join("warehouse"))?;
    let catalog: Arc<dyn Catalog> = open_catalog(&config, dir).await?;
    let idents = TableIdents::new(&config.namespace);
    ensure_tables(catalog.as_ref(), &idents).await?;
    let mut table = catalog.load_table(&idents.trades).await?;
    if table.metadata().current_snapshot().is_some() {
        anyhow::bail!(
            "{} already holds trades: remove {} first",
            idents.trades,
            dir.display()
        );
    }
    let writer = TableWriter::new(&table, 3, 1 << 30)?.with_max_row_group_rows(SORTED_ROW_GROUP_ROWS);
    let now_us = crate::model::now_us();
    let first_day_us = now_us - days as i64 * DAY_US;
    let per_symbol_day = (total / days as u64 / symbols.len() as u64).max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut written = 0u64;
    for day in 0..days {
        let start = first_day_us + day as i64 * DAY_US;
        let mut builder = TradeBatchBuilder::with_capacity((per_symbol_day as usize) * symbols.len());
        for (s, symbol) in symbols.iter().enumerate() {
            let mut times: Vec<i64> = (0..per_symbol_day)
                .map(|_| start + rng.random_range(0..DAY_US))
                .collect();
            times.sort_unstable();
            let mut price: i128 = 100 * 100_000_000 + s as i128 * 1_000_000;
            for (i, time) in times.into_iter().enumerate() {
                price = (price + rng.random_range(-50_000i128..=50_000)).max(1);
                builder.push(&Trade {
                    exchange: exchange.into(),
                    symbol: symbol.into(),
                    sequence: (day as i64) * per_symbol_day as i64 + i as i64 + 1,
                    trade_id: compact_str::format_compact!("H{day}-{symbol}-{i:07}"),
                    price,
                    quantity: rng.random_range(1..1_000_000_000),
                    side: if i % 2 == 0 { Side::Buy } else { Side::Sell },
                    event_time_us: time,
                    ingest_time_us: time,
                    partition: -1,
                    offset: written as i64,
                });
                written += 1;
            }
        }
        let files = writer.write(builder.finish(writer.arrow_schema())?).await?;
        let tx = Transaction::new(&table);
        let tx = tx.fast_append().add_data_files(files).apply(tx)?;
        table = tx.commit(catalog.as_ref()).await?;
        eprintln!(
            "k2 bench: history day {}/{days} written ({written} trades)",
            day + 1
        );
    }
    Ok(())
}

pub fn print_report(r: &QueryBenchReport) {
    println!(
        "history: {} trades over {} days, {} symbols (built in {:.1} s)",
        r.history_rows, r.days, r.symbols, r.history_build_s
    );
    println!(
        "ingestion at {} msg/s offered: {:.0} durable msg/s alone, {:.0} while querying (ratio {:.2})",
        r.rate,
        r.ingest_alone_msgs_per_s,
        r.ingest_querying_msgs_per_s,
        r.ingest_querying_msgs_per_s / r.ingest_alone_msgs_per_s.max(1e-9)
    );
    println!("mean live rows in a query's cut: {:.0}", r.mean_live_rows);
    for (name, l) in [
        ("recent 15 min, one symbol", &r.recent_15m),
        ("1-minute OHLCV of a day, one symbol", &r.ohlcv_day_1m),
    ] {
        println!(
            "{name}: {} queries, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {:.0} rows each (target p99 < {:.0} ms)",
            l.queries, l.p50_ms, l.p99_ms, l.max_ms, l.mean_rows, r.target_p99_ms
        );
        let phases: Vec<String> = l
            .phases
            .iter()
            .map(|p| format!("{} {:.1}/{:.1}", p.phase, p.p50_ms, p.p99_ms))
            .collect();
        if !phases.is_empty() {
            println!("  inside k2 run, p50/p99 ms: {}", phases.join(", "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_timing_phases_are_read_from_the_head_whatever_the_case() {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                    server-timing: live;dur=1.25, load;dur=0.50, execute;dur=40.00, encode;dur=3.10\r\n\
                    x-k2-row-count: 9";
        assert_eq!(
            server_timing(head),
            vec![
                ("live".to_string(), 1.25),
                ("load".to_string(), 0.5),
                ("execute".to_string(), 40.0),
                ("encode".to_string(), 3.1),
            ]
        );
        assert!(server_timing("HTTP/1.1 200 OK\r\ncontent-length: 2").is_empty());
    }

    #[test]
    fn phases_get_their_own_quantiles() {
        let sample = |ms: f64, execute: f64| Sample {
            at: chrono::Utc::now(),
            ms,
            rows: 10,
            live_rows: 0,
            phases: vec![("live".into(), 1.0), ("execute".into(), execute)],
        };
        let samples: Vec<Sample> = (1..=100).map(|i| sample(i as f64 * 2.0, i as f64)).collect();
        let l = latencies(&samples);
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (100.0, 198.0, 200.0));
        assert_eq!(l.phases.len(), 2);
        assert_eq!((l.phases[1].p50_ms, l.phases[1].p99_ms), (50.0, 99.0));
        assert_eq!(l.phases[0].p99_ms, 1.0);
    }

    #[test]
    fn the_timeline_lists_answers_in_the_order_asked_with_their_phases() {
        let at = |ms: i64| chrono::DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap();
        let sample = |ms: i64, phases: Vec<(String, f64)>| Sample {
            at: at(ms),
            ms: 12.34,
            rows: 7,
            live_rows: 3,
            phases,
        };
        let recent = [
            sample(0, vec![("live".into(), 0.5), ("execute".into(), 9.0)]),
            sample(30, Vec::new()),
        ];
        let ohlcv = [sample(15, vec![("encode".into(), 1.5)])];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queries.csv");
        write_timeline(&path, &recent, &ohlcv).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "at,query,ms,rows,live_rows,live_ms,load_ms,execute_ms,encode_ms",
                "2027-01-15T08:00:00.000Z,recent_15m,12.3,7,3,0.5,,9.0,",
                "2027-01-15T08:00:00.015Z,ohlcv_day_1m,12.3,7,3,,,,1.5",
                "2027-01-15T08:00:00.030Z,recent_15m,12.3,7,3,,,,",
            ]
        );
        assert_eq!(log_beside(&path), dir.path().join("queries.k2-run.log"));
    }
}
