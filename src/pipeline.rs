//! The one place that builds the actor graph.
//!
//! ```text
//! Kafka ─▶ PartitionConsumer ─▶ Sequencer ─▶ Deduplicator ─▶ LoadShedder ─▶ Batcher ─▶ IcebergCommitter ─▶ catalog
//!          (one lane per assigned partition, on one of N arbiters)                      (one per table set)
//! ```
//!
//! [`start`] opens the catalog and tables, starts the committer (the sink)
//! first, then table maintenance (on an arbiter of its own), then the
//! supervisor (which tells both of level changes), then joins the Kafka
//! group. The supervisor
//! builds lanes through [`ActorLanes`] (`lane.rs`: sink first, one arbiter
//! per lane) whenever the group assigns a partition or a failed lane is
//! rebuilt.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::Context as _;
use iceberg::Catalog;
use rdkafka::consumer::Consumer as _;

use crate::actors::iceberg_committer::{
    CommitHealth, CommitNow, CommitPolicy, ConnectSupervisor, IcebergCommitterParams, StateSink,
    StopCommitter,
};
use crate::actors::supervisor::{
    CommitterLink, DrainLanes, GetPipelineStatus, Health, PipelineStatus, StopLanes, SupervisorParams,
};
use crate::actors::table_maintainer::{MaintenanceStatus, OpenMaintainer, TableMaintainerParams};
use crate::actors::{IcebergCommitter, Supervisor, TableMaintainer};
use crate::breaker::CircuitBreaker;
use crate::config::K2Config;
use crate::decode::{DecoderConfig, TradeDecoder};
use crate::dedup::UnorderedWindows;
use crate::faults::FaultInjectingCatalog;
use crate::faults::Faults;
use crate::kafka::{self, GroupDriver, GroupListeners, KafkaConsumer, KafkaPartitions};
use crate::lane::{ActorLanes, LaneShared};
use crate::pending::CommitSchedule;
use crate::query::live::LiveRows;
use crate::query::recent::RecentFiles;
use crate::shedding::TierTable;
use crate::state::open_store;
use crate::storage::catalog::{CatalogDb, open_catalog};
use crate::storage::commit::Committer;
use crate::storage::maintenance::{HeldTrades, Maintainer, MetadataSwap};
use crate::storage::tables::{TableIdents, ensure_tables};
use crate::storage::writer::TableWriter;
use crate::supervision::RestartPolicy;

pub struct PipelineParams {
    pub config: K2Config,
    /// Kafka bootstrap list (the embedded broker's, when embedded).
    pub brokers: String,
    /// Relative catalog and warehouse paths are resolved against this.
    pub base_dir: PathBuf,
    /// Names this process in the offsets it records.
    pub instance: String,
}

/// A running pipeline.
pub struct Pipeline {
    pub supervisor: Addr<Supervisor>,
    pub committer: Addr<IcebergCommitter>,
    pub catalog: Arc<dyn Catalog>,
    pub tables: TableIdents,
    /// Switches for injected faults (tests, drills).
    pub faults: Arc<Faults>,
    /// What table maintenance did last, for `/v1/pipeline`.
    pub maintenance: Arc<MaintenanceStatus>,
    /// Each lane's uncommitted rows, for live queries.
    pub live: Arc<LiveRows>,
    /// The catalog's database, for queries to read a table's metadata
    /// pointer without loading the table.
    pub catalog_db: CatalogDb,
    consumer: Arc<KafkaConsumer>,
    group: GroupDriver,
    arbiters: Vec<Arbiter>,
}

/// Opens storage, starts the committer and supervisor, and joins the group.
/// Must run inside an actix `System`.
pub async fn start(params: PipelineParams) -> anyhow::Result<Pipeline> {
    let config = &params.config;
    let store = open_store(&config.state).await.with_context(|| {
        format!(
            "failed to open the state store ([state] backend = {:?})",
            config.state.backend
        )
    })?;
    let faults = Arc::new(Faults::default());
    faults.set_hold_after_commit(Duration::from_millis(config.faults.hold_after_commit_ms));
    Faults::spawn_expiry(&faults);
    let tables = TableIdents::new(&config.catalog.namespace);
    let catalog_db = CatalogDb::new(&config.catalog, &params.base_dir)?;
    let catalog: Arc<dyn Catalog> = Arc::new(FaultInjectingCatalog::new(
        open_catalog(&config.catalog, &params.base_dir).await?,
        faults.clone(),
        tables.clone(),
    ));
    ensure_tables(catalog.as_ref(), &tables)
        .await
        .context("failed to create K2's Iceberg tables")?;
    let trades = catalog
        .load_table(&tables.trades)
        .await
        .with_context(|| format!("failed to load table {}", tables.trades))?;
    let writer = TableWriter::new(
        &trades,
        config.batcher.zstd_level,
        config.batcher.target_file_size_bytes,
    )
    .context("failed to prepare the trades writer")?;

    let health = Health {
        catalog: Arc::new(CircuitBreaker::new("catalog", &config.breaker)),
        storage: Arc::new(CircuitBreaker::new("storage", &config.breaker)),
        commits: Arc::new(CommitHealth::default()),
    };
    let windows = Arc::new(UnorderedWindows::new(&config.dedup));
    let live = LiveRows::new(
        config.query.max_live_bytes,
        RecentFiles::new(
            config.query.max_recent_bytes,
            Duration::from_millis(config.query.recent_idle_ms),
        ),
    );
    let schedule = Arc::new(CommitSchedule::new(Duration::from_millis(
        config.commit.interval_ms,
    )));
    let committer = IcebergCommitter::new(IcebergCommitterParams {
        committer: Arc::new(Committer {
            catalog: catalog.clone(),
            idents: tables.clone(),
            topic: config.kafka.topic.clone(),
            writer_id: params.instance.clone(),
            zstd_level: config.batcher.zstd_level,
        }),
        policy: CommitPolicy {
            interval: Duration::from_millis(config.commit.interval_ms),
            caught_up_gap: (config.batcher.idle_flush_ms > 0)
                .then(|| Duration::from_millis(config.commit.interval_ms) / 4),
            max_rows: config.commit.max_rows,
            max_bytes: config.commit.max_bytes,
            max_pending_bytes: config.commit.max_pending_bytes,
            retry_backoff: Duration::from_millis(config.commit.retry_backoff_ms),
        },
        state: StateSink {
            store: store.clone(),
            writer: params.instance.clone(),
        },
        breaker: health.catalog.clone(),
        health: health.commits.clone(),
        faults: faults.clone(),
        windows: windows.clone(),
        live: live.clone(),
        schedule: schedule.clone(),
    })
    .start();

    let retention = kafka::retention_limits(&config.kafka, &params.brokers).await;
    let consumer = kafka::create_consumer(&config.kafka, &params.brokers)?;
    let arbiter_count = match config.lanes.arbiters {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let mut arbiters: Vec<Arbiter> = (0..arbiter_count).map(|_| Arbiter::new()).collect();
    let maintenance = Arc::new(MaintenanceStatus::default());
    let maintenance_arbiter = Arbiter::new();
    let maintainer = TableMaintainer::start_in_arbiter(&maintenance_arbiter.handle(), {
        let params = TableMaintainerParams {
            open: open_maintainer(
                config,
                &params.base_dir,
                catalog_db.clone(),
                faults.clone(),
                &live,
                tables.clone(),
            ),
            tables: tables.all(),
            interval: Duration::from_millis(config.maintenance.interval_ms),
            status: maintenance.clone(),
            faults: faults.clone(),
        };
        move |_| TableMaintainer::new(params)
    });

    let decoder = TradeDecoder::new(DecoderConfig {
        format: config.decode.format,
        max_event_time_skew_ms: config.decode.max_event_time_skew_ms,
        binance_exchange: config.decode.binance_exchange.clone(),
    });
    let supervisor = Supervisor::create({
        let committer = committer.clone();
        let consumer = consumer.clone();
        let arbiters: Vec<ArbiterHandle> = arbiters.iter().map(Arbiter::handle).collect();
        let config = config.clone();
        let instance = params.instance.clone();
        let faults = faults.clone();
        let live = live.clone();
        move |ctx| {
            let shared = LaneShared {
                topic: config.kafka.topic.clone(),
                consumer: consumer.clone(),
                queues: consumer.context().queues().clone(),
                decoder: Arc::new(decoder),
                writer,
                committer: committer.clone().recipient(),
                failures: ctx.address().recipient(),
                chunk_max_records: config.lanes.chunk_max_records,
                mailbox_capacity: config.lanes.mailbox_capacity,
                offset_gaps: config.kafka.offset_gaps,
                shed_by_key: config.shedding.by_key,
                from_log_start: config.kafka.start_from == crate::config::StartFrom::Earliest,
                batcher: config.batcher.clone(),
                sequence: config.sequence.clone(),
                store,
                state_prefix: format!("{}:{}", config.state.key_prefix, config.kafka.group_id),
                windows,
                probable_policy: config.dedup.probable_duplicates,
                tiers: Arc::new(TierTable::new(&config.shedding)),
                soft_batch_growth: config.degradation.soft_batch_growth,
                storage_breaker: health.storage.clone(),
                faults,
                live,
                commit_schedule: schedule,
            };
            Supervisor::new(SupervisorParams {
                lanes: Box::new(ActorLanes { shared, arbiters }),
                partitions: Arc::new(KafkaPartitions {
                    consumer,
                    topic: config.kafka.topic.clone(),
                    start_from: config.kafka.start_from,
                }),
                committer: CommitterLink {
                    register: committer.clone().recipient(),
                    release: committer.clone().recipient(),
                    status: committer.clone().recipient(),
                    level: committer.recipient(),
                },
                topic: config.kafka.topic.clone(),
                restart: RestartPolicy {
                    max_restarts: config.lanes.max_restarts,
                    window: Duration::from_millis(config.lanes.restart_window_ms),
                    base_backoff: Duration::from_millis(config.lanes.restart_backoff_ms),
                    max_backoff: Duration::from_millis(config.lanes.max_restart_backoff_ms),
                },
                instance,
                degradation: config.degradation.clone(),
                pause_after_failures: config.commit.pause_after_failures,
                health,
                retention,
                level_observers: vec![maintainer.clone().recipient()],
            })
        }
    });
    committer
        .send(ConnectSupervisor {
            committed: supervisor.clone().recipient(),
            lane_failures: supervisor.clone().recipient(),
        })
        .await
        .context("committer stopped during start-up")?;
    let group = GroupDriver::start(
        consumer.clone(),
        &config.kafka.topic,
        GroupListeners {
            offsets: committer.clone().recipient(),
            assigned: supervisor.clone().recipient(),
            revoked: supervisor.clone().recipient(),
            stray: supervisor.clone().recipient(),
        },
    )?;
    arbiters.push(maintenance_arbiter);
    Ok(Pipeline {
        supervisor,
        committer,
        maintenance,
        catalog,
        tables,
        faults,
        live,
        catalog_db,
        consumer,
        group,
        arbiters,
    })
}

/// Opens table maintenance's own catalog connection, on the maintainer's
/// arbiter: the pipeline's catalog pool belongs to the system's runtime.
fn open_maintainer(
    config: &K2Config,
    base_dir: &std::path::Path,
    catalog_db: CatalogDb,
    faults: Arc<Faults>,
    live: &LiveRows,
    tables: TableIdents,
) -> OpenMaintainer {
    let (catalog_config, maintenance, zstd_level) = (
        config.catalog.clone(),
        config.maintenance.clone(),
        config.batcher.zstd_level,
    );
    let hold = Duration::from_millis(config.faults.hold_in_maintenance_ms);
    let base_dir = base_dir.to_path_buf();
    let (recent, manifests) = (live.recent().clone(), live.manifests().clone());
    Box::new(move || {
        let (catalog_config, maintenance, base_dir) =
            (catalog_config.clone(), maintenance.clone(), base_dir.clone());
        let (catalog_db, faults, tables) = (catalog_db.clone(), faults.clone(), tables.clone());
        let for_queries = HeldTrades {
            table: tables.trades.clone(),
            files: recent.clone(),
            manifests: manifests.clone(),
        };
        Box::pin(async move {
            let catalog: Arc<dyn Catalog> = Arc::new(FaultInjectingCatalog::new(
                open_catalog(&catalog_config, &base_dir).await?,
                faults,
                tables,
            ));
            let swap = MetadataSwap::connect(catalog_db)
                .await
                .context("failed to connect table maintenance to the catalog database")?;
            Ok(Maintainer {
                catalog,
                swap,
                config: maintenance,
                zstd_level,
                hold,
                for_queries: Some(for_queries),
            })
        })
    })
}

impl Pipeline {
    pub async fn status(&self) -> anyhow::Result<PipelineStatus> {
        self.supervisor
            .send(GetPipelineStatus)
            .await
            .context("supervisor unreachable")?
            .map_err(anyhow::Error::msg)
    }

    /// Subscribes to the topic again, which revokes every partition of this
    /// process and rejoins the group, as a rebalance does (tests and drills).
    pub fn rejoin_group(&self) {
        self.consumer.context().request_rejoin();
    }

    /// Clean stop: every lane flushes to the committer, one final commit,
    /// then the process leaves the consumer group.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.supervisor
            .send(DrainLanes)
            .await
            .context("supervisor unreachable")?;
        let final_commit = self
            .committer
            .send(CommitNow)
            .await
            .context("committer unreachable")?;
        self.stop().await;
        final_commit.map_err(|e| anyhow::anyhow!("final commit failed: {e}"))
    }

    /// Stops without a final commit, as a crash would: whatever was not
    /// committed yet is discarded and will be read again from Kafka.
    pub async fn abort(self) {
        self.committer.do_send(StopCommitter);
        self.stop().await;
    }

    async fn stop(self) {
        let _ = self.supervisor.send(StopLanes).await;
        self.group.stop().await;
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}
