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
    /// The high watermark from the client's cache (no broker round trip).
    fn cached_high_watermark(&self, partition: i32) -> Option<i64>;
    /// The high watermark from the broker. Blocking.
    fn fetch_high_watermark(&self, partition: i32) -> Option<i64>;
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
