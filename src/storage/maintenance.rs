//! Keeping K2's tables healthy however long K2 runs: every ingestion commit
//! adds a manifest, a handful of small data files, a manifest list and a
//! metadata.json, and left alone each commit costs more than the last.
//!
//! A maintenance pass over one table:
//! 1. **rewrite**: one `replace` snapshot that merges the current snapshot's
//!    manifests into one per partition spec (Java's RewriteManifests) and
//!    compacts small data files, per partition, into files near the target
//!    size (Java's RewriteDataFiles). Readers see the same rows before and
//!    after; the `k2.offsets.*` summary keys are carried forward unchanged.
//! 2. **expire**: all but the newest `retain_snapshots` snapshots are dropped,
//!    and the manifest lists, manifests and data files that only they
//!    referenced are deleted.
//! 3. **metadata**: metadata.json files older than the newest
//!    `keep_metadata_files` are deleted.
//! 4. **orphans**: files under the table's location that no snapshot
//!    references and that are older than `orphan_min_age_ms` (written by a
//!    commit that never happened: a kill, a fence, a lost race) are deleted.
//!
//! `iceberg` 0.10.1 has no public way to commit a snapshot it did not build
//! itself (its actions and `TableCommit`'s builder are crate-private), so the
//! rewrite writes its manifests and manifest list with the public spec
//! writers and swaps the table's metadata pointer in the SQL catalog with the
//! same compare-and-swap the catalog itself uses ([`MetadataSwap`]). The
//! swap succeeds only if the table still points at the metadata the rewrite
//! was based on: that is the fence, stronger than the snapshot check
//! ingestion's [`super::catalog::FencedCatalog`] makes. A lost race rebases
//! the rewrite onto the new snapshot (ingestion only adds manifests) and
//! tries again; ingestion commits that lose to a rewrite re-merge as they do
//! against any writer. See `docs/adr/0008-table-maintenance.md`.
//!
//! Nothing here knows about actix.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use iceberg::spec::{
    DataContentType, DataFile, FormatVersion, MAIN_BRANCH, ManifestContentType, ManifestFile, ManifestList,
    ManifestListWriter, ManifestWriterBuilder, Operation, Snapshot, SnapshotRef, Summary,
    TableMetadataBuilder,
};
use iceberg::table::Table;
use iceberg::{Catalog, MetadataLocation, TableIdent};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tracing::{info, warn};

use super::catalog::CatalogDb;
use super::offsets::OFFSETS_KEY_PREFIX;
use super::writer::{SORTED_ROW_GROUP_ROWS, TableWriter, sorted_for_queries};
use crate::config::MaintenanceConfig;
use crate::query::recent::{Held, RecentFiles};
use crate::query::table::ManifestCache;

/// Attempts of one rewrite (or expiry) against concurrent commits before it
/// gives up for this pass (ingestion commits every couple of seconds; a rewrite
/// commits in milliseconds once its files are written).
const MAX_REWRITE_ATTEMPTS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error("iceberg: {0}")]
    Iceberg(#[from] iceberg::Error),
    #[error("catalog database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading a data file to compact: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("rebuilding a batch to compact: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("{table}: the rewrite lost the commit race {attempts} times in a row; it will be tried again")]
    TooManyConflicts { table: String, attempts: usize },
    #[error(
        "{table}: the catalog swapped to {location} but the table does not hold snapshot {snapshot_id}: \
         the rewrite was not made"
    )]
    NotPersisted {
        table: String,
        location: String,
        snapshot_id: i64,
    },
    #[error("{table}: holds delete files; K2 writes none, so maintenance leaves this table alone")]
    HasDeleteFiles { table: String },
    /// The swap was sent but its outcome is unknown or could not be read
    /// back. The rewrite's files stay: the table may reference them (if it
    /// does not, orphan cleanup takes them).
    #[error("{table}: the rewrite may have been committed, keeping its files: {source}")]
    Unconfirmed {
        table: String,
        #[source]
        source: Box<MaintenanceError>,
    },
}

/// What one step of a pass did to one table (for logs, metrics and `k2 maintain`).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RewriteReport {
    /// Manifests in the current snapshot before and after.
    pub manifests_before: usize,
    pub manifests_after: usize,
    /// Small data files replaced, and the files that replaced them.
    pub files_compacted: usize,
    pub files_written: usize,
    pub rows_rewritten: u64,
    pub bytes_rewritten: u64,
    /// The replace snapshot, when one was committed.
    pub snapshot_id: Option<i64>,
    /// Commit races lost (and rebased) on the way.
    pub conflicts: usize,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CleanupReport {
    pub snapshots_expired: usize,
    pub manifest_lists_deleted: usize,
    pub manifests_deleted: usize,
    pub data_files_deleted: usize,
    pub metadata_files_deleted: usize,
    pub orphans_deleted: usize,
}

/// Size of a table as a reader pays for it.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableHealth {
    pub snapshots: usize,
    /// Manifests of the current snapshot (each one read by every scan).
    pub manifests: usize,
    /// Bytes of the current snapshot's manifest list.
    pub manifest_list_bytes: u64,
    /// Live data files and their bytes.
    pub data_files: u64,
    pub data_bytes: u64,
    pub rows: u64,
    /// Everything under the table's `metadata/` directory.
    pub metadata_files: u64,
    pub metadata_bytes: u64,
}

/// What one pass did to one table, and how the table stands after it.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct TableReport {
    pub table: String,
    pub rewrite: RewriteReport,
    pub cleanup: CleanupReport,
    pub health: TableHealth,
    /// The step that failed (the pass goes on with the next table).
    pub error: Option<String>,
}

/// What a pass does. Compaction and the orphan sweep are the heavy, deferrable
/// part; merging manifests and expiring snapshots cut what every commit costs,
/// which is what SOFT exists to cut, so they go on at SOFT and above (ADR 0008).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PassScope {
    /// Every step.
    Full,
    /// Manifest merging, snapshot expiry and metadata cleanup only.
    Light,
}

/// How a pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PassEnd {
    Done,
    /// `keep_going` said stop (the level rose): the rest waits for the next pass.
    Paused,
    /// At least one table's step failed.
    Failed,
}

impl PassEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            PassEnd::Done => "done",
            PassEnd::Paused => "paused",
            PassEnd::Failed => "error",
        }
    }
}

/// Reads a table's metadata pointer in the SQL catalog, and swaps it, but
/// only if it still points where the caller's base did: the statement the
/// SQL catalog itself runs for every commit.
pub struct MetadataSwap {
    db: CatalogDb,
    pool: sqlx::AnyPool,
}

impl MetadataSwap {
    pub async fn connect(db: CatalogDb) -> Result<Self, MaintenanceError> {
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&db.uri)
            .await?;
        Ok(Self { db, pool })
    }

    /// True when the pointer moved from `expected` to `new`; false when the
    /// table had moved on (another writer committed).
    pub async fn swap(
        &self,
        ident: &TableIdent,
        expected: &str,
        new: &str,
    ) -> Result<bool, MaintenanceError> {
        let sql = self.db.bind(
            "UPDATE iceberg_tables SET metadata_location = ?, previous_metadata_location = ? \
             WHERE catalog_name = ? AND table_name = ? AND table_namespace = ? \
             AND (iceberg_type = 'TABLE' OR iceberg_type IS NULL) AND metadata_location = ?",
        );
        let done = sqlx::query(&sql)
            .bind(new)
            .bind(expected)
            .bind(&self.db.catalog_name)
            .bind(ident.name())
            .bind(ident.namespace().as_ref().join("."))
            .bind(expected)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Where the table's metadata is now; None if the catalog has no such
    /// table. One indexed row, without reading the metadata file.
    pub async fn location(&self, ident: &TableIdent) -> Result<Option<String>, MaintenanceError> {
        let sql = self.db.bind(
            "SELECT metadata_location FROM iceberg_tables \
             WHERE catalog_name = ? AND table_name = ? AND table_namespace = ? \
             AND (iceberg_type = 'TABLE' OR iceberg_type IS NULL)",
        );
        let row: Option<(Option<String>,)> = sqlx::query_as(&sql)
            .bind(&self.db.catalog_name)
            .bind(ident.name())
            .bind(ident.namespace().as_ref().join("."))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.and_then(|(location,)| location))
    }
}

/// Runs maintenance steps against one catalog.
pub struct Maintainer {
    pub catalog: Arc<dyn Catalog>,
    pub swap: MetadataSwap,
    pub config: MaintenanceConfig,
    pub zstd_level: i32,
    /// Held at each step boundary of a rewrite (a drill's kill lands inside
    /// it; `[faults] hold_in_maintenance_ms`). Zero: off.
    pub hold: Duration,
    /// Inside a running K2: the trades table's files held in memory for
    /// queries. Compaction reads its inputs from there when they are held,
    /// and hands its output over, so that queries of the recent window
    /// never decode the compacted file (ADR 0012). None in `k2 maintain`.
    pub for_queries: Option<HeldTrades>,
}

/// The trades table and the files of it a running K2 holds for queries.
pub struct HeldTrades {
    pub table: TableIdent,
    pub files: Arc<RecentFiles>,
    /// The queries' parsed manifests: a rewrite stages its merged ones there
    /// before it commits.
    pub manifests: Arc<ManifestCache>,
}

/// One small file chosen for compaction, with what its replacement must keep.
struct Candidate {
    entry_file: DataFile,
    snapshot_id: Option<i64>,
    sequence_number: i64,
    file_sequence_number: Option<i64>,
}

/// A rewrite's written files, kept across attempts against newer snapshots.
struct Staged {
    /// The replace snapshot's id, which the merged manifests carry.
    snapshot_id: i64,
    /// Manifest paths of the base snapshot the merged manifests replace.
    replaced_manifests: HashSet<String>,
    /// The merged manifests (sequence numbers unassigned until the list is written).
    manifests: Vec<ManifestFile>,
    added: Vec<DataFile>,
    removed: Vec<DataFile>,
    /// Every file this rewrite wrote, deleted if it never commits.
    written: Vec<String>,
    /// The rows of compacted files for the files held for queries (path,
    /// rows, bytes), handed over once the rewrite commits: before, they
    /// would push out the files they replace while queries still read them.
    for_queries: Vec<(String, RecordBatch, u64)>,
}

impl Maintainer {
    /// One pass over `tables`: rewrite, expire, clean files, then measure.
    /// `keep_going` is asked before every step; `on_table` hears each
    /// table's report as it finishes (progress for `k2 maintain`).
    pub async fn run_pass(
        &self,
        tables: &[TableIdent],
        scope: PassScope,
        keep_going: impl Fn() -> bool,
        mut on_table: impl FnMut(&TableReport),
    ) -> (PassEnd, Vec<TableReport>) {
        let mut end = PassEnd::Done;
        let mut reports = Vec::new();
        for ident in tables {
            let mut report = TableReport {
                table: ident.to_string(),
                ..TableReport::default()
            };
            let steps = async {
                if !keep_going() {
                    return Ok(false);
                }
                report.rewrite = self.rewrite_in(ident, scope).await.map_err(|e| ("rewrite", e))?;
                if !keep_going() {
                    return Ok(false);
                }
                report.cleanup = self.expire(ident).await.map_err(|e| ("expire", e))?;
                if !keep_going() {
                    return Ok(false);
                }
                let files = self
                    .clean_files_in(ident, scope)
                    .await
                    .map_err(|e| ("clean files", e))?;
                report.cleanup.metadata_files_deleted = files.metadata_files_deleted;
                report.cleanup.orphans_deleted = files.orphans_deleted;
                Ok(true)
            };
            let finished = match steps.await {
                Ok(finished) => finished,
                Err((step, err)) => {
                    warn!(table = %ident, step, error = %err, "table maintenance step failed");
                    report.error = Some(format!("{step}: {err}"));
                    end = PassEnd::Failed;
                    true
                }
            };
            match self.health(ident).await {
                Ok(health) => report.health = health,
                Err(err) if report.error.is_none() => {
                    report.error = Some(format!("health: {err}"));
                    end = PassEnd::Failed;
                }
                Err(_) => {}
            }
            on_table(&report);
            reports.push(report);
            if !finished {
                return (PassEnd::Paused, reports);
            }
        }
        (end, reports)
    }

    /// What a running K2 holds of `ident` for queries: none unless it is the
    /// trades table (and never in `k2 maintain`).
    fn held_for(&self, ident: &TableIdent) -> Option<&HeldTrades> {
        self.for_queries.as_ref().filter(|held| held.table == *ident)
    }

    /// Merges the current snapshot's manifests and compacts its small data
    /// files in one replace snapshot, when there is anything to gain:
    /// more than `max_manifests` manifests, or a partition with at least
    /// `min_files_to_compact` small files.
    pub async fn rewrite(&self, ident: &TableIdent) -> Result<RewriteReport, MaintenanceError> {
        self.rewrite_in(ident, PassScope::Full).await
    }

    /// [`Maintainer::rewrite`]; a light pass merges manifests only.
    pub async fn rewrite_in(
        &self,
        ident: &TableIdent,
        scope: PassScope,
    ) -> Result<RewriteReport, MaintenanceError> {
        let base = self.catalog.load_table(ident).await?;
        let mut report = RewriteReport::default();
        let Some(snapshot) = base.metadata().current_snapshot().cloned() else {
            return Ok(report);
        };
        let list = base.manifest_list_reader(&snapshot).load().await?;
        report.manifests_before = list.entries().len();
        if list
            .entries()
            .iter()
            .any(|m| m.content == ManifestContentType::Deletes)
        {
            return Err(MaintenanceError::HasDeleteFiles {
                table: ident.to_string(),
            });
        }
        // Live entries, by partition spec. Manifests the queries parsed
        // already are taken from their cache (a manifest never changes).
        let parsed = self.held_for(ident).map(|held| &held.manifests);
        let mut live: BTreeMap<i32, Vec<Candidate>> = BTreeMap::new();
        for manifest in list.entries() {
            let loaded = match parsed.and_then(|cache| cache.cached(&manifest.manifest_path)) {
                Some(loaded) => loaded,
                None => Arc::new(manifest.load_manifest(base.file_io()).await?),
            };
            for entry in loaded.entries() {
                if !entry.is_alive() {
                    continue;
                }
                if entry.content_type() != DataContentType::Data {
                    return Err(MaintenanceError::HasDeleteFiles {
                        table: ident.to_string(),
                    });
                }
                live.entry(manifest.partition_spec_id)
                    .or_default()
                    .push(Candidate {
                        entry_file: entry.data_file().clone(),
                        snapshot_id: entry.snapshot_id(),
                        sequence_number: entry.sequence_number().unwrap_or(0),
                        // Only entries of v1 manifests lack it; the data sequence number is the file's.
                        file_sequence_number: entry.file_sequence_number.or(entry.sequence_number()),
                    });
            }
        }
        let compact = match scope {
            PassScope::Full => self.pick_small_files(&base, &live),
            PassScope::Light => Vec::new(),
        };
        let merge = report.manifests_before > self.config.max_manifests;
        if compact.is_empty() && !merge {
            report.manifests_after = report.manifests_before;
            return Ok(report);
        }
        let held = self.held_for(ident).map(|held| held.files.as_ref());
        let staged = self
            .stage(&base, &snapshot, &live, &compact, held, &mut report)
            .await?;
        self.held("rewrite files written").await;
        // Once the rewrite commits, the files it replaced go from the files
        // held for queries and the compacted ones come in (a query uses a held
        // file only if its snapshot lists it).
        match self.commit_staged(ident, &staged, &mut report).await {
            Ok(()) => {
                if let Some(held) = held {
                    held.forget(staged.removed.iter().map(|f| f.file_path()));
                    for (path, rows, bytes) in staged.for_queries {
                        held.keep_sorted(path, rows, bytes);
                    }
                }
                Ok(report)
            }
            Err(err @ MaintenanceError::Unconfirmed { .. }) => Err(err),
            Err(err) => {
                delete_quietly(base.file_io(), &staged.written).await;
                Err(err)
            }
        }
    }

    /// The small files worth rewriting this pass, in groups (see
    /// [`pick_compaction`]). Files of the default spec only: a table that
    /// evolved its spec keeps older files as they are.
    fn pick_small_files(&self, base: &Table, live: &BTreeMap<i32, Vec<Candidate>>) -> Vec<Vec<usize>> {
        let spec_id = base.metadata().default_partition_spec_id();
        let Some(files) = live.get(&spec_id) else {
            return Vec::new();
        };
        let sized: Vec<(String, u64)> = files
            .iter()
            .map(|c| {
                (
                    format!("{:?}", c.entry_file.partition()),
                    c.entry_file.file_size_in_bytes(),
                )
            })
            .collect();
        pick_compaction(&sized, &self.config)
    }

    /// Writes the compacted data files and the merged manifests.
    async fn stage(
        &self,
        base: &Table,
        snapshot: &SnapshotRef,
        live: &BTreeMap<i32, Vec<Candidate>>,
        compact: &[Vec<usize>],
        held: Option<&RecentFiles>,
        report: &mut RewriteReport,
    ) -> Result<Staged, MaintenanceError> {
        let metadata = base.metadata();
        let file_io = base.file_io();
        let snapshot_id = new_snapshot_id(base);
        let default_spec = metadata.default_partition_spec_id();
        let groups = compact;
        let compact: HashSet<usize> = groups.iter().flatten().copied().collect();
        let mut staged = Staged {
            snapshot_id,
            replaced_manifests: base
                .manifest_list_reader(snapshot)
                .load()
                .await?
                .entries()
                .iter()
                .map(|m| m.manifest_path.clone())
                .collect(),
            manifests: Vec::new(),
            added: Vec::new(),
            removed: Vec::new(),
            written: Vec::new(),
            for_queries: Vec::new(),
        };
        let result = async {
            // One group at a time: the pass holds one group's rows, not all
            // (and, for queries, earlier groups' sorted rows within
            // `query.max_recent_bytes`).
            for group in groups {
                let files = &live[&default_spec];
                let inputs: Vec<&DataFile> = group.iter().map(|&i| &files[i].entry_file).collect();
                let (added, sorted) = self.compact(base, &inputs, held).await?;
                if let (Some(held), Some(sorted)) = (held, sorted) {
                    let room = held
                        .max_bytes()
                        .saturating_sub(staged.for_queries.iter().map(|(_, _, bytes)| bytes).sum::<u64>());
                    let slices = file_slices(&sorted, &added);
                    if slices.iter().map(|(_, _, bytes)| bytes).sum::<u64>() <= room {
                        staged.for_queries.extend(slices);
                    }
                }
                staged
                    .written
                    .extend(added.iter().map(|f| f.file_path().to_string()));
                report.files_compacted += inputs.len();
                report.files_written += added.len();
                report.rows_rewritten += inputs.iter().map(|f| f.record_count()).sum::<u64>();
                report.bytes_rewritten += inputs.iter().map(|f| f.file_size_in_bytes()).sum::<u64>();
                staged.added.extend(added);
            }
            for (&spec_id, files) in live {
                let spec = metadata
                    .partition_spec_by_id(spec_id)
                    .ok_or_else(|| {
                        iceberg::Error::new(
                            iceberg::ErrorKind::DataInvalid,
                            format!("manifest of unknown partition spec {spec_id}"),
                        )
                    })?
                    .as_ref()
                    .clone();
                let path = format!(
                    "{}/metadata/{}-m0.avro",
                    metadata.location(),
                    uuid::Uuid::now_v7()
                );
                staged.written.push(path.clone());
                let mut writer = ManifestWriterBuilder::new(
                    file_io.new_output(&path)?,
                    Some(snapshot_id),
                    metadata.current_schema().clone(),
                    spec,
                )
                .build_v2_data();
                for (index, candidate) in files.iter().enumerate() {
                    let file = candidate.entry_file.clone();
                    if spec_id == default_spec && compact.contains(&index) {
                        writer.add_delete_file(
                            file,
                            candidate.sequence_number,
                            candidate.file_sequence_number,
                        )?;
                        staged.removed.push(candidate.entry_file.clone());
                    } else {
                        writer.add_existing_file(
                            file,
                            candidate.snapshot_id.unwrap_or(snapshot.snapshot_id()),
                            candidate.sequence_number,
                            candidate.file_sequence_number,
                        )?;
                    }
                }
                if spec_id == default_spec {
                    for file in &staged.added {
                        // A negative sequence number: inherited from the snapshot.
                        writer.add_file(file.clone(), -1)?;
                    }
                }
                staged.manifests.push(writer.write_manifest_file().await?);
            }
            Ok::<_, MaintenanceError>(())
        }
        .await;
        match result {
            Ok(()) => Ok(staged),
            Err(err) => {
                delete_quietly(file_io, &staged.written).await;
                Err(err)
            }
        }
    }

    /// Reads `inputs` and writes their rows again into files near the target
    /// size, sorted for queries (`sorted_for_queries`). Inputs K2 holds for
    /// queries are taken from memory instead of decoded; the sorted rows come
    /// back beside the files when `held` wants them.
    async fn compact(
        &self,
        base: &Table,
        inputs: &[&DataFile],
        held: Option<&RecentFiles>,
    ) -> Result<(Vec<DataFile>, Option<RecordBatch>), MaintenanceError> {
        let writer = TableWriter::new(base, self.zstd_level, self.config.target_file_size_bytes)?;
        let schema = writer.arrow_schema().clone();
        let mut batches = Vec::new();
        for file in inputs {
            // A held batch is the file's rows; one that does not match the
            // file's count or the table's schema (none should) is not used.
            let in_memory = held.and_then(|held| match held.rows(file.file_path(), None, None) {
                Held::Rows(rows) if rows.num_rows() as u64 == file.record_count() => {
                    in_table_schema(&schema, &rows).ok()
                }
                Held::Rows(_) | Held::NotKept | Held::Nothing => None,
            });
            if let Some(rows) = in_memory {
                batches.push(rows);
                continue;
            }
            let bytes = base.file_io().new_input(file.file_path())?.read().await?;
            for batch in ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()? {
                batches.push(in_table_schema(&schema, &batch?)?);
            }
        }
        let batch = sorted_for_queries(&schema, &batches)?;
        drop(batches);
        let written = writer
            .with_max_row_group_rows(SORTED_ROW_GROUP_ROWS)
            .write(batch.clone())
            .await?;
        let for_queries = held.is_some_and(RecentFiles::wanted).then_some(batch);
        Ok((written, for_queries))
    }

    /// Commits `staged` on top of the newest snapshot, rebasing when other
    /// writers committed in between; gives up if one removed what the
    /// rewrite replaces (another maintainer got there first).
    async fn commit_staged(
        &self,
        ident: &TableIdent,
        staged: &Staged,
        report: &mut RewriteReport,
    ) -> Result<(), MaintenanceError> {
        for attempt in 0..MAX_REWRITE_ATTEMPTS {
            let base = self.catalog.load_table(ident).await?;
            let Some(current) = base.metadata().current_snapshot().cloned() else {
                return Err(abandoned(ident, "the table lost its snapshot"));
            };
            let list = base.manifest_list_reader(&current).load().await?;
            let paths: HashSet<&str> = list.entries().iter().map(|m| m.manifest_path.as_str()).collect();
            if staged
                .replaced_manifests
                .iter()
                .any(|p| !paths.contains(p.as_str()))
            {
                return Err(abandoned(ident, "another writer rewrote the manifests first"));
            }
            let newer: Vec<ManifestFile> = list
                .entries()
                .iter()
                .filter(|m| !staged.replaced_manifests.contains(&m.manifest_path))
                .cloned()
                .collect();
            let snapshot_id = staged.snapshot_id;
            let sequence_number = base.metadata().next_sequence_number();
            let list_path = format!(
                "{}/metadata/snap-{snapshot_id}-{attempt}-{}.avro",
                base.metadata().location(),
                uuid::Uuid::now_v7()
            );
            let mut writer = ManifestListWriter::v2(
                base.file_io().new_output(&list_path)?.writer().await?,
                snapshot_id,
                Some(current.snapshot_id()),
                sequence_number,
            );
            writer.add_manifests(staged.manifests.iter().cloned().chain(newer.iter().cloned()))?;
            writer.close().await?;
            self.manifests_for_queries(ident, base.file_io(), &list_path, &staged.manifests)
                .await;
            let snapshot = Snapshot::builder()
                .with_snapshot_id(snapshot_id)
                .with_parent_snapshot_id(Some(current.snapshot_id()))
                .with_sequence_number(sequence_number)
                .with_timestamp_ms(chrono::Utc::now().timestamp_millis())
                .with_manifest_list(list_path.clone())
                .with_summary(replace_summary(current.summary(), &staged.added, &staged.removed))
                .with_schema_id(base.metadata().current_schema_id())
                .build();
            match self.commit_snapshot(&base, snapshot).await {
                Ok(true) => {
                    report.snapshot_id = Some(snapshot_id);
                    report.manifests_after = staged.manifests.len() + newer.len();
                    report.conflicts = attempt;
                    info!(
                        table = %ident, snapshot_id,
                        manifests_before = report.manifests_before,
                        manifests_after = report.manifests_after,
                        files_compacted = report.files_compacted,
                        files_written = report.files_written,
                        "table rewritten"
                    );
                    return Ok(());
                }
                Ok(false) => {
                    delete_quietly(base.file_io(), &[list_path]).await;
                    warn!(table = %ident, attempt, "rewrite lost a commit race, rebasing onto the new snapshot");
                }
                Err(err @ MaintenanceError::Unconfirmed { .. }) => return Err(err),
                Err(err) => {
                    delete_quietly(base.file_io(), &[list_path]).await;
                    return Err(err);
                }
            }
        }
        Err(MaintenanceError::TooManyConflicts {
            table: ident.to_string(),
            attempts: MAX_REWRITE_ATTEMPTS,
        })
    }

    /// Parses the rewrite's merged manifests, as the list at `list_path`
    /// records them (with the sequence numbers it assigned), and stages them
    /// for queries before the snapshot commits: the first query of the new
    /// snapshot would otherwise parse them in its own time, an entry for every
    /// file the pass replaced. Only while queries come; a failure costs that
    /// query the parse, nothing more.
    async fn manifests_for_queries(
        &self,
        ident: &TableIdent,
        file_io: &iceberg::io::FileIO,
        list_path: &str,
        merged: &[ManifestFile],
    ) {
        let Some(held) = self.held_for(ident).filter(|held| held.files.wanted()) else {
            return;
        };
        let parsed = async {
            let bytes = file_io.new_input(list_path)?.read().await?;
            let list = ManifestList::parse_with_version(&bytes, FormatVersion::V2)?;
            let mut parsed = Vec::with_capacity(merged.len());
            for file in list
                .entries()
                .iter()
                .filter(|m| merged.iter().any(|ours| ours.manifest_path == m.manifest_path))
            {
                parsed.push((
                    file.manifest_path.clone(),
                    Arc::new(file.load_manifest(file_io).await?),
                ));
            }
            Ok::<_, iceberg::Error>(parsed)
        };
        match parsed.await {
            Ok(parsed) => held.manifests.stage(parsed),
            Err(err) => {
                warn!(table = %ident, error = %err, "could not parse the merged manifests for queries")
            }
        }
    }

    /// Adds `snapshot` to `base` as the main branch's head through the
    /// catalog's compare-and-swap, then reads the table back: Ok(false) when
    /// another writer moved the table first.
    async fn commit_snapshot(&self, base: &Table, snapshot: Snapshot) -> Result<bool, MaintenanceError> {
        let ident = base.identifier();
        let base_location = base.metadata_location_result()?.to_string();
        let snapshot_id = snapshot.snapshot_id();
        let metadata =
            TableMetadataBuilder::new_from_metadata(base.metadata().clone(), Some(base_location.clone()))
                .set_branch_snapshot(snapshot, MAIN_BRANCH)?
                .build()?
                .metadata;
        let location = MetadataLocation::from_str(&base_location)?
            .with_next_version()
            .with_new_metadata(&metadata);
        metadata.write_to(base.file_io(), &location).await?;
        let location = location.to_string();
        // From here on the table may point at the new snapshot: an error
        // must not let the caller delete what it references.
        let unconfirmed = |source: MaintenanceError| MaintenanceError::Unconfirmed {
            table: ident.to_string(),
            source: Box::new(source),
        };
        if !self
            .swap
            .swap(ident, &base_location, &location)
            .await
            .map_err(unconfirmed)?
        {
            delete_quietly(base.file_io(), std::slice::from_ref(&location)).await;
            return Ok(false);
        }
        self.held("rewrite committed").await;
        let current = self
            .catalog
            .load_table(ident)
            .await
            .map_err(|e| unconfirmed(e.into()))?;
        if current.metadata().snapshot_by_id(snapshot_id).is_none() {
            return Err(unconfirmed(MaintenanceError::NotPersisted {
                table: ident.to_string(),
                location,
                snapshot_id,
            }));
        }
        Ok(true)
    }

    /// Expires all but the newest `retain_snapshots` snapshots and deletes
    /// the files only they referenced.
    /// An ingestion commit that lands between the table's load and the
    /// expiry's commit makes the catalog refuse the expiry: it is planned
    /// again on the new snapshot.
    pub async fn expire(&self, ident: &TableIdent) -> Result<CleanupReport, MaintenanceError> {
        let mut report = CleanupReport::default();
        let mut attempt = 0;
        let before = loop {
            attempt += 1;
            let base = self.catalog.load_table(ident).await?;
            let before: Vec<SnapshotRef> = base.metadata().snapshots().cloned().collect();
            if before.len() <= self.config.retain_snapshots {
                return Ok(report);
            }
            let tx = iceberg::transaction::Transaction::new(&base);
            let tx = iceberg::transaction::ApplyTransactionAction::apply(
                tx.expire_snapshots()
                    .expire_older_than_ms(chrono::Utc::now().timestamp_millis())
                    .retain_last(self.config.retain_snapshots),
                tx,
            )?;
            match tx.commit(self.catalog.as_ref()).await {
                Ok(_) => break before,
                Err(err)
                    if err.kind() == iceberg::ErrorKind::CatalogCommitConflicts
                        && attempt < MAX_REWRITE_ATTEMPTS =>
                {
                    warn!(table = %ident, attempt, "the table moved under the expiry, planning it again");
                }
                Err(err) => return Err(err.into()),
            }
        };
        // What the table holds now, read back: a commit the catalog reported
        // but did not make (ADR 0006) must not delete a file.
        let after = self.catalog.load_table(ident).await?;
        let retained: HashSet<i64> = after.metadata().snapshots().map(|s| s.snapshot_id()).collect();
        let expired: Vec<SnapshotRef> = before
            .into_iter()
            .filter(|s| !retained.contains(&s.snapshot_id()))
            .collect();
        report.snapshots_expired = expired.len();
        if expired.is_empty() {
            return Ok(report);
        }
        self.held("snapshots expired").await;
        let keep = referenced_files(&after, after.metadata().snapshots().cloned()).await?;
        let gone = referenced_files(&after, expired.into_iter()).await?;
        let gc_data = after.metadata().table_properties()?.gc_enabled;
        let lists: Vec<String> = gone
            .manifest_lists
            .difference(&keep.manifest_lists)
            .cloned()
            .collect();
        let manifests: Vec<String> = gone.manifests.difference(&keep.manifests).cloned().collect();
        let data: Vec<String> = if gc_data {
            gone.data_files.difference(&keep.data_files).cloned().collect()
        } else {
            Vec::new()
        };
        let io = after.file_io();
        report.data_files_deleted = delete_all(io, &data).await?;
        report.manifests_deleted = delete_all(io, &manifests).await?;
        report.manifest_lists_deleted = delete_all(io, &lists).await?;
        info!(
            table = %ident, expired = report.snapshots_expired,
            manifest_lists = report.manifest_lists_deleted, manifests = report.manifests_deleted,
            data_files = report.data_files_deleted, "expired old snapshots and deleted their files"
        );
        Ok(report)
    }

    /// Deletes metadata.json files older than the newest `keep_metadata_files`
    /// and, past `orphan_min_age_ms`, every file under the table that no
    /// snapshot references.
    pub async fn clean_files(&self, ident: &TableIdent) -> Result<CleanupReport, MaintenanceError> {
        self.clean_files_in(ident, PassScope::Full).await
    }

    /// [`Maintainer::clean_files`]; a light pass leaves orphans for a full one.
    pub async fn clean_files_in(
        &self,
        ident: &TableIdent,
        scope: PassScope,
    ) -> Result<CleanupReport, MaintenanceError> {
        let mut report = CleanupReport::default();
        let table = self.catalog.load_table(ident).await?;
        let Some(root) = local_path(table.metadata().location()) else {
            warn!(table = %ident, location = table.metadata().location(), "not a local warehouse; files are not cleaned");
            return Ok(report);
        };
        let current = table.metadata_location_result()?;
        let current_version = metadata_version(current).unwrap_or(0);
        let keep_from =
            current_version.saturating_sub(self.config.keep_metadata_files.saturating_sub(1) as u64);
        let listed = list_files(&root)?;
        let mut old_metadata = Vec::new();
        let mut others = Vec::new();
        for file in listed {
            let uri = format!("file://{}", file.path.display());
            match file
                .path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(metadata_version)
            {
                Some(version) if version < keep_from => old_metadata.push(uri),
                Some(_) => {}
                None => others.push((uri, file.modified)),
            }
        }
        let io = table.file_io();
        report.metadata_files_deleted = delete_all(io, &old_metadata).await?;

        let min_age = Duration::from_millis(self.config.orphan_min_age_ms);
        let now = SystemTime::now();
        let old_enough: Vec<String> = others
            .into_iter()
            .filter(|(_, modified)| now.duration_since(*modified).unwrap_or_default() >= min_age)
            .map(|(uri, _)| uri)
            .collect();
        if scope == PassScope::Full && !old_enough.is_empty() {
            // Reload: the listing above may be newer than `table`.
            let table = self.catalog.load_table(ident).await?;
            let live = referenced_files(&table, table.metadata().snapshots().cloned()).await?;
            let orphans: Vec<String> = old_enough.into_iter().filter(|uri| !live.contains(uri)).collect();
            report.orphans_deleted = delete_all(io, &orphans).await?;
        }
        if report.metadata_files_deleted + report.orphans_deleted > 0 {
            info!(
                table = %ident, metadata_files = report.metadata_files_deleted,
                orphans = report.orphans_deleted, "deleted files no reader needs"
            );
        }
        Ok(report)
    }

    /// Counts what the table's current state costs a reader.
    pub async fn health(&self, ident: &TableIdent) -> Result<TableHealth, MaintenanceError> {
        table_health(&self.catalog.load_table(ident).await?).await
    }

    async fn held(&self, at: &str) {
        if !self.hold.is_zero() {
            info!(
                at,
                hold_ms = self.hold.as_millis() as u64,
                "maintenance holding (drill)"
            );
            tokio::time::sleep(self.hold).await;
        }
    }
}

/// Smallest size tier: files under 4× this share tier 0.
const TIER_BASE_BYTES: u64 = 64 << 10;

/// Size tier of a file: files within a factor of 4 of each other share one.
fn size_tier(bytes: u64) -> u32 {
    (bytes / TIER_BASE_BYTES).max(1).ilog2() / 2
}

/// Which of `files` ((table partition, bytes) each) to compact this pass,
/// in groups that are each rewritten together: per table partition and size
/// tier, the files under `small_file_bytes` once there are
/// `min_files_to_compact` of them, smallest first within what is left of
/// `max_rewrite_bytes`. Compacting only peers of one tier makes a file
/// rewritten once per tier it climbs (about log4 of how much it grows), not
/// once per pass: rewriting every small file of a partition each pass would
/// read and write a growing file again and again.
fn pick_compaction(files: &[(String, u64)], config: &MaintenanceConfig) -> Vec<Vec<usize>> {
    let mut tiers: BTreeMap<(&str, u32), Vec<usize>> = BTreeMap::new();
    for (index, (partition, bytes)) in files.iter().enumerate() {
        if *bytes < config.small_file_bytes {
            tiers
                .entry((partition.as_str(), size_tier(*bytes)))
                .or_default()
                .push(index);
        }
    }
    let mut groups = Vec::new();
    let mut budget = config.max_rewrite_bytes;
    for mut indexes in tiers.into_values() {
        indexes.sort_by_key(|&i| files[i].1);
        let mut group = Vec::new();
        for index in indexes {
            if files[index].1 > budget {
                break;
            }
            budget -= files[index].1;
            group.push(index);
        }
        if group.len() >= config.min_files_to_compact {
            groups.push(group);
        } else {
            budget += group.iter().map(|&i| files[i].1).sum::<u64>();
        }
    }
    groups
}

/// Counts what `table`'s current state costs a reader.
pub async fn table_health(table: &Table) -> Result<TableHealth, MaintenanceError> {
    let mut health = TableHealth {
        snapshots: table.metadata().snapshots().count(),
        ..TableHealth::default()
    };
    if let Some(snapshot) = table.metadata().current_snapshot() {
        let list = table.manifest_list_reader(snapshot).load().await?;
        health.manifests = list.entries().len();
        health.manifest_list_bytes = table
            .file_io()
            .new_input(snapshot.manifest_list())?
            .metadata()
            .await?
            .size;
        for manifest in list.entries() {
            let loaded = manifest.load_manifest(table.file_io()).await?;
            for entry in loaded.entries().iter().filter(|e| e.is_alive()) {
                health.data_files += 1;
                health.data_bytes += entry.file_size_in_bytes();
                health.rows += entry.record_count();
            }
        }
    }
    if let Some(root) = local_path(table.metadata().location()) {
        for file in list_files(&root.join("metadata"))? {
            health.metadata_files += 1;
            health.metadata_bytes += file.bytes;
        }
    }
    Ok(health)
}

fn abandoned(ident: &TableIdent, why: &str) -> MaintenanceError {
    MaintenanceError::Iceberg(iceberg::Error::new(
        iceberg::ErrorKind::DataInvalid,
        format!("{ident}: rewrite abandoned, {why}; its files are deleted"),
    ))
}

/// A positive snapshot id the table has not used.
fn new_snapshot_id(table: &Table) -> i64 {
    loop {
        let id = rand::random::<i64>() & i64::MAX;
        if id != 0 && table.metadata().snapshot_by_id(id).is_none() {
            return id;
        }
    }
}

/// A replace snapshot's summary: the parent's totals (unchanged rows),
/// what moved, and every `k2.offsets.*` key of the parent unchanged.
fn replace_summary(parent: &Summary, added: &[DataFile], removed: &[DataFile]) -> Summary {
    let sum = |files: &[DataFile], f: fn(&DataFile) -> u64| files.iter().map(f).sum::<u64>();
    let added_files = added.len() as i64;
    let removed_files = removed.len() as i64;
    let added_bytes = sum(added, DataFile::file_size_in_bytes) as i64;
    let removed_bytes = sum(removed, DataFile::file_size_in_bytes) as i64;
    let records = sum(added, DataFile::record_count);
    let mut properties: HashMap<String, String> = parent
        .additional_properties
        .iter()
        .filter(|(key, _)| key.starts_with("total-") || key.starts_with(OFFSETS_KEY_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut adjust = |key: &str, delta: i64| {
        if let Some(value) = properties.get_mut(key)
            && let Ok(total) = value.parse::<i64>()
        {
            *value = (total + delta).to_string();
        }
    };
    adjust("total-data-files", added_files - removed_files);
    adjust("total-files-size", added_bytes - removed_bytes);
    if added_files + removed_files > 0 {
        properties.extend([
            ("added-data-files".to_string(), added_files.to_string()),
            ("deleted-data-files".to_string(), removed_files.to_string()),
            ("added-records".to_string(), records.to_string()),
            ("deleted-records".to_string(), records.to_string()),
            ("added-files-size".to_string(), added_bytes.to_string()),
            ("removed-files-size".to_string(), removed_bytes.to_string()),
        ]);
    }
    Summary {
        operation: Operation::Replace,
        additional_properties: properties,
    }
}

/// Files a set of snapshots reference.
#[derive(Default)]
struct Referenced {
    manifest_lists: HashSet<String>,
    manifests: HashSet<String>,
    data_files: HashSet<String>,
}

impl Referenced {
    fn contains(&self, uri: &str) -> bool {
        self.manifest_lists.contains(uri) || self.manifests.contains(uri) || self.data_files.contains(uri)
    }
}

async fn referenced_files(
    table: &Table,
    snapshots: impl Iterator<Item = SnapshotRef>,
) -> Result<Referenced, MaintenanceError> {
    let mut out = Referenced::default();
    for snapshot in snapshots {
        out.manifest_lists.insert(snapshot.manifest_list().to_string());
        let list = table.manifest_list_reader(&snapshot).load().await?;
        for manifest in list.entries() {
            if !out.manifests.insert(manifest.manifest_path.clone()) {
                continue;
            }
            let loaded = manifest.load_manifest(table.file_io()).await?;
            // Live entries only: a file a snapshot marks deleted is read by
            // the snapshots before it, whose own manifests list it as live.
            out.data_files.extend(
                loaded
                    .entries()
                    .iter()
                    .filter(|e| e.is_alive())
                    .map(|e| e.file_path().to_string()),
            );
        }
    }
    Ok(out)
}

async fn delete_all(io: &iceberg::io::FileIO, paths: &[String]) -> Result<usize, MaintenanceError> {
    for path in paths {
        io.delete(path).await?;
    }
    Ok(paths.len())
}

/// Deletes files a failed step wrote; a file left behind is an orphan the
/// next cleanup takes.
async fn delete_quietly(io: &iceberg::io::FileIO, paths: &[String]) {
    for path in paths {
        if let Err(err) = io.delete(path).await {
            warn!(path, error = %err, "could not delete a file of a failed rewrite; orphan cleanup will");
        }
    }
}

/// The version number a metadata.json file name starts with
/// (`00042-<uuid>.metadata.json`).
fn metadata_version(name: &str) -> Option<u64> {
    let name = name.rsplit('/').next()?;
    if !name.ends_with(".metadata.json") && !name.ends_with(".metadata.json.gz") {
        return None;
    }
    name.split('-').next()?.parse().ok()
}

fn local_path(location: &str) -> Option<PathBuf> {
    location.strip_prefix("file://").map(PathBuf::from)
}

struct ListedFile {
    path: PathBuf,
    bytes: u64,
    modified: SystemTime,
}

fn list_files(root: &Path) -> Result<Vec<ListedFile>, MaintenanceError> {
    let io = |context: String| move |source| MaintenanceError::Io { context, source };
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(io(format!("failed to list {}", dir.display()))(err)),
        };
        for entry in entries {
            let entry = entry.map_err(io(format!("failed to list {}", dir.display())))?;
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                // Deleted since it was listed (a cleanup or a lost race).
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(io(format!("failed to stat {}", entry.path().display()))(err)),
            };
            if meta.is_dir() {
                dirs.push(entry.path());
            } else {
                out.push(ListedFile {
                    path: entry.path(),
                    bytes: meta.len(),
                    modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
    }
    Ok(out)
}

/// `batch` as the table's Arrow schema, columns by name: Parquet may hand
/// back a timezone or field metadata spelled differently from the table's;
/// the values are the same.
fn in_table_schema(schema: &SchemaRef, batch: &RecordBatch) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| {
            let column = batch.column_by_name(field.name()).ok_or_else(|| {
                arrow_schema::ArrowError::SchemaError(format!("a data file has no column {}", field.name()))
            })?;
            if column.data_type() == field.data_type() {
                Ok(column.clone())
            } else {
                arrow_cast::cast(column, field.data_type())
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns)
}

/// Each written file's rows, with their share of the batch's bytes: the
/// writer wrote `batch`'s rows in order, file after file, so a file is the
/// slice of its record count. Nothing if the counts do not add up to the batch.
fn file_slices(batch: &RecordBatch, written: &[DataFile]) -> Vec<(String, RecordBatch, u64)> {
    let rows = batch.num_rows();
    let counts: Vec<usize> = written.iter().map(|f| f.record_count() as usize).collect();
    if rows == 0 || counts.iter().sum::<usize>() != rows {
        return Vec::new();
    }
    let bytes = batch.get_array_memory_size() as u128;
    let mut offset = 0;
    let mut slices = Vec::with_capacity(written.len());
    for (file, count) in written.iter().zip(counts) {
        let share = (bytes * count as u128 / rows as u128) as u64;
        slices.push((file.file_path().to_string(), batch.slice(offset, count), share));
        offset += count;
    }
    slices
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MaintenanceConfig {
        MaintenanceConfig {
            small_file_bytes: 32 << 20,
            min_files_to_compact: 4,
            max_rewrite_bytes: 512 << 20,
            ..MaintenanceConfig::default()
        }
    }

    #[test]
    fn compaction_waits_for_enough_small_peers_per_partition_and_tier() {
        let day = |d: &str, kib: u64| (d.to_string(), kib << 10);
        let files = vec![
            day("d1", 10),
            day("d1", 12),
            day("d1", 9),
            day("d2", 10),
            day("d1", 11),
            day("d1", 2_000),
            day("d1", 64 << 10),
        ];
        // d1 has four tier-0 files; its 2 MB file has no peers and its 64 MiB one is not small.
        assert_eq!(pick_compaction(&files, &config()), vec![vec![2, 0, 4, 1]]);
        let few = &files[..3];
        assert!(pick_compaction(few, &config()).is_empty(), "three are not enough");
        let tight = MaintenanceConfig {
            max_rewrite_bytes: 40 << 10,
            ..config()
        };
        assert!(
            pick_compaction(&files, &tight).is_empty(),
            "over the pass's budget"
        );
    }

    #[test]
    fn each_byte_is_rewritten_about_once_per_tier_not_once_per_pass() {
        // 2,000 passes, each after one ingestion commit of a 16 KiB file.
        let config = config();
        let mut files: Vec<(String, u64)> = Vec::new();
        let (mut ingested, mut rewritten) = (0u64, 0u64);
        for _ in 0..2_000 {
            files.push(("d".into(), 16 << 10));
            ingested += 16 << 10;
            let groups = pick_compaction(&files, &config);
            let picked: Vec<usize> = groups.iter().flatten().copied().collect();
            let mut kept: Vec<(String, u64)> = files
                .iter()
                .enumerate()
                .filter(|(i, _)| !picked.contains(i))
                .map(|(_, f)| f.clone())
                .collect();
            for group in &groups {
                let bytes: u64 = group.iter().map(|&i| files[i].1).sum();
                rewritten += bytes;
                kept.push(("d".into(), bytes));
            }
            files = kept;
        }
        let amplification = rewritten as f64 / ingested as f64;
        assert!(
            amplification < 6.0,
            "each byte rewritten {amplification:.1} times"
        );
        assert!(files.len() < 20, "{} files left", files.len());
    }

    #[test]
    fn metadata_version_is_read_from_the_file_name() {
        assert_eq!(metadata_version("00042-0b1c.metadata.json"), Some(42));
        assert_eq!(
            metadata_version("file:///w/t/metadata/00007-ab.metadata.json"),
            Some(7)
        );
        assert_eq!(metadata_version("snap-1-0-ab.avro"), None);
        assert_eq!(metadata_version("ab-m0.avro"), None);
    }

    #[test]
    fn replace_summary_keeps_offsets_and_totals_and_counts_the_move() {
        let parent = Summary {
            operation: Operation::Append,
            additional_properties: HashMap::from([
                (
                    "k2.offsets.trades".to_string(),
                    r#"{"0":{"next":10}}"#.to_string(),
                ),
                ("total-records".to_string(), "100".to_string()),
                ("total-data-files".to_string(), "10".to_string()),
                ("total-files-size".to_string(), "1000".to_string()),
                ("added-records".to_string(), "7".to_string()),
            ]),
        };
        let summary = replace_summary(&parent, &[], &[]);
        assert_eq!(summary.operation, Operation::Replace);
        let props = &summary.additional_properties;
        assert_eq!(props["k2.offsets.trades"], r#"{"0":{"next":10}}"#);
        assert_eq!(props["total-records"], "100");
        assert_eq!(props["total-data-files"], "10");
        assert!(
            !props.contains_key("added-records"),
            "a manifest-only rewrite adds nothing"
        );
    }

    #[test]
    fn compaction_sorts_trades_by_exchange_symbol_and_time_and_leaves_other_tables_be() {
        use arrow_array::{Int64Array, StringArray};
        let trades = RecordBatch::try_from_iter([
            (
                "exchange",
                Arc::new(StringArray::from(vec!["B", "A", "A", "A"])) as _,
            ),
            (
                "symbol",
                Arc::new(StringArray::from(vec!["X", "Y", "X", "X"])) as _,
            ),
            ("event_time", Arc::new(Int64Array::from(vec![1, 1, 9, 5])) as _),
            ("kafka_offset", Arc::new(Int64Array::from(vec![0, 1, 2, 3])) as _),
        ])
        .unwrap();
        let schema = trades.schema();
        let offsets_of = |batch: &RecordBatch| {
            let offsets = batch.column_by_name("kafka_offset").unwrap();
            offsets
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values()
                .to_vec()
        };
        let sorted = sorted_for_queries(&schema, std::slice::from_ref(&trades)).unwrap();
        assert_eq!(offsets_of(&sorted), vec![3, 2, 1, 0]);
        // The same rows in several batches, one of them empty, sort the same.
        let parts = [
            trades.slice(0, 1),
            trades.slice(1, 0),
            trades.slice(1, 2),
            trades.slice(3, 1),
        ];
        let sorted = sorted_for_queries(&schema, &parts).unwrap();
        assert_eq!(offsets_of(&sorted), vec![3, 2, 1, 0]);
        assert_eq!(sorted_for_queries(&schema, &[]).unwrap().num_rows(), 0);
        let other =
            RecordBatch::try_from_iter([("reason", Arc::new(StringArray::from(vec!["b", "a"])) as _)])
                .unwrap();
        let halves = [other.slice(0, 1), other.slice(1, 1)];
        assert_eq!(sorted_for_queries(&other.schema(), &halves).unwrap(), other);
    }
}
