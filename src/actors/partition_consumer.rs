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
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::types::RDKafkaErrorCode;
use tracing::{error, warn};

use crate::config::OffsetGaps;
use crate::decode::TradeDecoder;
use crate::kafka::{self, KafkaConsumer, LaneQueue};
use crate::messages::{ChunkSink, Flush, LaneError, LaneFailed, LaneId, Stage, StopLane, TradeChunk};
use crate::metrics as m;
use crate::model::{DeadLetter, SideRows, now_us};
use crate::supervision::LaneStatus;

pub struct PartitionConsumerParams {
    pub lane: LaneId,
    pub topic: String,
    pub queue: Arc<LaneQueue>,
    pub consumer: Arc<KafkaConsumer>,
    pub decoder: Arc<TradeDecoder>,
    /// Offset the lane was positioned at; None when the table has none yet.
    pub start_offset: Option<i64>,
    pub chunk_max_records: usize,
    /// What a skip of offsets that retention does not explain does.
    pub offset_gaps: OffsetGaps,
    pub downstream: ChunkSink,
    pub supervisor: Recipient<LaneFailed>,
    pub status: Arc<LaneStatus>,
}

#[derive(Debug, Default)]
pub struct PartitionConsumerCounters {
    pub num_consumed: u64,
    pub num_dead_letters: u64,
    pub num_lost: u64,
}

impl PartitionConsumerCounters {
    fn record_chunk(&mut self, partition: &str, consumed: usize, dead: &[DeadLetter]) {
        self.num_consumed += consumed as u64;
        metrics::counter!(m::RECORDS_CONSUMED, "partition" => partition.to_string())
            .increment(consumed as u64);
        if !dead.is_empty() {
            self.num_dead_letters += dead.len() as u64;
            metrics::counter!(m::DEAD_LETTERS, "reason" => "decode").increment(dead.len() as u64);
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
    /// The next offset this lane accounts for.
    position: Option<i64>,
    draining: bool,
    partition_label: String,
    counters: PartitionConsumerCounters,
}

impl PartitionConsumer {
    pub fn new(params: PartitionConsumerParams) -> Self {
        let position = params.start_offset;
        if let Some(p) = position {
            params
                .status
                .position
                .store(p, std::sync::atomic::Ordering::Relaxed);
        }
        Self {
            partition_label: params.lane.partition.to_string(),
            params,
            position,
            draining: false,
            counters: PartitionConsumerCounters::default(),
        }
    }

    /// Takes what the queue holds right now (up to a chunk). Returns None
    /// when the queue is empty.
    fn drain_ready(&mut self) -> Result<Option<TradeChunk>, QueueError> {
        let mut trades = Vec::new();
        let mut dead_letters = Vec::new();
        let first_offset = self.position;
        // The next offset this chunk accounts for (None until the first
        // record of a lane that starts where the table has nothing).
        let mut expected = self.position;
        let mut first_read = None;
        let now = now_us();
        let decoder = self.params.decoder.clone();
        let queue = self.params.queue.clone();
        let partition = self.params.lane.partition;
        while trades.len() + dead_letters.len() < self.params.chunk_max_records {
            let message = match queue.queue.poll(Duration::ZERO) {
                None => break,
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    if first_read.is_some() {
                        // Hand over what was read; the error comes back on the next poll.
                        break;
                    }
                    return Err(classify(err));
                }
            };
            let offset = message.offset();
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
            let payload = message.payload().unwrap_or_default();
            match decoder.decode(payload, partition, offset, now) {
                Ok(trade) => trades.push(trade),
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
        self.counters.record_chunk(
            &self.partition_label,
            trades.len() + dead_letters.len(),
            &dead_letters,
        );
        Ok(Some(TradeChunk {
            lane: self.params.lane,
            first_offset,
            next_offset,
            trades,
            side: SideRows {
                dead_letters,
                ..SideRows::default()
            },
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
        status.dead_letters.store(self.counters.num_dead_letters, Relaxed);
        status.lost_records.store(self.counters.num_lost, Relaxed);
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
    /// the partition. Only a new assignment restarts it: ask the group
    /// thread to rejoin. The new lane starts at the earliest retained offset
    /// and records the lost range (`retention_gap`).
    fn retention_loss(&mut self, ctx: &mut Context<Self>) {
        error!(
            lane = %self.params.lane,
            position = ?self.position,
            "the partition's next offset is gone from Kafka (retention outran lag); rejoining the group to resume"
        );
        self.params.consumer.context().request_rejoin();
        // The rejoin revokes this lane; until then, look again now and then.
        ctx.run_later(Duration::from_secs(5), |_, ctx| ctx.notify(Poll));
    }

    /// Sends a chunk downstream, holding further polls until it is accepted.
    fn forward(&mut self, chunk: TradeChunk, ctx: &mut Context<Self>) {
        let sink = self.params.downstream.chunks.clone();
        ctx.wait(async move { sink.send(chunk).await }.into_actor(self).map(
            |result, act, ctx| match result {
                Ok(()) => ctx.notify(Poll),
                Err(err) => act.fail(ctx, LaneError::NextStageGone(err.to_string())),
            },
        ));
    }
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
        ctx.notify(Poll);
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
                let ready = self.params.queue.ready.clone();
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

impl Handler<StopLane> for PartitionConsumer {
    type Result = ();

    fn handle(&mut self, _: StopLane, ctx: &mut Context<Self>) {
        self.draining = true;
        ctx.stop();
    }
}
