//! The one place that builds the actor graph.
//!
//! ```text
//! Kafka ─▶ PartitionConsumer ─▶ Sequencer ─▶ Deduplicator ─▶ LoadShedder ─▶ Batcher ─▶ IcebergCommitter ─▶ catalog
//!          (one lane per assigned partition, on one of N arbiters)                      (one per table set)
//! ```
//!
//! [`start`] opens the catalog and tables, starts the committer (the sink)
//! first, then the supervisor, then joins the Kafka group. Lanes are built by
//! [`spawn_lane`], sink first, whenever the group assigns a partition or the
//! supervisor rebuilds a failed lane.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use anyhow::Context as _;
use iceberg::Catalog;

use crate::actors::batcher::BatcherParams;
use crate::actors::deduplicator::DeduplicatorParams;
use crate::actors::iceberg_committer::{
    CommitHealth, CommitNow, CommitPolicy, ConnectSupervisor, StateSink, StopCommitter,
};
use crate::actors::load_shedder::LoadShedderParams;
use crate::actors::partition_consumer::{LaneStatus, PartitionConsumerParams};
use crate::actors::sequencer::{SequenceState, SequencerParams};
use crate::actors::supervisor::{
    DrainLanes, GetPipelineStatus, Health, PipelineStatus, RestartPolicy, StopLanes, SupervisorParams,
};
use crate::actors::{
    Batcher, Deduplicator, IcebergCommitter, LoadShedder, PartitionConsumer, Sequencer, Supervisor,
};
use crate::breaker::CircuitBreaker;
use crate::config::K2Config;
use crate::decode::{DecoderConfig, TradeDecoder};
use crate::dedup::{LaneIds, ProbablePolicy, UnorderedWindows};
use crate::degradation::DegradationLevel;
use crate::faults::Faults;
use crate::kafka::{self, GroupDriver, GroupListeners, KafkaConsumer, LaneQueue};
use crate::messages::{ChunkSink, FilesWritten, LaneFailed, LaneId};
use crate::sequence::SequenceTracker;
use crate::shedding::TierTable;
use crate::state::{self, Checkpoint, EpochState, StateStore, open_store};
use crate::storage::catalog::open_catalog;
use crate::storage::commit::Committer;
use crate::storage::tables::{TableIdents, ensure_tables};
use crate::storage::writer::TableWriter;

pub struct PipelineParams {
    pub config: K2Config,
    /// Kafka bootstrap list (the embedded broker's, when embedded).
    pub brokers: String,
    /// Relative catalog and warehouse paths are resolved against this.
    pub base_dir: PathBuf,
    /// Names this process in the offsets it records.
    pub instance: String,
}

/// What every lane of a pipeline shares.
#[derive(Clone)]
pub struct LaneShared {
    pub topic: String,
    pub consumer: Arc<KafkaConsumer>,
    pub decoder: Arc<TradeDecoder>,
    pub writer: TableWriter,
    pub committer: Recipient<FilesWritten>,
    pub failures: Recipient<LaneFailed>,
    pub chunk_max_records: usize,
    pub mailbox_capacity: usize,
    pub batcher: crate::config::BatcherConfig,
    pub sequence: crate::sequence::SequenceConfig,
    pub store: Arc<dyn StateStore>,
    /// `{key_prefix}:{group_id}`: the start of every state scope.
    pub state_prefix: String,
    pub windows: Arc<UnorderedWindows>,
    pub probable_policy: ProbablePolicy,
    pub tiers: Arc<TierTable>,
    pub soft_batch_growth: u32,
    /// Around data-file writes.
    pub storage_breaker: Arc<CircuitBreaker>,
    pub faults: Arc<Faults>,
}

/// A lane's stage state, made with the lane and registered with the
/// committer, which stages and promotes it with every commit.
#[derive(Clone)]
pub struct LaneStates {
    pub sequence: Arc<SequenceState>,
    pub ids: Arc<Mutex<LaneIds>>,
}

impl LaneStates {
    pub fn new(shared: &LaneShared, partition: i32) -> Self {
        let scope = |stage| state::scope(&shared.state_prefix, &shared.topic, partition, stage);
        let config = shared.sequence.clone();
        Self {
            sequence: Arc::new(Mutex::new(EpochState::new(
                scope(state::SEQUENCER_STAGE),
                move || SequenceTracker::new(config.clone()),
            ))),
            ids: Arc::new(Mutex::new(LaneIds::new(
                scope(state::DEDUP_STAGE),
                shared.windows.clone(),
            ))),
        }
    }

    pub fn checkpoints(&self) -> Vec<Arc<dyn Checkpoint>> {
        vec![self.sequence.clone(), self.ids.clone()]
    }
}

/// The running actors of one lane that the supervisor stops directly; the
/// stages between them stop when their upstream goes away.
pub struct LaneHandle {
    pub consumer: Addr<PartitionConsumer>,
    pub batcher: Addr<Batcher>,
    /// With the batcher, the stages that act on level changes.
    pub shedder: Addr<LoadShedder>,
    pub status: Arc<LaneStatus>,
}

/// Builds one lane on `arbiter`, sink first.
pub fn spawn_lane(
    shared: &LaneShared,
    lane: LaneId,
    queue: Arc<LaneQueue>,
    start_offset: Option<i64>,
    states: LaneStates,
    level: DegradationLevel,
    arbiter: &ArbiterHandle,
) -> LaneHandle {
    let mailbox = shared.mailbox_capacity;
    let status = Arc::new(LaneStatus::default());
    status.position.store(-1, std::sync::atomic::Ordering::Relaxed);
    let batcher_params = BatcherParams {
        lane,
        max_rows: shared.batcher.max_rows,
        max_bytes: shared.batcher.max_bytes,
        max_age: Duration::from_millis(shared.batcher.max_age_ms),
        mailbox_capacity: mailbox,
        soft_growth: shared.soft_batch_growth,
        level,
        storage: shared.storage_breaker.clone(),
        status: status.clone(),
        faults: shared.faults.clone(),
    };
    let (writer, committer, failures) = (
        shared.writer.clone(),
        shared.committer.clone(),
        shared.failures.clone(),
    );
    let batcher = Batcher::start_in_arbiter(arbiter, move |_| {
        Batcher::new(batcher_params, writer, committer, failures)
    });
    let shedder = LoadShedder::start_in_arbiter(arbiter, {
        let params = LoadShedderParams {
            lane,
            topic: shared.topic.clone(),
            tiers: shared.tiers.clone(),
            level,
            downstream: sink(&batcher),
            mailbox_capacity: mailbox,
            failures: shared.failures.clone(),
            faults: shared.faults.clone(),
        };
        move |_| LoadShedder::new(params)
    });
    let deduplicator = Deduplicator::start_in_arbiter(arbiter, {
        let params = DeduplicatorParams {
            lane,
            topic: shared.topic.clone(),
            ids: states.ids,
            store: shared.store.clone(),
            start_offset,
            policy: shared.probable_policy,
            downstream: sink(&shedder),
            failures: shared.failures.clone(),
            mailbox_capacity: mailbox,
            faults: shared.faults.clone(),
        };
        move |_| Deduplicator::new(params)
    });
    let sequencer = Sequencer::start_in_arbiter(arbiter, {
        let params = SequencerParams {
            lane,
            topic: shared.topic.clone(),
            state: states.sequence,
            store: shared.store.clone(),
            start_offset,
            downstream: sink(&deduplicator),
            failures: shared.failures.clone(),
            mailbox_capacity: mailbox,
            faults: shared.faults.clone(),
        };
        move |_| Sequencer::new(params)
    });
    let params = PartitionConsumerParams {
        lane,
        topic: shared.topic.clone(),
        queue,
        consumer: shared.consumer.clone(),
        decoder: shared.decoder.clone(),
        start_offset,
        chunk_max_records: shared.chunk_max_records,
        downstream: sink(&sequencer),
        supervisor: shared.failures.clone(),
        status: status.clone(),
    };
    let consumer = PartitionConsumer::start_in_arbiter(arbiter, move |_| PartitionConsumer::new(params));
    LaneHandle {
        consumer,
        batcher,
        shedder,
        status,
    }
}

fn sink<A>(addr: &Addr<A>) -> ChunkSink
where
    A: Actor<Context = Context<A>> + Handler<crate::messages::TradeChunk> + Handler<crate::messages::Flush>,
{
    ChunkSink {
        chunks: addr.clone().recipient(),
        flush: addr.clone().recipient(),
    }
}

/// A running pipeline.
pub struct Pipeline {
    pub supervisor: Addr<Supervisor>,
    pub committer: Addr<IcebergCommitter>,
    pub catalog: Arc<dyn Catalog>,
    pub tables: TableIdents,
    /// Switches for injected faults (tests, drills).
    pub faults: Arc<Faults>,
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
    let catalog = open_catalog(&config.catalog, &params.base_dir).await?;
    let tables = TableIdents::new(&config.catalog.namespace);
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

    let faults = Arc::new(Faults::default());
    let health = Health {
        catalog: Arc::new(CircuitBreaker::new("catalog", &config.breaker)),
        storage: Arc::new(CircuitBreaker::new("storage", &config.breaker)),
        commits: Arc::new(CommitHealth::default()),
    };
    let committer = IcebergCommitter::new(
        Arc::new(Committer {
            catalog: catalog.clone(),
            idents: tables.clone(),
            topic: config.kafka.topic.clone(),
            writer_id: params.instance.clone(),
            zstd_level: config.batcher.zstd_level,
        }),
        CommitPolicy {
            interval: Duration::from_millis(config.commit.interval_ms),
            max_rows: config.commit.max_rows,
            max_bytes: config.commit.max_bytes,
            max_pending_bytes: config.commit.max_pending_bytes,
            retain_snapshots: config.commit.retain_snapshots,
            expire_every_commits: config.commit.expire_every_commits,
            retry_backoff: Duration::from_millis(config.commit.retry_backoff_ms),
        },
        StateSink {
            store: store.clone(),
            writer: params.instance.clone(),
        },
        health.catalog.clone(),
        health.commits.clone(),
        faults.clone(),
    )
    .start();
    let windows = Arc::new(UnorderedWindows::new(&config.dedup));

    let consumer = kafka::create_consumer(&config.kafka, &params.brokers)?;
    let arbiter_count = match config.lanes.arbiters {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let arbiters: Vec<Arbiter> = (0..arbiter_count).map(|_| Arbiter::new()).collect();
    let decoder = TradeDecoder::new(DecoderConfig {
        format: config.decode.format,
        max_event_time_skew_ms: config.decode.max_event_time_skew_ms,
        binance_exchange: config.decode.binance_exchange.clone(),
    });
    let supervisor = Supervisor::create({
        let committer = committer.clone();
        let consumer = consumer.clone();
        let handles: Vec<ArbiterHandle> = arbiters.iter().map(Arbiter::handle).collect();
        let config = config.clone();
        let instance = params.instance.clone();
        let faults = faults.clone();
        move |ctx| {
            let shared = LaneShared {
                topic: config.kafka.topic.clone(),
                consumer: consumer.clone(),
                decoder: Arc::new(decoder),
                writer,
                committer: committer.clone().recipient(),
                failures: ctx.address().recipient(),
                chunk_max_records: config.lanes.chunk_max_records,
                mailbox_capacity: config.lanes.mailbox_capacity,
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
            };
            Supervisor::new(SupervisorParams {
                shared,
                consumer,
                committer,
                start_from: config.kafka.start_from,
                restart: RestartPolicy {
                    max_restarts: config.lanes.max_restarts,
                    window: Duration::from_millis(config.lanes.restart_window_ms),
                    base_backoff: Duration::from_millis(100),
                },
                arbiters: handles,
                instance,
                degradation: config.degradation.clone(),
                pause_after_failures: config.commit.pause_after_failures,
                health,
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
        consumer,
        &config.kafka.topic,
        GroupListeners {
            offsets: committer.clone().recipient(),
            assigned: supervisor.clone().recipient(),
            revoked: supervisor.clone().recipient(),
            stray: supervisor.clone().recipient(),
        },
    )?;
    Ok(Pipeline {
        supervisor,
        committer,
        catalog,
        tables,
        faults,
        group,
        arbiters,
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
