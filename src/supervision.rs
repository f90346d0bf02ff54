//! The supervisor's decisions, apart from actors and Kafka: when a failed
//! lane is rebuilt and after how long, when partitions pause, and what lag
//! is. Time is passed in, so every rule is table-tested without sleeping.
//!
//! Also what the supervisor drives, as traits: lanes ([`LaneSpawner`],
//! built by `lane.rs`) and the consumer's partitions ([`PartitionControl`],
//! `kafka.rs`), so a test can give it fakes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Recipient;
use tokio::time::Instant;

use crate::dedup::{LaneIds, UnorderedWindows};
use crate::degradation::DegradationLevel;
use crate::messages::{Flush, LaneId, LevelChanged, StopLane};
use crate::sequence::{SequenceConfig, SequenceState, SequenceTracker};
use crate::state::{self, Checkpoint, EpochState};

/// Figures the lane publishes for `/v1/pipeline` (read without messaging).
#[derive(Debug, Default)]
pub struct LaneStatus {
    pub position: AtomicI64,
    pub consumed: AtomicU64,
    pub dead_letters: AtomicU64,
    pub lost_records: AtomicU64,
    /// Estimated bytes of rows the lane's batcher holds.
    pub buffered_bytes: AtomicU64,
    /// Key and value bytes of the records read.
    pub consumed_bytes: AtomicU64,
    /// Kafka timestamp (ms) of the last record read; 0 before the first.
    pub last_timestamp_ms: AtomicI64,
}

/// A lane's stage state, made with the lane and registered with the
/// committer, which stages and promotes it with every commit.
#[derive(Clone)]
pub struct LaneStates {
    pub sequence: Arc<SequenceState>,
    pub ids: Arc<Mutex<LaneIds>>,
}

impl LaneStates {
    /// Empty state of `partition`'s stages, named under `prefix` and `topic`.
    pub fn new(
        prefix: &str,
        topic: &str,
        partition: i32,
        sequence: &SequenceConfig,
        windows: Arc<UnorderedWindows>,
    ) -> Self {
        let scope = |stage| state::scope(prefix, topic, partition, stage);
        let config = sequence.clone();
        Self {
            sequence: Arc::new(Mutex::new(EpochState::new(
                scope(state::SEQUENCER_STAGE),
                move || SequenceTracker::new(config.clone()),
            ))),
            ids: Arc::new(Mutex::new(LaneIds::new(
                scope(state::DEDUP_STAGE),
                windows,
                partition,
            ))),
        }
    }

    pub fn checkpoints(&self) -> Vec<Arc<dyn Checkpoint>> {
        vec![self.sequence.clone(), self.ids.clone()]
    }
}

/// A running lane as the supervisor sees it: where to send stops, flushes
/// and level changes, and the figures it publishes.
pub struct LaneHandle {
    /// The stages that stop on their own; the ones between them stop when
    /// their upstream goes away.
    pub stop: Vec<Recipient<StopLane>>,
    /// The head of the lane; a flush travels down behind the data.
    pub flush: Recipient<Flush>,
    /// The stages that act on level changes.
    pub level: Vec<Recipient<LevelChanged>>,
    pub status: Arc<LaneStatus>,
}

impl LaneHandle {
    pub fn stop(&self) {
        for stage in &self.stop {
            stage.do_send(StopLane);
        }
    }

    pub fn set_level(&self, msg: LevelChanged) {
        for stage in &self.level {
            stage.do_send(msg);
        }
    }
}

/// Why a lane could not be built.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpawnError {
    #[error("partition {0} has no record queue: it was not assigned to this process")]
    NoQueue(i32),
}

/// How the supervisor starts lanes.
pub trait LaneSpawner: 'static {
    /// Empty stage state for a new lane of `partition`.
    fn states(&self, partition: i32) -> LaneStates;
    /// Builds and starts the lane `id`, reading from `start_offset` (None:
    /// the table has no offset for the partition), at `level`.
    fn spawn(
        &self,
        id: LaneId,
        start_offset: Option<i64>,
        states: LaneStates,
        level: DegradationLevel,
    ) -> Result<LaneHandle, SpawnError>;
}

/// What a partition's log holds before Kafka deletes its oldest records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetentionLimits {
    /// Bytes one partition keeps (`retention.bytes`); None: unlimited or unknown.
    pub bytes_per_partition: Option<u64>,
    /// How long a record is kept (`retention.ms`); None: unlimited or unknown.
    pub ms: Option<u64>,
}

/// Bytes a record takes in the log beyond its key and value (record and
/// batch headers), for turning `retention.bytes` into records.
pub const RECORD_OVERHEAD_BYTES: f64 = 24.0;

/// How far a partition's next record to read is from being deleted by
/// retention.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Headroom {
    /// Records retention will delete before it reaches the next record to
    /// read, over the records the log retains: 1 = caught up, 0 = the next
    /// record is the next to go.
    pub ratio: f64,
    /// Seconds until retention reaches the next record to read, at the
    /// current rates in and out. Infinite (`null` in JSON) while the lane
    /// keeps up.
    pub seconds: f64,
}

impl Headroom {
    pub const UNBOUNDED: Headroom = Headroom {
        ratio: 1.0,
        seconds: f64::INFINITY,
    };
}

/// One look at a partition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartitionSample {
    pub at: Instant,
    /// The log start and end offsets (low and high watermarks).
    pub low: i64,
    pub high: i64,
    /// The next offset the lane reads.
    pub position: i64,
    /// Average key + value bytes of the records the lane read; None before
    /// the first.
    pub record_bytes: Option<f64>,
    /// Age of the last record the lane read, by its Kafka timestamp, in ms.
    pub last_record_age_ms: Option<i64>,
}

/// Weight of the newest sample in the rate averages (at the default 250 ms
/// tick, a stall of a second moves them by about half).
const RATE_WEIGHT: f64 = 0.2;
/// Records a second, on average, below which nothing counts as arriving.
const ARRIVING: f64 = 1.0;

/// Follows one partition's watermarks and read position and says how much
/// headroom it has before retention deletes what the lane has not read.
///
/// Capacity in records comes from `retention.bytes` and the records' size
/// when known; otherwise from the observed retained range once the log
/// start moves (the log is full and deleting). Size retention deletes only
/// as records arrive, so it counts only while they do. Time comes from the
/// rates: the lag grows at (rate in − rate out), and the next record is
/// deleted once the lag exceeds the capacity; with `retention.ms`, also from
/// the age of the records being read.
#[derive(Debug, Default, Clone)]
pub struct HeadroomTracker {
    last: Option<PartitionSample>,
    rate_in: f64,
    rate_out: f64,
    rate_low: f64,
}

impl HeadroomTracker {
    pub fn observe(&mut self, sample: PartitionSample, limits: RetentionLimits) -> Headroom {
        if let Some(last) = self.last {
            let dt = sample.at.saturating_duration_since(last.at).as_secs_f64();
            if dt > 0.0 {
                let rate = |now: i64, then: i64| (now - then).max(0) as f64 / dt;
                let blend = |old: f64, new: f64| old + RATE_WEIGHT * (new - old);
                self.rate_in = blend(self.rate_in, rate(sample.high, last.high));
                self.rate_out = blend(self.rate_out, rate(sample.position, last.position));
                self.rate_low = blend(self.rate_low, rate(sample.low, last.low));
            }
        }
        self.last = Some(sample);
        if sample.position < sample.low {
            // Retention has already deleted the next record.
            return Headroom {
                ratio: 0.0,
                seconds: 0.0,
            };
        }
        let lag = (sample.high - sample.position).max(0) as f64;
        let capacity = match (limits.bytes_per_partition, sample.record_bytes) {
            (Some(bytes), Some(per_record)) => Some(bytes as f64 / (per_record + RECORD_OVERHEAD_BYTES)),
            _ if self.rate_low > 0.0 && sample.high > sample.low => Some((sample.high - sample.low) as f64),
            _ => None,
        };
        let mut headroom = Headroom::UNBOUNDED;
        // Size retention deletes only as records arrive: a partition nothing
        // is written to keeps what it has, however far behind the lane is.
        if let Some(capacity) = capacity.filter(|c| *c >= 1.0 && self.rate_in >= ARRIVING) {
            let left = (capacity - lag).max(0.0);
            headroom.ratio = left / capacity;
            let closing = self.rate_in - self.rate_out;
            if closing > 0.0 {
                headroom.seconds = left / closing;
            }
        }
        if let (Some(ms), Some(age_ms)) = (limits.ms, sample.last_record_age_ms)
            && lag > 0.0
            && ms > 0
        {
            let left_ms = (ms as f64 - age_ms as f64).max(0.0);
            headroom.ratio = headroom.ratio.min(left_ms / ms as f64);
            headroom.seconds = headroom.seconds.min(left_ms / 1000.0);
        }
        headroom
    }
}

/// What the supervisor does to the partitions of the Kafka consumer. The
/// real one is `kafka::KafkaPartitions`; tests put a fake in its place.
pub trait PartitionControl: Send + Sync + 'static {
    fn pause(&self, partitions: &[i32]) -> Result<(), String>;
    fn resume(&self, partitions: &[i32]) -> Result<(), String>;
    /// Positions `partition` where a lane that starts from the table's
    /// offset `start` must read next (None: the table has none). Blocking:
    /// it may ask the broker.
    fn seek_to_start(&self, partition: i32, start: Option<i64>) -> Result<(), String>;
    /// Commits `offsets` to the consumer group, for external lag tools.
    fn commit_offsets(&self, offsets: &BTreeMap<i32, i64>);
    /// The low and high watermarks from the client's cache (no broker
    /// round trip; updated by fetch responses).
    fn cached_watermarks(&self, partition: i32) -> Option<(i64, i64)>;
    /// The low and high watermarks from the broker. Blocking.
    fn fetch_watermarks(&self, partition: i32) -> Option<(i64, i64)>;
    /// Rejoins the group: every partition of this process is revoked and
    /// assigned again.
    fn request_rejoin(&self);
}

/// How failed lanes are rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartPolicy {
    /// More failures than this within `window` and the lane is marked failed.
    pub max_restarts: u32,
    pub window: Duration,
    /// The first rebuild waits this long; each further failure within the
    /// window doubles it.
    pub base_backoff: Duration,
    /// The longest a rebuild waits.
    pub max_backoff: Duration,
}

/// What to do with a lane that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Rebuild it after `backoff`.
    Restart { backoff: Duration },
    /// It failed `restarts` times within the window already: give up on it.
    GiveUp { restarts: usize },
}

/// One lane's recent restarts.
#[derive(Debug, Default, Clone)]
pub struct RestartBudget {
    recent: VecDeque<Instant>,
    total: u64,
}

impl RestartBudget {
    /// A lane failed at `now`: restart it (and count the restart), or give up.
    pub fn on_failure(&mut self, policy: &RestartPolicy, now: Instant) -> RestartDecision {
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > policy.window)
        {
            self.recent.pop_front();
        }
        let restarts = self.recent.len();
        if restarts as u32 >= policy.max_restarts {
            return RestartDecision::GiveUp { restarts };
        }
        let doubling = 2u32.saturating_pow(restarts.min(31) as u32);
        let backoff = policy
            .base_backoff
            .saturating_mul(doubling)
            .min(policy.max_backoff);
        self.recent.push_back(now);
        self.total += 1;
        RestartDecision::Restart { backoff }
    }

    /// Restarts since the lane's partition was assigned.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// What the pause rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitState {
    /// Commits failed in a row.
    pub consecutive_failures: u64,
    /// Files wait for a commit (or are in one).
    pub files_waiting: bool,
    /// A circuit breaker (catalog or storage) refuses calls now: open, and
    /// its open period not over.
    pub breaker_refuses: bool,
}

/// Whether partitions pause: commits keep failing while files wait, or a
/// breaker refuses calls. Failed commits with nothing waiting (a revoke or
/// rebuild dropped the files) do not hold a pause, nor does a breaker whose
/// open period is over: no commit could run to lift it. Resuming lets one
/// epoch in, whose commit either succeeds or pauses again.
pub fn should_pause(state: CommitState, pause_after_failures: u64) -> bool {
    (state.consecutive_failures >= pause_after_failures && state.files_waiting) || state.breaker_refuses
}

/// A partition's lag: records in Kafka that are not durable in Iceberg yet,
/// the high watermark minus the offset the table records for the partition.
/// A partition the table has never recorded counts from where its lane
/// started reading. Unknown (None) without a high watermark, or without
/// either offset; it is then left out of totals, never counted as 0 or as
/// the whole partition. This one definition serves the level's signals,
/// `k2_consumer_lag_records` and `/v1/pipeline`.
pub fn partition_lag(
    high_watermark: Option<i64>,
    committed: Option<i64>,
    position: Option<i64>,
) -> Option<i64> {
    let high = high_watermark?;
    let from = committed.or(position)?;
    Some((high - from).max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_restarts: u32) -> RestartPolicy {
        RestartPolicy {
            max_restarts,
            window: Duration::from_secs(60),
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }

    #[test]
    fn backoff_doubles_per_restart_in_the_window_up_to_its_cap() {
        let policy = policy(10);
        let mut budget = RestartBudget::default();
        let start = Instant::now();
        let backoffs: Vec<_> = (0..8)
            .map(|i| budget.on_failure(&policy, start + Duration::from_secs(i)))
            .collect();
        let ms = |ms| RestartDecision::Restart {
            backoff: Duration::from_millis(ms),
        };
        assert_eq!(
            backoffs,
            [
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1_600),
                ms(3_200),
                ms(5_000),
                ms(5_000)
            ]
        );
        assert_eq!(budget.total(), 8);
    }

    #[test]
    fn a_lane_failing_past_its_budget_within_the_window_is_given_up() {
        let policy = policy(2);
        let mut budget = RestartBudget::default();
        let t0 = Instant::now();
        assert!(matches!(
            budget.on_failure(&policy, t0),
            RestartDecision::Restart { .. }
        ));
        assert!(matches!(
            budget.on_failure(&policy, t0 + Duration::from_secs(30)),
            RestartDecision::Restart { .. }
        ));
        assert_eq!(
            budget.on_failure(&policy, t0 + Duration::from_secs(59)),
            RestartDecision::GiveUp { restarts: 2 }
        );
        assert_eq!(budget.total(), 2, "giving up is not a restart");
    }

    #[test]
    fn restarts_older_than_the_window_no_longer_count_nor_grow_the_backoff() {
        let policy = policy(2);
        let mut budget = RestartBudget::default();
        let t0 = Instant::now();
        budget.on_failure(&policy, t0);
        budget.on_failure(&policy, t0 + Duration::from_secs(1));
        // The first left the window: one restart counts, the backoff doubles once.
        assert_eq!(
            budget.on_failure(&policy, t0 + Duration::from_secs(61)),
            RestartDecision::Restart {
                backoff: Duration::from_millis(200)
            }
        );
    }

    #[test]
    fn a_budget_of_zero_never_restarts() {
        let mut budget = RestartBudget::default();
        assert_eq!(
            budget.on_failure(&policy(0), Instant::now()),
            RestartDecision::GiveUp { restarts: 0 }
        );
    }

    #[test]
    fn partitions_pause_only_while_a_commit_could_lift_the_pause() {
        let cases = [
            // (failures, files waiting, breaker refuses) -> pause
            ((0, true, false), false),
            ((2, true, false), false),
            ((3, true, false), true),
            ((9, false, false), false),
            ((0, false, true), true),
            ((9, false, true), true),
        ];
        for ((consecutive_failures, files_waiting, breaker_refuses), pause) in cases {
            let state = CommitState {
                consecutive_failures,
                files_waiting,
                breaker_refuses,
            };
            assert_eq!(should_pause(state, 3), pause, "{state:?}");
        }
    }

    fn sample(t0: Instant, secs: f64, low: i64, high: i64, position: i64) -> PartitionSample {
        PartitionSample {
            at: t0 + Duration::from_secs_f64(secs),
            low,
            high,
            position,
            record_bytes: Some(176.0),
            last_record_age_ms: None,
        }
    }

    #[test]
    fn headroom_from_retention_bytes_falls_as_the_lag_grows_and_says_when_it_runs_out() {
        // 200 bytes a record with overhead: 10,000 records fit in 2,000,000 bytes.
        let limits = RetentionLimits {
            bytes_per_partition: Some(2_000_000),
            ms: None,
        };
        let t0 = Instant::now();
        let mut tracker = HeadroomTracker::default();
        assert_eq!(
            tracker.observe(sample(t0, 0.0, 0, 0, 0), limits),
            Headroom::UNBOUNDED
        );
        // 1,000 records/s in, 400/s read: the lag grows by 600/s.
        let mut headroom = Headroom::UNBOUNDED;
        for i in 1..=40 {
            let s = i as f64 * 0.25;
            headroom = tracker.observe(sample(t0, s, 0, (s * 1_000.0) as i64, (s * 400.0) as i64), limits);
        }
        // After 10 s: lag 6,000 of 10,000 records.
        assert!((headroom.ratio - 0.4).abs() < 1e-9, "{headroom:?}");
        // 4,000 records left at 600/s: ~6.7 s (the rates are averages).
        assert!((6.0..7.5).contains(&headroom.seconds), "{headroom:?}");
    }

    #[test]
    fn without_limits_headroom_counts_once_the_log_start_moves() {
        let limits = RetentionLimits::default();
        let t0 = Instant::now();
        let mut tracker = HeadroomTracker::default();
        tracker.observe(sample(t0, 0.0, 0, 5_000, 1_000), limits);
        let still = tracker.observe(sample(t0, 1.0, 0, 6_000, 1_500), limits);
        assert_eq!(
            still,
            Headroom::UNBOUNDED,
            "nothing deleted yet: no way to know the capacity"
        );
        // The log is full: its start moves as records arrive.
        let mut headroom = still;
        for i in 2..=10 {
            let s = i as f64;
            headroom = tracker.observe(
                sample(
                    t0,
                    s,
                    (s as i64 - 1) * 1_000,
                    5_000 + s as i64 * 1_000,
                    1_000 + s as i64 * 500,
                ),
                limits,
            );
        }
        // Retained 6,000, lag 9,000: the next record is already gone in effect.
        assert_eq!(headroom.ratio, 0.0, "{headroom:?}");
    }

    #[test]
    fn a_partition_nothing_arrives_on_keeps_its_records_however_far_behind() {
        let limits = RetentionLimits {
            bytes_per_partition: Some(2_000_000),
            ms: None,
        };
        let t0 = Instant::now();
        let mut tracker = HeadroomTracker::default();
        // 9,000 of 10,000 records behind, nothing produced: size retention deletes nothing.
        for i in 0..8 {
            let h = tracker.observe(sample(t0, i as f64, 0, 9_500, 500 + i * 100), limits);
            assert_eq!(h, Headroom::UNBOUNDED);
        }
    }

    #[test]
    fn headroom_from_retention_ms_is_what_is_left_of_the_oldest_unread_records_life() {
        let limits = RetentionLimits {
            bytes_per_partition: None,
            ms: Some(60_000),
        };
        let t0 = Instant::now();
        let mut tracker = HeadroomTracker::default();
        let mut s = sample(t0, 0.0, 0, 100, 50);
        s.last_record_age_ms = Some(45_000);
        let headroom = tracker.observe(s, limits);
        assert!((headroom.ratio - 0.25).abs() < 1e-9, "{headroom:?}");
        assert!((headroom.seconds - 15.0).abs() < 1e-9, "{headroom:?}");
        // Caught up: nothing unread can expire.
        let mut s = sample(t0, 1.0, 0, 100, 100);
        s.last_record_age_ms = Some(45_000);
        assert_eq!(tracker.observe(s, limits), Headroom::UNBOUNDED);
    }

    #[test]
    fn a_position_below_the_log_start_has_no_headroom() {
        let t0 = Instant::now();
        let mut tracker = HeadroomTracker::default();
        let headroom = tracker.observe(sample(t0, 0.0, 500, 900, 400), RetentionLimits::default());
        assert_eq!((headroom.ratio, headroom.seconds), (0.0, 0.0));
    }

    #[test]
    fn lag_counts_from_the_table_then_the_lane_and_is_unknown_without_either() {
        let cases = [
            // (high, committed, position) -> lag
            ((Some(100), Some(40), Some(90)), Some(60)),
            ((Some(100), None, Some(90)), Some(10)),
            ((Some(100), None, None), None),
            ((None, Some(40), Some(90)), None),
            ((Some(30), Some(40), None), Some(0)),
        ];
        for ((high, committed, position), lag) in cases {
            assert_eq!(
                partition_lag(high, committed, position),
                lag,
                "{high:?} {committed:?} {position:?}"
            );
        }
    }
}
