//! Injected faults: typed, reversible switches that make a real failure
//! path run on purpose (tests, demos, drills). Nothing here fakes data; a
//! fault makes a real component fail the way an outage would.
//!
//! A [`Fault`] is injected with [`Faults::inject`] (what `POST /v1/faults`
//! calls, and what the tests call) and gets an id; it stays active until it
//! is cleared ([`Faults::clear`], `DELETE /v1/faults/{id}`), expires, or,
//! for the counted kinds (`stage_panic`, `poison`, `lose_commits`), is
//! spent. The kinds:
//!
//! - `catalog_down`: every Iceberg commit and offset load fails before
//!   reaching the catalog, as if the catalog were unreachable.
//! - `storage_down`: every data-file write fails before reaching object
//!   storage, as if the store were unreachable.
//! - `commit_latency`: every table commit waits this long before it reaches
//!   the catalog, as a slow catalog would make it.
//! - `stage_panic`: a stage of one partition's lane panics on its next chunk.
//! - `slow_stage`: a stage of one partition's lane (or every lane) waits
//!   this long per chunk.
//! - `poison`: the next records of a partition are corrupted before
//!   decoding, as a bad producer would write them.
//! - `memory_pressure`: the process holds this many MiB more (resident, so
//!   the memory signal sees them).
//! - `broker_down`: the embedded broker goes down until the fault ends.
//! - `lose_commits`: the catalog answers "committed" to the next commits of
//!   a table without making them, as the SQL catalog does when the
//!   database's COMMIT fails (apache/iceberg-rust#3061; see
//!   [`FaultInjectingCatalog`]).
//!
//! `hold_after_commit` is not a fault of this API: it is set from
//! `[faults] hold_after_commit_ms` for drills that aim a kill.

use std::fmt;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use iceberg::Catalog;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::messages::Stage;
use crate::metrics as m;
use crate::storage::tables::{K2Table, TableIdents};

/// How long a fault lasts when its request names no `duration_s`.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(60);
/// Longest a fault can last: a forgotten one ends by itself (a day).
pub const MAX_DURATION_S: u64 = 24 * 3600;
const MAX_LATENCY_MS: u64 = 600_000;
const MAX_DELAY_MS: u64 = 60_000;
const MAX_POISON_RECORDS: u64 = 1_000_000;
const MAX_PRESSURE_MIB: u64 = 64 * 1024;
const MAX_LOST_COMMITS: u64 = 100;
/// How often expired faults are cleared.
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// What a fault breaks and where.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    CatalogDown,
    StorageDown,
    CommitLatency {
        latency: Duration,
    },
    StagePanic {
        stage: Stage,
        partition: i32,
    },
    /// `partition` None: every lane.
    SlowStage {
        stage: Stage,
        partition: Option<i32>,
        delay: Duration,
    },
    Poison {
        partition: i32,
        records: u64,
    },
    MemoryPressure {
        mib: u64,
    },
    BrokerDown,
    LoseCommits {
        table: K2Table,
        commits: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    CatalogDown,
    StorageDown,
    CommitLatency,
    StagePanic,
    SlowStage,
    Poison,
    MemoryPressure,
    BrokerDown,
    LoseCommits,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::CatalogDown => "catalog_down",
            FaultKind::StorageDown => "storage_down",
            FaultKind::CommitLatency => "commit_latency",
            FaultKind::StagePanic => "stage_panic",
            FaultKind::SlowStage => "slow_stage",
            FaultKind::Poison => "poison",
            FaultKind::MemoryPressure => "memory_pressure",
            FaultKind::BrokerDown => "broker_down",
            FaultKind::LoseCommits => "lose_commits",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a fault strikes, as the API spells it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<K2Table>,
}

/// How hard a fault strikes, as the API spells it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commits: Option<u64>,
}

/// The body of `POST /v1/faults`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    pub kind: FaultKind,
    #[serde(default)]
    pub target: FaultTarget,
    #[serde(default)]
    pub params: FaultParams,
    /// Seconds until the fault ends by itself ([`DEFAULT_DURATION`] when absent).
    pub duration_s: Option<u64>,
}

impl FaultRequest {
    /// The fault and how long it lasts, or what is wrong with the request.
    pub fn parse(&self) -> Result<(Fault, Duration), String> {
        let kind = self.kind;
        let (t, p) = (&self.target, &self.params);
        let used_target: &[&str] = match kind {
            FaultKind::StagePanic | FaultKind::SlowStage => &["stage", "partition"],
            FaultKind::Poison => &["partition"],
            FaultKind::LoseCommits => &["table"],
            _ => &[],
        };
        for (name, given) in [
            ("stage", t.stage.is_some()),
            ("partition", t.partition.is_some()),
            ("table", t.table.is_some()),
        ] {
            if given && !used_target.contains(&name) {
                return Err(format!("{kind} takes no `target.{name}`"));
            }
        }
        let used_params: &[&str] = match kind {
            FaultKind::CommitLatency => &["latency_ms"],
            FaultKind::SlowStage => &["delay_ms"],
            FaultKind::Poison => &["records"],
            FaultKind::MemoryPressure => &["mib"],
            FaultKind::LoseCommits => &["commits"],
            _ => &[],
        };
        for (name, given) in [
            ("latency_ms", p.latency_ms.is_some()),
            ("delay_ms", p.delay_ms.is_some()),
            ("records", p.records.is_some()),
            ("mib", p.mib.is_some()),
            ("commits", p.commits.is_some()),
        ] {
            if given && !used_params.contains(&name) {
                return Err(format!("{kind} takes no `params.{name}`"));
            }
        }
        let bounded = |name: &str, value: Option<u64>, max: u64| match value {
            None => Err(format!("{kind} needs `params.{name}`")),
            Some(v) if v == 0 || v > max => Err(format!("`params.{name}` {v} is out of range: 1 to {max}")),
            Some(v) => Ok(v),
        };
        let partition = |required: bool| match t.partition {
            Some(p) if p < 0 => Err(format!("`target.partition` {p} is negative")),
            None if required => Err(format!("{kind} needs `target.partition`")),
            other => Ok(other),
        };
        let stage = |allowed: &[Stage]| {
            let names = || allowed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
            match t.stage {
                None => Err(format!("{kind} needs `target.stage` (one of {})", names())),
                Some(s) if !allowed.contains(&s) => {
                    Err(format!("{kind} cannot target the {s}: it targets {}", names()))
                }
                Some(s) => Ok(s),
            }
        };
        let fault = match kind {
            FaultKind::CatalogDown => Fault::CatalogDown,
            FaultKind::StorageDown => Fault::StorageDown,
            FaultKind::BrokerDown => Fault::BrokerDown,
            FaultKind::CommitLatency => Fault::CommitLatency {
                latency: Duration::from_millis(bounded("latency_ms", p.latency_ms, MAX_LATENCY_MS)?),
            },
            FaultKind::StagePanic => Fault::StagePanic {
                stage: stage(&PANICKABLE)?,
                partition: partition(true)?.expect("required"),
            },
            FaultKind::SlowStage => Fault::SlowStage {
                stage: stage(&SLOWABLE)?,
                partition: partition(false)?,
                delay: Duration::from_millis(bounded("delay_ms", p.delay_ms, MAX_DELAY_MS)?),
            },
            FaultKind::Poison => Fault::Poison {
                partition: partition(true)?.expect("required"),
                records: bounded("records", p.records, MAX_POISON_RECORDS)?,
            },
            FaultKind::MemoryPressure => Fault::MemoryPressure {
                mib: bounded("mib", p.mib, MAX_PRESSURE_MIB)?,
            },
            FaultKind::LoseCommits => Fault::LoseCommits {
                table: t.table.ok_or_else(|| format!("{kind} needs `target.table`"))?,
                commits: bounded("commits", p.commits, MAX_LOST_COMMITS)? as u32,
            },
        };
        let duration = match self.duration_s {
            None => DEFAULT_DURATION,
            Some(s) if s == 0 || s > MAX_DURATION_S => {
                return Err(format!(
                    "`duration_s` {s} is out of range: 1 to {MAX_DURATION_S} (a day)"
                ));
            }
            Some(s) => Duration::from_secs(s),
        };
        Ok((fault, duration))
    }
}

/// The stages that honour `slow_stage`: each waits before it hands a chunk
/// on (the partition consumer: that lane reads slowly).
pub const SLOWABLE: [Stage; 4] = [
    Stage::PartitionConsumer,
    Stage::Sequencer,
    Stage::Deduplicator,
    Stage::LoadShedder,
];
/// The stages that honour `stage_panic`: each reports its panic to the
/// supervisor as it unwinds (`PanicReport`), which rebuilds the lane.
pub const PANICKABLE: [Stage; 4] = [
    Stage::Sequencer,
    Stage::Deduplicator,
    Stage::LoadShedder,
    Stage::Batcher,
];

impl Fault {
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::CatalogDown => FaultKind::CatalogDown,
            Fault::StorageDown => FaultKind::StorageDown,
            Fault::CommitLatency { .. } => FaultKind::CommitLatency,
            Fault::StagePanic { .. } => FaultKind::StagePanic,
            Fault::SlowStage { .. } => FaultKind::SlowStage,
            Fault::Poison { .. } => FaultKind::Poison,
            Fault::MemoryPressure { .. } => FaultKind::MemoryPressure,
            Fault::BrokerDown => FaultKind::BrokerDown,
            Fault::LoseCommits { .. } => FaultKind::LoseCommits,
        }
    }

    /// The fault as the API spells it (the inverse of [`FaultRequest::parse`]).
    pub fn request(&self, duration: Duration) -> FaultRequest {
        let mut target = FaultTarget::default();
        let mut params = FaultParams::default();
        match *self {
            Fault::CatalogDown | Fault::StorageDown | Fault::BrokerDown => {}
            Fault::CommitLatency { latency } => params.latency_ms = Some(latency.as_millis() as u64),
            Fault::StagePanic { stage, partition } => {
                target.stage = Some(stage);
                target.partition = Some(partition);
            }
            Fault::SlowStage {
                stage,
                partition,
                delay,
            } => {
                target.stage = Some(stage);
                target.partition = partition;
                params.delay_ms = Some(delay.as_millis() as u64);
            }
            Fault::Poison { partition, records } => {
                target.partition = Some(partition);
                params.records = Some(records);
            }
            Fault::MemoryPressure { mib } => params.mib = Some(mib),
            Fault::LoseCommits { table, commits } => {
                target.table = Some(table);
                params.commits = Some(commits as u64);
            }
        }
        FaultRequest {
            kind: self.kind(),
            target,
            params,
            duration_s: Some(duration.as_secs().max(1)),
        }
    }

    /// How many times a counted fault strikes before it is spent.
    fn strikes(&self) -> Option<u64> {
        match *self {
            Fault::StagePanic { .. } => Some(1),
            Fault::Poison { records, .. } => Some(records),
            Fault::LoseCommits { commits, .. } => Some(commits as u64),
            _ => None,
        }
    }
}

/// An active fault, as `GET /v1/faults` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActiveFault {
    pub id: u64,
    #[serde(flatten)]
    pub request: FaultRequest,
    /// RFC 3339, UTC.
    pub injected_at: String,
    /// RFC 3339, UTC.
    pub expires_at: String,
    /// Strikes left of a counted fault (`stage_panic`, `poison`, `lose_commits`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strikes_left: Option<u64>,
}

/// Why a fault cannot be injected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InjectError {
    #[error(
        "broker_down needs the embedded broker (kafka.brokers = \"embedded\"); an external broker cannot be taken down from here"
    )]
    NoBrokerControl,
    #[error("the embedded broker refused: {0}")]
    Broker(String),
}

/// Takes the embedded broker down and up (`broker_down`).
pub trait BrokerControl: Send + Sync + 'static {
    fn set_down(&self, down: bool) -> Result<(), String>;
}

struct Entry {
    id: u64,
    fault: Fault,
    duration: Duration,
    injected_at: DateTime<Utc>,
    expires: Instant,
    strikes_left: Option<u64>,
    /// What `memory_pressure` holds.
    _ballast: Vec<u8>,
}

impl Entry {
    fn view(&self) -> ActiveFault {
        ActiveFault {
            id: self.id,
            request: self.fault.request(self.duration),
            injected_at: rfc3339(self.injected_at),
            expires_at: rfc3339(
                chrono::Duration::from_std(self.duration)
                    .ok()
                    .and_then(|d| self.injected_at.checked_add_signed(d))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC),
            ),
            strikes_left: self.strikes_left,
        }
    }
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    active: Vec<Entry>,
    broker: Option<Arc<dyn BrokerControl>>,
    broker_down: bool,
}

/// The faults in force, and the switches the pipeline's components read.
/// Each switch has a lock-free fast path, so a component pays one atomic
/// load per chunk (or per record for `poison`) while nothing is injected.
#[derive(Default)]
pub struct Faults {
    registry: Mutex<Registry>,
    catalog_down: AtomicBool,
    storage_down: AtomicBool,
    commit_latency_ms: AtomicU64,
    panic_armed: AtomicBool,
    slow_armed: AtomicBool,
    poison_armed: AtomicBool,
    lost_armed: AtomicBool,
    hold_after_commit_ms: AtomicU64,
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faults")
            .field("active", &self.list())
            .finish_non_exhaustive()
    }
}

impl Faults {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().expect("faults lock")
    }

    /// Lets `broker_down` take the embedded broker down.
    pub fn set_broker_control(&self, control: Arc<dyn BrokerControl>) {
        self.registry().broker = Some(control);
    }

    /// Puts `fault` in force for `duration` (until cleared, expired or spent).
    pub fn inject(&self, fault: Fault, duration: Duration) -> Result<ActiveFault, InjectError> {
        // No clock overflows however long a caller asks for (ten years).
        let duration = duration.min(Duration::from_secs(10 * 365 * 86_400));
        let mut registry = self.registry();
        if fault == Fault::BrokerDown && registry.broker.is_none() {
            return Err(InjectError::NoBrokerControl);
        }
        let ballast = match fault {
            // Every byte written, so the pages are resident.
            Fault::MemoryPressure { mib } => vec![0xA5u8; (mib as usize) << 20],
            _ => Vec::new(),
        };
        registry.next_id += 1;
        let entry = Entry {
            id: registry.next_id,
            strikes_left: fault.strikes(),
            fault,
            duration,
            injected_at: Utc::now(),
            expires: Instant::now() + duration,
            _ballast: ballast,
        };
        let view = entry.view();
        registry.active.push(entry);
        if let Err(err) = self.apply(&mut registry) {
            registry.active.pop();
            let _ = self.apply(&mut registry);
            return Err(err);
        }
        drop(registry);
        metrics::counter!(m::FAULTS_INJECTED, "kind" => view.request.kind.as_str()).increment(1);
        let fault = serde_json::to_string(&view.request).unwrap_or_default();
        warn!(id = view.id, %fault, "fault injected");
        Ok(view)
    }

    /// Ends fault `id`; None if no such fault is active.
    pub fn clear(&self, id: u64) -> Option<ActiveFault> {
        self.remove(|e| e.id == id, "fault cleared").pop()
    }

    /// Ends every fault of `kind`.
    pub fn clear_kind(&self, kind: FaultKind) -> Vec<ActiveFault> {
        self.remove(|e| e.fault.kind() == kind, "fault cleared")
    }

    /// The active faults, oldest first.
    pub fn list(&self) -> Vec<ActiveFault> {
        self.registry().active.iter().map(Entry::view).collect()
    }

    /// Ends the faults whose time is up.
    pub fn expire(&self) -> Vec<ActiveFault> {
        let now = Instant::now();
        self.remove(|e| e.expires <= now, "fault expired")
    }

    /// Clears expired faults until the pipeline holding `faults` is gone.
    /// Must run inside a Tokio runtime.
    pub fn spawn_expiry(faults: &Arc<Faults>) {
        let weak: Weak<Faults> = Arc::downgrade(faults);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EXPIRY_TICK);
            loop {
                tick.tick().await;
                let Some(faults) = weak.upgrade() else { return };
                faults.expire();
            }
        });
    }

    fn remove(&self, mut which: impl FnMut(&Entry) -> bool, what: &str) -> Vec<ActiveFault> {
        let mut registry = self.registry();
        let mut removed = Vec::new();
        registry.active.retain(|e| {
            if which(e) {
                removed.push(e.view());
                false
            } else {
                true
            }
        });
        if removed.is_empty() {
            return removed;
        }
        if let Err(err) = self.apply(&mut registry) {
            warn!(error = %err, "a fault could not be undone");
        }
        drop(registry);
        for view in &removed {
            info!(id = view.id, kind = %view.request.kind, "{what}");
        }
        removed
    }

    /// Sets the switches from the active faults.
    fn apply(&self, registry: &mut Registry) -> Result<(), InjectError> {
        let active = &registry.active;
        let any = |kind: FaultKind| active.iter().any(|e| e.fault.kind() == kind);
        self.catalog_down.store(any(FaultKind::CatalogDown), Relaxed);
        self.storage_down.store(any(FaultKind::StorageDown), Relaxed);
        let latency = active
            .iter()
            .filter_map(|e| match e.fault {
                Fault::CommitLatency { latency } => Some(latency.as_millis() as u64),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        self.commit_latency_ms.store(latency, Relaxed);
        self.panic_armed.store(any(FaultKind::StagePanic), Relaxed);
        self.slow_armed.store(any(FaultKind::SlowStage), Relaxed);
        self.poison_armed.store(any(FaultKind::Poison), Relaxed);
        self.lost_armed.store(any(FaultKind::LoseCommits), Relaxed);
        metrics::gauge!(m::FAULTS_ACTIVE).set(active.len() as f64);
        let down = any(FaultKind::BrokerDown);
        if down != registry.broker_down {
            if let Some(broker) = &registry.broker {
                broker.set_down(down).map_err(InjectError::Broker)?;
            }
            registry.broker_down = down;
        }
        Ok(())
    }

    /// Takes one strike of the first active fault `matches` accepts; true
    /// if there was one. A fault whose strikes are used up is spent.
    fn strike(&self, matches: impl Fn(&Fault) -> bool) -> bool {
        let mut registry = self.registry();
        let Some(index) = registry.active.iter().position(|e| matches(&e.fault)) else {
            return false;
        };
        let entry = &mut registry.active[index];
        let left = entry.strikes_left.map_or(0, |n| n.saturating_sub(1));
        entry.strikes_left = Some(left);
        if left == 0 {
            let spent = registry.active.remove(index);
            if let Err(err) = self.apply(&mut registry) {
                warn!(error = %err, "a fault could not be undone");
            }
            info!(id = spent.id, kind = %spent.fault.kind(), "fault spent");
        }
        true
    }

    pub fn catalog_down(&self) -> bool {
        self.catalog_down.load(Relaxed)
    }

    pub fn storage_down(&self) -> bool {
        self.storage_down.load(Relaxed)
    }

    /// Called by stages per chunk: panics if a `stage_panic` targets this
    /// stage and partition (once).
    pub fn check_panic(&self, stage: Stage, partition: i32) {
        if !self.panic_armed.load(Relaxed) {
            return;
        }
        let target = Fault::StagePanic { stage, partition };
        if self.strike(|f| *f == target) {
            panic!("injected fault: {stage} of partition {partition} panics");
        }
    }

    /// Called by stages per chunk: how long this stage of this partition's
    /// lane waits, if it is slowed.
    pub fn chunk_delay(&self, stage: Stage, partition: i32) -> Option<Duration> {
        if !self.slow_armed.load(Relaxed) {
            return None;
        }
        self.registry()
            .active
            .iter()
            .filter_map(|e| match e.fault {
                Fault::SlowStage {
                    stage: s,
                    partition: p,
                    delay,
                } if s == stage && p.is_none_or(|p| p == partition) => Some(delay),
                _ => None,
            })
            .max()
    }

    /// Called by the partition consumer per record it decodes: true if a
    /// `poison` fault corrupts this record of `partition` (and counts it).
    pub fn take_poison(&self, partition: i32) -> bool {
        if !self.poison_armed.load(Relaxed) {
            return false;
        }
        self.strike(|f| matches!(*f, Fault::Poison { partition: p, .. } if p == partition))
    }

    /// Called by the catalog per commit: true if this commit of `table` is
    /// to be lost (and counts it).
    pub fn take_lost_commit(&self, table: K2Table) -> bool {
        if !self.lost_armed.load(Relaxed) {
            return false;
        }
        self.strike(|f| matches!(*f, Fault::LoseCommits { table: t, .. } if t == table))
    }

    /// Called by the catalog before each table commit.
    pub async fn commit_latency(&self) {
        let ms = self.commit_latency_ms.load(Relaxed);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// Every successful commit waits `hold` before its stage state is put
    /// in force (zero: no wait).
    pub fn set_hold_after_commit(&self, hold: Duration) {
        self.hold_after_commit_ms.store(hold.as_millis() as u64, Relaxed);
    }

    /// Called by the committer between a commit the catalog shows and its
    /// promotion.
    pub async fn hold_after_commit(&self) {
        let ms = self.hold_after_commit_ms.load(Relaxed);
        if ms > 0 {
            tracing::info!(
                hold_ms = ms,
                "commit landed; holding before its state is put in force (drill)"
            );
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Corrupts a record's bytes as a broken producer would: the first half
/// kept, the rest cut, and a byte no text encoding starts with in front.
pub fn poisoned(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(payload.len() / 2 + 1);
    bytes.push(0xFF);
    bytes.extend_from_slice(&payload[..payload.len() / 2]);
    bytes
}

/// The catalog K2's pipeline talks to: everything is delegated to the real
/// catalog, except what an injected fault ([`Faults`]) changes.
///
/// `lose_commits` makes a commit behave as the SQL catalog's does when the
/// database's COMMIT fails (`SqlCatalog::execute` ignores that error,
/// apache/iceberg-rust#3061): the new metadata file is written, the table's
/// pointer does not move, and the caller is told the commit succeeded.
pub struct FaultInjectingCatalog {
    inner: Arc<dyn Catalog>,
    faults: Arc<Faults>,
    tables: TableIdents,
}

impl FaultInjectingCatalog {
    pub fn new(inner: Arc<dyn Catalog>, faults: Arc<Faults>, tables: TableIdents) -> Self {
        Self {
            inner,
            faults,
            tables,
        }
    }
}

impl fmt::Debug for FaultInjectingCatalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultInjectingCatalog").finish_non_exhaustive()
    }
}

crate::catalog_wrapper!(FaultInjectingCatalog, inner, |this, commit| {
    this.faults.commit_latency().await;
    if this.faults.storage_down() {
        // A commit writes its manifests to the store first.
        return Err(iceberg::Error::new(
            iceberg::ErrorKind::Unexpected,
            "injected fault: object storage is down (the commit's manifests cannot be written)",
        ));
    }
    let lost = this
        .tables
        .kind(commit.identifier())
        .is_some_and(|table| this.faults.take_lost_commit(table));
    if !lost {
        return this.inner.update_table(commit).await;
    }
    let ident = commit.identifier().clone();
    let current = this.inner.load_table(&ident).await?;
    let staged = commit.apply(current)?;
    let location = iceberg::MetadataLocation::from_str(staged.metadata_location_result()?)?;
    staged.metadata().write_to(staged.file_io(), &location).await?;
    tracing::warn!(table = %ident, "injected fault: the catalog reports a commit it did not make");
    Ok(staged)
});

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> Result<(Fault, Duration), String> {
        serde_json::from_str::<FaultRequest>(json)
            .map_err(|e| e.to_string())?
            .parse()
    }

    #[test]
    fn every_kind_parses_from_its_api_form_and_prints_back_the_same() {
        let bodies = [
            r#"{"kind": "catalog_down"}"#,
            r#"{"kind": "storage_down", "duration_s": 5}"#,
            r#"{"kind": "commit_latency", "params": {"latency_ms": 250}}"#,
            r#"{"kind": "stage_panic", "target": {"stage": "batcher", "partition": 3}}"#,
            r#"{"kind": "slow_stage", "target": {"stage": "partition_consumer"}, "params": {"delay_ms": 40}}"#,
            r#"{"kind": "slow_stage", "target": {"stage": "load_shedder", "partition": 1}, "params": {"delay_ms": 40}}"#,
            r#"{"kind": "poison", "target": {"partition": 0}, "params": {"records": 7}}"#,
            r#"{"kind": "memory_pressure", "params": {"mib": 16}}"#,
            r#"{"kind": "broker_down", "duration_s": 10}"#,
            r#"{"kind": "lose_commits", "target": {"table": "shed_ledger"}, "params": {"commits": 2}}"#,
        ];
        for body in bodies {
            let (fault, duration) = request(body).unwrap_or_else(|e| panic!("{body}: {e}"));
            let printed = serde_json::to_string(&fault.request(duration)).unwrap();
            assert_eq!(
                request(&printed).unwrap(),
                (fault, duration),
                "{body} -> {printed}"
            );
        }
        assert_eq!(
            request(r#"{"kind": "catalog_down"}"#).unwrap().1,
            DEFAULT_DURATION
        );
        assert_eq!(
            request(r#"{"kind": "slow_stage", "target": {"stage": "sequencer"}, "params": {"delay_ms": 5}}"#)
                .unwrap()
                .0,
            Fault::SlowStage {
                stage: Stage::Sequencer,
                partition: None,
                delay: Duration::from_millis(5)
            }
        );
    }

    #[test]
    fn a_request_that_does_not_fit_its_kind_says_what_is_wrong() {
        for (body, reason) in [
            (
                r#"{"kind": "storage_down", "target": {"partition": 1}}"#,
                "storage_down takes no `target.partition`",
            ),
            (
                r#"{"kind": "poison", "target": {"partition": 1}}"#,
                "poison needs `params.records`",
            ),
            (
                r#"{"kind": "poison", "params": {"records": 1}}"#,
                "poison needs `target.partition`",
            ),
            (
                r#"{"kind": "commit_latency", "params": {"latency_ms": 600001}}"#,
                "1 to 600000",
            ),
            (
                r#"{"kind": "stage_panic", "target": {"partition": 0}}"#,
                "stage_panic needs `target.stage` (one of sequencer",
            ),
            (
                r#"{"kind": "stage_panic", "target": {"stage": "partition_consumer", "partition": 0}}"#,
                "cannot target the partition_consumer",
            ),
            (
                r#"{"kind": "broker_down", "duration_s": 86401}"#,
                "`duration_s` 86401 is out of range",
            ),
            (
                r#"{"kind": "memory_pressure", "params": {"mib": 1, "records": 2}}"#,
                "memory_pressure takes no `params.records`",
            ),
        ] {
            let err = request(body).unwrap_err();
            assert!(err.contains(reason), "{body}: {err:?} does not say {reason:?}");
        }
    }

    #[test]
    fn counted_faults_are_spent_after_their_strikes_and_others_last_until_cleared_or_expired() {
        let faults = Faults::default();
        let hour = Duration::from_secs(3600);
        let poison = faults
            .inject(
                Fault::Poison {
                    partition: 2,
                    records: 2,
                },
                hour,
            )
            .unwrap();
        assert_eq!(poison.strikes_left, Some(2));
        assert!(!faults.take_poison(1), "another partition is not poisoned");
        assert!(faults.take_poison(2));
        assert_eq!(faults.list()[0].strikes_left, Some(1));
        assert!(faults.take_poison(2));
        assert!(!faults.take_poison(2), "spent after two records");
        assert!(faults.list().is_empty());

        faults.inject(Fault::CatalogDown, hour).unwrap();
        let short = faults.inject(Fault::CatalogDown, Duration::ZERO).unwrap();
        assert!(faults.catalog_down());
        assert_eq!(
            faults.expire().iter().map(|f| f.id).collect::<Vec<_>>(),
            [short.id]
        );
        assert!(faults.catalog_down(), "the other catalog_down still holds");
        assert_eq!(faults.clear_kind(FaultKind::CatalogDown).len(), 1);
        assert!(!faults.catalog_down());

        let slow = |partition| Fault::SlowStage {
            stage: Stage::Sequencer,
            partition,
            delay: Duration::from_millis(partition.map_or(10, |_| 30) as u64),
        };
        let every = faults.inject(slow(None), hour).unwrap();
        faults.inject(slow(Some(4)), hour).unwrap();
        assert_eq!(
            faults.chunk_delay(Stage::Sequencer, 4),
            Some(Duration::from_millis(30))
        );
        assert_eq!(
            faults.chunk_delay(Stage::Sequencer, 5),
            Some(Duration::from_millis(10))
        );
        assert_eq!(faults.chunk_delay(Stage::Deduplicator, 4), None);
        faults.clear(every.id).unwrap();
        assert_eq!(faults.chunk_delay(Stage::Sequencer, 5), None);
        assert!(faults.clear(every.id).is_none(), "cleared twice");
    }

    #[test]
    fn broker_down_needs_a_broker_and_takes_it_down_only_while_a_fault_holds() {
        struct Recorder(Mutex<Vec<bool>>);
        impl BrokerControl for Recorder {
            fn set_down(&self, down: bool) -> Result<(), String> {
                self.0.lock().unwrap().push(down);
                Ok(())
            }
        }
        let faults = Faults::default();
        let hour = Duration::from_secs(3600);
        assert_eq!(
            faults.inject(Fault::BrokerDown, hour).unwrap_err(),
            InjectError::NoBrokerControl
        );
        let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
        faults.set_broker_control(recorder.clone());
        let first = faults.inject(Fault::BrokerDown, hour).unwrap();
        let second = faults.inject(Fault::BrokerDown, hour).unwrap();
        faults.clear(first.id);
        assert_eq!(*recorder.0.lock().unwrap(), [true], "still down while one holds");
        faults.clear(second.id);
        assert_eq!(*recorder.0.lock().unwrap(), [true, false]);
    }

    #[test]
    fn a_poisoned_record_is_not_valid_text() {
        let poisoned = poisoned(br#"{"exchange": "X"}"#);
        assert!(std::str::from_utf8(&poisoned).is_err());
        assert!(poisoned.len() < 12);
    }
}
