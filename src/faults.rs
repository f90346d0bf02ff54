//! Injected faults: typed, reversible switches that make a real failure
//! path run on purpose (tests, demos, drills). Nothing here fakes data; a
//! fault makes a real component fail the way an outage would.
//!
//! - `catalog_down`: every Iceberg commit and offset load fails before reaching the catalog,
//!   as if the catalog were unreachable.
//! - `panic_stage`: the named stage of the lane for a partition panics on
//!   its next chunk (once).
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

use async_trait::async_trait;
use iceberg::table::Table;
use iceberg::{Catalog, Namespace, NamespaceIdent, Result, TableCommit, TableCreation, TableIdent};

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

#[async_trait]
impl Catalog for FaultInjectingCatalog {
    async fn list_namespaces(&self, parent: Option<&NamespaceIdent>) -> Result<Vec<NamespaceIdent>> {
        self.inner.list_namespaces(parent).await
    }
    async fn create_namespace(
        &self,
        namespace: &NamespaceIdent,
        properties: HashMap<String, String>,
    ) -> Result<Namespace> {
        self.inner.create_namespace(namespace, properties).await
    }
    async fn get_namespace(&self, namespace: &NamespaceIdent) -> Result<Namespace> {
        self.inner.get_namespace(namespace).await
    }
    async fn namespace_exists(&self, namespace: &NamespaceIdent) -> Result<bool> {
        self.inner.namespace_exists(namespace).await
    }
    async fn update_namespace(
        &self,
        namespace: &NamespaceIdent,
        properties: HashMap<String, String>,
    ) -> Result<()> {
        self.inner.update_namespace(namespace, properties).await
    }
    async fn drop_namespace(&self, namespace: &NamespaceIdent) -> Result<()> {
        self.inner.drop_namespace(namespace).await
    }
    async fn list_tables(&self, namespace: &NamespaceIdent) -> Result<Vec<TableIdent>> {
        self.inner.list_tables(namespace).await
    }
    async fn create_table(&self, namespace: &NamespaceIdent, creation: TableCreation) -> Result<Table> {
        self.inner.create_table(namespace, creation).await
    }
    async fn load_table(&self, table: &TableIdent) -> Result<Table> {
        self.inner.load_table(table).await
    }
    async fn drop_table(&self, table: &TableIdent) -> Result<()> {
        self.inner.drop_table(table).await
    }
    async fn purge_table(&self, table: &TableIdent) -> Result<()> {
        self.inner.purge_table(table).await
    }
    async fn table_exists(&self, table: &TableIdent) -> Result<bool> {
        self.inner.table_exists(table).await
    }
    async fn rename_table(&self, src: &TableIdent, dest: &TableIdent) -> Result<()> {
        self.inner.rename_table(src, dest).await
    }
    async fn register_table(&self, table: &TableIdent, metadata_location: String) -> Result<Table> {
        self.inner.register_table(table, metadata_location).await
    }
    async fn update_table(&self, commit: TableCommit) -> Result<Table> {
        let lost = self
            .tables
            .kind(commit.identifier())
            .is_some_and(|table| self.faults.take_lost_commit(table));
        if !lost {
            return self.inner.update_table(commit).await;
        }
        let ident = commit.identifier().clone();
        let current = self.inner.load_table(&ident).await?;
        let staged = commit.apply(current)?;
        let location = iceberg::MetadataLocation::from_str(staged.metadata_location_result()?)?;
        staged.metadata().write_to(staged.file_io(), &location).await?;
        tracing::warn!(table = %ident, "injected fault: the catalog reports a commit it did not make");
        Ok(staged)
    }
}
