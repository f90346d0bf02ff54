//! The commit protocol: one Iceberg snapshot per table per epoch, carrying
//! the offsets the data covers, fenced against concurrent writers.
//!
//! Order within an epoch: the side tables first (`market.reference`,
//! `k2.dead_letters`, `k2.sequence_gaps`, `k2.probable_duplicates`,
//! `k2.shed_ledger`, each with its own offsets summary), then trades (in the trades table, whose offsets are the source
//! of truth for restarts). A crash in between replays the epoch: the trades
//! are written again (their offsets were not recorded) and side rows below a
//! side table's recorded offset are skipped, so no table holds anything
//! twice (the shed ledger, and probable duplicates that were dropped, are
//! written again: see `Replayed::Keep`).
//!
//! Every snapshot K2 makes is read back before it counts
//! ([`Committer::verify`]): the SQL catalog of iceberg-rust 0.10.1 reports a
//! commit whose database COMMIT failed as a success (apache/iceberg-rust#3061),
//! and a catalog that times out on COMMIT leaves the same doubt. See
//! `docs/adr/0006-verify-every-commit.md`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use iceberg::spec::DataFile;
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::{Catalog, TableIdent};
use tracing::warn;

use super::catalog::{FencedCatalog, is_fence_error};
use super::offsets::{OffsetsError, TopicOffsets, summary_key};
use super::tables::TableIdents;
use super::writer::{
    TableWriter, dead_letter_batch, probable_duplicates_batch, reference_batch, sequence_events_batch,
    shed_ledger_batch,
};
use crate::model::SideRows;

/// How many times one epoch is re-merged after losing a race to another writer.
const MAX_FENCE_RETRIES: usize = 20;

/// What one partition contributes to an epoch.
#[derive(Debug, Default)]
pub struct PartitionRange {
    pub partition: i32,
    pub first_offset: i64,
    pub next_offset: i64,
    pub files: Vec<DataFile>,
    pub rows: u64,
    /// Dead letters, sequence events and probable duplicates of the range.
    pub side: SideRows,
}

#[derive(Debug, Default)]
pub struct CommitOutcome {
    /// Partitions now durable up to these offsets.
    pub committed: BTreeMap<i32, i64>,
    /// Partitions refused: the table stands elsewhere (its next offset).
    pub fenced: Vec<(i32, Option<i64>)>,
    pub rows: u64,
    /// Reference-data rows written to `market.reference`.
    pub reference: u64,
    pub dead_letters: u64,
    pub sequence_events: u64,
    pub probable_duplicates: u64,
    pub shed_entries: u64,
    pub snapshot_id: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("iceberg: {0}")]
    Iceberg(#[from] iceberg::Error),
    #[error(transparent)]
    Offsets(#[from] OffsetsError),
    #[error("state store: {0}")]
    State(String),
    #[error(transparent)]
    Unavailable(crate::breaker::BreakerOpen),
    #[error("lost the commit race {0} times in a row")]
    TooManyConflicts(usize),
    #[error("failed to build a batch for one of K2's tables: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error(
        "the catalog reported a commit to {table} (snapshot {snapshot_id:?}) that the table does not \
         hold: it was not made (current snapshot {current:?})"
    )]
    NotPersisted {
        table: String,
        snapshot_id: Option<i64>,
        current: Option<i64>,
    },
}

impl CommitError {
    /// The fence refused the commit: the table moved; reload and re-merge.
    pub fn is_fence(&self) -> bool {
        matches!(self, CommitError::Iceberg(err) if is_fence_error(err))
    }

    /// `outcome` label of `k2_commits_total` for a failed commit.
    pub fn outcome_label(&self) -> &'static str {
        match self {
            CommitError::NotPersisted { .. } => "not_persisted",
            CommitError::Unavailable(_) => "unavailable",
            _ => "error",
        }
    }
}

/// What a side table does with a row of a replayed epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replayed {
    /// The table holds them already: skip them (the replay produces the same rows).
    Skip,
    /// Write them again. For the shed ledger: a replay may shed differently
    /// (the level changed), and a shed record missing from the ledger would
    /// be lost. Rows of the same shedding carry the same `entry_id`, which
    /// readers deduplicate on; a row whose records were committed after all
    /// is harmless (backfill skips trades the table holds). For a probable
    /// duplicate that was dropped: a replay may judge a record a probable
    /// duplicate that the first attempt kept (the Bloom filters moved on),
    /// and a dropped trade must always have its row. Readers deduplicate
    /// `k2.probable_duplicates` on (topic, partition, offset).
    Keep,
}

pub struct Committer {
    pub catalog: Arc<dyn Catalog>,
    pub idents: TableIdents,
    pub topic: String,
    pub writer_id: String,
    pub zstd_level: i32,
}

impl Committer {
    /// Loads the trades table and returns its recorded offsets.
    pub async fn load_offsets(&self) -> Result<TopicOffsets, CommitError> {
        let table = self.catalog.load_table(&self.idents.trades).await?;
        Ok(TopicOffsets::from_table(&table, &self.topic)?)
    }

    /// Commits one epoch. Ranges the table refuses are reported in
    /// `fenced`; their files are left out (orphans no reader sees).
    pub async fn commit(&self, ranges: &[PartitionRange]) -> Result<CommitOutcome, CommitError> {
        let reference = self
            .commit_side(
                &self.idents.reference,
                ranges,
                |side| &side.reference,
                |row| row.offset,
                |_| Replayed::Skip,
                reference_batch,
            )
            .await?;
        let dead_letters = self
            .commit_side(
                &self.idents.dead_letters,
                ranges,
                |side| &side.dead_letters,
                |row| row.offset,
                |_| Replayed::Skip,
                dead_letter_batch,
            )
            .await?;
        let sequence_events = self
            .commit_side(
                &self.idents.sequence_gaps,
                ranges,
                |side| &side.sequence_events,
                |row| row.reported_offset,
                |_| Replayed::Skip,
                sequence_events_batch,
            )
            .await?;
        let probable_duplicates = self
            .commit_side(
                &self.idents.probable_duplicates,
                ranges,
                |side| &side.probable_duplicates,
                |row| row.offset,
                |row| if row.kept { Replayed::Skip } else { Replayed::Keep },
                probable_duplicates_batch,
            )
            .await?;
        let shed = self
            .commit_side(
                &self.idents.shed_ledger,
                ranges,
                |side| &side.shed,
                |row| row.first_offset(),
                |_| Replayed::Keep,
                shed_ledger_batch,
            )
            .await?;
        let mut outcome = self.commit_trades(ranges).await?;
        outcome.reference = reference;
        outcome.dead_letters = dead_letters;
        outcome.sequence_events = sequence_events;
        outcome.probable_duplicates = probable_duplicates;
        outcome.shed_entries = shed;
        Ok(outcome)
    }

    /// Appends the ranges' rows of one side table, with the offsets they
    /// cover in its own summary. Rows at offsets the table already records
    /// (a replayed epoch) are skipped or kept as `replayed` says of each.
    #[allow(clippy::too_many_arguments)]
    async fn commit_side<R: Clone>(
        &self,
        ident: &TableIdent,
        ranges: &[PartitionRange],
        rows_of: impl Fn(&SideRows) -> &Vec<R>,
        offset_of: impl Fn(&R) -> i64,
        replayed: impl Fn(&R) -> Replayed,
        build_batch: impl Fn(&[R], &SchemaRef) -> Result<RecordBatch, arrow_schema::ArrowError>,
    ) -> Result<u64, CommitError> {
        if ranges.iter().all(|r| rows_of(&r.side).is_empty()) {
            return Ok(0);
        }
        for _ in 0..MAX_FENCE_RETRIES {
            let table = self.catalog.load_table(ident).await?;
            let mut offsets = TopicOffsets::from_table(&table, &self.topic)?;
            let in_table = offsets.clone();
            let mut rows = Vec::new();
            for range in ranges {
                let range_rows = rows_of(&range.side);
                if range_rows.is_empty() {
                    continue;
                }
                let committed_below = offsets.next_offset(range.partition).unwrap_or(i64::MIN);
                // A lane's tail: rows reported as it stopped, on an empty
                // range at its next offset, about records below it. New
                // unless the table already holds this tail (a retried
                // commit whose first attempt landed).
                let tail = range.first_offset == range.next_offset && committed_below <= range.next_offset;
                let new_tail = tail && !in_table.has_tail(range.partition, range.next_offset);
                rows.extend(
                    range_rows
                        .iter()
                        .filter(|r| {
                            new_tail || replayed(r) == Replayed::Keep || offset_of(r) >= committed_below
                        })
                        .cloned(),
                );
                if tail {
                    offsets.set_tail(range.partition, range.next_offset, &self.writer_id);
                } else {
                    offsets.set(
                        range.partition,
                        range.next_offset.max(committed_below),
                        &self.writer_id,
                    );
                }
            }
            if rows.is_empty() {
                return Ok(0);
            }
            let writer = TableWriter::new(&table, self.zstd_level, 64 << 20)?;
            let files = writer.write(build_batch(&rows, writer.arrow_schema())?).await?;
            match self.append(&table, files, &offsets).await {
                Ok(_) => return Ok(rows.len() as u64),
                Err(err) if err.is_fence() => {
                    warn!(table = %ident, "commit to a side table lost a race, re-merging");
                }
                Err(err) => return Err(err),
            }
        }
        Err(CommitError::TooManyConflicts(MAX_FENCE_RETRIES))
    }

    async fn commit_trades(&self, ranges: &[PartitionRange]) -> Result<CommitOutcome, CommitError> {
        for _ in 0..MAX_FENCE_RETRIES {
            let table = self.catalog.load_table(&self.idents.trades).await?;
            let mut offsets = TopicOffsets::from_table(&table, &self.topic)?;
            let mut outcome = CommitOutcome::default();
            let mut files = Vec::new();
            for range in ranges {
                match offsets.advance(
                    range.partition,
                    range.first_offset,
                    range.next_offset,
                    &self.writer_id,
                ) {
                    Ok(()) => {
                        outcome.committed.insert(range.partition, range.next_offset);
                        outcome.rows += range.rows;
                        files.extend(range.files.iter().cloned());
                    }
                    Err(OffsetsError::Fenced {
                        partition,
                        table_next,
                        ..
                    }) => {
                        outcome.fenced.push((partition, table_next));
                    }
                    Err(err) => return Err(err.into()),
                }
            }
            if outcome.committed.is_empty() {
                return Ok(outcome);
            }
            match self.append(&table, files, &offsets).await {
                Ok(table) => {
                    outcome.snapshot_id = table.metadata().current_snapshot_id();
                    return Ok(outcome);
                }
                Err(err) if err.is_fence() => {
                    warn!(table = %self.idents.trades, "commit lost a race to another writer, re-merging offsets");
                }
                Err(err) => return Err(err),
            }
        }
        Err(CommitError::TooManyConflicts(MAX_FENCE_RETRIES))
    }

    /// Appends `files` to `base` with `offsets` in the snapshot summary, only
    /// if the table has not moved past `base`, and only counts it once the
    /// table shows it.
    async fn append(
        &self,
        base: &Table,
        files: Vec<DataFile>,
        offsets: &TopicOffsets,
    ) -> Result<Table, CommitError> {
        let properties = HashMap::from([(summary_key(&self.topic), offsets.to_json())]);
        let tx = Transaction::new(base);
        let tx = tx
            .fast_append()
            .add_data_files(files)
            .with_check_duplicate(false)
            .set_snapshot_properties(properties)
            .apply(tx)?;
        let committed = tx
            .commit(&FencedCatalog::new(self.catalog.as_ref(), base))
            .await?;
        self.verify(&committed).await?;
        Ok(committed)
    }

    /// Reads the table back and checks that it holds the snapshot the
    /// catalog just reported: only then did the commit happen. A catalog
    /// whose COMMIT failed or timed out after the change was sent may answer
    /// success either way; the snapshot is in the table's history (another
    /// writer may have committed on top of it since) or it was never made.
    pub async fn verify(&self, committed: &Table) -> Result<(), CommitError> {
        let started = Instant::now();
        let ident = committed.identifier();
        let current = self.catalog.load_table(ident).await?;
        metrics::histogram!(crate::metrics::COMMIT_VERIFY_DURATION).record(started.elapsed().as_secs_f64());
        let made = committed.metadata().current_snapshot_id();
        let held = made.is_some_and(|id| current.metadata().snapshot_by_id(id).is_some());
        if !held {
            tracing::error!(
                table = %ident, snapshot_id = ?made,
                "the catalog reported a commit the table does not hold; it will be made again"
            );
            return Err(CommitError::NotPersisted {
                table: ident.to_string(),
                snapshot_id: made,
                current: current.metadata().current_snapshot_id(),
            });
        }
        Ok(())
    }

    /// Appends `files` to `base` in a snapshot whose summary carries every
    /// `k2.offsets.*` key of `base`'s snapshot forward unchanged, plus
    /// `properties`. For writers that add rows without consuming Kafka
    /// (`k2 backfill`): the offsets say where the pipeline resumes, and such
    /// a commit must not move them. One attempt, fenced like every commit:
    /// refused ([`is_fence_error`]) if the table moved past `base`.
    pub async fn append_keeping_offsets(
        &self,
        base: &Table,
        files: Vec<DataFile>,
        properties: &HashMap<String, String>,
    ) -> Result<Table, CommitError> {
        let mut summary = properties.clone();
        if let Some(snapshot) = base.metadata().current_snapshot() {
            summary.extend(
                snapshot
                    .summary()
                    .additional_properties
                    .iter()
                    .filter(|(key, _)| key.starts_with(super::offsets::OFFSETS_KEY_PREFIX))
                    .map(|(key, value)| (key.clone(), value.clone())),
            );
        }
        let tx = Transaction::new(base);
        let tx = tx
            .fast_append()
            .add_data_files(files)
            .with_check_duplicate(false)
            .set_snapshot_properties(summary)
            .apply(tx)?;
        let committed = tx
            .commit(&FencedCatalog::new(self.catalog.as_ref(), base))
            .await?;
        self.verify(&committed).await?;
        Ok(committed)
    }

    /// [`Committer::append_keeping_offsets`] onto the newest snapshot of
    /// `ident`: when another writer commits first, reloads the table, takes
    /// its offsets as they now stand and appends again.
    pub async fn append_keeping_offsets_retrying(
        &self,
        ident: &TableIdent,
        files: Vec<DataFile>,
        properties: &HashMap<String, String>,
    ) -> Result<Table, CommitError> {
        for _ in 0..MAX_FENCE_RETRIES {
            let base = self.catalog.load_table(ident).await?;
            match self
                .append_keeping_offsets(&base, files.clone(), properties)
                .await
            {
                Ok(table) => return Ok(table),
                Err(err) if err.is_fence() => {
                    warn!(table = %ident, "append lost a race to another writer, retrying on the new snapshot");
                }
                Err(err) => return Err(err),
            }
        }
        Err(CommitError::TooManyConflicts(MAX_FENCE_RETRIES))
    }
}
