//! Injected faults: typed, reversible switches that make a real failure
//! path run on purpose (tests, demos, drills). Nothing here fakes data; a
//! fault makes a real component fail the way an outage would.
//!
//! - `catalog_down`: every Iceberg commit and offset load fails before reaching the catalog,
//!   as if the catalog were unreachable.
//! - `panic_stage`: the named stage of the lane for a partition panics on
//!   its next chunk (once).
//! - `slow_stage`: a stage of one partition's lane waits this long per chunk
//!   (the partition consumer so far: that lane reads slowly).
//! - `hold_after_commit`: every successful commit waits before its stage
//!   state is put in force and its lanes are told (a drill aims a kill there).
//! - `lose_commits`: the catalog answers "committed" to the next commits of
//!   a table without making them, as the SQL catalog does when the
//!   database's COMMIT fails (apache/iceberg-rust#3061; see
//!   [`FaultInjectingCatalog`]).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iceberg::Catalog;

use crate::messages::Stage;
use crate::storage::tables::{K2Table, TableIdents};

#[derive(Debug, Default)]
pub struct Faults {
    catalog_down: AtomicBool,
    /// Fast path: set while a panic is armed.
    panic_armed: AtomicBool,
    panic: Mutex<Option<(Stage, i32)>>,
    /// Fast path: set while a lost commit is armed.
    lost_armed: AtomicBool,
    /// Per table: how many of its next commits are lost.
    lost_commits: Mutex<HashMap<K2Table, u32>>,
    hold_after_commit_ms: AtomicU64,
    /// Fast path: set while a slow stage is armed.
    slow_armed: AtomicBool,
    slow: Mutex<Option<(Stage, i32, Duration)>>,
}

impl Faults {
    pub fn set_catalog_down(&self, down: bool) {
        self.catalog_down.store(down, Relaxed);
    }

    pub fn catalog_down(&self) -> bool {
        self.catalog_down.load(Relaxed)
    }

    /// Makes `stage` of `partition`'s lane panic on its next chunk.
    pub fn arm_panic(&self, stage: Stage, partition: i32) {
        *self.panic.lock().expect("faults lock") = Some((stage, partition));
        self.panic_armed.store(true, Relaxed);
    }

    /// Called by stages per chunk: panics if this stage and partition are armed.
    pub fn check_panic(&self, stage: Stage, partition: i32) {
        if !self.panic_armed.load(Relaxed) {
            return;
        }
        let mut armed = self.panic.lock().expect("faults lock");
        if armed
            .as_ref()
            .is_some_and(|(s, p)| *s == stage && *p == partition)
        {
            *armed = None;
            self.panic_armed.store(false, Relaxed);
            drop(armed);
            panic!("injected fault: {stage} of partition {partition} panics");
        }
    }

    /// The catalog answers "committed" to the next `count` commits of
    /// `table` without making them.
    pub fn lose_commits(&self, table: K2Table, count: u32) {
        let mut lost = self.lost_commits.lock().expect("faults lock");
        lost.insert(table, count);
        self.lost_armed.store(lost.values().any(|n| *n > 0), Relaxed);
    }

    /// Called by the catalog per commit: true if this commit of `table` is
    /// to be lost (and counts it).
    pub fn take_lost_commit(&self, table: K2Table) -> bool {
        if !self.lost_armed.load(Relaxed) {
            return false;
        }
        let mut lost = self.lost_commits.lock().expect("faults lock");
        let take = match lost.get_mut(&table) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        self.lost_armed.store(lost.values().any(|n| *n > 0), Relaxed);
        take
    }

    /// Makes `stage` of `partition`'s lane wait `delay` per chunk, until cleared.
    pub fn slow_stage(&self, stage: Stage, partition: i32, delay: Duration) {
        *self.slow.lock().expect("faults lock") = Some((stage, partition, delay));
        self.slow_armed.store(true, Relaxed);
    }

    pub fn clear_slow_stage(&self) {
        *self.slow.lock().expect("faults lock") = None;
        self.slow_armed.store(false, Relaxed);
    }

    /// Called by stages per chunk: how long this stage of this partition's
    /// lane waits, if it is slowed.
    pub fn chunk_delay(&self, stage: Stage, partition: i32) -> Option<Duration> {
        if !self.slow_armed.load(Relaxed) {
            return None;
        }
        let slow = self.slow.lock().expect("faults lock");
        slow.filter(|(s, p, _)| *s == stage && *p == partition)
            .map(|(_, _, delay)| delay)
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
