//! One per table set: collects every lane's data files and commits them in
//! one Iceberg snapshot per interval (or sooner when rows or bytes pile up),
//! with the offsets they cover; then tells the supervisor what is durable.
//!
//! Files are accepted only from a partition's current lane incarnation and
//! only if they continue exactly where that lane's pending range ends, so a
//! rebuilt or revoked lane's stragglers are dropped, never committed. When
//! more than `max_pending_bytes` of files wait for a commit, batchers are
//! held (their `FilesWritten` is answered only after the next commit), which
//! stops their lanes and, through them, Kafka fetching.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::breaker::{BreakerError, CircuitBreaker};
use crate::degradation::DegradationLevel;
use crate::kafka::LoadOffsets;
use crate::messages::{Committed, FilesWritten, LaneFailed, LaneId, LevelChanged};
use crate::metrics as m;
use crate::state::{Checkpoint, Staged, StateStore};
use crate::storage::commit::{CommitError, CommitOutcome, Committer, PartitionRange};
use crate::storage::offsets::TopicOffsets;

/// Commit health the supervisor samples every tick (no message round trip:
/// the committer is busy exactly when commits are slow).
#[derive(Debug, Default)]
pub struct CommitHealth {
    /// Commits failed in a row.
    pub consecutive_failures: AtomicU64,
    /// Duration of the last successful commit.
    pub last_duration_ms: AtomicU64,
    /// Unix milliseconds when the oldest uncommitted files (waiting or in a
    /// running commit) arrived; 0: none.
    pub oldest_pending_ms: AtomicI64,
    pub pending_bytes: AtomicU64,
}

impl CommitHealth {
    /// How long commits take, as the level sees it: the last commit's
    /// duration, or the age of the oldest uncommitted files if that is
    /// larger (a commit that hangs or keeps failing counts).
    pub fn latency_ms(&self, now_ms: i64) -> u64 {
        let oldest = self.oldest_pending_ms.load(Relaxed);
        let waiting = if oldest > 0 {
            (now_ms - oldest).max(0) as u64
        } else {
            0
        };
        self.last_duration_ms.load(Relaxed).max(waiting)
    }
}

#[derive(Debug, Clone)]
pub struct CommitPolicy {
    pub interval: Duration,
    pub max_rows: u64,
    pub max_bytes: u64,
    pub max_pending_bytes: u64,
    pub retain_snapshots: usize,
    pub expire_every_commits: u64,
    pub retry_backoff: Duration,
}

#[derive(Debug, Default, Clone)]
pub struct IcebergCommitterCounters {
    pub num_commits: u64,
    pub num_failed_commits: u64,
    pub num_rows_committed: u64,
    pub num_dead_letters_committed: u64,
    pub num_sequence_events_committed: u64,
    pub num_probable_duplicates_committed: u64,
    pub num_state_promotions_failed: u64,
    pub num_fenced: u64,
    pub num_stale_files_dropped: u64,
    pub last_commit_ms: Option<u64>,
    pub last_error: Option<String>,
}

impl IcebergCommitterCounters {
    fn record_commit(&mut self, outcome: &CommitOutcome, elapsed: Duration) {
        self.num_commits += 1;
        self.num_rows_committed += outcome.rows;
        self.num_dead_letters_committed += outcome.dead_letters;
        self.num_sequence_events_committed += outcome.sequence_events;
        self.num_probable_duplicates_committed += outcome.probable_duplicates;
        self.num_fenced += outcome.fenced.len() as u64;
        self.last_commit_ms = Some(elapsed.as_millis() as u64);
        self.last_error = None;
        metrics::counter!(m::COMMITS, "outcome" => "ok").increment(1);
        metrics::counter!(m::TRADES_COMMITTED).increment(outcome.rows);
        metrics::histogram!(m::COMMIT_DURATION).record(elapsed.as_secs_f64());
        if !outcome.fenced.is_empty() {
            metrics::counter!(m::COMMIT_FENCED).increment(outcome.fenced.len() as u64);
        }
    }

    fn record_failure(&mut self, error: &str) {
        self.num_failed_commits += 1;
        self.last_error = Some(error.to_string());
        metrics::counter!(m::COMMITS, "outcome" => "error").increment(1);
    }
}

/// Files of one partition that wait for the next commit.
#[derive(Debug)]
struct Pending {
    lane: LaneId,
    range: PartitionRange,
    file_bytes: u64,
}

/// Where lane stage state is staged and promoted with each commit.
pub struct StateSink {
    pub store: Arc<dyn StateStore>,
    /// Names this process's staged state (its instance id).
    pub writer: String,
}

pub struct IcebergCommitter {
    committer: Arc<Committer>,
    policy: CommitPolicy,
    state: StateSink,
    /// Catalog calls (commits, snapshot expiry) go through it.
    breaker: Arc<CircuitBreaker>,
    health: Arc<CommitHealth>,
    faults: Arc<crate::faults::Faults>,
    /// SOFT and above skip snapshot expiry (non-essential work).
    level: DegradationLevel,
    /// Stage state of each partition's current lane.
    checkpoints: HashMap<i32, Vec<Arc<dyn Checkpoint>>>,
    supervisor: Option<Recipient<Committed>>,
    lane_failures: Option<Recipient<LaneFailed>>,
    /// Current lane incarnation of each partition this process owns.
    lanes: HashMap<i32, u64>,
    pending: BTreeMap<i32, Pending>,
    pending_rows: u64,
    pending_bytes: u64,
    /// Batchers held until a commit makes room.
    held: Vec<oneshot::Sender<()>>,
    last_commit: Instant,
    retry_after: Option<Instant>,
    epoch: u64,
    /// Committed offsets as of this process's last commit or load.
    committed: BTreeMap<i32, i64>,
    pub counters: IcebergCommitterCounters,
}

impl IcebergCommitter {
    pub fn new(
        committer: Arc<Committer>,
        policy: CommitPolicy,
        state: StateSink,
        breaker: Arc<CircuitBreaker>,
        health: Arc<CommitHealth>,
        faults: Arc<crate::faults::Faults>,
    ) -> Self {
        Self {
            faults,
            committer,
            policy,
            state,
            breaker,
            health,
            level: DegradationLevel::Normal,
            checkpoints: HashMap::new(),
            supervisor: None,
            lane_failures: None,
            lanes: HashMap::new(),
            pending: BTreeMap::new(),
            pending_rows: 0,
            pending_bytes: 0,
            held: Vec::new(),
            last_commit: Instant::now(),
            retry_after: None,
            epoch: 0,
            committed: BTreeMap::new(),
            counters: IcebergCommitterCounters::default(),
        }
    }

    fn drop_pending(&mut self, partition: i32) {
        if let Some(p) = self.pending.remove(&partition) {
            self.pending_rows -= p.range.rows;
            self.pending_bytes -= p.file_bytes;
            if self.pending.is_empty() {
                self.health.oldest_pending_ms.store(0, Relaxed);
            }
            self.publish_pending();
        }
    }

    fn commit_due(&self) -> bool {
        !self.pending.is_empty()
            && self.retry_after.is_none_or(|t| Instant::now() >= t)
            && (self.last_commit.elapsed() >= self.policy.interval
                || self.pending_rows >= self.policy.max_rows
                || self.pending_bytes >= self.policy.max_bytes)
    }

    /// Commits everything pending, as one future that holds the actor.
    fn commit_future(&mut self) -> ResponseActFuture<Self, Result<(), String>> {
        let pending = std::mem::take(&mut self.pending);
        self.recount_pending();
        let lanes: Vec<(i32, LaneId, u64)> = pending
            .values()
            .map(|p| (p.range.partition, p.lane, p.file_bytes))
            .collect();
        let ranges: Vec<PartitionRange> = pending.into_values().map(|p| p.range).collect();
        // Each lane stage's state at the end of its range, staged before
        // the commit and put in force after it.
        let mut staged: Vec<Staged> = Vec::new();
        let mut checkpoints: Vec<(i32, i64, Arc<dyn Checkpoint>)> = Vec::new();
        for range in &ranges {
            for checkpoint in self.checkpoints.get(&range.partition).into_iter().flatten() {
                staged.push(checkpoint.stage(range.next_offset));
                checkpoints.push((range.partition, range.next_offset, checkpoint.clone()));
            }
        }
        let committer = self.committer.clone();
        let breaker = self.breaker.clone();
        let faults = self.faults.clone();
        let store = self.state.store.clone();
        let writer = self.state.writer.clone();
        let staged_partitions: Vec<i32> = checkpoints.iter().map(|(p, ..)| *p).collect();
        let started = Instant::now();
        Box::pin(
            async move {
                if let Err(err) = store.stage(&writer, &staged).await {
                    let err = crate::storage::commit::CommitError::State(err.to_string());
                    return (ranges, Err(err), false);
                }
                let result = catalog_call(&breaker, &faults, committer.commit(&ranges)).await;
                let mut promoted = false;
                if let Ok(outcome) = &result {
                    let scopes: Vec<(String, i64)> = staged
                        .iter()
                        .zip(&staged_partitions)
                        .filter(|(_, partition)| outcome.committed.contains_key(partition))
                        .map(|(s, _)| (s.scope.clone(), s.offset))
                        .collect();
                    match store.promote(&writer, &scopes).await {
                        Ok(()) => promoted = true,
                        // The data is committed; the state stays staged and
                        // goes again with the next epoch (or a load promotes it).
                        Err(err) => {
                            warn!(error = %err, "failed to put the committed epoch's stage state in force")
                        }
                    }
                }
                (ranges, result, promoted)
            }
            .into_actor(self)
            .map(move |(ranges, result, promoted), act, _ctx| {
                act.last_commit = Instant::now();
                match result {
                    Ok(outcome) => {
                        if !promoted {
                            act.counters.num_state_promotions_failed += 1;
                        }
                        for (partition, next, checkpoint) in &checkpoints {
                            if outcome.committed.get(partition) == Some(next) {
                                checkpoint.committed(*next, promoted);
                            }
                        }
                        act.apply_outcome(&outcome, &lanes, started.elapsed());
                        Ok(())
                    }
                    Err(err) => {
                        let error = err.to_string();
                        warn!(error = %error, "commit failed, keeping files for the next attempt");
                        act.counters.record_failure(&error);
                        act.health.consecutive_failures.fetch_add(1, Relaxed);
                        act.retry_after = Some(Instant::now() + act.policy.retry_backoff);
                        // Put everything back in front of what arrived meanwhile.
                        for ((partition, lane, file_bytes), range) in lanes.into_iter().zip(ranges) {
                            act.restore(partition, lane, file_bytes, range);
                        }
                        if act.pending.is_empty() {
                            // Every failed range's lane was rebuilt or revoked
                            // meanwhile: nothing waits for a commit any more.
                            act.health.oldest_pending_ms.store(0, Relaxed);
                        }
                        act.publish_pending();
                        Err(error)
                    }
                }
            }),
        )
    }

    fn restore(&mut self, partition: i32, lane: LaneId, file_bytes: u64, mut range: PartitionRange) {
        if self.lanes.get(&partition) != Some(&lane.incarnation) {
            return; // the lane was rebuilt or revoked meanwhile
        }
        if let Some(newer) = self.pending.remove(&partition) {
            // Files that arrived during the commit continue the range.
            range.next_offset = newer.range.next_offset;
            range.rows += newer.range.rows;
            range.files.extend(newer.range.files);
            range.side.extend(newer.range.side);
            self.pending_rows -= newer.range.rows;
            self.pending_bytes -= newer.file_bytes;
            return self.restore(partition, lane, file_bytes + newer.file_bytes, range);
        }
        self.pending_rows += range.rows;
        self.pending_bytes += file_bytes;
        self.pending.insert(
            partition,
            Pending {
                lane,
                range,
                file_bytes,
            },
        );
    }

    fn apply_outcome(&mut self, outcome: &CommitOutcome, lanes: &[(i32, LaneId, u64)], elapsed: Duration) {
        self.retry_after = None;
        self.counters.record_commit(outcome, elapsed);
        self.health.consecutive_failures.store(0, Relaxed);
        self.health
            .last_duration_ms
            .store(elapsed.as_millis() as u64, Relaxed);
        // The committed ranges left `pending` when the commit started; what
        // is there now arrived during the commit.
        let arrived = if self.pending.is_empty() {
            0
        } else {
            chrono::Utc::now().timestamp_millis()
        };
        self.health.oldest_pending_ms.store(arrived, Relaxed);
        self.recount_pending();
        for (&partition, &next) in &outcome.committed {
            self.committed.insert(partition, next);
        }
        for &(partition, table_next) in &outcome.fenced {
            warn!(
                partition,
                ?table_next,
                "table moved past this lane's data; rebuilding the lane"
            );
            if let (Some(failures), Some(&(_, lane, _))) = (
                &self.lane_failures,
                lanes.iter().find(|(p, _, _)| *p == partition),
            ) {
                failures.do_send(LaneFailed {
                    lane,
                    stage: "iceberg_committer",
                    error: format!("fenced: the table stands at offset {table_next:?}"),
                });
            }
        }
        if !outcome.committed.is_empty() {
            self.epoch += 1;
            if let Some(supervisor) = &self.supervisor {
                supervisor.do_send(Committed {
                    epoch: self.epoch,
                    offsets: outcome.committed.clone(),
                    rows: outcome.rows,
                    snapshot_id: outcome.snapshot_id,
                });
            }
        }
        for waiter in self.held.drain(..) {
            let _ = waiter.send(());
        }
    }

    fn recount_pending(&mut self) {
        self.pending_rows = self.pending.values().map(|p| p.range.rows).sum();
        self.pending_bytes = self.pending.values().map(|p| p.file_bytes).sum();
        self.publish_pending();
    }

    fn publish_pending(&self) {
        metrics::gauge!(m::COMMIT_PENDING_BYTES).set(self.pending_bytes as f64);
        self.health.pending_bytes.store(self.pending_bytes, Relaxed);
        // Reset only when a commit succeeded (`apply_outcome`) or files were
        // dropped: files taken into a running commit are still uncommitted.
        if !self.pending.is_empty() && self.health.oldest_pending_ms.load(Relaxed) == 0 {
            self.health
                .oldest_pending_ms
                .store(chrono::Utc::now().timestamp_millis(), Relaxed);
        }
    }

    fn maybe_expire(&mut self, ctx: &mut Context<Self>) {
        if self.level >= DegradationLevel::Soft
            || self.policy.expire_every_commits == 0
            || !self
                .counters
                .num_commits
                .is_multiple_of(self.policy.expire_every_commits)
        {
            return;
        }
        let committer = self.committer.clone();
        let breaker = self.breaker.clone();
        let retain = self.policy.retain_snapshots;
        ctx.wait(
            async move {
                if let Err(err) = breaker.call(committer.expire_snapshots(retain)).await {
                    warn!(error = %err, "snapshot expiry failed; will try again later");
                }
            }
            .into_actor(self),
        );
    }
}

impl IcebergCommitter {
    /// Reads the trades table's recorded offsets, through the catalog breaker.
    fn load_offsets(&self) -> impl Future<Output = Result<TopicOffsets, CommitError>> + 'static {
        let (committer, breaker, faults) =
            (self.committer.clone(), self.breaker.clone(), self.faults.clone());
        async move { catalog_call(&breaker, &faults, committer.load_offsets()).await }
    }
}

/// Runs a call to the catalog through the catalog breaker. The injected
/// `catalog_down` fault fails it before it reaches the catalog, as an
/// unreachable catalog would.
async fn catalog_call<T>(
    breaker: &CircuitBreaker,
    faults: &crate::faults::Faults,
    call: impl Future<Output = Result<T, CommitError>>,
) -> Result<T, CommitError> {
    let guarded = async {
        if faults.catalog_down() {
            return Err(CommitError::Iceberg(iceberg::Error::new(
                iceberg::ErrorKind::Unexpected,
                "injected fault: the catalog is down",
            )));
        }
        call.await
    };
    match breaker.call(guarded).await {
        Ok(value) => Ok(value),
        Err(BreakerError::Open(open)) => Err(CommitError::Unavailable(open)),
        Err(BreakerError::Failed(err)) => Err(err),
    }
}

impl Actor for IcebergCommitter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(64);
        let tick = (self.policy.interval / 4).clamp(Duration::from_millis(5), Duration::from_millis(250));
        ctx.run_interval(tick, |act, ctx| {
            if act.commit_due() {
                ctx.notify(CommitNow);
            }
        });
    }
}

// Messages

/// Wires the committer to the supervisor (built after it).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectSupervisor {
    pub committed: Recipient<Committed>,
    pub lane_failures: Recipient<LaneFailed>,
}

impl Handler<ConnectSupervisor> for IcebergCommitter {
    type Result = ();

    fn handle(&mut self, msg: ConnectSupervisor, _: &mut Context<Self>) {
        self.supervisor = Some(msg.committed);
        self.lane_failures = Some(msg.lane_failures);
    }
}

/// A lane (re)starts for a partition: forget older incarnations' files.
/// Replies with the partition's committed next offset (None if the table has
/// none), which is where the new lane must start.
#[derive(Message)]
#[rtype(result = "Result<Option<i64>, String>")]
pub struct RegisterLane {
    pub lane: LaneId,
    /// The lane's stage state, staged and promoted with its commits.
    pub checkpoints: Vec<Arc<dyn Checkpoint>>,
}

impl Handler<RegisterLane> for IcebergCommitter {
    type Result = ResponseActFuture<Self, Result<Option<i64>, String>>;

    fn handle(&mut self, msg: RegisterLane, _: &mut Context<Self>) -> Self::Result {
        let partition = msg.lane.partition;
        self.lanes.insert(partition, msg.lane.incarnation);
        self.checkpoints.insert(partition, msg.checkpoints);
        self.drop_pending(partition);
        Box::pin(self.load_offsets().into_actor(self).map(move |result, act, _| {
            let offsets = result.map_err(|e| format!("failed to read offsets from Iceberg: {e}"))?;
            let next = offsets.next_offset(partition);
            if let Some(next) = next {
                act.committed.insert(partition, next);
            }
            Ok(next)
        }))
    }
}

/// Partitions that left this process: drop their lanes' pending files.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReleasePartitions {
    pub partitions: Vec<i32>,
}

impl Handler<ReleasePartitions> for IcebergCommitter {
    type Result = ();

    fn handle(&mut self, msg: ReleasePartitions, _: &mut Context<Self>) {
        for partition in msg.partitions {
            self.lanes.remove(&partition);
            self.checkpoints.remove(&partition);
            self.drop_pending(partition);
            self.committed.remove(&partition);
        }
    }
}

impl Handler<LoadOffsets> for IcebergCommitter {
    type Result = ResponseActFuture<Self, Result<BTreeMap<i32, i64>, String>>;

    fn handle(&mut self, msg: LoadOffsets, _: &mut Context<Self>) -> Self::Result {
        Box::pin(self.load_offsets().into_actor(self).map(move |result, act, _| {
            let offsets = result.map_err(|e| format!("failed to read offsets from Iceberg: {e}"))?;
            let found: BTreeMap<i32, i64> = msg
                .partitions
                .iter()
                .filter_map(|&p| offsets.next_offset(p).map(|n| (p, n)))
                .collect();
            act.committed.extend(found.iter().map(|(p, n)| (*p, *n)));
            Ok(found)
        }))
    }
}

impl Handler<FilesWritten> for IcebergCommitter {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: FilesWritten, ctx: &mut Context<Self>) -> Self::Result {
        let partition = msg.lane.partition;
        if self.lanes.get(&partition) != Some(&msg.lane.incarnation) {
            self.counters.num_stale_files_dropped += msg.data_files.len() as u64;
            info!(lane = %msg.lane, "dropping files of a lane that was rebuilt or revoked");
            return Box::pin(async {});
        }
        match self.pending.get_mut(&partition) {
            Some(p) if p.range.next_offset != msg.first_offset => {
                let error = format!(
                    "files start at offset {} but pending data ends at {}",
                    msg.first_offset, p.range.next_offset
                );
                error!(lane = %msg.lane, error = %error, "non-contiguous files; rebuilding the lane");
                self.drop_pending(partition);
                if let Some(failures) = &self.lane_failures {
                    failures.do_send(LaneFailed {
                        lane: msg.lane,
                        stage: "iceberg_committer",
                        error,
                    });
                }
                return Box::pin(async {});
            }
            Some(p) => {
                p.range.next_offset = msg.next_offset;
                p.range.rows += msg.rows;
                p.range.files.extend(msg.data_files);
                p.range.side.extend(msg.side);
                p.file_bytes += msg.file_bytes;
            }
            None => {
                self.pending.insert(
                    partition,
                    Pending {
                        lane: msg.lane,
                        range: PartitionRange {
                            partition,
                            first_offset: msg.first_offset,
                            next_offset: msg.next_offset,
                            files: msg.data_files,
                            rows: msg.rows,
                            side: msg.side,
                        },
                        file_bytes: msg.file_bytes,
                    },
                );
            }
        }
        self.pending_rows += msg.rows;
        self.pending_bytes += msg.file_bytes;
        self.publish_pending();
        if self.commit_due() {
            ctx.notify(CommitNow);
        }
        if self.pending_bytes > self.policy.max_pending_bytes {
            // Hold the batcher until a commit makes room.
            let (tx, rx) = oneshot::channel();
            self.held.push(tx);
            return Box::pin(async move {
                let _ = rx.await;
            });
        }
        Box::pin(async {})
    }
}

/// Commit what is pending now (on the interval, on size, or on shutdown).
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct CommitNow;

impl Handler<CommitNow> for IcebergCommitter {
    type Result = AtomicResponse<Self, Result<(), String>>;

    fn handle(&mut self, _: CommitNow, _: &mut Context<Self>) -> Self::Result {
        if self.pending.is_empty() {
            return AtomicResponse::new(Box::pin(actix::fut::ready(Ok(()))));
        }
        AtomicResponse::new(Box::pin(self.commit_future().map(|result, act, ctx| {
            if result.is_ok() {
                act.maybe_expire(ctx);
            }
            result
        })))
    }
}

impl Handler<LevelChanged> for IcebergCommitter {
    type Result = ();

    fn handle(&mut self, msg: LevelChanged, _: &mut Context<Self>) {
        self.level = msg.level;
    }
}

/// Stops the committer where it stands (no commit).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopCommitter;

impl Handler<StopCommitter> for IcebergCommitter {
    type Result = ();

    fn handle(&mut self, _: StopCommitter, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// The committer's figures for `/v1/pipeline`.
#[derive(Message)]
#[rtype(result = "CommitterStatus")]
pub struct GetCommitterStatus;

#[derive(Debug, Clone, serde::Serialize)]
pub struct CommitterStatus {
    pub epoch: u64,
    pub commits: u64,
    pub failed_commits: u64,
    pub rows_committed: u64,
    pub dead_letters_committed: u64,
    pub sequence_events_committed: u64,
    pub probable_duplicates_committed: u64,
    /// Commits whose stage state could not be put in force at once (it
    /// stays staged and goes with the next commit).
    pub state_promotions_failed: u64,
    pub fenced: u64,
    pub pending_rows: u64,
    pub pending_bytes: u64,
    pub last_commit_ms: Option<u64>,
    pub last_error: Option<String>,
    pub committed_offsets: BTreeMap<i32, i64>,
}

impl Handler<GetCommitterStatus> for IcebergCommitter {
    type Result = MessageResult<GetCommitterStatus>;

    fn handle(&mut self, _: GetCommitterStatus, _: &mut Context<Self>) -> Self::Result {
        let c = &self.counters;
        MessageResult(CommitterStatus {
            epoch: self.epoch,
            commits: c.num_commits,
            failed_commits: c.num_failed_commits,
            rows_committed: c.num_rows_committed,
            dead_letters_committed: c.num_dead_letters_committed,
            sequence_events_committed: c.num_sequence_events_committed,
            probable_duplicates_committed: c.num_probable_duplicates_committed,
            state_promotions_failed: c.num_state_promotions_failed,
            fenced: c.num_fenced,
            pending_rows: self.pending_rows,
            pending_bytes: self.pending_bytes,
            last_commit_ms: c.last_commit_ms,
            last_error: c.last_error.clone(),
            committed_offsets: self.committed.clone(),
        })
    }
}
