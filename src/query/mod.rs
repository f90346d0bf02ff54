//! Hybrid queries: the trades table at one snapshot plus the rows K2 has
//! consumed since, through DataFusion, each trade exactly once.
//!
//! A query takes a [`Cut`]: it reads every lane's live rows first
//! ([`live::LiveRows::snapshot`]), then loads the trades table, whose current
//! snapshot S records the next offset of each partition. The live rows kept
//! are those at or above S's offset of their partition: the rows below it are
//! in S. A commit that lands between the two reads is in S and its rows are
//! dropped from the live side; one that lands after S was read leaves its
//! rows live. So a trade is seen once before, during and after the commit that
//! makes it durable, with no deduplication by guesswork (ADR 0011).
//!
//! Queries run on a runtime of their own (`query.threads`), each bounded by
//! `query.max_rows`, `query.timeout_ms` and `query.memory_limit_bytes`. They
//! touch ingestion only through the live rows' per-lane lock, held while a
//! lane's buffer is copied.

pub mod cli;
pub mod live;
pub mod output;
pub mod recent;
pub mod table;
pub mod trades;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use datafusion::catalog::{MemorySchemaProvider, SchemaProvider};
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};
use datafusion::sql::sqlparser::parser::ParserError;
use iceberg::table::Table;
use iceberg::{Catalog, TableIdent};
use iceberg_datafusion::IcebergStaticTableProvider;
use recent::RecentFiles;
use table::{ManifestCache, TradesTable};

use crate::config::QueryConfig;
use crate::storage::catalog::CatalogDb;
use crate::storage::maintenance::MetadataSwap;
use crate::storage::offsets::TopicOffsets;
use crate::storage::tables::TableIdents;
use live::LiveRows;

/// Why a query has no answer. Each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A parameter or the SQL is wrong: the message names what.
    #[error("{0}")]
    BadRequest(String),
    /// The SQL is not a query (DDL, DML, COPY, SET...).
    #[error("only queries are allowed: {0}")]
    NotAQuery(String),
    #[error("the query ran longer than query.timeout_ms ({0} ms) and was stopped")]
    Timeout(u64),
    #[error("the query needs more memory than query.memory_limit_bytes allows: {0}")]
    TooMuchMemory(String),
    /// The catalog could not be read (down, breaker open).
    #[error("failed to read the table: {0}")]
    Unavailable(String),
    #[error("the query failed: {0}")]
    Failed(String),
}

impl From<DataFusionError> for QueryError {
    fn from(err: DataFusionError) -> Self {
        match err.find_root() {
            DataFusionError::ResourcesExhausted(reason) => QueryError::TooMuchMemory(reason.clone()),
            DataFusionError::SQL(parse, _) => match parse.as_ref() {
                ParserError::RecursionLimitExceeded => {
                    QueryError::BadRequest("the SQL nests too deeply".into())
                }
                other => QueryError::BadRequest(format!("SQL error: {other}")),
            },
            DataFusionError::Plan(reason) if reason.contains("not supported") => {
                QueryError::NotAQuery(reason.clone())
            }
            DataFusionError::Plan(reason) => QueryError::BadRequest(reason.clone()),
            DataFusionError::SchemaError(..) => QueryError::BadRequest(err.strip_backtrace()),
            DataFusionError::NotImplemented(reason) => QueryError::BadRequest(reason.clone()),
            _ => QueryError::Failed(err.strip_backtrace()),
        }
    }
}

/// An answer: the rows, cut at the row limit, and the cut they come from.
#[derive(Debug)]
pub struct QueryAnswer {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub rows: usize,
    /// More rows matched than the limit allowed.
    pub truncated: bool,
    /// The trades table's snapshot the answer read (None: no commit yet).
    pub snapshot_id: Option<i64>,
    /// Uncommitted rows the cut held (before the query's filters).
    pub live_rows: usize,
    /// Where the query's time went, inside K2.
    pub timings: Timings,
}

impl QueryAnswer {
    /// No rows yet, from `cut`, executed since `executing`.
    fn empty(schema: SchemaRef, cut: &Cut, executing: Instant) -> Self {
        Self {
            schema,
            batches: Vec::new(),
            rows: 0,
            truncated: false,
            snapshot_id: cut.snapshot_id,
            live_rows: cut.live_rows,
            timings: Timings {
                execute: executing.elapsed(),
                ..cut.timings
            },
        }
    }
}

/// Time a query spent in each phase (the HTTP answer reports them in its
/// `Server-Timing` header).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Copying the lanes' live rows and keeping those above the snapshot.
    pub live: Duration,
    /// Loading the tables from the catalog.
    pub load: Duration,
    /// Planning and running the query, to its last row.
    pub execute: Duration,
}

/// The trades table at one snapshot and the live rows above its offsets,
/// registered as `market.trades` and `live` in a session of their own.
pub struct Cut {
    pub ctx: SessionContext,
    pub snapshot_id: Option<i64>,
    pub live_rows: usize,
    /// The cut's own phases (`live`, `load`).
    pub timings: Timings,
}

/// A runtime for queries only; dropped without waiting for its tasks.
struct QueryRuntime(Option<tokio::runtime::Runtime>);

impl QueryRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("the query runtime lives until it is dropped")
            .handle()
    }
}

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs queries over the catalog's tables and, inside a running K2, the
/// lanes' live rows.
pub struct QueryEngine {
    source: Arc<Source>,
    runtime: QueryRuntime,
}

/// Where cuts come from; shared with the query tasks.
struct Source {
    catalog: Arc<dyn Catalog>,
    tables: TableIdents,
    topic: String,
    /// None: the tables only (`k2 query` with no K2 running).
    live: Option<Arc<LiveRows>>,
    /// Files just committed, held in memory (none without live rows).
    recent: Arc<RecentFiles>,
    /// The trades table's manifests, parsed once.
    manifests: Arc<ManifestCache>,
    /// Reads the trades table's metadata pointer (None: `k2 query` with no
    /// K2 running, which loads the table each time).
    pointer: Option<MetadataSwap>,
    /// The trades table last loaded: a query whose pointer still names its
    /// metadata file takes it instead of reading and parsing that file again
    /// (it grows with every snapshot the table keeps).
    last_trades: std::sync::Mutex<Option<Table>>,
    trades_schema: SchemaRef,
    limits: QueryConfig,
    env: Arc<RuntimeEnv>,
}

impl QueryEngine {
    pub async fn new(
        catalog: Arc<dyn Catalog>,
        tables: TableIdents,
        topic: &str,
        live: Option<Arc<LiveRows>>,
        catalog_db: Option<CatalogDb>,
        limits: QueryConfig,
    ) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context as _;
        let trades = catalog
            .load_table(&tables.trades)
            .await
            .with_context(|| format!("failed to load table {}", tables.trades))?;
        let trades_schema = Arc::new(iceberg::arrow::schema_to_arrow_schema(
            trades.metadata().current_schema(),
        )?);
        let env = RuntimeEnvBuilder::new()
            .with_memory_limit(limits.memory_limit_bytes, 1.0)
            .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled))
            .build_arc()?;
        let runtime = QueryRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(limits.threads)
                .thread_name("k2-query")
                .enable_all()
                .build()
                .context("failed to start the query runtime")?,
        ));
        // Connected on the query runtime, where the queries use it.
        let pointer = match catalog_db {
            Some(db) => Some(
                runtime
                    .handle()
                    .spawn(MetadataSwap::connect(db))
                    .await
                    .context("the query runtime stopped")?
                    .context("failed to connect queries to the catalog database")?,
            ),
            None => None,
        };
        let (recent, manifests) = match &live {
            Some(live) => (live.recent().clone(), live.manifests().clone()),
            None => (RecentFiles::new(0, Duration::ZERO), Arc::default()),
        };
        Ok(Arc::new(Self {
            source: Arc::new(Source {
                catalog,
                tables,
                topic: topic.to_string(),
                live,
                recent,
                manifests,
                pointer,
                last_trades: std::sync::Mutex::default(),
                trades_schema,
                limits,
                env,
            }),
            runtime,
        }))
    }

    pub fn limits(&self) -> &QueryConfig {
        &self.source.limits
    }

    /// Runs `build` on a cut of every table (the SQL endpoint's) and collects
    /// its rows, on the query runtime, within `query.max_rows` and the time
    /// limit; one more row is read to tell whether there were more.
    async fn run<F, Fut>(&self, build: F) -> Result<QueryAnswer, QueryError>
    where
        F: FnOnce(Cut) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(DataFrame, Cut), QueryError>> + Send + 'static,
    {
        let limit = self.source.limits.max_rows;
        let source = self.source.clone();
        let work = async move {
            let cut = source.cut(true).await?;
            let executing = Instant::now();
            let (frame, cut) = build(cut).await?;
            // EXPLAIN [ANALYZE] must stay the root of its plan; it returns a
            // few rows of its own.
            let explains = matches!(
                frame.logical_plan(),
                datafusion::logical_expr::LogicalPlan::Explain(_)
                    | datafusion::logical_expr::LogicalPlan::Analyze(_)
            );
            let frame = if explains {
                frame
            } else {
                frame.limit(0, Some(limit + 1))?
            };
            let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
            let mut batches = frame.collect().await?;
            let mut rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
            let truncated = rows > limit;
            if truncated {
                batches = cut_at(batches, limit);
                rows = limit;
            }
            Ok(QueryAnswer {
                batches,
                rows,
                truncated,
                ..QueryAnswer::empty(schema, &cut, executing)
            })
        };
        self.within_time_limit(work).await
    }

    /// Runs `build` on a cut and hands each batch of its rows to `fold` as
    /// the plan yields it, then the state to `finish`, on the query runtime
    /// within the time limit. No row limit: whatever `fold` keeps is its own
    /// to bound. The answer carries the cut and the timings, and no rows.
    pub async fn fold<F, Fut, T, G, H, U>(
        &self,
        build: F,
        mut state: T,
        mut fold: G,
        finish: H,
    ) -> Result<(U, QueryAnswer), QueryError>
    where
        F: FnOnce(Cut) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(DataFrame, Cut), QueryError>> + Send + 'static,
        T: Send + 'static,
        G: FnMut(&mut T, &RecordBatch) -> Result<(), QueryError> + Send + 'static,
        H: FnOnce(T) -> Result<U, QueryError> + Send + 'static,
        U: Send + 'static,
    {
        use futures::StreamExt as _;
        let source = self.source.clone();
        let work = async move {
            let cut = source.cut(false).await?;
            let executing = Instant::now();
            let (frame, cut) = build(cut).await?;
            let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
            let mut stream = frame.execute_stream().await?;
            while let Some(batch) = stream.next().await {
                fold(&mut state, &batch?)?;
            }
            let done = finish(state)?;
            Ok((done, QueryAnswer::empty(schema, &cut, executing)))
        };
        self.within_time_limit(work).await
    }

    /// Runs `work` on the query runtime, stopped after `query.timeout_ms`.
    async fn within_time_limit<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, QueryError>> + Send + 'static,
    ) -> Result<T, QueryError> {
        let timeout_ms = self.source.limits.timeout_ms;
        let handle = self
            .runtime
            .handle()
            .spawn(tokio::time::timeout(Duration::from_millis(timeout_ms), work));
        match handle.await {
            Ok(Ok(done)) => done,
            Ok(Err(_elapsed)) => Err(QueryError::Timeout(timeout_ms)),
            Err(join) => Err(QueryError::Failed(format!("the query task ended: {join}"))),
        }
    }

    /// Read-only SQL over `market.trades`, `market.reference`, `k2.*` and
    /// `live`; anything but a query is refused.
    pub async fn sql(&self, sql: &str) -> Result<QueryAnswer, QueryError> {
        if sql.trim().is_empty() {
            return Err(QueryError::BadRequest("`sql` is empty".into()));
        }
        let sql = sql.to_string();
        self.run(move |cut| async move {
            let options = datafusion::execution::context::SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false);
            let frame = cut.ctx.sql_with_options(&sql, options).await?;
            Ok((frame, cut))
        })
        .await
    }
}

impl Source {
    fn session(&self) -> SessionContext {
        let config = SessionConfig::new()
            .with_target_partitions(self.limits.threads)
            .with_information_schema(true);
        SessionContext::new_with_config_rt(config, self.env.clone())
    }

    async fn load(&self, ident: &TableIdent) -> Result<Table, QueryError> {
        self.catalog
            .load_table(ident)
            .await
            .map_err(|e| QueryError::Unavailable(format!("{ident}: {e}")))
    }

    /// The trades table as the catalog has it now: the one loaded last if
    /// the catalog's pointer still names its metadata file (a metadata file
    /// never changes), else loaded.
    async fn load_trades(&self) -> Result<Table, QueryError> {
        let ident = &self.tables.trades;
        let Some(pointer) = &self.pointer else {
            return self.load(ident).await;
        };
        let location = pointer
            .location(ident)
            .await
            .map_err(|e| QueryError::Unavailable(format!("{ident}: {e}")))?;
        let last = || self.last_trades.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(table) = last().as_ref()
            && location.is_some()
            && table.metadata_location() == location.as_deref()
        {
            return Ok(table.clone());
        }
        let table = self.load(ident).await?;
        *last() = Some(table.clone());
        Ok(table)
    }

    /// Takes a cut: live rows first, then the table. `all_tables` also
    /// registers `market.reference` and K2's `k2.*` tables (the SQL endpoint).
    pub async fn cut(&self, all_tables: bool) -> Result<Cut, QueryError> {
        self.recent.queried();
        let started = Instant::now();
        let live = match &self.live {
            Some(live) => live.snapshot(&self.trades_schema).map_err(|e| match e {
                live::LiveError::Incomplete { .. } => QueryError::Unavailable(e.to_string()),
                live::LiveError::Arrow(e) => QueryError::Failed(format!("failed to read the live rows: {e}")),
            })?,
            None => Vec::new(),
        };
        let mut timings = Timings {
            live: started.elapsed(),
            ..Timings::default()
        };
        let loading = Instant::now();
        let trades = self.load_trades().await?;
        timings.load = loading.elapsed();
        let snapshot_id = trades.metadata().current_snapshot_id();
        let offsets = TopicOffsets::from_table(&trades, &self.topic)
            .map_err(|e| QueryError::Unavailable(e.to_string()))?;
        let filtering = Instant::now();
        let mut batches = Vec::new();
        for rows in live {
            let from = offsets.next_offset(rows.partition);
            batches.extend(
                rows.from_offset(from)
                    .map_err(|e| QueryError::Failed(format!("failed to filter the live rows: {e}")))?,
            );
        }
        let live_rows = batches.iter().map(RecordBatch::num_rows).sum();
        timings.live += filtering.elapsed();

        let ctx = self.session();
        let catalog = ctx
            .catalog("datafusion")
            .ok_or_else(|| QueryError::Failed("DataFusion has no default catalog".into()))?;
        let market = Arc::new(MemorySchemaProvider::new());
        let trades = TradesTable::new(trades, self.recent.clone(), self.manifests.clone())
            .map_err(|e| QueryError::Failed(format!("failed to read the table's schema: {e}")))?;
        market.register_table("trades".into(), Arc::new(trades))?;
        ctx.register_table(
            "live",
            Arc::new(MemTable::try_new(self.trades_schema.clone(), vec![batches])?),
        )?;
        if all_tables {
            let loading = Instant::now();
            let k2 = Arc::new(MemorySchemaProvider::new());
            let reference = self.load(&self.tables.reference).await?;
            market.register_table("reference".into(), Arc::new(static_provider(reference).await?))?;
            let own = [
                &self.tables.dead_letters,
                &self.tables.sequence_gaps,
                &self.tables.probable_duplicates,
                &self.tables.shed_ledger,
            ];
            for ident in own {
                let table = self.load(ident).await?;
                k2.register_table(ident.name().to_string(), Arc::new(static_provider(table).await?))?;
            }
            catalog.register_schema("k2", k2)?;
            timings.load += loading.elapsed();
        }
        catalog.register_schema("market", market)?;
        Ok(Cut {
            ctx,
            snapshot_id,
            live_rows,
            timings,
        })
    }
}

async fn static_provider(table: Table) -> Result<IcebergStaticTableProvider, QueryError> {
    IcebergStaticTableProvider::try_new_from_table(table)
        .await
        .map_err(|e| QueryError::Failed(format!("failed to read the table's schema: {e}")))
}

/// The first `limit` rows of `batches`.
fn cut_at(batches: Vec<RecordBatch>, limit: usize) -> Vec<RecordBatch> {
    let mut left = limit;
    let mut kept = Vec::new();
    for batch in batches {
        if left == 0 {
            break;
        }
        let take = batch.num_rows().min(left);
        kept.push(batch.slice(0, take));
        left -= take;
    }
    kept
}
