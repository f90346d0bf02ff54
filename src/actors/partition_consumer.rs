//! Reads one partition's queue, decodes records into chunks and sends them
//! down the lane, waiting when the lane is full (backpressure reaches
//! librdkafka, which stops fetching once its prefetch budget is used).
//!
//! It also owns the partition's position: chunk offset ranges are contiguous
//! from the position the lane started at, and every record must be the next
//! offset. When Kafka reports that the next offset no longer exists
//! (retention outran the lag), the lost range is reported loudly and
//! accounted for with a dead letter, then consumption resumes at the
//! earliest retained offset. A record below the position (the partition was
//! repositioned under the lane) fails the lane, and so does a skip that
//! retention does not explain, unless `kafka.offset_gaps = "accept"`: either
//! would make a chunk claim offsets the lane never read.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use rdkafka::consumer::Consumer as _;
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::types::RDKafkaErrorCode;
use tracing::{error, warn};

use crate::config::OffsetGaps;
use crate::decode::{Record, TradeDecoder};
use crate::degradation::DegradationLevel;
use crate::kafka::{self, KafkaConsumer, LaneQueue};
use crate::messages::{
    ChunkSink, Flush, LaneError, LaneFailed, LaneId, LevelChanged, Stage, StopLane, TradeChunk,
};
use crate::metrics as m;
use crate::model::{DeadLetter, SideRows, now_us};
use crate::shedding::{EarlyShed, ShedEntry, TierTable};
use crate::supervision::LaneStatus;

pub struct PartitionConsumerParams {
    pub lane: LaneId,
    pub topic: String,
    pub consumer: Arc<KafkaConsumer>,
    pub decoder: Arc<TradeDecoder>,
    /// Offset the lane was positioned at; None when the table has none yet.
    pub start_offset: Option<i64>,
    pub chunk_max_records: usize,
    /// What a skip of offsets that retention does not explain does.
    pub offset_gaps: OffsetGaps,
    /// Shed records by their Kafka key (`EXCHANGE:SYMBOL`) before decoding.
    pub shed_by_key: bool,
    /// A lane with no table offset reads from the log start
    /// (`kafka.start_from = "earliest"`): what retention deletes from there
    /// before its first record is a loss too.
    pub from_log_start: bool,
    pub tiers: Arc<TierTable>,
    /// The level in force when the lane starts.
    pub level: DegradationLevel,
    pub downstream: ChunkSink,
    pub supervisor: Recipient<LaneFailed>,
    pub status: Arc<LaneStatus>,
    pub faults: Arc<crate::faults::Faults>,
}

#[derive(Debug, Default)]
pub struct PartitionConsumerCounters {
    pub num_consumed: u64,
    pub num_consumed_bytes: u64,
    /// Records shed by their Kafka key before decoding.
    pub num_shed_early: u64,
    pub num_dead_letters: u64,
    pub num_lost: u64,
}

impl PartitionConsumerCounters {
    fn record_chunk(&mut self, partition: &str, consumed: usize, bytes: u64, dead: &[DeadLetter]) {
        self.num_consumed += consumed as u64;
        self.num_consumed_bytes += bytes;
        metrics::counter!(m::RECORDS_CONSUMED, "partition" => partition.to_string())
            .increment(consumed as u64);
        if !dead.is_empty() {
            self.num_dead_letters += dead.len() as u64;
            metrics::counter!(m::DEAD_LETTERS, "reason" => "decode").increment(dead.len() as u64);
        }
    }

    fn record_shed(&mut self, entries: &[ShedEntry]) {
        for entry in entries {
            self.num_shed_early += entry.records;
            let labels = [
                ("priority", entry.priority.as_str()),
                ("level", entry.level.as_str()),
            ];
            metrics::counter!(m::RECORDS_SHED, &labels).increment(entry.records);
            metrics::counter!(m::EARLY_SHED_RECORDS, "priority" => entry.priority.as_str())
                .increment(entry.records);
        }
    }

    fn record_gap(&mut self, skipped: u64) {
        metrics::counter!(m::OFFSET_GAPS).increment(skipped);
    }

    fn record_lost(&mut self, partition: &str, lost: u64) {
        self.num_lost += lost;
        metrics::counter!(m::RETENTION_LOST_RECORDS, "partition" => partition.to_string()).increment(lost);
        metrics::counter!(m::DEAD_LETTERS, "reason" => "retention").increment(1);
    }
}

pub struct PartitionConsumer {
    params: PartitionConsumerParams,
    /// The partition's record queue; replaced when the partition restarts
    /// (None meanwhile: the old handle must be gone before the new one is
    /// made, or dropping it would silence the new one's wake-ups).
    queue: Option<Arc<LaneQueue>>,
    /// A queue error that came after records in one poll: handled first on
    /// the next (librdkafka does not deliver it twice).
    deferred: Option<QueueError>,
    level: DegradationLevel,
    /// The next offset this lane accounts for.
    position: Option<i64>,
    /// For a lane with no position: the log start when it began. A first
    /// record past it that retention explains records the lost range.
    floor: Option<i64>,
    draining: bool,
    partition_label: String,
    counters: PartitionConsumerCounters,
}

impl PartitionConsumer {
    pub fn new(params: PartitionConsumerParams, queue: Arc<LaneQueue>) -> Self {
        let position = params.start_offset;
        if let Some(p) = position {
            params
                .status
                .position
                .store(p, std::sync::atomic::Ordering::Relaxed);
        }
        Self {
            partition_label: params.lane.partition.to_string(),
            queue: Some(queue),
            deferred: None,
            level: params.level,
            params,
            position,
            floor: None,
            draining: false,
            counters: PartitionConsumerCounters::default(),
        }
    }

    /// Takes what the queue holds right now (up to a chunk). Returns None
    /// when the queue is empty.
    fn drain_ready(&mut self) -> Result<Option<TradeChunk>, QueueError> {
        if let Some(err) = self.deferred.take() {
            return Err(err);
        }
        let Some(queue) = self.queue.clone() else {
            return Ok(None);
        };
        let mut trades = Vec::new();
        let mut reference = Vec::new();
        let mut dead_letters = Vec::new();
        let first_offset = self.position;
        // The next offset this chunk accounts for (None until the first
        // record of a lane that starts where the table has nothing).
        let mut expected = self.position;
        let mut first_read = None;
        let mut read = 0usize;
        let mut read_bytes = 0u64;
        let mut last_timestamp = None;
        let mut early = EarlyShed::default();
        let shed_by_key = self.params.shed_by_key && self.level >= DegradationLevel::Graceful;
        let now = now_us();
        let decoder = self.params.decoder.clone();
        let partition = self.params.lane.partition;
        let mut exhausted = false;
        while read < self.params.chunk_max_records {
            let message = match queue.queue.poll(Duration::ZERO) {
                None => {
                    exhausted = true;
                    break;
                }
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    if first_read.is_some() {
                        // Hand over what was read; the error is handled on the next poll.
                        self.deferred = Some(classify(err));
                        break;
                    }
                    return Err(classify(err));
                }
            };
            let offset = message.offset();
            if expected.is_none()
                && let Some(floor) = self.floor.take()
                && offset > floor
                && let Some(lost) = self.retention_gap(floor, offset, now)
            {
                // Retention deleted the log start before the lane's first
                // record: the chunk accounts for the lost range too.
                dead_letters.push(lost);
                first_read = Some(floor);
            }
            if let Some(position) = expected {
                if offset < position {
                    return Err(QueueError::Lane(LaneError::BelowPosition { position, offset }));
                }
                if offset > position {
                    match self.retention_gap(position, offset, now) {
                        Some(lost) => dead_letters.push(lost),
                        None if self.params.offset_gaps == OffsetGaps::Accept => {
                            self.counters.record_gap((offset - position) as u64);
                        }
                        None => {
                            return Err(QueueError::Lane(LaneError::UnexplainedGap { position, offset }));
                        }
                    }
                }
            }
            first_read.get_or_insert(offset);
            expected = Some(offset + 1);
            read += 1;
            let payload = message.payload().unwrap_or_default();
            read_bytes += (payload.len() + message.key().map_or(0, <[u8]>::len)) as u64;
            last_timestamp = message.timestamp().to_millis().or(last_timestamp);
            if shed_by_key && early.offer(&self.params.tiers, self.level, message.key(), offset) {
                continue;
            }
            // The injected `poison` fault: this record arrives corrupted.
            let poisoned = self
                .params
                .faults
                .take_poison(partition)
                .then(|| crate::faults::poisoned(payload));
            let payload = poisoned.as_deref().unwrap_or(payload);
            match decoder.decode_record(payload, partition, offset, now) {
                Ok(Record::Trade(trade)) => trades.push(trade),
                Ok(Record::Reference(record)) => reference.push(record),
                Err(err) => dead_letters.push(DeadLetter {
                    topic: self.params.topic.clone(),
                    partition,
                    offset,
                    raw: payload.to_vec(),
                    reason: err.to_string(),
                    dead_lettered_at_us: now,
                }),
            }
        }
        let (Some(first_read), Some(next_offset)) = (first_read, expected) else {
            return Ok(None);
        };
        let first_offset = first_offset.unwrap_or(first_read);
        self.counters
            .record_chunk(&self.partition_label, read, read_bytes, &dead_letters);
        if let Some(ts) = last_timestamp {
            self.params
                .status
                .last_timestamp_ms
                .store(ts, std::sync::atomic::Ordering::Relaxed);
        }
        let (shed, shed_symbols) = if early.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            let (entries, symbols) = early.finish(&self.params.topic, partition, self.level);
            self.counters.record_shed(&entries);
            (entries, symbols)
        };
        let caught_up = exhausted
            && kafka::cached_watermarks(&self.params.consumer, &self.params.topic, partition)
                .is_some_and(|(_, high)| next_offset >= high);
        Ok(Some(TradeChunk {
            lane: self.params.lane,
            first_offset,
            next_offset,
            trades,
            shed_symbols,
            side: SideRows {
                dead_letters,
                shed,
                reference,
                ..SideRows::default()
            },
            caught_up,
        }))
    }

    /// The first record after `position` arrived at `offset`. Offsets can be
    /// skipped legitimately (transaction markers, compaction); the skipped
    /// range is a loss only where Kafka's log now starts past `position`.
    /// Then the lost range becomes a dead letter at `position` and is
    /// reported loudly.
    fn retention_gap(&mut self, position: i64, offset: i64, now: i64) -> Option<DeadLetter> {
        let partition = self.params.lane.partition;
        let (low, _) = kafka::cached_watermarks(&self.params.consumer, &self.params.topic, partition)?;
        if low <= position {
            return None;
        }
        let to = low.min(offset);
        let lost = (to - position) as u64;
        error!(
            partition,
            from = position,
            to,
            lost,
            "kafka deleted offsets before K2 read them (retention outran lag); recorded in k2.dead_letters"
        );
        self.counters.record_lost(&self.partition_label, lost);
        Some(DeadLetter {
            topic: self.params.topic.clone(),
            partition,
            offset: position,
            raw: Vec::new(),
            reason: format!(
                "retention: Kafka deleted offsets [{position}, {to}) ({lost} records) before K2 read them"
            ),
            dead_lettered_at_us: now,
        })
    }

    fn publish(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let status = &self.params.status;
        if let Some(p) = self.position {
            status.position.store(p, Relaxed);
        }
        status.consumed.store(self.counters.num_consumed, Relaxed);
        status
            .consumed_bytes
            .store(self.counters.num_consumed_bytes, Relaxed);
        status.dead_letters.store(self.counters.num_dead_letters, Relaxed);
        status.lost_records.store(self.counters.num_lost, Relaxed);
        stamp_records_consumed();
    }

    fn fail(&self, ctx: &mut Context<Self>, error: LaneError) {
        error!(lane = %self.params.lane, error = %error, "partition consumer failed");
        self.params.supervisor.do_send(LaneFailed {
            lane: self.params.lane,
            stage: Stage::PartitionConsumer,
            error,
        });
        ctx.stop();
    }

    /// The next offset is gone from Kafka and librdkafka stopped fetching
    /// the partition. It restarts alone at the earliest offset Kafka still
    /// holds; this lane goes on with a new queue (what it read and wrote so
    /// far stays), and its first record past its position records the lost
    /// range (`retention_gap`). The other partitions are not touched.
    fn retention_loss(&mut self, ctx: &mut Context<Self>) {
        error!(
            lane = %self.params.lane,
            position = ?self.position,
            "the partition's next offset is gone from Kafka (retention outran lag); restarting the partition at its log start"
        );
        let consumer = self.params.consumer.clone();
        let topic = self.params.topic.clone();
        let partition = self.params.lane.partition;
        self.queue = None;
        metrics::counter!(m::PARTITION_RESTARTS).increment(1);
        let restart = tokio::task::spawn_blocking(move || {
            kafka::restart_at_retained_start(&consumer, &topic, partition)
        });
        ctx.wait(restart.into_actor(self).map(|result, act, ctx| {
            match result.map_err(|e| e.to_string()).and_then(|r| r) {
                Ok((low, queue)) => {
                    warn!(lane = %act.params.lane, restarted_at = low, "partition restarted at its log start");
                    act.queue = Some(queue);
                    ctx.notify(Poll);
                }
                Err(err) => act.fail(ctx, LaneError::Restart(err)),
            }
        }));
    }

    /// Sends a chunk downstream, holding further polls until it is accepted.
    fn forward(&mut self, chunk: TradeChunk, ctx: &mut Context<Self>) {
        let sink = self.params.downstream.chunks.clone();
        // The injected `slow_stage` fault: this lane reads slowly.
        let delay = self
            .params
            .faults
            .chunk_delay(Stage::PartitionConsumer, self.params.lane.partition);
        let send = async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            sink.send(chunk).await
        };
        ctx.wait(send.into_actor(self).map(|result, act, ctx| match result {
            Ok(()) => ctx.notify(Poll),
            Err(err) => act.fail(ctx, LaneError::NextStageGone(err.to_string())),
        }));
    }
}

/// Sets the process-wide "first" (once) and "last" record-consumed gauges
/// to now, once per chunk: `k2 bench` times the steady state from the first
/// to the last, apart from the group join before the first.
fn stamp_records_consumed() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    static FIRST_STAMPED: AtomicBool = AtomicBool::new(false);
    let now_s = now_us() as f64 / 1e6;
    if !FIRST_STAMPED.swap(true, Relaxed) {
        metrics::gauge!(m::FIRST_RECORD_CONSUMED).set(now_s);
    }
    metrics::gauge!(m::LAST_RECORD_CONSUMED).set(now_s);
}

enum QueueError {
    OffsetOutOfRange,
    /// The lane cannot go on: it is rebuilt from the table.
    Lane(LaneError),
    Other(KafkaError),
}

fn classify(err: KafkaError) -> QueueError {
    match err.rdkafka_error_code() {
        Some(RDKafkaErrorCode::OffsetOutOfRange) | Some(RDKafkaErrorCode::AutoOffsetReset) => {
            QueueError::OffsetOutOfRange
        }
        _ => QueueError::Other(err),
    }
}

impl Actor for PartitionConsumer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4);
        if self.position.is_some() || !self.params.from_log_start {
            ctx.notify(Poll);
            return;
        }
        // A lane that starts where the table has nothing reads from the log
        // start: note where that is before the first poll, so that retention
        // deleting it before the lane reads a record is seen as a loss.
        let consumer = self.params.consumer.clone();
        let topic = self.params.topic.clone();
        let partition = self.params.lane.partition;
        let query = tokio::task::spawn_blocking(move || {
            consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10))
        });
        ctx.wait(query.into_actor(self).map(|result, act, ctx| {
            match result {
                Ok(Ok((low, _))) => act.floor = Some(low),
                Ok(Err(err)) => warn!(
                    lane = %act.params.lane,
                    error = %err,
                    "could not read the log start; a retention loss before the first record would go unseen"
                ),
                Err(err) => warn!(lane = %act.params.lane, error = %err, "log start query failed"),
            }
            ctx.notify(Poll);
        }));
    }
}

// Messages

/// Read what is ready, or wait for the queue to fill.
#[derive(Message)]
#[rtype(result = "()")]
struct Poll;

impl Handler<Poll> for PartitionConsumer {
    type Result = ();

    fn handle(&mut self, _: Poll, ctx: &mut Context<Self>) {
        if self.draining {
            return;
        }
        match self.drain_ready() {
            Ok(Some(chunk)) => {
                self.position = Some(chunk.next_offset);
                self.publish();
                self.forward(chunk, ctx);
            }
            Ok(None) => {
                let Some(ready) = self.queue.as_ref().map(|q| q.ready.clone()) else {
                    return;
                };
                // Not `wait`: a flush or stop may arrive while the queue is idle.
                ctx.spawn(
                    async move {
                        let _ = tokio::time::timeout(Duration::from_millis(250), ready.notified()).await;
                    }
                    .into_actor(self)
                    .map(|_, _, ctx| ctx.notify(Poll)),
                );
            }
            Err(QueueError::OffsetOutOfRange) => self.retention_loss(ctx),
            Err(QueueError::Lane(error)) => self.fail(ctx, error),
            Err(QueueError::Other(err)) => {
                // Broker-side trouble on this partition; librdkafka retries by itself.
                warn!(lane = %self.params.lane, error = %err, "partition fetch error");
                ctx.run_later(Duration::from_millis(100), |_, ctx| ctx.notify(Poll));
            }
        }
    }
}

impl Handler<Flush> for PartitionConsumer {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Self::Result {
        self.draining = true;
        Box::pin(
            self.params
                .downstream
                .forward_flush(self.params.lane, Stage::PartitionConsumer),
        )
    }
}

impl Handler<LevelChanged> for PartitionConsumer {
    type Result = ();

    fn handle(&mut self, msg: LevelChanged, _: &mut Context<Self>) {
        self.level = msg.level;
    }
}

impl Handler<StopLane> for PartitionConsumer {
    type Result = ();

    fn handle(&mut self, _: StopLane, ctx: &mut Context<Self>) {
        self.draining = true;
        ctx.stop();
    }
}
