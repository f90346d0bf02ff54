//! `k2 maintain`: one table-maintenance pass on demand, beside a running
//! K2 or with none running. The same steps the background maintainer runs
//! (`storage::maintenance`), over every K2 table, with a line of progress
//! per table and a before/after table at the end.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::K2Config;
use crate::storage::catalog::{CatalogDb, open_existing_catalog};
use crate::storage::maintenance::{Maintainer, MetadataSwap, PassEnd, PassScope, TableHealth, TableReport};
use crate::storage::tables::TableIdents;

/// What `k2 maintain` found and did.
#[derive(Debug, serde::Serialize)]
pub struct MaintainReport {
    pub end: PassEnd,
    pub elapsed_ms: u64,
    pub before: Vec<(String, TableHealth)>,
    pub tables: Vec<TableReport>,
}

pub async fn maintain(config: &K2Config, base_dir: &Path, progress: bool) -> anyhow::Result<MaintainReport> {
    let catalog = open_existing_catalog(&config.catalog, base_dir).await?;
    let swap = MetadataSwap::connect(CatalogDb::new(&config.catalog, base_dir)?)
        .await
        .context("failed to connect to the catalog database")?;
    let maintainer = Maintainer {
        catalog,
        swap,
        config: config.maintenance.clone(),
        zstd_level: config.batcher.zstd_level,
        hold: Duration::from_millis(config.faults.hold_in_maintenance_ms),
        for_queries: None,
    };
    let tables = TableIdents::new(&config.catalog.namespace).all();
    let mut before = Vec::new();
    for ident in &tables {
        let health = maintainer
            .health(ident)
            .await
            .with_context(|| format!("failed to read table {ident} (does it exist?)"))?;
        before.push((ident.to_string(), health));
    }
    let bar = if progress {
        let bar = ProgressBar::new(tables.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} maintaining [{bar:20}] {pos}/{len} tables {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    let (end, reports) = maintainer
        .run_pass(
            &tables,
            PassScope::Full,
            || true,
            |report| {
                bar.inc(1);
                bar.println(table_line(report));
            },
        )
        .await;
    bar.finish_and_clear();
    Ok(MaintainReport {
        end,
        elapsed_ms: started.elapsed().as_millis() as u64,
        before,
        tables: reports,
    })
}

fn table_line(report: &TableReport) -> String {
    let r = &report.rewrite;
    let c = &report.cleanup;
    let mut line = format!(
        "{}: manifests {} -> {}, {} small files -> {}, {} snapshots expired, {} files deleted ({} orphans)",
        report.table,
        r.manifests_before,
        r.manifests_after,
        r.files_compacted,
        r.files_written,
        c.snapshots_expired,
        c.data_files_deleted
            + c.manifests_deleted
            + c.manifest_lists_deleted
            + c.metadata_files_deleted
            + c.orphans_deleted,
        c.orphans_deleted
    );
    if let Some(err) = &report.error {
        line.push_str(&format!("; FAILED at {err}"));
    }
    line
}

pub fn print_report(report: &MaintainReport) {
    println!(
        "{:<24} {:>18} {:>20} {:>22} {:>12}",
        "table", "manifests", "data files", "metadata bytes", "snapshots"
    );
    for (table, after) in report.tables.iter().map(|r| (&r.table, &r.health)) {
        let before = report
            .before
            .iter()
            .find(|(name, _)| name == table)
            .map(|(_, h)| h.clone())
            .unwrap_or_default();
        println!(
            "{:<24} {:>18} {:>20} {:>22} {:>12}",
            table,
            format!("{} -> {}", before.manifests, after.manifests),
            format!("{} -> {}", before.data_files, after.data_files),
            format!("{} -> {}", before.metadata_bytes, after.metadata_bytes),
            format!("{} -> {}", before.snapshots, after.snapshots),
        );
    }
    println!(
        "maintenance pass {} in {} ms",
        match report.end {
            PassEnd::Done => "done",
            PassEnd::Paused => "paused",
            PassEnd::Failed => "FAILED (see the lines above)",
        },
        report.elapsed_ms
    );
}
