//! `bloom_billion`: fills K2's long-window Bloom tier with a day of keys (10⁹ by default) and measures
//! what it costs: insert time, memory, peak RSS, and the false-positive rate on keys never inserted.
//!
//! ```text
//! cargo run --release --bin bloom_billion -- --keys 100000000
//! ```

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use k2::bloom::{Insert, LongWindow, LongWindowConfig};
use serde::Serialize;

/// Fill a long-window Bloom tier with `--keys` distinct trade keys spread over `--window-hours` event
/// hours, then check `--absent` keys never inserted and report the false-positive rate.
#[derive(Parser)]
#[command(name = "bloom_billion")]
struct Args {
    /// Distinct keys inserted; also the window's capacity.
    #[arg(long, default_value_t = 1_000_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
    /// Keys never inserted, checked to measure the false-positive rate.
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    absent: u64,
    /// Hours of event time in the window; keys are spread evenly over them.
    #[arg(long, default_value_t = 24)]
    window_hours: u32,
    /// Configured false-positive rate.
    #[arg(long, default_value_t = 0.001)]
    fp_rate: f64,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    keys: u64,
    window_hours: u32,
    generations: usize,
    insert_seconds: f64,
    ns_per_insert: f64,
    inserts_per_second: f64,
    outside_window: u64,
    memory_bytes: usize,
    bits_per_entry: f64,
    peak_rss_bytes: u64,
    present_checked: u64,
    false_negatives: u64,
    ns_per_lookup_present: f64,
    absent_checked: u64,
    false_positives: u64,
    fp_rate_measured: f64,
    fp_rate_configured: f64,
    ns_per_lookup_absent: f64,
}

const MICROS_PER_HOUR: i64 = 3_600_000_000;
/// 2026-01-01T00:00:00Z, the first hour of the window.
const BASE_US: i64 = 1_767_225_600_000_000;
/// Keys between two progress-bar updates.
const PROGRESS_STEP: u64 = 1 << 16;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = LongWindowConfig {
        window_hours: args.window_hours,
        capacity: args.keys,
        false_positive_rate: args.fp_rate,
    };
    config
        .validate()
        .map_err(|err| anyhow!("invalid options: {err}"))?;
    let window = LongWindow::new(&config);
    let hours = u64::from(args.window_hours);
    let mut buf = Vec::with_capacity(64);

    // Inserted in event-time order, hour after hour, as a live feed arrives: generations are
    // allocated one at a time.
    let bar = progress(args.keys, "insert");
    let started = Instant::now();
    let mut outside_window = 0u64;
    for n in 0..args.keys {
        let hour = hour_of(n, args.keys, hours);
        if window.insert(key(&mut buf, n), event_time(hour, n)) == Insert::OutsideWindow {
            outside_window += 1;
        }
        if n % PROGRESS_STEP == 0 {
            bar.set_position(n);
        }
    }
    let insert_time = started.elapsed();
    bar.finish_and_clear();

    // Inserted keys, a sample strided over all hours: must all be found.
    let present_checked = args.absent.min(args.keys);
    let stride = args.keys / present_checked;
    let bar = progress(present_checked, "check inserted keys");
    let started = Instant::now();
    let mut false_negatives = 0u64;
    for i in 0..present_checked {
        let n = i * stride;
        let hour = hour_of(n, args.keys, hours);
        false_negatives += u64::from(!window.contains(key(&mut buf, n), event_time(hour, n)));
        if i % PROGRESS_STEP == 0 {
            bar.set_position(i);
        }
    }
    let present_time = started.elapsed();
    bar.finish_and_clear();

    // Keys never inserted (ids after the inserted ones), spread over the same hours in the same
    // event-time order, so both checks touch the generations alike.
    let bar = progress(args.absent, "check absent keys");
    let started = Instant::now();
    let mut false_positives = 0u64;
    for i in 0..args.absent {
        let n = args.keys + i;
        let hour = hour_of(i, args.absent, hours);
        false_positives += u64::from(window.contains(key(&mut buf, n), event_time(hour, n)));
        if i % PROGRESS_STEP == 0 {
            bar.set_position(i);
        }
    }
    let absent_time = started.elapsed();
    bar.finish_and_clear();

    let report = Report {
        keys: args.keys,
        window_hours: args.window_hours,
        generations: window.generations(),
        insert_seconds: insert_time.as_secs_f64(),
        ns_per_insert: per_key_ns(insert_time, args.keys),
        inserts_per_second: args.keys as f64 / insert_time.as_secs_f64(),
        outside_window,
        memory_bytes: window.memory_bytes(),
        bits_per_entry: window.bits_per_entry(),
        peak_rss_bytes: k2::bench::peak_rss_bytes(),
        present_checked,
        false_negatives,
        ns_per_lookup_present: per_key_ns(present_time, present_checked),
        absent_checked: args.absent,
        false_positives,
        fp_rate_measured: false_positives as f64 / args.absent as f64,
        fp_rate_configured: args.fp_rate,
        ns_per_lookup_absent: per_key_ns(absent_time, args.absent),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// `BINANCE \x1f BTCUSDT \x1f n`, written into the reused buffer.
fn key(buf: &mut Vec<u8>, n: u64) -> &[u8] {
    buf.clear();
    // Writing into a Vec cannot fail.
    let _ = write!(buf, "BINANCE\x1fBTCUSDT\x1f{n}");
    buf
}

/// The event hour of the `i`th of `count` keys spread evenly, in order, over `hours` hours.
fn hour_of(i: u64, count: u64, hours: u64) -> u64 {
    // Below `hours`, which came from a u32.
    (u128::from(i) * u128::from(hours) / u128::from(count)) as u64
}

/// A time inside event hour `hour` of the window, varying with `n`.
fn event_time(hour: u64, n: u64) -> i64 {
    BASE_US + hour as i64 * MICROS_PER_HOUR + (n % MICROS_PER_HOUR as u64) as i64
}

fn per_key_ns(elapsed: Duration, keys: u64) -> f64 {
    elapsed.as_nanos() as f64 / keys as f64
}

fn progress(len: u64, phase: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:20} {elapsed_precise} {wide_bar} {percent:>3}% eta {eta}")
            .expect("static template"),
    );
    bar.set_message(phase);
    bar
}

fn print_report(r: &Report) {
    const GIB: f64 = (1u64 << 30) as f64;
    println!(
        "bloom_billion: {} keys over {} event hours ({} generations)",
        r.keys, r.window_hours, r.generations
    );
    println!(
        "  insert            {:.1} s, {:.0} ns/insert, {:.2} M inserts/s, {} outside the window",
        r.insert_seconds,
        r.ns_per_insert,
        r.inserts_per_second / 1e6,
        r.outside_window
    );
    println!(
        "  memory            {:.3} GiB of filters ({} bytes), {:.2} bits/entry",
        r.memory_bytes as f64 / GIB,
        r.memory_bytes,
        r.bits_per_entry
    );
    println!(
        "  peak RSS          {:.3} GiB (VmHWM)",
        r.peak_rss_bytes as f64 / GIB
    );
    println!(
        "  inserted keys     {} checked, {} not found, {:.0} ns/lookup",
        r.present_checked, r.false_negatives, r.ns_per_lookup_present
    );
    println!(
        "  absent keys       {} checked, {} false positives: rate {:.6} (configured {}), {:.0} ns/lookup",
        r.absent_checked, r.false_positives, r.fp_rate_measured, r.fp_rate_configured, r.ns_per_lookup_absent
    );
}
