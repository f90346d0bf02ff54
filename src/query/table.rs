//! `market.trades` at one snapshot, for DataFusion. K2 plans the scan
//! itself: the snapshot's manifest list, each manifest parsed once (a
//! manifest never changes, and each commit adds one, so a query parses only
//! those new since the last: [`ManifestCache`]), each live data file kept if
//! its column bounds may hold rows the filters want. A planned file's rows
//! come from [`RecentFiles`] when K2 still holds the batch it wrote the file
//! from, else from the file through Iceberg's Arrow reader (which also skips
//! row groups by their statistics). A snapshot with delete files is planned
//! by Iceberg's own scan, deletes applied.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arrow_array::{RecordBatch, RecordBatchOptions};
use arrow_schema::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::TableProviderFilterPushDown;
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties};
use datafusion::prelude::Expr;
use futures::{StreamExt, TryStreamExt};
use iceberg::expr::{Bind, BoundPredicate, PredicateOperator};
use iceberg::scan::FileScanTask;
use iceberg::spec::{DataFile, Manifest, ManifestContentType, ManifestList, PrimitiveLiteral, SnapshotRef};
use iceberg::table::Table;
use iceberg_datafusion::physical_plan::convert_filters_to_predicate;

use super::recent::{Held, RecentFiles};

fn iceberg_error(err: iceberg::Error) -> DataFusionError {
    DataFusionError::External(Box::new(err))
}

/// Parsed manifests by path, those of the last snapshot planned, and that
/// snapshot's manifest list.
#[derive(Debug, Default)]
pub struct ManifestCache {
    by_path: std::sync::Mutex<HashMap<String, Arc<Manifest>>>,
    /// The manifests a table rewrite wrote, parsed by the maintainer before
    /// its snapshot commits ([`ManifestCache::stage`]): the first query after
    /// a compaction finds its merged manifests here instead of parsing them
    /// (hundreds of entries, one per file it replaced, in the query's time).
    /// Apart from `by_path`, which a query of the older snapshot replaces
    /// wholesale; only the last rewrite's, so it stays bounded when a
    /// rewrite never commits.
    staged: std::sync::Mutex<HashMap<String, Arc<Manifest>>>,
    /// The last manifest list read, by its path: queries come many times a
    /// commit, and a list (one entry a commit since the last manifest merge)
    /// never changes once written.
    list: std::sync::Mutex<Option<(String, Arc<ManifestList>)>>,
}

impl ManifestCache {
    fn by_path(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Manifest>>> {
        self.by_path.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn staged(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Manifest>>> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `manifests`, by path, are what a snapshot about to commit lists;
    /// they replace those staged before.
    pub fn stage(&self, manifests: Vec<(String, Arc<Manifest>)>) {
        *self.staged() = manifests.into_iter().collect();
    }

    /// The manifest at `path` if a query or a rewrite parsed it.
    pub fn cached(&self, path: &str) -> Option<Arc<Manifest>> {
        let found = self.by_path().get(path).cloned();
        found.or_else(|| self.staged().get(path).cloned())
    }

    fn last_list(&self) -> std::sync::MutexGuard<'_, Option<(String, Arc<ManifestList>)>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The manifest list of `snapshot`, read once.
    pub async fn list(&self, table: &Table, snapshot: &SnapshotRef) -> iceberg::Result<Arc<ManifestList>> {
        let path = snapshot.manifest_list();
        if let Some((cached, list)) = &*self.last_list()
            && cached == path
        {
            return Ok(list.clone());
        }
        let list = Arc::new(table.manifest_list_reader(snapshot).load().await?);
        *self.last_list() = Some((path.to_string(), list.clone()));
        Ok(list)
    }

    /// The manifests of `list`, parsing only those not parsed before; the
    /// cache then holds exactly these (what newer snapshots still list).
    pub async fn manifests(&self, table: &Table, list: &ManifestList) -> iceberg::Result<Vec<Arc<Manifest>>> {
        let cached: Vec<Option<Arc<Manifest>>> = {
            let (by_path, staged) = (self.by_path(), self.staged());
            list.entries()
                .iter()
                .map(|file| {
                    let path = &file.manifest_path;
                    by_path.get(path).or_else(|| staged.get(path)).cloned()
                })
                .collect()
        };
        let file_io = table.file_io().clone();
        let manifests: Vec<Arc<Manifest>> =
            futures::stream::iter(list.entries().to_vec().into_iter().zip(cached))
                .map(move |(file, cached)| {
                    let file_io = file_io.clone();
                    async move {
                        match cached {
                            Some(manifest) => Ok(manifest),
                            None => file.load_manifest(&file_io).await.map(Arc::new),
                        }
                    }
                })
                .buffered(8)
                .try_collect()
                .await?;
        let mut by_path = self.by_path();
        *by_path = list
            .entries()
            .iter()
            .zip(&manifests)
            .map(|(file, manifest)| (file.manifest_path.clone(), manifest.clone()))
            .collect();
        self.staged().retain(|path, _| !by_path.contains_key(path));
        Ok(manifests)
    }
}

/// The trades table pinned to the snapshot the cut loaded.
#[derive(Debug)]
pub struct TradesTable {
    table: Table,
    schema: SchemaRef,
    recent: Arc<RecentFiles>,
    manifests: Arc<ManifestCache>,
}

impl TradesTable {
    pub fn new(
        table: Table,
        recent: Arc<RecentFiles>,
        manifests: Arc<ManifestCache>,
    ) -> Result<Self, iceberg::Error> {
        let schema = Arc::new(iceberg::arrow::schema_to_arrow_schema(
            table.metadata().current_schema(),
        )?);
        Ok(Self {
            table,
            schema,
            recent,
            manifests,
        })
    }

    /// The files to read and the held batches, planned by K2 over cached
    /// manifests; None when the snapshot has delete files.
    async fn plan(
        &self,
        names: &[String],
        filters: &[Expr],
        schema: &SchemaRef,
    ) -> iceberg::Result<Option<Planned>> {
        let metadata = self.table.metadata();
        let Some(snapshot) = metadata.current_snapshot() else {
            return Ok(Some(Planned::default()));
        };
        let list = self.manifests.list(&self.table, snapshot).await?;
        if list
            .entries()
            .iter()
            .any(|m| m.content != ManifestContentType::Data)
        {
            return Ok(None);
        }
        let table_schema = metadata.current_schema().clone();
        let predicate = convert_filters_to_predicate(filters)
            .map(|p| p.rewrite_not().bind(table_schema.clone(), true))
            .transpose()?;
        let field_ids = names
            .iter()
            .map(|name| {
                table_schema.field_by_name(name).map(|f| f.id).ok_or_else(|| {
                    iceberg::Error::new(iceberg::ErrorKind::DataInvalid, format!("no column {name}"))
                })
            })
            .collect::<iceberg::Result<Vec<i32>>>()?;
        let mut keys = [None, None];
        if let Some(predicate) = &predicate {
            key_equalities(predicate, &mut keys);
        }
        let mut planned = Planned::default();
        for manifest in self.manifests.manifests(&self.table, &list).await? {
            for entry in manifest.entries() {
                let file = entry.data_file();
                // A held file is looked up by its index, before its bounds:
                // cheaper, and as narrow for the symbol it asks for.
                if !entry.is_alive() || planned.hold(&self.recent, file.file_path(), &keys, schema) {
                    continue;
                }
                if predicate.as_ref().is_some_and(|p| !may_hold(p, file)) {
                    continue;
                }
                planned.files.push(FileScanTask {
                    file_size_in_bytes: file.file_size_in_bytes(),
                    start: 0,
                    length: file.file_size_in_bytes(),
                    record_count: Some(file.record_count()),
                    data_file_path: file.file_path().to_string(),
                    data_file_format: file.file_format(),
                    schema: table_schema.clone(),
                    project_field_ids: field_ids.clone(),
                    predicate: predicate.clone(),
                    deletes: Vec::new(),
                    partition: Some(file.partition().clone()),
                    partition_spec: None,
                    name_mapping: None,
                    case_sensitive: true,
                });
            }
        }
        planned.coalesce(schema);
        Ok(Some(planned))
    }

    /// Iceberg's own planning, deletes included; held batches still replace
    /// the files they were written to when those have no deletes.
    async fn plan_with_iceberg(
        &self,
        names: Vec<String>,
        filters: &[Expr],
        schema: &SchemaRef,
    ) -> iceberg::Result<Planned> {
        let mut scan = self.table.scan().select(names);
        if let Some(predicate) = convert_filters_to_predicate(filters) {
            scan = scan.with_filter(predicate);
        }
        let tasks: Vec<FileScanTask> = scan.build()?.plan_files().await?.try_collect().await?;
        let mut planned = Planned::default();
        for task in tasks {
            if task.deletes.is_empty()
                && planned.hold(&self.recent, &task.data_file_path, &[None, None], schema)
            {
                continue;
            }
            planned.files.push(task);
        }
        planned.coalesce(schema);
        Ok(planned)
    }
}

/// What a scan reads: the rows K2 holds and the files it opens.
#[derive(Default)]
struct Planned {
    held: Vec<RecordBatch>,
    /// Files whose rows came from memory (`held` has no empty slices and
    /// may be coalesced, so it does not count them).
    held_files: usize,
    files: Vec<FileScanTask>,
}

impl Planned {
    /// Takes the file at `path` from memory, narrowed to `keys`, if K2
    /// holds it; false: the file is to be read.
    fn hold(
        &mut self,
        recent: &RecentFiles,
        path: &str,
        keys: &[Option<String>; 2],
        schema: &SchemaRef,
    ) -> bool {
        let batch = match recent.rows(path, keys[0].as_deref(), keys[1].as_deref()) {
            Held::NotKept => return false,
            Held::Nothing => None,
            Held::Rows(rows) => match project(&rows, schema) {
                Some(batch) => Some(batch),
                None => return false,
            },
        };
        self.held_files += 1;
        if let Some(batch) = batch.filter(|b| b.num_rows() > 0) {
            self.held.push(batch);
        }
        true
    }

    /// Held batches are one per file, mostly small slices: up to 64K rows
    /// become one batch, so the operators above do not pay per batch
    /// thousands of times.
    fn coalesce(&mut self, schema: &SchemaRef) {
        let rows: usize = self.held.iter().map(RecordBatch::num_rows).sum();
        if self.held.len() < 2 || rows > 65_536 {
            return;
        }
        if let Ok(one) = arrow_select::concat::concat_batches(schema, &self.held) {
            self.held = vec![one];
        }
    }
}

/// The values the predicate's conjuncts require of `exchange` and `symbol`.
fn key_equalities(predicate: &BoundPredicate, keys: &mut [Option<String>; 2]) {
    match predicate {
        BoundPredicate::And(both) => {
            let [a, b] = both.inputs();
            key_equalities(a, keys);
            key_equalities(b, keys);
        }
        BoundPredicate::Binary(expr) if expr.op() == PredicateOperator::Eq => {
            if let PrimitiveLiteral::String(value) = expr.literal().literal() {
                match expr.term().field().name.as_str() {
                    "exchange" => keys[0] = Some(value.clone()),
                    "symbol" => keys[1] = Some(value.clone()),
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// Whether `file`'s column bounds allow a row matching `predicate`: false
/// only when a bound rules it out; anything not understood may match.
fn may_hold(predicate: &BoundPredicate, file: &DataFile) -> bool {
    use std::cmp::Ordering::{Equal, Greater, Less};
    match predicate {
        BoundPredicate::AlwaysFalse => false,
        BoundPredicate::And(both) => {
            let [a, b] = both.inputs();
            may_hold(a, file) && may_hold(b, file)
        }
        BoundPredicate::Or(either) => {
            let [a, b] = either.inputs();
            may_hold(a, file) || may_hold(b, file)
        }
        BoundPredicate::Binary(expr) => {
            let id = expr.term().field().id;
            let value = expr.literal();
            // None: no bound, or one of another type: it rules nothing out.
            let lower = file.lower_bounds().get(&id).and_then(|l| l.partial_cmp(value));
            let upper = file.upper_bounds().get(&id).and_then(|u| u.partial_cmp(value));
            match expr.op() {
                PredicateOperator::Eq => lower != Some(Greater) && upper != Some(Less),
                PredicateOperator::LessThan => !matches!(lower, Some(Greater | Equal)),
                PredicateOperator::LessThanOrEq => lower != Some(Greater),
                PredicateOperator::GreaterThan => !matches!(upper, Some(Less | Equal)),
                PredicateOperator::GreaterThanOrEq => upper != Some(Less),
                _ => true,
            }
        }
        _ => true,
    }
}

#[async_trait]
impl TableProvider for TradesTable {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let schema = match projection {
            Some(columns) => Arc::new(self.schema.project(columns)?),
            None => self.schema.clone(),
        };
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let planned = match self.plan(&names, filters, &schema).await.map_err(iceberg_error)? {
            Some(planned) => planned,
            None => self
                .plan_with_iceberg(names, filters, &schema)
                .await
                .map_err(iceberg_error)?,
        };
        Ok(Arc::new(TradesScan {
            properties: Arc::new(PlanProperties::new(
                EquivalenceProperties::new(schema.clone()),
                Partitioning::UnknownPartitioning(1),
                EmissionType::Incremental,
                Boundedness::Bounded,
            )),
            schema,
            table: self.table.clone(),
            planned,
        }))
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DFResult<Vec<TableProviderFilterPushDown>> {
        // Iceberg prunes files and row groups with what converts; DataFusion
        // applies every filter to the rows.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }
}

/// `batch`'s columns of `schema`, by name; None if one is missing or of
/// another type (the file is read instead).
fn project(batch: &RecordBatch, schema: &SchemaRef) -> Option<RecordBatch> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| {
            batch
                .column_by_name(field.name())
                .filter(|column| column.data_type() == field.data_type())
                .cloned()
        })
        .collect::<Option<Vec<_>>>()?;
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    RecordBatch::try_new_with_options(schema.clone(), columns, &options).ok()
}

/// The planned files of one scan: the rows K2 holds, then the files it reads.
struct TradesScan {
    properties: Arc<PlanProperties>,
    schema: SchemaRef,
    table: Table,
    planned: Planned,
}

impl fmt::Debug for TradesScan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TradesScan")
            .field("held_files", &self.planned.held_files)
            .field("files", &self.planned.files.len())
            .finish_non_exhaustive()
    }
}

impl DisplayAs for TradesScan {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "TradesScan: files held in memory={}, files read={}",
            self.planned.held_files,
            self.planned.files.len()
        )
    }
}

impl ExecutionPlan for TradesScan {
    fn name(&self) -> &str {
        "TradesScan"
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, _partition: usize, _context: Arc<TaskContext>) -> DFResult<SendableRecordBatchStream> {
        let held = futures::stream::iter(self.planned.held.clone().into_iter().map(Ok));
        let read = if self.planned.files.is_empty() {
            futures::stream::empty().boxed()
        } else {
            let tasks = futures::stream::iter(self.planned.files.clone().into_iter().map(Ok)).boxed();
            self.table
                .reader_builder()
                .build()
                .read(tasks)
                .map_err(iceberg_error)?
                .stream()
                .map_err(iceberg_error)
                .boxed()
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            held.chain(read),
        )))
    }
}
