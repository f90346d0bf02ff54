//! TableMaintainer: the one owner of table maintenance in a running K2.
//!
//! Every `maintenance.interval_ms` it runs a pass over K2's tables
//! (`storage::maintenance`: merge manifests and compact small files, expire
//! snapshots and delete what only they referenced, delete old metadata and
//! orphans). It runs on an arbiter of its own, with a catalog connection of
//! its own, so a compaction's Parquet work never holds up a lane or the
//! committer. At SOFT and above it runs light passes: compaction and the
//! orphan sweep (the heavy, deferrable part) wait for NORMAL, and a full pass
//! stops between steps once the level rises; merging manifests and expiring
//! snapshots go on, because they cut what every commit costs, which is what
//! SOFT is for, and a table left to grow while the level stays up makes
//! commits slower and the level higher (ADR 0008).
//!
//! What it did and how each table stands is in `/v1/pipeline`
//! (`maintenance`) and in the `k2_table_*` / `k2_maintenance_*` metrics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use iceberg::TableIdent;
use tracing::{info, warn};

use crate::degradation::DegradationLevel;
use crate::faults::Faults;
use crate::messages::LevelChanged;
use crate::metrics as m;
use crate::storage::maintenance::{Maintainer, PassEnd, PassScope, TableHealth, TableReport};

/// What `/v1/pipeline` shows of maintenance.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MaintenanceView {
    /// `idle`, `running` (a full pass), `light` (level at SOFT or above: light passes only) or `off`
    /// (interval 0).
    pub state: &'static str,
    pub passes: u64,
    /// Of the passes, the light ones.
    pub light_passes: u64,
    /// Small files rewritten since start.
    pub files_compacted: u64,
    pub last_pass_end: Option<PassEnd>,
    pub last_pass_at: Option<String>,
    pub last_pass_ms: Option<u64>,
    /// When a replace snapshot (compaction or manifest merge) last landed.
    pub last_compaction_at: Option<String>,
    pub last_error: Option<String>,
    /// How each table stood after the last pass.
    pub tables: BTreeMap<String, TableHealth>,
}

/// Shared with the HTTP server.
#[derive(Debug, Default)]
pub struct MaintenanceStatus(Mutex<MaintenanceView>);

impl MaintenanceStatus {
    pub fn view(&self) -> MaintenanceView {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut MaintenanceView)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Opens what a pass needs (its own catalog connection), on the
/// maintainer's arbiter, the first time a pass runs.
pub type OpenMaintainer =
    Box<dyn Fn() -> futures::future::LocalBoxFuture<'static, anyhow::Result<Maintainer>> + Send>;

pub struct TableMaintainerParams {
    pub open: OpenMaintainer,
    pub tables: Vec<TableIdent>,
    pub interval: Duration,
    pub status: Arc<MaintenanceStatus>,
    pub faults: Arc<Faults>,
}

#[derive(Debug, Default, Clone)]
pub struct TableMaintainerCounters {
    pub num_passes: u64,
    pub num_failed_passes: u64,
    pub num_files_compacted: u64,
    pub num_files_deleted: u64,
}

impl TableMaintainerCounters {
    fn record_pass(&mut self, end: PassEnd, elapsed: Duration) {
        self.num_passes += 1;
        if end == PassEnd::Failed {
            self.num_failed_passes += 1;
        }
        metrics::counter!(m::MAINTENANCE_RUNS, "outcome" => end.as_str()).increment(1);
        metrics::histogram!(m::MAINTENANCE_DURATION).record(elapsed.as_secs_f64());
    }

    fn record_table(&mut self, report: &TableReport) {
        let table = report.table.clone();
        let health = &report.health;
        metrics::gauge!(m::TABLE_MANIFESTS, "table" => table.clone()).set(health.manifests as f64);
        metrics::gauge!(m::TABLE_DATA_FILES, "table" => table.clone()).set(health.data_files as f64);
        metrics::gauge!(m::TABLE_METADATA_BYTES, "table" => table).set(health.metadata_bytes as f64);
        let compacted = report.rewrite.files_compacted as u64;
        self.num_files_compacted += compacted;
        metrics::counter!(m::MAINTENANCE_FILES_COMPACTED).increment(compacted);
        let c = &report.cleanup;
        for (kind, n) in [
            ("data", c.data_files_deleted),
            ("manifest", c.manifests_deleted),
            ("manifest_list", c.manifest_lists_deleted),
            ("metadata", c.metadata_files_deleted),
            ("orphan", c.orphans_deleted),
        ] {
            self.num_files_deleted += n as u64;
            metrics::counter!(m::MAINTENANCE_FILES_DELETED, "kind" => kind).increment(n as u64);
        }
        if report.rewrite.snapshot_id.is_some() {
            metrics::gauge!(m::MAINTENANCE_LAST_COMPACTION).set(chrono::Utc::now().timestamp() as f64);
        }
    }
}

pub struct TableMaintainer {
    params: TableMaintainerParams,
    maintainer: Option<Arc<Maintainer>>,
    /// Set at SOFT and above; a running full pass reads it between steps.
    stand_aside: Arc<AtomicBool>,
    running: bool,
    counters: TableMaintainerCounters,
}

impl TableMaintainer {
    pub fn new(params: TableMaintainerParams) -> Self {
        Self {
            params,
            maintainer: None,
            stand_aside: Arc::new(AtomicBool::new(false)),
            running: false,
            counters: TableMaintainerCounters::default(),
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.running {
            return;
        }
        if self.params.faults.catalog_down() {
            self.params
                .status
                .update(|v| v.last_error = Some("the catalog is down (injected fault); pass skipped".into()));
            return;
        }
        self.running = true;
        let scope = if self.stand_aside.load(Relaxed) {
            PassScope::Light
        } else {
            PassScope::Full
        };
        self.params.status.update(|v| {
            v.state = match scope {
                PassScope::Full => "running",
                PassScope::Light => "light",
            }
        });
        let cached = self.maintainer.clone();
        let open = (self.params.open)();
        let tables = self.params.tables.clone();
        let stand_aside = self.stand_aside.clone();
        let started = Instant::now();
        ctx.spawn(
            async move {
                let maintainer = match cached {
                    Some(maintainer) => maintainer,
                    None => Arc::new(open.await?),
                };
                // A full pass stops once the level rises; a light one goes on.
                let keep_going = || scope == PassScope::Light || !stand_aside.load(Relaxed);
                let (end, reports) = maintainer.run_pass(&tables, scope, keep_going, |_| {}).await;
                Ok::<_, anyhow::Error>((maintainer, end, reports))
            }
            .into_actor(self)
            .map(move |result, act, _| {
                act.running = false;
                let elapsed = started.elapsed();
                match result {
                    Ok((maintainer, end, reports)) => {
                        act.maintainer = Some(maintainer);
                        act.finish_pass(scope, end, &reports, elapsed);
                    }
                    Err(err) => {
                        warn!(error = %err, "table maintenance could not start; will try again");
                        act.counters.record_pass(PassEnd::Failed, elapsed);
                        act.params.status.update(|v| {
                            v.state = "idle";
                            v.last_pass_end = Some(PassEnd::Failed);
                            v.last_error = Some(format!("{err:#}"));
                        });
                    }
                }
            }),
        );
    }

    fn finish_pass(&mut self, scope: PassScope, end: PassEnd, reports: &[TableReport], elapsed: Duration) {
        self.counters.record_pass(end, elapsed);
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut compacted = false;
        for report in reports {
            self.counters.record_table(report);
            compacted |= report.rewrite.snapshot_id.is_some();
        }
        let error = reports
            .iter()
            .find_map(|r| r.error.as_ref().map(|e| format!("{}: {e}", r.table)));
        info!(
            outcome = end.as_str(),
            elapsed_ms = elapsed.as_millis() as u64,
            files_compacted = self.counters.num_files_compacted,
            files_deleted = self.counters.num_files_deleted,
            "table maintenance pass ended"
        );
        let light = self.stand_aside.load(Relaxed);
        let compacted_files = self.counters.num_files_compacted;
        self.params.status.update(|v| {
            v.state = if light { "light" } else { "idle" };
            v.passes += 1;
            v.light_passes += u64::from(scope == PassScope::Light);
            v.files_compacted = compacted_files;
            v.last_pass_end = Some(end);
            v.last_pass_at = Some(now.clone());
            v.last_pass_ms = Some(elapsed.as_millis() as u64);
            if compacted {
                v.last_compaction_at = Some(now.clone());
            }
            if error.is_some() || end == PassEnd::Done {
                v.last_error = error;
            }
            for report in reports {
                v.tables.insert(report.table.clone(), report.health.clone());
            }
        });
    }
}

impl Actor for TableMaintainer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.params.interval.is_zero() {
            self.params.status.update(|v| v.state = "off");
            return;
        }
        self.params.status.update(|v| v.state = "idle");
        // The first pass right away measures the tables (and tidies what an
        // earlier process left); then one per interval.
        self.tick(ctx);
        ctx.run_interval(self.params.interval, |act, ctx| act.tick(ctx));
    }
}

impl Handler<LevelChanged> for TableMaintainer {
    type Result = ();

    fn handle(&mut self, msg: LevelChanged, _: &mut Context<Self>) {
        let aside = msg.level >= DegradationLevel::Soft;
        if aside != self.stand_aside.swap(aside, Relaxed) {
            info!(level = %msg.level, light = aside, "table maintenance follows the level");
        }
        if !self.params.interval.is_zero() && !self.running {
            self.params
                .status
                .update(|v| v.state = if aside { "light" } else { "idle" });
        }
    }
}
