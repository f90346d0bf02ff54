//! Builds lanes: the chain PartitionConsumer → Sequencer → Deduplicator →
//! LoadShedder → Batcher for one Kafka partition, sink first, on one
//! arbiter.
//!
//! The supervisor starts lanes through the [`LaneSpawner`] trait
//! (`supervision.rs`), not this module's actors directly, so a test can
//! drive the supervisor with fake lanes; [`ActorLanes`] is the real spawner.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::actors::batcher::BatcherParams;
use crate::actors::deduplicator::DeduplicatorParams;
use crate::actors::load_shedder::LoadShedderParams;
use crate::actors::partition_consumer::PartitionConsumerParams;
use crate::actors::sequencer::SequencerParams;
use crate::actors::{Batcher, Deduplicator, LoadShedder, PartitionConsumer, Sequencer};
use crate::breaker::CircuitBreaker;
use crate::config::OffsetGaps;
use crate::decode::TradeDecoder;
use crate::dedup::{ProbablePolicy, UnorderedWindows};
use crate::degradation::DegradationLevel;
use crate::faults::Faults;
use crate::kafka::{KafkaConsumer, LaneQueues};
use crate::messages::{ChunkSink, FilesWritten, Flush, LaneFailed, LaneId, TradeChunk};
use crate::pending::CommitSchedule;
use crate::sequence::SequenceConfig;
use crate::shedding::TierTable;
use crate::state::StateStore;
use crate::storage::writer::TableWriter;
use crate::supervision::{LaneHandle, LaneSpawner, LaneStates, LaneStatus, SpawnError};

/// What every lane of a pipeline shares.
#[derive(Clone)]
pub struct LaneShared {
    pub topic: String,
    pub consumer: Arc<KafkaConsumer>,
    /// Each assigned partition's queue, split in the rebalance callback.
    pub queues: LaneQueues,
    pub decoder: Arc<TradeDecoder>,
    pub writer: TableWriter,
    pub committer: Recipient<FilesWritten>,
    pub failures: Recipient<LaneFailed>,
    pub chunk_max_records: usize,
    pub mailbox_capacity: usize,
    pub offset_gaps: OffsetGaps,
    /// Shed records by their Kafka key before decoding (`shedding.by_key`).
    pub shed_by_key: bool,
    /// `kafka.start_from = "earliest"`: a lane with no table offset owes
    /// every record from the log start it began at.
    pub from_log_start: bool,
    pub batcher: crate::config::BatcherConfig,
    pub sequence: SequenceConfig,
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
    /// Each lane's uncommitted rows, for live queries.
    pub live: Arc<crate::query::live::LiveRows>,
    /// When the next commit is due: batchers flush just before it.
    pub commit_schedule: Arc<CommitSchedule>,
}

/// The real lanes: actors on the pipeline's arbiters, lane `p` on arbiter
/// `p mod N`.
pub struct ActorLanes {
    pub shared: LaneShared,
    pub arbiters: Vec<ArbiterHandle>,
}

impl LaneSpawner for ActorLanes {
    fn states(&self, partition: i32) -> LaneStates {
        let shared = &self.shared;
        LaneStates::new(
            &shared.state_prefix,
            &shared.topic,
            partition,
            &shared.sequence,
            shared.windows.clone(),
        )
    }

    fn spawn(
        &self,
        id: LaneId,
        start_offset: Option<i64>,
        states: LaneStates,
        level: DegradationLevel,
    ) -> Result<LaneHandle, SpawnError> {
        let queue = self
            .shared
            .queues
            .get(id.partition)
            .ok_or(SpawnError::NoQueue(id.partition))?;
        let arbiter = &self.arbiters[id.partition.unsigned_abs() as usize % self.arbiters.len()];
        Ok(spawn_lane(
            &self.shared,
            id,
            queue,
            start_offset,
            states,
            level,
            arbiter,
        ))
    }
}

/// Builds one lane on `arbiter`, sink first.
fn spawn_lane(
    shared: &LaneShared,
    lane: LaneId,
    queue: Arc<crate::kafka::LaneQueue>,
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
        idle_flush: Duration::from_millis(shared.batcher.idle_flush_ms),
        mailbox_capacity: mailbox,
        soft_growth: shared.soft_batch_growth,
        level,
        storage: shared.storage_breaker.clone(),
        status: status.clone(),
        faults: shared.faults.clone(),
        live: shared.live.open(lane),
        commit_schedule: shared.commit_schedule.clone(),
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
            downstream: sink(&batcher, shared),
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
            downstream: sink(&shedder, shared),
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
            downstream: sink(&deduplicator, shared),
            failures: shared.failures.clone(),
            mailbox_capacity: mailbox,
            faults: shared.faults.clone(),
        };
        move |_| Sequencer::new(params)
    });
    let params = PartitionConsumerParams {
        lane,
        topic: shared.topic.clone(),
        consumer: shared.consumer.clone(),
        decoder: shared.decoder.clone(),
        start_offset,
        chunk_max_records: shared.chunk_max_records,
        offset_gaps: shared.offset_gaps,
        shed_by_key: shared.shed_by_key,
        from_log_start: shared.from_log_start,
        tiers: shared.tiers.clone(),
        level,
        downstream: sink(&sequencer, shared),
        supervisor: shared.failures.clone(),
        status: status.clone(),
        faults: shared.faults.clone(),
    };
    let consumer =
        PartitionConsumer::start_in_arbiter(arbiter, move |_| PartitionConsumer::new(params, queue));
    LaneHandle {
        stop: vec![consumer.clone().recipient(), batcher.clone().recipient()],
        flush: consumer.clone().recipient(),
        level: vec![consumer.recipient(), shedder.recipient(), batcher.recipient()],
        status,
    }
}

fn sink<A>(addr: &Addr<A>, shared: &LaneShared) -> ChunkSink
where
    A: Actor<Context = Context<A>> + Handler<TradeChunk> + Handler<Flush>,
{
    ChunkSink {
        chunks: addr.clone().recipient(),
        flush: addr.clone().recipient(),
        failures: shared.failures.clone(),
        faults: shared.faults.clone(),
    }
}
