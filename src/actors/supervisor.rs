//! Owns the lanes and the degradation level.
//!
//! Lanes: starts one per assigned partition, stops them when their
//! partitions leave, rebuilds a failed lane from the last committed offsets
//! (with backoff, at most `max_restarts` in `restart_window`, after which the
//! lane is marked failed while the others keep running), relays what the
//! committer made durable to the Kafka group, and reports the pipeline's
//! state for `/v1/pipeline`. Lanes are built through a [`LaneSpawner`] and
//! partitions driven through a [`PartitionControl`], so tests can put fakes
//! in their place; the decisions themselves live in [`crate::supervision`].
//!
//! A rebuild is a sequence of steps (wait out the backoff, register with the
//! committer, position the partition, start the lane) during which a
//! rebalance or a newer rebuild may supersede it. Before every step that
//! acts, it checks that its incarnation is still the partition's current
//! one, and stops if not; the committer refuses a superseded registration
//! too, and the consumer fails a lane that sees its partition repositioned.
//!
//! Level: every `degradation.tick_ms` it samples the signals (lag, memory,
//! batcher bytes, commit latency and failures, the circuit breakers), moves
//! the level with hysteresis ([`Degradation`]) and broadcasts every change
//! as [`LevelChanged`] to the committer and every lane's shedder and
//! batcher. While commits fail it pauses the partitions' consumption, so
//! memory stays flat and lag grows instead.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use actix::prelude::*;
use serde::Serialize;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::actors::iceberg_committer::{CommitHealth, CommitterStatus, GetCommitterStatus};
use crate::breaker::{BreakerState, CircuitBreaker};
use crate::degradation::{
    Degradation, DegradationConfig, DegradationLevel, Mode, Signal, Signals, Thresholds, Transition,
};
use crate::messages::{
    Committed, Flush, LaneError, LaneFailed, LaneId, LevelChanged, PartitionsAssigned, PartitionsRevoked,
    RegisterError, RegisterLane, ReleasePartitions, Stage, StrayRecord,
};
use crate::metrics as m;
use crate::supervision::{
    CommitState, Headroom, HeadroomTracker, LaneHandle, LaneSpawner, LaneStates, PartitionControl,
    PartitionSample, RestartBudget, RestartDecision, RestartPolicy, RetentionLimits, partition_lag,
    should_pause,
};

/// How often a lane that cannot read the table's offsets (catalog down)
/// tries again. Waiting does not count as a restart.
const CATALOG_WAIT: Duration = Duration::from_secs(1);

/// Why a lane could not start from the table.
enum StartFailure {
    /// A rebalance or a newer rebuild replaced this incarnation: do nothing.
    Superseded,
    /// The table's offsets could not be read: the catalog is down or its
    /// breaker is open. The lane waits.
    Table(String),
    /// Anything else (the seek was refused, the committer is gone): the lane
    /// is rebuilt, which counts against its restart intensity.
    Other(String),
}

#[derive(Debug, Default)]
pub struct SupervisorCounters {
    pub num_lanes_started: u64,
    pub num_restarts: u64,
    pub num_failed_lanes: u64,
    pub num_superseded_starts: u64,
}

impl SupervisorCounters {
    fn record_restart(&mut self, stage: Stage) {
        self.num_restarts += 1;
        metrics::counter!(m::LANE_RESTARTS, "stage" => stage.as_str()).increment(1);
    }

    fn record_superseded(&mut self) {
        self.num_superseded_starts += 1;
        metrics::counter!(m::LANE_STARTS_SUPERSEDED).increment(1);
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
    handle: Option<LaneHandle>,
    state: LaneState,
    budget: RestartBudget,
    last_error: Option<String>,
    /// The next offset the table records for the partition, as this
    /// process last saw it.
    committed: Option<i64>,
    high_watermark: Option<i64>,
    low_watermark: Option<i64>,
    retention: HeadroomTracker,
    /// As of the last tick; None while the lane's position is unknown.
    headroom: Option<Headroom>,
}

impl Lane {
    fn new(id: LaneId, committed: Option<i64>) -> Self {
        Self {
            id,
            handle: None,
            state: LaneState::Restarting,
            budget: RestartBudget::default(),
            last_error: None,
            committed,
            high_watermark: None,
            low_watermark: None,
            retention: HeadroomTracker::default(),
            headroom: None,
        }
    }

    fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.stop();
        }
    }

    fn position(&self) -> Option<i64> {
        self.handle
            .as_ref()
            .map(|h| h.status.position.load(Relaxed))
            .filter(|p| *p >= 0)
    }

    /// This process's one definition of lag (see [`partition_lag`]).
    fn lag(&self) -> Option<i64> {
        partition_lag(self.high_watermark, self.committed, self.position())
    }

    /// Follows the partition's retention headroom (see [`HeadroomTracker`]).
    fn observe_retention(&mut self, now: Instant, limits: RetentionLimits) {
        let (Some(high), Some(low), Some(handle)) = (self.high_watermark, self.low_watermark, &self.handle)
        else {
            self.headroom = None;
            return;
        };
        let Some(position) = self.position() else {
            self.headroom = None;
            return;
        };
        let status = &handle.status;
        let consumed = status.consumed.load(Relaxed);
        let record_bytes =
            (consumed > 0).then(|| status.consumed_bytes.load(Relaxed) as f64 / consumed as f64);
        let last_ts = status.last_timestamp_ms.load(Relaxed);
        let last_record_age_ms = (last_ts > 0).then(|| chrono::Utc::now().timestamp_millis() - last_ts);
        let sample = PartitionSample {
            at: now,
            low,
            high,
            position,
            record_bytes,
            last_record_age_ms,
        };
        self.headroom = Some(self.retention.observe(sample, limits));
    }
}

/// What the supervisor watches besides the lanes.
pub struct Health {
    pub catalog: Arc<CircuitBreaker>,
    pub storage: Arc<CircuitBreaker>,
    pub commits: Arc<CommitHealth>,
}

/// The committer as the supervisor talks to it.
#[derive(Clone)]
pub struct CommitterLink {
    pub register: Recipient<RegisterLane>,
    pub release: Recipient<ReleasePartitions>,
    pub status: Recipient<GetCommitterStatus>,
    pub level: Recipient<LevelChanged>,
}

pub struct SupervisorParams {
    pub lanes: Box<dyn LaneSpawner>,
    pub partitions: Arc<dyn PartitionControl>,
    pub committer: CommitterLink,
    pub topic: String,
    pub restart: RestartPolicy,
    pub instance: String,
    pub degradation: DegradationConfig,
    pub pause_after_failures: u64,
    pub health: Health,
    /// What the topic retains per partition (for the retention headroom).
    pub retention: RetentionLimits,
    /// Actors outside the lanes told of every level change (table maintenance).
    pub level_observers: Vec<Recipient<LevelChanged>>,
}

pub struct Supervisor {
    degradation: Degradation,
    tick: Duration,
    memory_budget: u64,
    health: Health,
    pause_after_failures: u64,
    /// Partitions whose consumption this supervisor paused.
    paused: BTreeSet<i32>,
    watermark_query_in_flight: bool,
    last_watermark_query: Option<Instant>,
    spawner: Box<dyn LaneSpawner>,
    partitions: Arc<dyn PartitionControl>,
    committer: CommitterLink,
    topic: String,
    restart: RestartPolicy,
    lanes: BTreeMap<i32, Lane>,
    next_incarnation: u64,
    instance: String,
    retention: RetentionLimits,
    level_observers: Vec<Recipient<LevelChanged>>,
    pub counters: SupervisorCounters,
}

impl Supervisor {
    pub fn new(params: SupervisorParams) -> Self {
        metrics::gauge!(m::DEGRADATION_LEVEL).set(0.0);
        Self {
            tick: Duration::from_millis(params.degradation.tick_ms),
            memory_budget: params.degradation.memory_budget_bytes,
            degradation: Degradation::new(params.degradation),
            health: params.health,
            pause_after_failures: params.pause_after_failures,
            paused: BTreeSet::new(),
            watermark_query_in_flight: false,
            last_watermark_query: None,
            spawner: params.lanes,
            partitions: params.partitions,
            committer: params.committer,
            topic: params.topic,
            restart: params.restart,
            lanes: BTreeMap::new(),
            next_incarnation: 1,
            instance: params.instance,
            retention: params.retention,
            level_observers: params.level_observers,
            counters: SupervisorCounters::default(),
        }
    }

    /// Samples every signal.
    fn sample(&self) -> Signals {
        let (mut total_lag, mut max_lag, mut batcher_bytes) = (0i64, 0i64, 0u64);
        let mut headroom = Headroom::UNBOUNDED;
        for lane in self.lanes.values() {
            if let Some(lag) = lane.lag() {
                total_lag += lag;
                max_lag = max_lag.max(lag);
            }
            if let Some(h) = lane.headroom {
                headroom.ratio = headroom.ratio.min(h.ratio);
                headroom.seconds = headroom.seconds.min(h.seconds);
            }
            if let Some(handle) = &lane.handle {
                batcher_bytes += handle.status.buffered_bytes.load(Relaxed);
            }
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let commits = &self.health.commits;
        let breaker = self
            .health
            .catalog
            .state()
            .max_by_severity(self.health.storage.state());
        Signals {
            total_lag_records: total_lag as f64,
            partition_lag_records: max_lag as f64,
            memory_ratio: resident_bytes().map_or(0.0, |rss| rss as f64 / self.memory_budget as f64),
            batcher_bytes: batcher_bytes as f64,
            commit_latency_ms: commits.latency_ms(now_ms) as f64,
            commit_failures: commits.consecutive_failures.load(Relaxed) as f64,
            circuit_breaker: breaker.as_f64(),
            retention_headroom_ratio: headroom.ratio,
            retention_headroom_s: headroom.seconds,
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.refresh_watermarks();
        self.query_paused_watermarks(ctx);
        let signals = self.sample();
        for signal in Signal::ALL {
            metrics::gauge!(m::DEGRADATION_SIGNAL, "signal" => signal.as_str()).set(signals.get(signal));
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        if let Some(transition) = self
            .degradation
            .observe(signals, std::time::Instant::now(), now_ms)
        {
            self.announce(transition);
        }
        self.pause_or_resume();
    }

    /// Logs, counts and broadcasts a level change.
    fn announce(&mut self, t: Transition) {
        if t.to > t.from {
            warn!(from = %t.from, to = %t.to, cause = %t.cause, "degradation level raised");
        } else {
            info!(from = %t.from, to = %t.to, cause = %t.cause, "degradation level lowered");
        }
        metrics::counter!(m::DEGRADATION_TRANSITIONS, "from" => t.from.as_str(), "to" => t.to.as_str())
            .increment(1);
        metrics::gauge!(m::DEGRADATION_LEVEL).set(t.to.index() as f64);
        let msg = LevelChanged { level: t.to };
        self.committer.level.do_send(msg);
        for observer in &self.level_observers {
            observer.do_send(msg);
        }
        for handle in self.lanes.values().filter_map(|l| l.handle.as_ref()) {
            handle.set_level(msg);
        }
    }

    /// Pauses every lane's partition while [`should_pause`] says so, and
    /// resumes them once it no longer does.
    fn pause_or_resume(&mut self) {
        let now = std::time::Instant::now();
        let commits = &self.health.commits;
        let state = CommitState {
            consecutive_failures: commits.consecutive_failures.load(Relaxed),
            files_waiting: commits.oldest_pending_ms.load(Relaxed) > 0,
            breaker_refuses: self.health.catalog.refuses_calls(now) || self.health.storage.refuses_calls(now),
        };
        if should_pause(state, self.pause_after_failures) {
            let to_pause: Vec<i32> = self
                .lanes
                .iter()
                .filter(|(p, l)| l.handle.is_some() && !self.paused.contains(*p))
                .map(|(p, _)| *p)
                .collect();
            if to_pause.is_empty() {
                return;
            }
            match self.partitions.pause(&to_pause) {
                Ok(()) => {
                    warn!(partitions = ?to_pause, "commits are failing; pausing consumption until one succeeds");
                    self.paused.extend(to_pause);
                }
                Err(err) => warn!(error = %err, "failed to pause partitions"),
            }
        } else if !self.paused.is_empty() {
            let resume: Vec<i32> = std::mem::take(&mut self.paused).into_iter().collect();
            self.resume(&resume);
            info!(partitions = ?resume, "commits succeed again; resumed consumption");
        }
        metrics::gauge!(m::PARTITIONS_PAUSED).set(self.paused.len() as f64);
    }

    /// librdkafka's cached high watermark moves only with fetch responses,
    /// and a paused partition is not fetched: ask the broker (off the actor
    /// thread, at most once a second) so the lag of paused partitions keeps
    /// growing where the level can see it.
    fn query_paused_watermarks(&mut self, ctx: &mut Context<Self>) {
        if self.paused.is_empty()
            || self.watermark_query_in_flight
            || self
                .last_watermark_query
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.watermark_query_in_flight = true;
        self.last_watermark_query = Some(Instant::now());
        let control = self.partitions.clone();
        let partitions: Vec<i32> = self.paused.iter().copied().collect();
        let query = tokio::task::spawn_blocking(move || {
            partitions
                .into_iter()
                .filter_map(|p| Some((p, control.fetch_watermarks(p)?)))
                .collect::<Vec<_>>()
        });
        ctx.spawn(query.into_actor(self).map(|result, act, _| {
            act.watermark_query_in_flight = false;
            for (partition, (low, high)) in result.unwrap_or_default() {
                if let Some(lane) = act.lanes.get_mut(&partition) {
                    lane.high_watermark = Some(lane.high_watermark.map_or(high, |h| h.max(high)));
                    lane.low_watermark = Some(lane.low_watermark.map_or(low, |l| l.max(low)));
                }
            }
        }));
    }

    fn resume(&self, partitions: &[i32]) {
        if let Err(err) = self.partitions.resume(partitions) {
            warn!(error = %err, "failed to resume partitions");
        }
    }

    fn degradation_view(&self) -> DegradationView {
        let d = &self.degradation;
        let config = d.config();
        let finite =
            |values: &[f64; 4], lower: bool| values.map(|v| Thresholds::reachable(v, lower).then_some(v));
        DegradationView {
            level: d.level(),
            auto_level: d.auto_level(),
            mode: d.mode().clone(),
            signals: Signal::ALL
                .iter()
                .map(|s| SignalView {
                    name: s.as_str(),
                    value: d.last_signals().get(*s),
                    escalate: finite(&config.thresholds(*s).escalate, s.lower_is_worse()),
                    recover: finite(&config.thresholds(*s).recover, s.lower_is_worse()),
                    lower_is_worse: s.lower_is_worse(),
                })
                .collect(),
            cooldown_s: config.cooldown_s,
            catalog_breaker: self.health.catalog.state(),
            storage_breaker: self.health.storage.state(),
            paused_partitions: self.paused.iter().copied().collect(),
            transitions: d.history().cloned().collect(),
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

    /// Whether `id` is still its partition's current lane.
    fn is_current(&self, id: LaneId) -> bool {
        self.lanes.get(&id.partition).is_some_and(|l| l.id == id)
    }

    /// Starts the lane `partition`'s record has (its id is current), reading
    /// from `start_offset`.
    fn start_lane(&mut self, partition: i32, start_offset: Option<i64>, states: LaneStates) {
        let level = self.degradation.level();
        let Some(lane) = self.lanes.get_mut(&partition) else {
            return;
        };
        match self.spawner.spawn(lane.id, start_offset, states, level) {
            Ok(handle) => {
                lane.handle = Some(handle);
                lane.state = LaneState::Running;
                info!(lane = %lane.id, start = ?start_offset, "lane started");
                self.counters.num_lanes_started += 1;
            }
            Err(err) => {
                // The partition was announced without a queue: only a new
                // assignment can give it one.
                error!(lane = %lane.id, error = %err, "cannot build the lane; rejoining the group");
                lane.last_error = Some(err.to_string());
                self.partitions.request_rejoin();
            }
        }
        self.publish_lane_count();
    }

    fn publish_lane_count(&self) {
        let running = self.lanes.values().filter(|l| l.handle.is_some()).count();
        metrics::gauge!(m::LANES_ACTIVE).set(running as f64);
        let failed = self
            .lanes
            .values()
            .filter(|l| l.state == LaneState::Failed)
            .count();
        metrics::gauge!(m::LANES_FAILED).set(failed as f64);
    }

    /// Rebuilds `partition`'s lane from the table's committed offset.
    fn rebuild(&mut self, partition: i32, stage: Stage, error: String, ctx: &mut Context<Self>) {
        let Some(lane) = self.lanes.get_mut(&partition) else {
            return;
        };
        lane.stop();
        lane.last_error = Some(format!("{stage}: {error}"));
        match lane.budget.on_failure(&self.restart, Instant::now()) {
            RestartDecision::GiveUp { restarts } => {
                error!(
                    partition, restarts, error = %error,
                    "lane failed too often; marking it failed (other lanes keep running)"
                );
                lane.state = LaneState::Failed;
                self.counters.num_failed_lanes += 1;
                self.publish_lane_count();
            }
            RestartDecision::Restart { backoff } => {
                self.counters.record_restart(stage);
                warn!(partition, ?backoff, %stage, error = %error, "rebuilding lane from the last committed offset");
                self.start_from_table(partition, backoff, ctx);
            }
        }
    }

    /// After `delay`, registers a new incarnation of `partition`'s lane with
    /// the committer (which answers with the table's offset), positions the
    /// partition there and starts the lane. Each step first checks that the
    /// incarnation is still current: a rebalance or a newer rebuild that
    /// replaced it meanwhile ends it without a side effect. A table that
    /// cannot be read (catalog down, its breaker open) is not the lane's
    /// fault: the lane waits for it, trying again every [`CATALOG_WAIT`],
    /// without spending its restart budget. Other failures rebuild the lane.
    fn start_from_table(&mut self, partition: i32, delay: Duration, ctx: &mut Context<Self>) {
        let id = self.new_lane_id(partition);
        let Some(lane) = self.lanes.get_mut(&partition) else {
            return;
        };
        lane.state = LaneState::Restarting;
        lane.id = id;
        self.publish_lane_count();

        let states = self.spawner.states(partition);
        let checkpoints = states.checkpoints();
        let register = self.committer.register.clone();
        let control = self.partitions.clone();
        let fut = actix::fut::wrap_future::<_, Self>(tokio::time::sleep(delay))
            .then(move |(), act, _| {
                let send = act.is_current(id).then(|| register.send(RegisterLane { lane: id, checkpoints }));
                async move {
                    let Some(send) = send else {
                        return Err(StartFailure::Superseded);
                    };
                    match send.await {
                        Ok(Ok(start)) => Ok(start),
                        Ok(Err(RegisterError::Superseded(_))) => Err(StartFailure::Superseded),
                        Ok(Err(RegisterError::Offsets(err))) => Err(StartFailure::Table(err.to_string())),
                        Err(err) => Err(StartFailure::Other(format!("committer unreachable: {err}"))),
                    }
                }
                .into_actor(act)
            })
            .then(move |registered, act, _| {
                let seek = match registered {
                    Ok(start) if act.is_current(id) => Ok(start),
                    Ok(_) => Err(StartFailure::Superseded),
                    Err(err) => Err(err),
                };
                async move {
                    let start = seek?;
                    tokio::task::spawn_blocking(move || control.seek_to_start(partition, start))
                        .await
                        .map_err(|e| StartFailure::Other(e.to_string()))?
                        .map_err(|e| StartFailure::Other(format!("seek failed: {e}")))?;
                    Ok(start)
                }
                .into_actor(act)
            })
            .map(move |result, act, ctx| {
                if !act.is_current(id) {
                    return act.note_superseded(id);
                }
                match result {
                    Ok(start) => act.start_lane(partition, start, states),
                    Err(StartFailure::Superseded) => act.note_superseded(id),
                    Err(StartFailure::Table(err)) => {
                        warn!(lane = %id, error = %err, "cannot read the table's offsets; the lane waits for the catalog");
                        if let Some(lane) = act.lanes.get_mut(&partition) {
                            lane.last_error = Some(format!("waiting for the catalog: {err}"));
                        }
                        act.start_from_table(partition, CATALOG_WAIT, ctx);
                    }
                    Err(StartFailure::Other(err)) => act.rebuild(partition, Stage::Supervisor, err, ctx),
                }
            });
        ctx.spawn(fut);
    }

    fn note_superseded(&mut self, id: LaneId) {
        debug!(lane = %id, "lane start superseded by a rebalance or a newer rebuild; it does nothing");
        self.counters.record_superseded();
    }

    fn commit_to_group(&self, offsets: &BTreeMap<i32, i64>) {
        let owned: BTreeMap<i32, i64> = offsets
            .iter()
            .filter(|(p, _)| self.lanes.contains_key(p))
            .map(|(p, o)| (*p, *o))
            .collect();
        if !owned.is_empty() {
            // For external lag tools only: restarts use the table's offsets.
            self.partitions.commit_offsets(&owned);
        }
    }

    /// Reads each lane's high watermark from librdkafka's cache (updated by
    /// every fetch response; no broker round trip) and publishes the lag.
    fn refresh_watermarks(&mut self) {
        let now = Instant::now();
        for (&partition, lane) in &mut self.lanes {
            if let Some((low, high)) = self.partitions.cached_watermarks(partition) {
                // A paused partition's cache stands still; `query_paused_watermarks`
                // may have seen further.
                lane.high_watermark = Some(lane.high_watermark.map_or(high, |h| h.max(high)));
                if low >= 0 {
                    lane.low_watermark = Some(lane.low_watermark.map_or(low, |l| l.max(low)));
                }
            }
            lane.observe_retention(now, self.retention);
            let label = partition.to_string();
            if let Some(lag) = lane.lag() {
                metrics::gauge!(m::CONSUMER_LAG, "partition" => label.clone()).set(lag as f64);
            }
            if let Some(headroom) = lane.headroom {
                metrics::gauge!(m::RETENTION_HEADROOM_RATIO, "partition" => label.clone())
                    .set(headroom.ratio);
                metrics::gauge!(m::RETENTION_HEADROOM_SECONDS, "partition" => label).set(headroom.seconds);
            }
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.tick, |act, ctx| act.tick(ctx));
    }
}

impl Handler<PartitionsAssigned> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: PartitionsAssigned, ctx: &mut Context<Self>) {
        debug!(partitions = msg.partitions.len(), "partitions assigned");
        for (partition, start) in msg.partitions {
            if let Some(mut old) = self.lanes.remove(&partition) {
                old.stop();
            }
            // A new assignment starts unpaused; the next tick pauses it
            // again if commits still fail.
            if self.paused.remove(&partition) {
                self.resume(&[partition]);
            }
            let id = self.new_lane_id(partition);
            let mut lane = Lane::new(id, start);
            if !msg.offsets_known {
                // Positioned at the log end until the table answers.
                lane.last_error = Some("waiting for the catalog: offsets unknown at assignment".to_string());
                self.lanes.insert(partition, lane);
                self.start_from_table(partition, Duration::ZERO, ctx);
                continue;
            }
            self.lanes.insert(partition, lane);
            // Register before the first file can arrive; the committer
            // answers with the table's offset, which the rebalance callback
            // already used to position the partition.
            let states = self.spawner.states(partition);
            let registered = self.committer.register.send(RegisterLane {
                lane: id,
                checkpoints: states.checkpoints(),
            });
            self.start_lane(partition, start, states);
            ctx.spawn(registered.into_actor(self).map(move |result, act, ctx| {
                let failure = match result {
                    Ok(Ok(table_next)) if table_next == start => None,
                    Ok(Ok(table_next)) => Some(format!(
                        "table moved to {table_next:?} while the partition was assigned at {start:?}"
                    )),
                    Ok(Err(err)) => Some(err.to_string()),
                    Err(err) => Some(format!("committer unreachable: {err}")),
                };
                if let Some(error) = failure
                    && act.is_current(id)
                {
                    act.rebuild(partition, Stage::Supervisor, error, ctx);
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
            // librdkafka keeps an application's pause across a revoke and a
            // new assignment; a new assignment must start unpaused (the next
            // tick pauses it again if commits still fail).
            if self.paused.remove(partition) {
                self.resume(&[*partition]);
            }
        }
        self.publish_lane_count();
        let release = self.committer.release.send(ReleasePartitions {
            partitions: msg.partitions,
        });
        Box::pin(async move {
            if let Err(err) = release.await {
                warn!(error = %err, "committer unreachable while partitions were revoked");
            }
        })
    }
}

impl Handler<LaneFailed> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: LaneFailed, ctx: &mut Context<Self>) {
        if !self.is_current(msg.lane) {
            return; // an old incarnation's last words
        }
        self.rebuild(msg.lane.partition, msg.stage, msg.error.to_string(), ctx);
    }
}

impl Handler<StrayRecord> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: StrayRecord, ctx: &mut Context<Self>) {
        if self.lanes.contains_key(&msg.partition) {
            let error = LaneError::StrayRecord { offset: msg.offset }.to_string();
            self.rebuild(msg.partition, Stage::PartitionConsumer, error, ctx);
        } else {
            // Assigned to this process with no lane: only a new assignment
            // can set it right.
            error!(
                partition = msg.partition,
                offset = msg.offset,
                "a record arrived for a partition with no lane; rejoining the group"
            );
            self.partitions.request_rejoin();
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
            .filter_map(|l| l.handle.as_ref().map(|h| h.flush.send(Flush)))
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
    /// Records not durable in Iceberg yet; null while unknown.
    pub lag: Option<i64>,
    /// How far retention is from the next record to read: a fraction of
    /// what the log retains (1 = caught up), and seconds at the current
    /// rates (null: not closing in). Null while unknown.
    pub retention_headroom_ratio: Option<f64>,
    pub retention_headroom_s: Option<f64>,
    /// Consumption paused because commits are failing.
    pub paused: bool,
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
    /// Lane starts a rebalance or a newer rebuild superseded before they acted.
    pub superseded_starts: u64,
    /// The degradation level in force (details at `/v1/degradation`).
    pub degradation_level: DegradationLevel,
    pub committer: CommitterStatus,
}

#[derive(Message)]
#[rtype(result = "Result<PipelineStatus, String>")]
pub struct GetPipelineStatus;

impl Handler<GetPipelineStatus> for Supervisor {
    type Result = ResponseFuture<Result<PipelineStatus, String>>;

    fn handle(&mut self, _: GetPipelineStatus, _: &mut Context<Self>) -> Self::Result {
        let lanes: Vec<LaneView> = self
            .lanes
            .values()
            .map(|l| {
                let status = l.handle.as_ref().map(|h| &h.status);
                LaneView {
                    partition: l.id.partition,
                    incarnation: l.id.incarnation,
                    state: l.state,
                    position: l.position(),
                    committed_offset: l.committed,
                    high_watermark: l.high_watermark,
                    lag: l.lag(),
                    retention_headroom_ratio: l.headroom.map(|h| h.ratio),
                    retention_headroom_s: l.headroom.map(|h| h.seconds).filter(|s| s.is_finite()),
                    paused: self.paused.contains(&l.id.partition),
                    consumed: status.map_or(0, |s| s.consumed.load(Relaxed)),
                    dead_letters: status.map_or(0, |s| s.dead_letters.load(Relaxed)),
                    lost_records: status.map_or(0, |s| s.lost_records.load(Relaxed)),
                    restarts: l.budget.total(),
                    last_error: l.last_error.clone(),
                }
            })
            .collect();
        let failed_lanes = lanes.iter().filter(|l| l.state == LaneState::Failed).count();
        let instance = self.instance.clone();
        let topic = self.topic.clone();
        let lane_restarts = self.counters.num_restarts;
        let superseded_starts = self.counters.num_superseded_starts;
        let degradation_level = self.degradation.level();
        let committer = self.committer.status.send(GetCommitterStatus);
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
                superseded_starts,
                degradation_level,
                committer,
            })
        })
    }
}

/// Resident memory of this process (Linux `/proc/self/status`, `VmRSS`).
pub(crate) fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `GET /v1/degradation`.
#[derive(Debug, Clone, Serialize)]
pub struct DegradationView {
    pub level: DegradationLevel,
    /// The level the signals call for (differs from `level` while forced).
    pub auto_level: DegradationLevel,
    pub mode: Mode,
    pub signals: Vec<SignalView>,
    pub cooldown_s: u64,
    pub catalog_breaker: BreakerState,
    pub storage_breaker: BreakerState,
    pub paused_partitions: Vec<i32>,
    /// Oldest first, at most 50.
    pub transitions: Vec<Transition>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SignalView {
    pub name: &'static str,
    /// null: unbounded (a headroom that is not closing in).
    pub value: f64,
    /// The level rises as the value falls (headroom).
    pub lower_is_worse: bool,
    /// SOFT, GRACEFUL, AGGRESSIVE, CIRCUIT_BREAK; null: this signal never
    /// drives that level.
    pub escalate: [Option<f64>; 4],
    pub recover: [Option<f64>; 4],
}

#[derive(Message)]
#[rtype(result = "DegradationView")]
pub struct GetDegradation;

impl Handler<GetDegradation> for Supervisor {
    type Result = MessageResult<GetDegradation>;

    fn handle(&mut self, _: GetDegradation, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.degradation_view())
    }
}

/// Force a level (operator override) until cleared or `ttl` passes.
#[derive(Message)]
#[rtype(result = "DegradationView")]
pub struct ForceLevel {
    pub level: DegradationLevel,
    pub reason: String,
    pub ttl: Option<Duration>,
}

impl Handler<ForceLevel> for Supervisor {
    type Result = MessageResult<ForceLevel>;

    fn handle(&mut self, msg: ForceLevel, _: &mut Context<Self>) -> Self::Result {
        let now_ms = chrono::Utc::now().timestamp_millis();
        info!(level = %msg.level, reason = %msg.reason, ttl = ?msg.ttl, "degradation level forced");
        if let Some(t) =
            self.degradation
                .force(msg.level, msg.reason, msg.ttl, std::time::Instant::now(), now_ms)
        {
            self.announce(t);
        }
        MessageResult(self.degradation_view())
    }
}

/// Return to the automatic level.
#[derive(Message)]
#[rtype(result = "DegradationView")]
pub struct ClearForce;

impl Handler<ClearForce> for Supervisor {
    type Result = MessageResult<ClearForce>;

    fn handle(&mut self, _: ClearForce, _: &mut Context<Self>) -> Self::Result {
        let now_ms = chrono::Utc::now().timestamp_millis();
        if let Some(t) = self.degradation.clear_force(now_ms) {
            self.announce(t);
        }
        MessageResult(self.degradation_view())
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

#[cfg(test)]
#[path = "supervisor_tests.rs"]
mod tests;
