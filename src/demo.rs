//! `k2 demo <scenario>`: scripted failure demos. Each runs the embedded demo
//! (broker, load generator, pipeline, HTTP), injects a real fault through
//! the same typed API as `POST /v1/faults` at a quarter of the run (`overload`
//! throttles the lanes from the start and follows the level; `kill-restart`
//! SIGKILLs a `k2 run` child instead), says what
//! to watch, and ends with the verdict read back from the tables plus the
//! scenario's own checks, each observed on the running pipeline. `k2 demo`
//! exits 0 only when both hold.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::actors::supervisor::PipelineStatus;
use crate::config::K2Config;
use crate::degradation::DegradationLevel;
use crate::embedded::EmbeddedBroker;
use crate::faults::{Fault, FaultKind};
use crate::loadgen::{LoadgenParams, run_loadgen};
use crate::messages::Stage;
use crate::pipeline::Pipeline;
use crate::service::{Verdict, print_verdict};
use crate::storage::catalog::open_catalog;
use crate::storage::offsets::TopicOffsets;
use crate::storage::tables::TableIdents;

/// How to run `k2 demo` (the plain demo, a scenario, or the tour).
#[derive(Debug, Clone)]
pub struct DemoSetup {
    /// The embedded broker and load generator already forced.
    pub config: K2Config,
    /// The file `config` came from, for `kill-restart`'s child.
    pub config_file: Option<PathBuf>,
    /// Holds the catalog and warehouse (and the logs); absolute.
    pub dir: PathBuf,
    /// The length of a run (None: until Ctrl-C, the plain demo only).
    pub run: Option<Duration>,
    /// The `k2` binary `kill-restart` runs as its child.
    pub binary: PathBuf,
    /// Draw the live view (a terminal, logs to a file).
    pub live_view: bool,
}

/// Runs the plain demo (`None`) or one scenario and returns its verdict
/// (None: the plain demo was stopped before it had one).
pub async fn run_scenario(setup: &DemoSetup, scenario: Option<Scenario>) -> anyhow::Result<Option<Verdict>> {
    match scenario {
        Some(Scenario::Tour) => anyhow::bail!("the tour runs scenarios; it is not one (crate::tour::run)"),
        Some(Scenario::KillRestart) => {
            let run = setup
                .run
                .context("kill-restart needs a duration: its kill comes at a quarter of the run")?;
            let verdict = kill_restart(
                &setup.binary,
                &setup.config,
                setup.config_file.clone(),
                &setup.dir,
                run,
            )
            .await?;
            Ok(Some(verdict))
        }
        scenario => {
            crate::service::run(crate::service::ServiceOptions {
                config: setup.config.clone(),
                base_dir: setup.dir.clone(),
                duration: setup.run,
                progress: true,
                verdict: true,
                scenario,
                live_view: setup.live_view && scenario.is_some(),
            })
            .await
        }
    }
}

/// The partition the demos aim at.
const TARGET: i32 = 0;
/// Records the `poison` demo corrupts.
const POISONED: u64 = 20;
/// How slowly each lane reads while the `overload` demo climbs.
const OVERLOAD_READ_DELAY: Duration = Duration::from_secs(5);
/// The least share of reference data in the `overload` demo's load: LOW
/// records for GRACEFUL to shed before anything else.
const OVERLOAD_REFERENCE_RATIO: f64 = 0.02;

/// The degradation settings of the `overload` demo: the embedded broker
/// keeps ~5 MiB a partition, so the level follows the retention headroom,
/// climbing to CIRCUIT_BREAK at half of it (well before the broker deletes
/// anything, so every shed trade can be backfilled), and steps down every
/// 2 s once the headroom is back. A share of the load is reference data,
/// so that GRACEFUL has LOW records to shed.
pub fn overload_config(config: &mut K2Config) {
    let degradation = &mut config.degradation;
    degradation.cooldown_s = 2;
    degradation.retention_headroom_ratio.escalate = [0.8, 0.7, 0.6, 0.5];
    degradation.retention_headroom_ratio.recover = [0.9, 0.85, 0.75, 0.65];
    let loadgen = &mut config.loadgen;
    loadgen.reference_ratio = loadgen.reference_ratio.max(OVERLOAD_REFERENCE_RATIO);
}

/// The `overload` demo's load: a fifth of `rate` ramping to `rate` over a
/// third of the run.
pub fn overload_shape(rate: u64, run: Duration) -> crate::loadgen::RateShape {
    crate::loadgen::RateShape {
        ramp: Some(crate::loadgen::Ramp {
            to: rate,
            over: (run / 3).max(Duration::from_secs(1)),
        }),
        burst: None,
    }
}

/// What a scenario asks of the demo after a tick.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TickOutcome {
    /// Stop the load generator.
    pub stop_load: bool,
    /// The scenario has seen what it came for: end the run.
    pub done: bool,
}

/// How far resident memory may grow while the catalog is down: partitions
/// pause instead of buffering, so it stays about flat.
const OUTAGE_GROWTH_MIB: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The sequencer of partition 0 panics: only its lane restarts.
    ActorCrash,
    /// 20 records of partition 0 arrive corrupted: dead letters with the reason, no lane lost.
    Poison,
    /// The catalog is down for a third of the run: partitions pause, memory stays flat, commits resume.
    CatalogOutage,
    /// The embedded broker is down for a third of the run: consumption stalls and resumes.
    BrokerOutage,
    /// `k2 run`, a child process against the embedded broker, is SIGKILLed at a quarter of the run
    /// and started again: the table ends exact.
    KillRestart,
    /// The load ramps up while every lane reads slowly, until the retention headroom raises the
    /// level to CIRCUIT_BREAK; then the load stops, K2 sheds by priority into the ledger, recovers to
    /// NORMAL, and `k2 backfill` ingests every shed trade.
    Overload,
    /// The ten-minute story of K2 in four acts (the problem, the architecture, what is new, scale and
    /// cost): talking points, and the scenarios they talk about run one after another.
    Tour,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::ActorCrash => "actor-crash",
            Scenario::Poison => "poison",
            Scenario::CatalogOutage => "catalog-outage",
            Scenario::BrokerOutage => "broker-outage",
            Scenario::KillRestart => "kill-restart",
            Scenario::Overload => "overload",
            Scenario::Tour => "tour",
        }
    }

    /// The fault, how long it lasts in a run of `run`, and what to watch;
    /// None for `kill-restart`, whose fault is a signal ([`kill_restart`]).
    fn fault(self, run: Duration) -> Option<(Fault, Duration, &'static str)> {
        let outage = (run / 3).max(Duration::from_secs(3));
        Some(match self {
            Scenario::KillRestart | Scenario::Tour => return None,
            Scenario::Overload => (
                Fault::SlowStage {
                    stage: Stage::PartitionConsumer,
                    partition: None,
                    delay: OVERLOAD_READ_DELAY,
                },
                run,
                "the load ramps up while every lane reads one chunk per 5 s (K2 overloaded): the \
                 backlog nears what the broker retains and the retention headroom raises the level \
                 (GET /v1/degradation)",
            ),
            Scenario::ActorCrash => (
                Fault::StagePanic {
                    stage: Stage::Sequencer,
                    partition: TARGET,
                },
                run,
                "partition 0's sequencer panics on its next chunk: only lane p0 is rebuilt, from the \
                 table's offsets (GET /v1/pipeline: restarts)",
            ),
            Scenario::Poison => (
                Fault::Poison {
                    partition: TARGET,
                    records: POISONED,
                },
                run,
                "the next 20 records of partition 0 arrive corrupted: each becomes a dead letter with its \
                 reason, and no lane stops (k2.dead_letters)",
            ),
            Scenario::CatalogOutage => (
                Fault::CatalogDown,
                outage,
                "the catalog is down: commits fail, the catalog breaker opens, partitions pause instead of \
                 buffering, memory stays flat; commits resume when it returns (GET /v1/degradation)",
            ),
            Scenario::BrokerOutage => (
                Fault::BrokerDown,
                outage,
                "the broker is down: consumption and the producer stall; both resume when it returns, \
                 with nothing lost or repeated (GET /v1/pipeline: consumed)",
            ),
        })
    }
}

/// Drives a scenario beside the running demo and watches what it needs to
/// judge it.
pub struct ScenarioRun {
    scenario: Scenario,
    run: Duration,
    injected: Option<Injected>,
    /// Most partitions paused at once.
    max_paused: usize,
    /// Resident memory at the injection and the most seen while it held.
    rss_at_fault_mib: u64,
    peak_rss_in_fault_mib: u64,
    /// The next offset each partition's lane reads, as last seen (a lane
    /// rebuilt or revoked keeps its last one).
    positions: BTreeMap<i32, i64>,
    /// Rows committed and offsets read (summed over partitions) when the
    /// fault ended.
    at_end_of_fault: Option<(u64, i64)>,
    last: Option<PipelineStatus>,
    /// `overload`: the highest level, and when it broke and was NORMAL again.
    highest: DegradationLevel,
    broke_at: Option<Duration>,
    normal_again_at: Option<Duration>,
    /// What the scenario said, for the live view.
    pub messages: Vec<String>,
    /// Say it on stderr too (no live view).
    plain: bool,
}

struct Injected {
    id: u64,
    /// When it ends, into the run.
    until: Duration,
}

/// One check of a scenario, as the verdict shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Check {
    pub what: String,
    pub held: bool,
}

impl ScenarioRun {
    pub fn new(scenario: Scenario, run: Duration, plain: bool) -> Self {
        ScenarioRun {
            highest: DegradationLevel::Normal,
            broke_at: None,
            normal_again_at: None,
            messages: Vec::new(),
            plain,
            scenario,
            run,
            injected: None,
            max_paused: 0,
            rss_at_fault_mib: 0,
            peak_rss_in_fault_mib: 0,
            positions: BTreeMap::new(),
            at_end_of_fault: None,
            last: None,
        }
    }

    /// Called about twice a second, `elapsed` into the load: injects the
    /// fault at a quarter of the run (`overload`: at once), and watches.
    pub async fn tick(&mut self, pipeline: &Pipeline, elapsed: Duration) -> TickOutcome {
        let status = self.watch(pipeline).await;
        let at = if self.scenario == Scenario::Overload {
            Duration::ZERO
        } else {
            self.run / 4
        };
        if self.injected.is_none()
            && elapsed >= at
            && let Some((fault, lasting, watch)) = self.scenario.fault(self.run)
        {
            match pipeline.faults.inject(fault, lasting) {
                Ok(active) => {
                    self.say(
                        elapsed,
                        format!("{} injected (fault {}): {watch}", active.request.kind, active.id),
                    );
                    self.rss_at_fault_mib = resident_mib();
                    self.injected = Some(Injected {
                        id: active.id,
                        until: elapsed + lasting,
                    });
                }
                Err(err) => self.say(elapsed, format!("the fault could not be injected: {err}")),
            }
        }
        if let Some(injected) = &self.injected {
            let active = pipeline.faults.list().iter().any(|f| f.id == injected.id);
            if active {
                self.peak_rss_in_fault_mib = self.peak_rss_in_fault_mib.max(resident_mib());
                if let Some(status) = &status {
                    self.max_paused = self
                        .max_paused
                        .max(status.lanes.iter().filter(|l| l.paused).count());
                }
            } else if self.at_end_of_fault.is_none()
                && let Some(status) = &status
            {
                let read = self.positions.values().sum();
                self.at_end_of_fault = Some((status.committer.rows_committed, read));
                let how = if self.scenario == Scenario::Overload {
                    "was cleared"
                } else if elapsed >= injected.until {
                    "expired"
                } else {
                    "struck and is spent"
                };
                self.say(elapsed, format!("the fault {how}"));
            }
        }
        let mut outcome = TickOutcome::default();
        if self.scenario == Scenario::Overload
            && let Some(level) = status.map(|s| s.degradation_level)
        {
            outcome = self.follow_overload(pipeline, elapsed, level);
        }
        outcome
    }

    /// The `overload` demo's turns: at CIRCUIT_BREAK the load stops and the
    /// lanes read at full speed again; back at NORMAL the run ends.
    fn follow_overload(
        &mut self,
        pipeline: &Pipeline,
        elapsed: Duration,
        level: DegradationLevel,
    ) -> TickOutcome {
        self.highest = self.highest.max(level);
        if level == DegradationLevel::CircuitBreak && self.broke_at.is_none() {
            self.broke_at = Some(elapsed);
            if let Some(injected) = &self.injected {
                pipeline.faults.clear(injected.id);
            }
            self.say(
                elapsed,
                "CIRCUIT_BREAK: the load stops and the lanes read at full speed again; everything below \
                 critical priority is shed by key before decoding, each range recorded in k2.shed_ledger"
                    .to_string(),
            );
            return TickOutcome {
                stop_load: true,
                done: false,
            };
        }
        if level == DegradationLevel::Normal && self.broke_at.is_some() && self.normal_again_at.is_none() {
            self.normal_again_at = Some(elapsed);
            self.say(
                elapsed,
                "back to NORMAL: the backfill now ingests what the ledger deferred".to_string(),
            );
            return TickOutcome {
                stop_load: false,
                done: true,
            };
        }
        TickOutcome::default()
    }

    fn say(&mut self, elapsed: Duration, what: String) {
        let line = format!("[{:>5.1} s] {what}", elapsed.as_secs_f64());
        if self.plain {
            eprintln!("k2 demo {line}");
        }
        self.messages.push(line);
    }

    /// Looks at the pipeline once more (after the run, once the lanes have
    /// drained what was produced); the checks judge the last look.
    pub async fn watch(&mut self, pipeline: &Pipeline) -> Option<PipelineStatus> {
        let status = pipeline.status().await.ok()?;
        for lane in &status.lanes {
            if let Some(position) = lane.position {
                self.positions.insert(lane.partition, position);
            }
        }
        self.last = Some(status.clone());
        Some(status)
    }

    /// The scenario's checks, from what it watched and the verdict.
    pub fn checks(&self, verdict: &Verdict) -> Vec<Check> {
        let check = |what: String, held: bool| Check { what, held };
        let mut checks = vec![check(
            format!("the fault was injected ({})", self.scenario.name()),
            self.injected.is_some(),
        )];
        let Some(last) = &self.last else {
            checks.push(check("the pipeline answered".into(), false));
            return checks;
        };
        let restarts: BTreeMap<i32, u64> = last.lanes.iter().map(|l| (l.partition, l.restarts)).collect();
        let others_restarted: u64 = restarts
            .iter()
            .filter(|(p, _)| **p != TARGET)
            .map(|(_, r)| r)
            .sum();
        checks.push(check(
            format!("no lane failed for good ({} failed)", last.failed_lanes),
            last.failed_lanes == 0,
        ));
        let read_now = self.positions.values().sum::<i64>() as u64;
        let (rows_then, read_then) = match self.at_end_of_fault {
            Some((rows, read)) => (Some(rows), Some(read as u64)),
            None => (None, None),
        };
        let resumed = |what: &str, then: Option<u64>, now: u64| {
            check(
                format!("{what} resumed after the fault ({} -> {now})", then.unwrap_or(0)),
                then.is_some_and(|then| now > then),
            )
        };
        match self.scenario {
            Scenario::ActorCrash => {
                let target = restarts.get(&TARGET).copied().unwrap_or(0);
                checks.push(check(
                    format!("lane p{TARGET} was rebuilt ({target} restarts)"),
                    target >= 1,
                ));
                checks.push(check(
                    format!("no other lane restarted ({others_restarted} restarts)"),
                    others_restarted == 0,
                ));
            }
            Scenario::Poison => {
                checks.push(check(
                    format!(
                        "the {POISONED} poisoned records are dead letters ({} valid trades dead-lettered)",
                        verdict.valid_dead_lettered
                    ),
                    verdict.valid_dead_lettered == POISONED,
                ));
                checks.push(check(
                    format!("no lane restarted ({} restarts)", last.lane_restarts),
                    last.lane_restarts == 0,
                ));
            }
            Scenario::CatalogOutage => {
                checks.push(check(
                    format!(
                        "partitions paused during the outage (at most {} at once)",
                        self.max_paused
                    ),
                    self.max_paused > 0,
                ));
                let growth = self.peak_rss_in_fault_mib.saturating_sub(self.rss_at_fault_mib);
                checks.push(check(
                    format!(
                        "memory stayed flat ({} -> {} MiB at most, +{OUTAGE_GROWTH_MIB} allowed)",
                        self.rss_at_fault_mib, self.peak_rss_in_fault_mib
                    ),
                    growth <= OUTAGE_GROWTH_MIB,
                ));
                checks.push(resumed("commits", rows_then, last.committer.rows_committed));
            }
            Scenario::BrokerOutage => {
                checks.push(resumed("reading (offsets read)", read_then, read_now));
                checks.push(resumed("commits", rows_then, last.committer.rows_committed));
            }
            Scenario::KillRestart | Scenario::Tour => {}
            Scenario::Overload => {
                checks.push(check(
                    format!("the level climbed to CIRCUIT_BREAK (highest {})", self.highest),
                    self.broke_at.is_some(),
                ));
                checks.push(check(
                    "the level came back to NORMAL".to_string(),
                    self.normal_again_at.is_some(),
                ));
                checks.push(check(
                    format!(
                        "records were shed into the ledger ({} backfilled)",
                        verdict.backfilled
                    ),
                    verdict.backfilled > 0,
                ));
                checks.push(check(
                    format!(
                        "the backfill ingested every shed record ({} still open in the ledger)",
                        verdict.shed_ledgered
                    ),
                    verdict.shed_ledgered == 0,
                ));
                let critical = verdict
                    .by_priority
                    .get(&crate::shedding::Priority::Critical)
                    .copied()
                    .unwrap_or_default();
                checks.push(check(
                    format!(
                        "no CRITICAL trade was shed ({} of {} produced)",
                        critical.shed, critical.produced
                    ),
                    critical.produced > 0 && critical.shed == 0,
                ));
                let (shed, shed_committed) = verdict
                    .by_priority
                    .values()
                    .fold((0, 0), |(s, c), p| (s + p.shed, c + p.shed_committed));
                // Over every priority: LOW counts reference records, in market.reference.
                checks.push(check(
                    format!("every shed record of the ids file is in its table ({shed_committed} of {shed})"),
                    shed > 0 && shed_committed == shed,
                ));
            }
        }
        checks
    }

    /// Clears the scenario's fault if it still holds (the run ended first).
    pub fn end(&self, pipeline: &Pipeline) {
        if let Some(injected) = &self.injected {
            pipeline.faults.clear(injected.id);
        }
        // A panic or poison that never struck is no longer armed either.
        for kind in [FaultKind::StagePanic, FaultKind::Poison] {
            pipeline.faults.clear_kind(kind);
        }
    }
}

pub fn print_checks(checks: &[Check]) {
    println!("  scenario checks");
    println!("  ---------------");
    for c in checks {
        println!("  [{}] {}", if c.held { "ok" } else { "FAILED" }, c.what);
    }
    println!();
}

fn resident_mib() -> u64 {
    crate::actors::supervisor::resident_bytes().map_or(0, |bytes| bytes >> 20)
}

/// `k2 demo kill-restart`: `k2 run` (the `binary`) as a child process
/// against the embedded broker (this process), the load generator here; at a quarter of the run
/// the child is SIGKILLed mid-stream and started again. Once the generator
/// stops and the table's offsets cover every produced record, the child is
/// stopped cleanly and the verdict is read from the tables.
pub async fn kill_restart(
    binary: &Path,
    config: &K2Config,
    config_file: Option<PathBuf>,
    dir: &Path,
    run: Duration,
) -> anyhow::Result<Verdict> {
    use crate::bench::{Launch, spawn_k2_run};

    let topic = config.kafka.topic.clone();
    let broker = EmbeddedBroker::start(&[(topic.clone(), config.kafka.embedded_partitions)])?;
    let brokers = broker.bootstrap_servers().to_string();
    let launch = |log_name: &str| Launch {
        binary: binary.to_path_buf(),
        config_file: config_file.clone(),
        brokers: brokers.clone(),
        dir: dir.to_path_buf(),
        overrides: vec![
            ("K2_KAFKA__TOPIC", topic.clone()),
            ("K2_KAFKA__GROUP_ID", config.kafka.group_id.clone()),
            ("K2_CATALOG__URI", config.catalog.uri.clone()),
            ("K2_CATALOG__WAREHOUSE", config.catalog.warehouse.clone()),
            ("K2_LOADGEN__ENABLED", "false".to_string()),
        ],
        log_name: log_name.to_string(),
    };
    let started = Instant::now();
    let say = |what: String| eprintln!("k2 demo [{:>5.1} s] {what}", started.elapsed().as_secs_f64());
    let mut first = spawn_k2_run(&launch("k2-run-first.log"))?;
    say(format!(
        "k2 run started as a child process (pid {}) against the embedded broker on {brokers}; its log: {}",
        first.pid(),
        dir.join("k2-run-first.log").display()
    ));

    let ids_file = dir.join("data").join("produced-trade-ids.csv");
    std::fs::create_dir_all(ids_file.parent().expect("has a parent"))?;
    let _ = std::fs::remove_file(&ids_file);
    let loadgen = actix_rt::spawn(run_loadgen(
        LoadgenParams {
            duration: Some(run),
            ..LoadgenParams::from_config(config, &brokers, Some(ids_file.clone()))
        },
        futures::future::pending(),
    ));

    // The kill comes at a quarter of the run, once the child has committed.
    let committed_at_kill = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        first.check_running("before the kill")?;
        let committed = table_offsets(config, dir).await;
        if started.elapsed() >= run / 4 && committed > 0 {
            break committed;
        }
        if started.elapsed() > run + KILL_WAIT {
            anyhow::bail!("k2 run committed nothing in {} s", (run + KILL_WAIT).as_secs());
        }
    };
    first.kill()?;
    say(format!(
        "SIGKILL: k2 run killed mid-stream, {committed_at_kill} offsets committed; what it held in memory is gone"
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut second = spawn_k2_run(&launch("k2-run-second.log"))?;
    say(format!(
        "k2 run started again (pid {}): it resumes from the offsets the table records",
        second.pid()
    ));

    let report = loadgen.await.context("load generator task failed")??;
    say(format!(
        "the load generator stopped after {} messages",
        report.produced
    ));
    let deadline = Instant::now() + CATCH_UP;
    let covered = loop {
        second.check_running("before it caught up")?;
        let covered = table_offsets(config, dir).await;
        if covered >= report.produced || Instant::now() > deadline {
            break covered;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let stopped = tokio::task::spawn_blocking(move || second.stop()).await?;
    say(format!(
        "k2 run stopped with SIGTERM ({})",
        match &stopped {
            Ok(()) => "exit 0".to_string(),
            Err(err) => err.to_string(),
        }
    ));
    drop(broker);

    let catalog = open_catalog(&config.catalog, dir).await?;
    let tables = TableIdents::new(&config.catalog.namespace);
    let mut verdict = crate::service::verdict(
        &report,
        &ids_file,
        catalog.as_ref(),
        &tables,
        &topic,
        &BTreeMap::new(),
    )
    .await?;
    let check = |what: String, held: bool| Check { what, held };
    verdict.checks = vec![
        check(
            format!(
                "the kill landed mid-stream ({committed_at_kill} of {} offsets committed)",
                report.produced
            ),
            committed_at_kill < report.produced,
        ),
        check(
            format!(
                "the restarted k2 run committed every offset ({covered} of {})",
                report.produced
            ),
            covered >= report.produced,
        ),
        check(
            "the restarted k2 run stopped cleanly".to_string(),
            stopped.is_ok(),
        ),
    ];
    print_verdict(&verdict);
    Ok(verdict)
}

/// How much longer than the run the first commit may take.
const KILL_WAIT: Duration = Duration::from_secs(60);
/// How long the restarted process may take to commit what was produced.
const CATCH_UP: Duration = Duration::from_secs(120);

/// Offsets the trades table records, summed over partitions (0 before the
/// child created the catalog).
async fn table_offsets(config: &K2Config, dir: &Path) -> u64 {
    let Ok(catalog) = open_catalog(&config.catalog, dir).await else {
        return 0;
    };
    let tables = TableIdents::new(&config.catalog.namespace);
    let Ok(trades) = catalog.load_table(&tables.trades).await else {
        return 0;
    };
    TopicOffsets::from_table(&trades, &config.kafka.topic)
        .map(|offsets| offsets.iter().map(|(_, o)| o.next_offset.max(0) as u64).sum())
        .unwrap_or(0)
}
