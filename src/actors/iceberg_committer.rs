//! One per table set: collects every lane's data files and commits them in
//! one Iceberg snapshot per interval (or sooner when rows or bytes pile up),
//! with the offsets they cover; then tells the supervisor what is durable.
//!
//! Which files are accepted, what a commit takes and puts back, and when a
//! commit is due are decided by [`PendingFiles`]; this actor runs commits,
//! holds batchers while too many bytes wait, and reports.
//!
//! One commit runs at a time, beside the actor's mailbox rather than in
//! place of it: lanes' files are accepted into the book while a commit is
//! in flight, so batchers keep writing (a commit takes 0.2–1 s with 64
//! partitions). What touches a partition's offsets waits for the running
//! commit to end: a lane registration or an assignment reads the table's
//! offsets only once the commit that may move them has landed or failed.
//! A commit counts
//! only once the catalog shows it ([`Committer::commit`] verifies every
//! snapshot it makes); only then is the epoch's stage state put in force
//! and its trade ids handed to the process-wide dedup windows.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use actix::prelude::*;
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::breaker::{BreakerError, CircuitBreaker};
use crate::dedup::UnorderedWindows;
use crate::degradation::DegradationLevel;
use crate::messages::{
    Committed, FilesWritten, LaneError, LaneFailed, LaneId, LevelChanged, LoadOffsets, OffsetsUnavailable,
    RegisterError, RegisterLane, ReleasePartitions, Stage,
};
use crate::metrics as m;
use crate::pending::{
    Accepted, CommitSchedule, CommitTimes, DuePolicy, Pending, PendingFiles, next_due_after,
};
use crate::query::live::LiveRows;
use crate::state::{Checkpoint, EpochCheckpoint, StateStore, put_in_force};
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
    /// Commit this long after the last commit once every pending range
    /// comes from a caught-up lane (`batcher.idle_flush_ms`); None: off.
    pub caught_up_gap: Option<Duration>,
    pub max_rows: u64,
    pub max_bytes: u64,
    pub max_pending_bytes: u64,
    pub retry_backoff: Duration,
}

#[derive(Debug, Default, Clone)]
pub struct IcebergCommitterCounters {
    pub num_commits: u64,
    pub num_failed_commits: u64,
    /// Commits the catalog reported and the table did not hold.
    pub num_not_persisted: u64,
    pub num_rows_committed: u64,
    pub num_reference_committed: u64,
    pub num_dead_letters_committed: u64,
    pub num_sequence_events_committed: u64,
    pub num_probable_duplicates_committed: u64,
    pub num_state_promotions_failed: u64,
    pub num_state_promotions_refused: u64,
    pub num_fenced: u64,
    pub num_fenced_behind: u64,
    pub num_stale_files_dropped: u64,
    pub num_stale_partitions: u64,
    pub last_commit_ms: Option<u64>,
    pub last_error: Option<String>,
}

impl IcebergCommitterCounters {
    /// `elapsed`: from the commit's start until the catalog showed it;
    /// `landed_us`: unix microseconds at that moment (the trades are
    /// durable and visible to readers from then on).
    fn record_commit(&mut self, outcome: &CommitOutcome, elapsed: Duration, landed_us: i64) {
        self.num_commits += 1;
        self.num_rows_committed += outcome.rows;
        self.num_reference_committed += outcome.reference;
        self.num_dead_letters_committed += outcome.dead_letters;
        self.num_sequence_events_committed += outcome.sequence_events;
        self.num_probable_duplicates_committed += outcome.probable_duplicates;
        self.num_fenced += outcome.fenced.len() as u64;
        self.last_commit_ms = Some(elapsed.as_millis() as u64);
        self.last_error = None;
        metrics::counter!(m::COMMITS, "outcome" => "ok").increment(1);
        metrics::counter!(m::TRADES_COMMITTED).increment(outcome.rows);
        metrics::counter!(m::REFERENCE_COMMITTED).increment(outcome.reference);
        metrics::histogram!(m::COMMIT_DURATION).record(elapsed.as_secs_f64());
        metrics::gauge!(m::LAST_COMMIT).set(landed_us as f64 / 1e6);
        if !outcome.fenced.is_empty() {
            metrics::counter!(m::COMMIT_FENCED).increment(outcome.fenced.len() as u64);
        }
    }

    fn record_failure(&mut self, error: &CommitError) {
        self.num_failed_commits += 1;
        if matches!(error, CommitError::NotPersisted { .. }) {
            self.num_not_persisted += 1;
        }
        self.last_error = Some(error.to_string());
        metrics::counter!(m::COMMITS, "outcome" => error.outcome_label()).increment(1);
    }

    fn record_stale_partition(&mut self) {
        self.num_stale_partitions += 1;
        metrics::counter!(m::STALE_PARTITIONS).increment(1);
    }
}

/// Where lane stage state is staged and promoted with each commit.
pub struct StateSink {
    pub store: Arc<dyn StateStore>,
    /// Names this process's staged state (its instance id).
    pub writer: String,
}

pub struct IcebergCommitterParams {
    pub committer: Arc<Committer>,
    pub policy: CommitPolicy,
    pub state: StateSink,
    /// Catalog calls (commits, snapshot expiry, offset loads) go through it.
    pub breaker: Arc<CircuitBreaker>,
    pub health: Arc<CommitHealth>,
    pub faults: Arc<crate::faults::Faults>,
    /// The process-wide dedup windows of ids without order.
    pub windows: Arc<UnorderedWindows>,
    /// Lanes' uncommitted rows: a commit in the catalog drops what it covers.
    pub live: Arc<LiveRows>,
    /// Where the committer publishes when its next commit is due.
    pub schedule: Arc<CommitSchedule>,
}

/// A lane stage state to tell of a commit: its checkpoint, the next offset
/// committed, whether its staged state is in force.
type Told = (Arc<dyn Checkpoint>, i64, bool);

/// A commit that runs beside the mailbox.
struct InFlight {
    started: Instant,
    rows: u64,
    /// Replies owed to the `CommitNow` requests this commit answers.
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
}

pub struct IcebergCommitter {
    committer: Arc<Committer>,
    policy: CommitPolicy,
    state: StateSink,
    breaker: Arc<CircuitBreaker>,
    health: Arc<CommitHealth>,
    faults: Arc<crate::faults::Faults>,
    windows: Arc<UnorderedWindows>,
    live: Arc<LiveRows>,
    schedule: Arc<CommitSchedule>,
    /// SOFT and above skip snapshot expiry (non-essential work).
    level: DegradationLevel,
    /// Stage state of each partition's current lane.
    checkpoints: HashMap<i32, Vec<Arc<dyn Checkpoint>>>,
    supervisor: Option<Recipient<Committed>>,
    lane_failures: Option<Recipient<LaneFailed>>,
    book: PendingFiles,
    /// Partitions whose stale files were reported this episode.
    stale_reported: HashSet<i32>,
    /// Batchers held until a commit makes room.
    held: Vec<oneshot::Sender<()>>,
    /// The commit running now, if any.
    in_flight: Option<InFlight>,
    /// Replies owed to `CommitNow` requests, answered by the next commit
    /// that starts (one that runs already took its files before they came).
    next_waiters: Vec<oneshot::Sender<Result<(), String>>>,
    /// Told when the running commit ends, successful or not.
    settled: Vec<oneshot::Sender<()>>,
    last_commit: Instant,
    /// The commit due by the interval: dues are an interval apart.
    next_due: Instant,
    retry_after: Option<Instant>,
    epoch: u64,
    /// Committed offsets as of this process's last commit or load.
    committed: BTreeMap<i32, i64>,
    pub counters: IcebergCommitterCounters,
}

impl IcebergCommitter {
    pub fn new(params: IcebergCommitterParams) -> Self {
        let interval = params.policy.interval;
        Self {
            committer: params.committer,
            policy: params.policy,
            state: params.state,
            breaker: params.breaker,
            health: params.health,
            faults: params.faults,
            windows: params.windows,
            live: params.live,
            schedule: params.schedule,
            level: DegradationLevel::Normal,
            checkpoints: HashMap::new(),
            supervisor: None,
            lane_failures: None,
            book: PendingFiles::default(),
            stale_reported: HashSet::new(),
            held: Vec::new(),
            in_flight: None,
            next_waiters: Vec::new(),
            settled: Vec::new(),
            last_commit: Instant::now(),
            next_due: Instant::now() + interval,
            retry_after: None,
            epoch: 0,
            committed: BTreeMap::new(),
            counters: IcebergCommitterCounters::default(),
        }
    }

    fn due_policy(&self) -> DuePolicy {
        DuePolicy {
            interval: self.policy.interval,
            caught_up_gap: self.policy.caught_up_gap,
            max_rows: self.policy.max_rows,
            max_bytes: self.policy.max_bytes,
        }
    }

    fn commit_due(&self) -> bool {
        let times = CommitTimes {
            last_commit: self.last_commit,
            next_due: self.next_due,
            retry_after: self.retry_after,
        };
        self.book.is_due(&self.due_policy(), Instant::now(), times)
    }

    fn fail_lane(&self, lane: LaneId, error: LaneError) {
        if let Some(failures) = &self.lane_failures {
            failures.do_send(LaneFailed {
                lane,
                stage: Stage::IcebergCommitter,
                error,
            });
        }
    }

    /// Starts a commit if one is due and none runs. A due that came with
    /// nothing pending passes: the batchers are told the next one.
    fn maybe_commit(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight.is_some() {
            return;
        }
        if self.commit_due() {
            self.start_commit(ctx);
        } else if self.book.is_empty() && Instant::now() >= self.next_due {
            self.schedule_next(ctx);
        }
    }

    /// Moves to the next commit due by the interval (once the one before
    /// came), publishes it for the batchers, which flush just before it,
    /// and wakes up then. Early commits do not move it.
    fn schedule_next(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        self.next_due = next_due_after(self.next_due, self.policy.interval, now);
        let due = self
            .retry_after
            .map_or(self.next_due, |retry| retry.max(self.next_due));
        let wait = due.saturating_duration_since(now);
        let now_ms = crate::model::now_us() / 1000;
        self.schedule.set_next_due(now_ms + wait.as_millis() as i64);
        ctx.run_later(wait, |act, ctx| act.maybe_commit(ctx));
    }

    /// Commits everything pending, beside the mailbox, unless a commit runs
    /// already (it starts the next one when it ends, if due or requested).
    /// Answers the `CommitNow` requests waiting for a commit to start.
    fn start_commit(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight.is_some() {
            return;
        }
        let waiters = std::mem::take(&mut self.next_waiters);
        if self.book.is_empty() {
            for waiter in waiters {
                let _ = waiter.send(Ok(()));
            }
            return;
        }
        if Instant::now() >= self.next_due {
            // This commit takes what the lanes flushed for the due.
            self.schedule_next(ctx);
        }
        self.in_flight = Some(InFlight {
            started: Instant::now(),
            rows: self.book.rows(),
            waiters,
        });
        let commit = self.commit_future().then(|(result, told), act, _ctx| {
            // Lanes' stage state learns of the commit one lane at a time,
            // the mailbox served in between (moving a commit's ids into the
            // dedup windows takes ~0.6 µs an id). The commit settles after.
            futures::stream::iter(told)
                .for_each(|(checkpoint, next_offset, in_force)| async move {
                    checkpoint.committed(next_offset, in_force);
                    tokio::task::yield_now().await;
                })
                .map(move |()| result)
                .into_actor(act)
        });
        ctx.spawn(commit.map(|result, act, ctx| {
            let done = act.in_flight.take().expect("the running commit is recorded");
            for waiter in done.waiters {
                let _ = waiter.send(result.clone());
            }
            for settled in act.settled.drain(..) {
                let _ = settled.send(());
            }
            if !act.next_waiters.is_empty() {
                act.start_commit(ctx);
            } else {
                act.maybe_commit(ctx);
            }
        }));
    }

    /// Resolves once no commit runs that was running when it was asked for.
    fn commit_settled(&mut self) -> impl Future<Output = ()> + use<> {
        let rx = self.in_flight.is_some().then(|| {
            let (tx, rx) = oneshot::channel();
            self.settled.push(tx);
            rx
        });
        async move {
            if let Some(rx) = rx {
                let _ = rx.await;
            }
        }
    }

    /// Commits everything pending, as one actor future. Returns the lane
    /// stage states to tell of the commit ([`Checkpoint::committed`]).
    fn commit_future(&mut self) -> ResponseActFuture<Self, (Result<(), String>, Vec<Told>)> {
        let (heads, ranges): (Vec<(LaneId, u64)>, Vec<PartitionRange>) = self
            .book
            .take()
            .into_iter()
            .map(|p| ((p.lane, p.file_bytes), p.range))
            .unzip();
        self.publish_pending();
        // Each lane stage's state at the end of its range, staged before
        // the commit and put in force after it.
        let epoch: Vec<EpochCheckpoint> = ranges
            .iter()
            .flat_map(|range| {
                self.checkpoints
                    .get(&range.partition)
                    .into_iter()
                    .flatten()
                    .map(|checkpoint| {
                        EpochCheckpoint::stage(range.partition, range.next_offset, checkpoint.clone())
                    })
            })
            .collect();
        let committer = self.committer.clone();
        let breaker = self.breaker.clone();
        let faults = self.faults.clone();
        let store = self.state.store.clone();
        let writer = self.state.writer.clone();
        let started = Instant::now();
        Box::pin(
            async move {
                let staged: Vec<_> = epoch.iter().map(|c| c.staged.clone()).collect();
                if let Err(err) = store.stage(&writer, &staged).await {
                    let landed = (started.elapsed(), crate::model::now_us());
                    return (
                        ranges,
                        epoch,
                        Err(CommitError::State(err.to_string())),
                        None,
                        landed,
                    );
                }
                let result = catalog_call(&breaker, &faults, committer.commit(&ranges)).await;
                // Durable from here; what follows (state promotion, ids into
                // the dedup windows) is K2's own bookkeeping.
                let landed = (started.elapsed(), crate::model::now_us());
                let promotion = match &result {
                    Ok(outcome) => {
                        faults.hold_after_commit().await;
                        Some(put_in_force(store.as_ref(), &writer, &epoch, &outcome.committed).await)
                    }
                    Err(_) => None,
                };
                (ranges, epoch, result, promotion, landed)
            }
            .into_actor(self)
            .map(move |(ranges, epoch, result, promotion, landed), act, _ctx| {
                act.last_commit = Instant::now();
                match result {
                    Ok(outcome) => {
                        let promotion = promotion.unwrap_or_default();
                        let told = epoch
                            .iter()
                            .filter(|c| outcome.committed.get(&c.partition) == Some(&c.next_offset))
                            .map(|c| {
                                (
                                    c.checkpoint.clone(),
                                    c.next_offset,
                                    promotion.in_force(&c.staged.scope),
                                )
                            })
                            .collect();
                        act.note_promotion(&promotion, &heads);
                        act.apply_outcome(&outcome, &heads, &ranges, landed);
                        (Ok(()), told)
                    }
                    Err(err) => {
                        warn!(error = %err, "commit failed, keeping files for the next attempt");
                        act.counters.record_failure(&err);
                        act.health.consecutive_failures.fetch_add(1, Relaxed);
                        act.retry_after = Some(Instant::now() + act.policy.retry_backoff);
                        // Put everything back in front of what arrived meanwhile.
                        let taken = heads
                            .into_iter()
                            .zip(ranges)
                            .map(|((lane, file_bytes), range)| Pending {
                                lane,
                                range,
                                file_bytes,
                                // Retried after the backoff, by the interval.
                                caught_up: false,
                            })
                            .collect();
                        act.book.restore(taken);
                        if act.book.is_empty() {
                            // Every failed range's lane was rebuilt or revoked
                            // meanwhile: nothing waits for a commit any more.
                            act.health.oldest_pending_ms.store(0, Relaxed);
                        }
                        act.publish_pending();
                        (Err(err.to_string()), Vec::new())
                    }
                }
            }),
        )
    }

    /// Counts what the epoch's state promotion did; a partition whose state
    /// could not be put in force (even after restaging it whole) has its
    /// lane rebuilt, which reloads the state from the store.
    fn note_promotion(&mut self, promotion: &crate::state::PromotionReport, heads: &[(LaneId, u64)]) {
        if promotion.failed {
            self.counters.num_state_promotions_failed += 1;
        }
        self.counters.num_state_promotions_refused += promotion.refused.len() as u64;
        for (partition, error) in &promotion.not_in_force {
            if let Some(&(lane, _)) = heads.iter().find(|(l, _)| l.partition == *partition) {
                error!(%lane, error = %error, "the committed epoch's stage state is not in force; rebuilding the lane");
                self.fail_lane(lane, LaneError::StateNotInForce(error.clone()));
            }
        }
    }

    fn apply_outcome(
        &mut self,
        outcome: &CommitOutcome,
        heads: &[(LaneId, u64)],
        ranges: &[PartitionRange],
        (elapsed, landed_us): (Duration, i64),
    ) {
        self.retry_after = None;
        self.counters.record_commit(outcome, elapsed, landed_us);
        self.health.consecutive_failures.store(0, Relaxed);
        self.health
            .last_duration_ms
            .store(elapsed.as_millis() as u64, Relaxed);
        // The committed ranges left the book when the commit started; what
        // is there now arrived during the commit.
        let arrived = if self.book.is_empty() {
            0
        } else {
            chrono::Utc::now().timestamp_millis()
        };
        self.health.oldest_pending_ms.store(arrived, Relaxed);
        self.publish_pending();
        for (&partition, &next) in &outcome.committed {
            // A partition released while the commit ran is not this
            // process's any more.
            if self.book.current(partition).is_some() {
                self.committed.insert(partition, next);
                self.live.committed(partition, next);
            }
        }
        for &(partition, table_next) in &outcome.fenced {
            self.fenced(partition, table_next, heads, ranges);
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

    /// The table refused `partition`'s range: it stands at `table_next`. If
    /// that is behind what this process believed committed, ids this process
    /// moved into the shared dedup windows may never have reached the table:
    /// they are dropped, so the replay is not judged duplicate.
    fn fenced(
        &mut self,
        partition: i32,
        table_next: Option<i64>,
        heads: &[(LaneId, u64)],
        ranges: &[PartitionRange],
    ) {
        let believed = self.committed.get(&partition).copied();
        if believed.is_some_and(|b| table_next.is_none_or(|t| t < b)) {
            let from = table_next.unwrap_or(i64::MIN);
            let forgotten = self.windows.forget(partition, from);
            self.counters.num_fenced_behind += 1;
            error!(
                partition,
                ?table_next,
                ?believed,
                forgotten,
                "the table stands behind what this process committed; its ids of the partition from there are dropped"
            );
            match table_next {
                Some(next) => self.committed.insert(partition, next),
                None => self.committed.remove(&partition),
            };
        }
        let first = ranges
            .iter()
            .find(|r| r.partition == partition)
            .map(|r| r.first_offset);
        warn!(
            partition,
            ?table_next,
            ?first,
            "table moved past this lane's data; rebuilding the lane"
        );
        if let Some(&(lane, _)) = heads.iter().find(|(l, _)| l.partition == partition) {
            self.fail_lane(lane, LaneError::Fenced { table_next });
        }
    }

    fn publish_pending(&self) {
        let bytes = self.book.bytes();
        metrics::gauge!(m::COMMIT_PENDING_BYTES).set(bytes as f64);
        self.health.pending_bytes.store(bytes, Relaxed);
        // Reset only when a commit succeeded (`apply_outcome`) or files were
        // dropped: files taken into a running commit are still uncommitted.
        if !self.book.is_empty() && self.health.oldest_pending_ms.load(Relaxed) == 0 {
            self.health
                .oldest_pending_ms
                .store(chrono::Utc::now().timestamp_millis(), Relaxed);
        }
    }

    /// Reads the trades table's recorded offsets, through the catalog
    /// breaker, once the running commit (if any) ended: it may move them.
    fn load_offsets(&mut self) -> impl Future<Output = Result<TopicOffsets, OffsetsUnavailable>> + use<> {
        let settled = self.commit_settled();
        let (committer, breaker, faults) =
            (self.committer.clone(), self.breaker.clone(), self.faults.clone());
        async move {
            settled.await;
            catalog_call(&breaker, &faults, committer.load_offsets())
                .await
                .map_err(|e| OffsetsUnavailable(e.to_string()))
        }
    }

    /// The book dropped `partition`'s files (a new lane or a release).
    fn files_dropped(&mut self, partition: i32) {
        self.stale_reported.remove(&partition);
        if self.book.is_empty() {
            self.health.oldest_pending_ms.store(0, Relaxed);
        }
        self.publish_pending();
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
        ctx.run_interval(tick, |act, ctx| act.maybe_commit(ctx));
        self.schedule_next(ctx);
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

impl Handler<RegisterLane> for IcebergCommitter {
    type Result = ResponseActFuture<Self, Result<Option<i64>, RegisterError>>;

    fn handle(&mut self, msg: RegisterLane, _: &mut Context<Self>) -> Self::Result {
        let partition = msg.lane.partition;
        if let Err(superseded) = self.book.register(msg.lane) {
            info!(error = %superseded, "refusing a superseded lane registration");
            return Box::pin(actix::fut::ready(Err(superseded.into())));
        }
        self.checkpoints.insert(partition, msg.checkpoints);
        self.files_dropped(partition);
        // A running commit may hold the old lane's range of the partition:
        // the new lane starts where the table stands once it ended.
        Box::pin(self.load_offsets().into_actor(self).map(move |result, act, _| {
            let next = result?.next_offset(partition);
            if let Some(next) = next {
                act.committed.insert(partition, next);
            }
            Ok(next)
        }))
    }
}

impl Handler<ReleasePartitions> for IcebergCommitter {
    type Result = ();

    fn handle(&mut self, msg: ReleasePartitions, _: &mut Context<Self>) {
        for partition in msg.partitions {
            self.book.release(partition);
            self.checkpoints.remove(&partition);
            self.files_dropped(partition);
            self.committed.remove(&partition);
            self.live.release(partition);
        }
    }
}

impl Handler<LoadOffsets> for IcebergCommitter {
    type Result = ResponseActFuture<Self, Result<BTreeMap<i32, i64>, OffsetsUnavailable>>;

    fn handle(&mut self, msg: LoadOffsets, _: &mut Context<Self>) -> Self::Result {
        Box::pin(self.load_offsets().into_actor(self).map(move |result, act, _| {
            let offsets = result?;
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
        let lane = msg.lane;
        let files = msg.data_files.len() as u64;
        match self.book.accept(msg, Instant::now()) {
            Accepted::Yes => {
                self.stale_reported.remove(&lane.partition);
            }
            Accepted::Stale { current, stale_for } => {
                self.counters.num_stale_files_dropped += files;
                if stale_for > self.policy.interval && self.stale_reported.insert(lane.partition) {
                    // Only stale files for longer than a commit interval: the
                    // supervisor and this committer disagree about the lane.
                    self.counters.record_stale_partition();
                    error!(
                        %lane, ?current, stale_ms = stale_for.as_millis() as u64,
                        "a partition's files have been refused as stale for longer than a commit interval; rebuilding its lane"
                    );
                    self.fail_lane(
                        lane,
                        LaneError::Stale {
                            stale_ms: stale_for.as_millis() as u64,
                            current,
                        },
                    );
                } else {
                    info!(%lane, "dropping files of a lane that was rebuilt or revoked");
                }
                return Box::pin(async {});
            }
            Accepted::NotContiguous {
                pending_next,
                first_offset,
            } => {
                let error = LaneError::NotContiguous {
                    expected: pending_next,
                    first_offset,
                };
                error!(%lane, error = %error, "non-contiguous files; rebuilding the lane");
                self.publish_pending();
                self.fail_lane(lane, error);
                return Box::pin(async {});
            }
        }
        self.publish_pending();
        if self.commit_due() {
            self.maybe_commit(ctx);
        } else if let Some(gap) = self.policy.caught_up_gap
            && self.book.all_caught_up()
        {
            // Input stopped: commit once the gap since the last commit passed.
            let wait = gap.saturating_sub(self.last_commit.elapsed());
            ctx.run_later(wait, |act, ctx| act.maybe_commit(ctx));
        }
        if self.book.bytes() > self.policy.max_pending_bytes {
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

/// Commit what is pending now (on shutdown, or on request): answered when
/// a commit that started after the request ends, or at once if nothing
/// waits and no commit runs.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct CommitNow;

impl Handler<CommitNow> for IcebergCommitter {
    type Result = ResponseFuture<Result<(), String>>;

    fn handle(&mut self, _: CommitNow, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.next_waiters.push(tx);
        self.start_commit(ctx);
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err("the committer stopped before the commit ended".to_string()))
        })
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

/// A partition whose lane's files have been refused as stale for longer
/// than a commit interval: an error (the lane is being rebuilt).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StalePartition {
    pub partition: i32,
    pub stale_ms: u64,
    /// The lane incarnation the committer accepts files from.
    pub current_incarnation: Option<u64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CommitterStatus {
    pub epoch: u64,
    pub commits: u64,
    pub failed_commits: u64,
    /// Of `failed_commits`: commits the catalog reported and the table did
    /// not hold (read back after every commit, ADR 0006).
    pub commits_not_persisted: u64,
    pub rows_committed: u64,
    /// Reference-data rows committed to `market.reference`.
    pub reference_committed: u64,
    pub dead_letters_committed: u64,
    pub sequence_events_committed: u64,
    pub probable_duplicates_committed: u64,
    /// Commits whose stage state could not be put in force at once (it
    /// stays staged and goes with the next commit).
    pub state_promotions_failed: u64,
    /// Scopes the store refused to promote (restaged whole, or their lane
    /// rebuilt).
    pub state_promotions_refused: u64,
    pub fenced: u64,
    /// Fences that found the table behind what this process had committed.
    pub fenced_behind: u64,
    pub stale_files_dropped: u64,
    pub stale_partitions: Vec<StalePartition>,
    /// Rows of files accepted and not yet in a commit.
    pub pending_rows: u64,
    pub pending_bytes: u64,
    /// How long the running commit has run; null: none runs.
    pub commit_in_flight_ms: Option<u64>,
    /// Rows the running commit carries.
    pub in_flight_rows: u64,
    pub last_commit_ms: Option<u64>,
    pub last_error: Option<String>,
    pub committed_offsets: BTreeMap<i32, i64>,
}

impl Handler<GetCommitterStatus> for IcebergCommitter {
    type Result = MessageResult<GetCommitterStatus>;

    fn handle(&mut self, _: GetCommitterStatus, _: &mut Context<Self>) -> Self::Result {
        let c = &self.counters;
        let now = Instant::now();
        let stale_partitions = self
            .book
            .stale()
            .map(|(partition, since)| StalePartition {
                partition,
                stale_ms: now.saturating_duration_since(since).as_millis() as u64,
                current_incarnation: self.book.current(partition),
            })
            .filter(|s| s.stale_ms > self.policy.interval.as_millis() as u64)
            .collect();
        MessageResult(CommitterStatus {
            epoch: self.epoch,
            commits: c.num_commits,
            failed_commits: c.num_failed_commits,
            commits_not_persisted: c.num_not_persisted,
            rows_committed: c.num_rows_committed,
            reference_committed: c.num_reference_committed,
            dead_letters_committed: c.num_dead_letters_committed,
            sequence_events_committed: c.num_sequence_events_committed,
            probable_duplicates_committed: c.num_probable_duplicates_committed,
            state_promotions_failed: c.num_state_promotions_failed,
            state_promotions_refused: c.num_state_promotions_refused,
            fenced: c.num_fenced,
            fenced_behind: c.num_fenced_behind,
            stale_files_dropped: c.num_stale_files_dropped,
            stale_partitions,
            pending_rows: self.book.rows(),
            pending_bytes: self.book.bytes(),
            commit_in_flight_ms: self
                .in_flight
                .as_ref()
                .map(|f| f.started.elapsed().as_millis() as u64),
            in_flight_rows: self.in_flight.as_ref().map_or(0, |f| f.rows),
            last_commit_ms: c.last_commit_ms,
            last_error: c.last_error.clone(),
            committed_offsets: self.committed.clone(),
        })
    }
}
