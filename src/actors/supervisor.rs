//! Owns the lanes: starts one per assigned partition, stops them when their
//! partitions leave, rebuilds a failed lane from the last committed offsets
//! (with backoff, at most `max_restarts` in `restart_window`, after which the
//! lane is marked failed while the others keep running), relays what the
//! committer made durable to the Kafka group, and reports the pipeline's
//! state for `/v1/pipeline`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tracing::{error, info, warn};

use crate::actors::iceberg_committer::{
    CommitterStatus, GetCommitterStatus, IcebergCommitter, RegisterLane, ReleasePartitions,
};
use crate::actors::partition_consumer::LaneStatus;
use crate::config::StartFrom;
use crate::kafka::{self, KafkaConsumer, LaneQueue, PartitionsAssigned, PartitionsRevoked, StrayRecord};
use crate::messages::{Committed, Flush, LaneFailed, LaneId, StopLane};
use crate::metrics as m;
use crate::pipeline::{LaneHandle, LaneShared, LaneStates, spawn_lane};

#[derive(Debug, Clone)]
pub struct RestartPolicy {
    pub max_restarts: u32,
    pub window: Duration,
    pub base_backoff: Duration,
}

#[derive(Debug, Default)]
pub struct SupervisorCounters {
    pub num_lanes_started: u64,
    pub num_restarts: u64,
    pub num_failed_lanes: u64,
}

impl SupervisorCounters {
    fn record_restart(&mut self, stage: &'static str) {
        self.num_restarts += 1;
        metrics::counter!(m::LANE_RESTARTS, "stage" => stage).increment(1);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LaneState {
    Running,
    Restarting,
    Failed,
}

struct Lane {
    id: LaneId,
    queue: Arc<LaneQueue>,
    handle: Option<LaneHandle>,
    state: LaneState,
    restarts: VecDeque<Instant>,
    total_restarts: u64,
    last_error: Option<String>,
    committed: Option<i64>,
    high_watermark: Option<i64>,
}

impl Lane {
    fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.consumer.do_send(StopLane);
            handle.batcher.do_send(StopLane);
        }
    }
}

pub struct Supervisor {
    shared: LaneShared,
    consumer: Arc<KafkaConsumer>,
    committer: Addr<IcebergCommitter>,
    start_from: StartFrom,
    restart: RestartPolicy,
    arbiters: Vec<ArbiterHandle>,
    lanes: BTreeMap<i32, Lane>,
    next_incarnation: u64,
    instance: String,
    pub counters: SupervisorCounters,
}

impl Supervisor {
    pub fn new(
        shared: LaneShared,
        consumer: Arc<KafkaConsumer>,
        committer: Addr<IcebergCommitter>,
        start_from: StartFrom,
        restart: RestartPolicy,
        arbiters: Vec<ArbiterHandle>,
        instance: String,
    ) -> Self {
        Self {
            shared,
            consumer,
            committer,
            start_from,
            restart,
            arbiters,
            lanes: BTreeMap::new(),
            next_incarnation: 1,
            instance,
            counters: SupervisorCounters::default(),
        }
    }

    fn new_lane_id(&mut self, partition: i32) -> LaneId {
        let incarnation = self.next_incarnation;
        self.next_incarnation += 1;
        LaneId {
            partition,
            incarnation,
        }
    }

    fn start_lane(&mut self, lane: &mut Lane, start_offset: Option<i64>, states: LaneStates) {
        let arbiter = &self.arbiters[lane.id.partition.unsigned_abs() as usize % self.arbiters.len()];
        lane.handle = Some(spawn_lane(
            &self.shared,
            lane.id,
            lane.queue.clone(),
            start_offset,
            states,
            arbiter,
        ));
        lane.state = LaneState::Running;
        info!(lane = %lane.id, start = ?start_offset, "lane started");
        self.counters.num_lanes_started += 1;
        self.publish_lane_count();
    }

    fn publish_lane_count(&self) {
        let running = self.lanes.values().filter(|l| l.handle.is_some()).count();
        metrics::gauge!(m::LANES_ACTIVE).set(running as f64);
    }

    /// Rebuilds `partition`'s lane from the table's committed offset.
    fn rebuild(&mut self, partition: i32, stage: &'static str, error: String, ctx: &mut Context<Self>) {
        let Some(lane) = self.lanes.get_mut(&partition) else {
            return;
        };
        lane.stop();
        lane.last_error = Some(format!("{stage}: {error}"));
        let now = Instant::now();
        while lane
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.restart.window)
        {
            lane.restarts.pop_front();
        }
        if lane.restarts.len() as u32 >= self.restart.max_restarts {
            error!(
                partition, restarts = lane.restarts.len(), error = %error,
                "lane failed too often; marking it failed (other lanes keep running)"
            );
            lane.state = LaneState::Failed;
            self.counters.num_failed_lanes += 1;
            self.publish_lane_count();
            return;
        }
        let backoff = self.restart.base_backoff * 2u32.saturating_pow(lane.restarts.len() as u32);
        lane.restarts.push_back(now);
        lane.total_restarts += 1;
        lane.state = LaneState::Restarting;
        self.counters.record_restart(stage);
        let id = LaneId {
            partition,
            incarnation: self.next_incarnation,
        };
        self.next_incarnation += 1;
        lane.id = id;
        warn!(lane = %id, ?backoff, stage, error = %error, "rebuilding lane from the last committed offset");
        self.publish_lane_count();

        let committer = self.committer.clone();
        let consumer = self.consumer.clone();
        let topic = self.shared.topic.clone();
        let start_from = self.start_from;
        let states = LaneStates::new(&self.shared, partition);
        let checkpoints = states.checkpoints();
        let fut = async move {
            tokio::time::sleep(backoff).await;
            let start = committer
                .send(RegisterLane {
                    lane: id,
                    checkpoints,
                })
                .await
                .map_err(|e| e.to_string())??;
            tokio::task::spawn_blocking(move || {
                let offset = kafka::start_offset(&consumer, &topic, partition, start, start_from);
                consumer
                    .seek(&topic, partition, offset, Duration::from_secs(10))
                    .inspect_err(|_| {
                        // librdkafka refuses to seek a partition it stopped
                        // (offset out of range); a new assignment restarts it
                        // and revokes this lane, superseding this rebuild.
                        consumer.context().request_rejoin();
                    })
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("seek failed: {e}"))?;
            Ok::<_, String>(start)
        };
        ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| {
            let Some(mut lane) = act.lanes.remove(&partition) else {
                return;
            };
            if lane.id != id {
                act.lanes.insert(partition, lane);
                return; // superseded by a newer rebuild or a revoke
            }
            match result {
                Ok(start) => {
                    act.start_lane(&mut lane, start, states);
                    act.lanes.insert(partition, lane);
                }
                Err(err) => {
                    act.lanes.insert(partition, lane);
                    act.rebuild(partition, "supervisor", err, ctx);
                }
            }
        }));
    }

    fn commit_to_group(&self, offsets: &BTreeMap<i32, i64>) {
        let mut tpl = TopicPartitionList::new();
        for (&partition, &next) in offsets {
            if self.lanes.contains_key(&partition) {
                let _ = tpl.add_partition_offset(&self.shared.topic, partition, Offset::Offset(next));
            }
        }
        if tpl.count() == 0 {
            return;
        }
        // For external lag tools only: restarts use the table's offsets.
        if let Err(err) = self.consumer.commit(&tpl, CommitMode::Async) {
            warn!(error = %err, "failed to commit offsets to the Kafka group");
        }
    }

    /// Reads each lane's high watermark from librdkafka's cache (updated by
    /// every fetch response; no broker round trip) and publishes the lag.
    fn refresh_watermarks(&mut self) {
        for (&partition, lane) in &mut self.lanes {
            let Some((_, high)) = kafka::cached_watermarks(&self.consumer, &self.shared.topic, partition)
            else {
                continue;
            };
            lane.high_watermark = Some(high);
            if let Some(committed) = lane.committed {
                metrics::gauge!(m::CONSUMER_LAG, "partition" => partition.to_string())
                    .set((high - committed).max(0) as f64);
            }
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(Duration::from_secs(1), |act, _| act.refresh_watermarks());
    }
}

impl Handler<PartitionsAssigned> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: PartitionsAssigned, ctx: &mut Context<Self>) {
        tracing::debug!(partitions = msg.partitions.len(), "partitions assigned");
        for (queue, start) in msg.partitions {
            let partition = queue.partition;
            if let Some(mut old) = self.lanes.remove(&partition) {
                old.stop();
            }
            let id = self.new_lane_id(partition);
            let mut lane = Lane {
                id,
                queue,
                handle: None,
                state: LaneState::Restarting,
                restarts: VecDeque::new(),
                total_restarts: 0,
                last_error: None,
                committed: start,
                high_watermark: None,
            };
            // Register before the first file can arrive; the committer
            // answers with the table's offset, which the rebalance callback
            // already used to position the partition.
            let states = LaneStates::new(&self.shared, partition);
            let registered = self.committer.send(RegisterLane {
                lane: id,
                checkpoints: states.checkpoints(),
            });
            self.start_lane(&mut lane, start, states);
            self.lanes.insert(partition, lane);
            ctx.spawn(registered.into_actor(self).map(move |result, act, ctx| {
                let failure = match result {
                    Ok(Ok(table_next)) if table_next == start => None,
                    Ok(Ok(table_next)) => Some(format!(
                        "table moved to {table_next:?} while the partition was assigned at {start:?}"
                    )),
                    Ok(Err(err)) => Some(err),
                    Err(err) => Some(err.to_string()),
                };
                if let Some(error) = failure {
                    let current = act.lanes.get(&partition).map(|l| l.id);
                    if current == Some(id) {
                        act.rebuild(partition, "supervisor", error, ctx);
                    }
                }
            }));
        }
    }
}

impl Handler<PartitionsRevoked> for Supervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: PartitionsRevoked, _: &mut Context<Self>) -> Self::Result {
        for partition in &msg.partitions {
            if let Some(mut lane) = self.lanes.remove(partition) {
                lane.stop();
            }
        }
        self.publish_lane_count();
        let release = self.committer.send(ReleasePartitions {
            partitions: msg.partitions,
        });
        Box::pin(async move {
            let _ = release.await;
        })
    }
}

impl Handler<LaneFailed> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: LaneFailed, ctx: &mut Context<Self>) {
        let current = self.lanes.get(&msg.lane.partition).map(|l| l.id);
        if current != Some(msg.lane) {
            return; // an old incarnation's last words
        }
        self.rebuild(msg.lane.partition, msg.stage, msg.error, ctx);
    }
}

impl Handler<StrayRecord> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: StrayRecord, ctx: &mut Context<Self>) {
        if self.lanes.contains_key(&msg.partition) {
            let error = format!("record at offset {} bypassed the lane", msg.offset);
            self.rebuild(msg.partition, "partition_consumer", error, ctx);
        }
    }
}

impl Handler<Committed> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: Committed, _: &mut Context<Self>) {
        for (partition, next) in &msg.offsets {
            if let Some(lane) = self.lanes.get_mut(partition) {
                lane.committed = Some(*next);
            }
        }
        self.commit_to_group(&msg.offsets);
    }
}

/// Flush every lane down to the committer (for a clean shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct DrainLanes;

impl Handler<DrainLanes> for Supervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: DrainLanes, _: &mut Context<Self>) -> Self::Result {
        let flushes: Vec<_> = self
            .lanes
            .values()
            .filter_map(|l| l.handle.as_ref().map(|h| h.consumer.send(Flush)))
            .collect();
        Box::pin(async move {
            futures::future::join_all(flushes).await;
        })
    }
}

/// Stop every lane now (shutdown, or a simulated crash).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopLanes;

impl Handler<StopLanes> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: StopLanes, _: &mut Context<Self>) {
        for lane in self.lanes.values_mut() {
            lane.stop();
        }
        self.publish_lane_count();
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LaneView {
    pub partition: i32,
    pub incarnation: u64,
    pub state: LaneState,
    pub position: Option<i64>,
    pub committed_offset: Option<i64>,
    pub high_watermark: Option<i64>,
    pub lag: Option<i64>,
    pub consumed: u64,
    pub dead_letters: u64,
    pub lost_records: u64,
    pub restarts: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineStatus {
    pub instance: String,
    pub topic: String,
    pub lanes: Vec<LaneView>,
    pub lane_restarts: u64,
    pub failed_lanes: usize,
    pub committer: CommitterStatus,
}

#[derive(Message)]
#[rtype(result = "Result<PipelineStatus, String>")]
pub struct GetPipelineStatus;

impl Handler<GetPipelineStatus> for Supervisor {
    type Result = ResponseFuture<Result<PipelineStatus, String>>;

    fn handle(&mut self, _: GetPipelineStatus, _: &mut Context<Self>) -> Self::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let lanes: Vec<LaneView> = self
            .lanes
            .values()
            .map(|l| {
                let status: Option<&Arc<LaneStatus>> = l.handle.as_ref().map(|h| &h.status);
                let position = status.map(|s| s.position.load(Relaxed)).filter(|p| *p >= 0);
                LaneView {
                    partition: l.id.partition,
                    incarnation: l.id.incarnation,
                    state: l.state,
                    position,
                    committed_offset: l.committed,
                    high_watermark: l.high_watermark,
                    lag: l
                        .high_watermark
                        .map(|h| (h - l.committed.or(position).unwrap_or(0)).max(0)),
                    consumed: status.map_or(0, |s| s.consumed.load(Relaxed)),
                    dead_letters: status.map_or(0, |s| s.dead_letters.load(Relaxed)),
                    lost_records: status.map_or(0, |s| s.lost_records.load(Relaxed)),
                    restarts: l.total_restarts,
                    last_error: l.last_error.clone(),
                }
            })
            .collect();
        let failed_lanes = lanes.iter().filter(|l| l.state == LaneState::Failed).count();
        let instance = self.instance.clone();
        let topic = self.shared.topic.clone();
        let lane_restarts = self.counters.num_restarts;
        let committer = self.committer.send(GetCommitterStatus);
        Box::pin(async move {
            let committer = committer
                .await
                .map_err(|e| format!("committer unreachable: {e}"))?;
            Ok(PipelineStatus {
                instance,
                topic,
                lanes,
                lane_restarts,
                failed_lanes,
                committer,
            })
        })
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        for lane in self.lanes.values_mut() {
            lane.stop();
        }
        info!("supervisor stopped");
    }
}
