//! The supervisor driven with fake lanes, a fake committer and fake Kafka
//! partitions, on tokio's paused clock: every backoff and catalog wait
//! passes instantly and in a fixed order.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;

use super::Supervisor;
use super::*;
use crate::breaker::BreakerConfig;
use crate::dedup::{DedupConfig, UnorderedWindows};
use crate::messages::OffsetsUnavailable;
use crate::messages::StopLane;
use crate::sequence::SequenceConfig;
use crate::supervision::SpawnError;

/// Everything the fakes saw, in order.
#[derive(Debug, Default)]
struct Seen {
    registered: Vec<LaneId>,
    released: Vec<i32>,
    spawned: Vec<(LaneId, Option<i64>)>,
    stopped: Vec<LaneId>,
    seeks: Vec<(i32, Option<i64>)>,
    paused: Vec<i32>,
    resumed: Vec<i32>,
    rejoins: u32,
}

type Log = Arc<Mutex<Seen>>;

/// Answers registrations with the table's offset, or fails them while
/// `catalog_down` is set.
struct FakeCommitter {
    seen: Log,
    catalog_down: Arc<Mutex<bool>>,
    table_next: Option<i64>,
}

impl Actor for FakeCommitter {
    type Context = Context<Self>;
}

impl Handler<RegisterLane> for FakeCommitter {
    type Result = Result<Option<i64>, RegisterError>;

    fn handle(&mut self, msg: RegisterLane, _: &mut Context<Self>) -> Self::Result {
        self.seen.lock().unwrap().registered.push(msg.lane);
        if *self.catalog_down.lock().unwrap() {
            return Err(OffsetsUnavailable("injected: catalog down".into()).into());
        }
        Ok(self.table_next)
    }
}

impl Handler<ReleasePartitions> for FakeCommitter {
    type Result = ();

    fn handle(&mut self, msg: ReleasePartitions, _: &mut Context<Self>) {
        self.seen.lock().unwrap().released.extend(msg.partitions);
    }
}

impl Handler<LevelChanged> for FakeCommitter {
    type Result = ();

    fn handle(&mut self, _: LevelChanged, _: &mut Context<Self>) {}
}

impl Handler<GetCommitterStatus> for FakeCommitter {
    type Result = MessageResult<GetCommitterStatus>;

    fn handle(&mut self, _: GetCommitterStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(CommitterStatus {
            epoch: 0,
            commits: 0,
            failed_commits: 0,
            commits_not_persisted: 0,
            rows_committed: 0,
            reference_committed: 0,
            dead_letters_committed: 0,
            sequence_events_committed: 0,
            probable_duplicates_committed: 0,
            state_promotions_failed: 0,
            state_promotions_refused: 0,
            fenced: 0,
            fenced_behind: 0,
            stale_files_dropped: 0,
            stale_partitions: Vec::new(),
            pending_rows: 0,
            pending_bytes: 0,
            commit_in_flight_ms: None,
            in_flight_rows: 0,
            last_commit_ms: None,
            last_error: None,
            committed_offsets: BTreeMap::new(),
        })
    }
}

/// One actor stands for a whole lane.
struct FakeLane {
    id: LaneId,
    seen: Log,
}

impl Actor for FakeLane {
    type Context = Context<Self>;
}

impl Handler<StopLane> for FakeLane {
    type Result = ();

    fn handle(&mut self, _: StopLane, ctx: &mut Context<Self>) {
        self.seen.lock().unwrap().stopped.push(self.id);
        ctx.stop();
    }
}

impl Handler<Flush> for FakeLane {
    type Result = ();

    fn handle(&mut self, _: Flush, _: &mut Context<Self>) {}
}

impl Handler<LevelChanged> for FakeLane {
    type Result = ();

    fn handle(&mut self, _: LevelChanged, _: &mut Context<Self>) {}
}

struct FakeLanes {
    seen: Log,
    windows: Arc<UnorderedWindows>,
}

impl LaneSpawner for FakeLanes {
    fn states(&self, partition: i32) -> LaneStates {
        LaneStates::new(
            "test",
            "t",
            partition,
            &SequenceConfig::default(),
            self.windows.clone(),
        )
    }

    fn spawn(
        &self,
        id: LaneId,
        start_offset: Option<i64>,
        _: LaneStates,
        _: DegradationLevel,
    ) -> Result<LaneHandle, SpawnError> {
        self.seen.lock().unwrap().spawned.push((id, start_offset));
        let lane = FakeLane {
            id,
            seen: self.seen.clone(),
        }
        .start();
        Ok(LaneHandle {
            stop: vec![lane.clone().recipient()],
            flush: lane.clone().recipient(),
            level: vec![lane.recipient()],
            status: Arc::default(),
        })
    }
}

struct FakePartitions {
    seen: Log,
}

impl PartitionControl for FakePartitions {
    fn pause(&self, partitions: &[i32]) -> Result<(), String> {
        self.seen.lock().unwrap().paused.extend(partitions);
        Ok(())
    }
    fn resume(&self, partitions: &[i32]) -> Result<(), String> {
        self.seen.lock().unwrap().resumed.extend(partitions);
        Ok(())
    }
    fn seek_to_start(&self, partition: i32, start: Option<i64>) -> Result<(), String> {
        self.seen.lock().unwrap().seeks.push((partition, start));
        Ok(())
    }
    fn commit_offsets(&self, _: &BTreeMap<i32, i64>) {}
    fn cached_watermarks(&self, _: i32) -> Option<(i64, i64)> {
        Some((0, 1_000))
    }
    fn fetch_watermarks(&self, _: i32) -> Option<(i64, i64)> {
        Some((0, 1_000))
    }
    fn request_rejoin(&self) {
        self.seen.lock().unwrap().rejoins += 1;
    }
}

struct Harness {
    supervisor: Addr<Supervisor>,
    seen: Log,
    catalog_down: Arc<Mutex<bool>>,
    commits: Arc<CommitHealth>,
}

impl Harness {
    fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().unwrap())
    }

    async fn assign(&self, partitions: &[i32], offsets_known: bool) {
        let partitions = partitions.iter().map(|&p| (p, Some(100))).collect();
        self.supervisor
            .send(PartitionsAssigned {
                partitions,
                offsets_known,
            })
            .await
            .unwrap();
    }

    async fn revoke(&self, partitions: &[i32]) {
        self.supervisor
            .send(PartitionsRevoked {
                partitions: partitions.to_vec(),
            })
            .await
            .unwrap();
    }

    async fn fail(&self, lane: LaneId) {
        self.supervisor
            .send(LaneFailed {
                lane,
                stage: Stage::Sequencer,
                error: LaneError::Panicked,
            })
            .await
            .unwrap();
    }

    async fn status(&self) -> PipelineStatus {
        self.supervisor.send(GetPipelineStatus).await.unwrap().unwrap()
    }
}

fn harness(restart: RestartPolicy) -> Harness {
    let seen = Log::default();
    let catalog_down = Arc::new(Mutex::new(false));
    let committer = FakeCommitter {
        seen: seen.clone(),
        catalog_down: catalog_down.clone(),
        table_next: Some(100),
    }
    .start();
    let commits = Arc::new(CommitHealth::default());
    let breaker = BreakerConfig::default();
    let supervisor = Supervisor::new(SupervisorParams {
        lanes: Box::new(FakeLanes {
            seen: seen.clone(),
            windows: Arc::new(UnorderedWindows::new(&DedupConfig::default())),
        }),
        partitions: Arc::new(FakePartitions { seen: seen.clone() }),
        committer: CommitterLink {
            register: committer.clone().recipient(),
            release: committer.clone().recipient(),
            status: committer.clone().recipient(),
            level: committer.recipient(),
        },
        topic: "t".into(),
        restart,
        instance: "test".into(),
        degradation: DegradationConfig::default(),
        pause_after_failures: 3,
        health: Health {
            catalog: Arc::new(CircuitBreaker::new("catalog", &breaker)),
            storage: Arc::new(CircuitBreaker::new("storage", &breaker)),
            commits: commits.clone(),
        },
        retention: RetentionLimits::default(),
        level_observers: Vec::new(),
    })
    .start();
    Harness {
        supervisor,
        seen,
        catalog_down,
        commits,
    }
}

fn policy(max_restarts: u32, base_backoff: Duration) -> RestartPolicy {
    RestartPolicy {
        max_restarts,
        window: Duration::from_secs(600),
        base_backoff,
        max_backoff: Duration::from_secs(60),
    }
}

fn lane(partition: i32, incarnation: u64) -> LaneId {
    LaneId {
        partition,
        incarnation,
    }
}

#[actix_rt::test]
async fn a_rebuild_superseded_during_its_backoff_neither_registers_nor_seeks_nor_starts() {
    tokio::time::pause();
    let h = harness(policy(10, Duration::from_secs(2)));
    h.assign(&[0, 1], true).await;
    assert_eq!(h.seen(|s| s.registered.clone()), [lane(0, 1), lane(1, 2)]);
    // Partition 0's lane fails; its rebuild (#3) waits out a 2 s backoff.
    h.fail(lane(0, 1)).await;
    // A rebalance takes the partitions away and hands them back meanwhile.
    h.revoke(&[0, 1]).await;
    h.assign(&[0, 1], true).await;
    tokio::time::sleep(Duration::from_secs(10)).await;

    h.seen(|s| {
        assert_eq!(
            s.registered,
            [lane(0, 1), lane(1, 2), lane(0, 4), lane(1, 5)],
            "the superseded rebuild #3 registered"
        );
        assert!(s.seeks.is_empty(), "the superseded rebuild sought: {:?}", s.seeks);
        let spawned: Vec<LaneId> = s.spawned.iter().map(|(id, _)| *id).collect();
        assert_eq!(spawned, [lane(0, 1), lane(1, 2), lane(0, 4), lane(1, 5)]);
        assert_eq!(s.released, [0, 1]);
    });
    let status = h.status().await;
    assert_eq!(status.superseded_starts, 1);
    let zero = &status.lanes[0];
    assert_eq!((zero.incarnation, zero.state), (4, LaneState::Running));
}

#[actix_rt::test]
async fn lanes_waiting_for_the_catalog_across_a_rejoin_leave_one_lane_and_register_in_order() {
    tokio::time::pause();
    let h = harness(policy(10, Duration::from_millis(100)));
    *h.catalog_down.lock().unwrap() = true;
    h.assign(&[0], false).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    // Waiting: a new incarnation tries every second.
    let tries = h.seen(|s| s.registered.len());
    assert!(tries >= 3, "{tries} tries");
    // A rejoin while the catalog is still down, then the catalog returns.
    h.revoke(&[0]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.assign(&[0], false).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    *h.catalog_down.lock().unwrap() = false;
    tokio::time::sleep(Duration::from_secs(5)).await;

    h.seen(|s| {
        let incarnations: Vec<u64> = s.registered.iter().map(|l| l.incarnation).collect();
        assert!(
            incarnations.windows(2).all(|w| w[0] < w[1]),
            "a superseded try registered after a newer one: {incarnations:?}"
        );
        assert_eq!(s.spawned.len(), 1, "one lane runs: {:?}", s.spawned);
        assert_eq!(s.seeks, [(0, Some(100))], "one seek, by the lane that started");
        assert_eq!(s.spawned[0].0, *s.registered.last().unwrap());
    });
    let status = h.status().await;
    assert_eq!(status.lanes[0].state, LaneState::Running);
    assert_eq!(
        status.lanes[0].restarts, 0,
        "waiting for the catalog is not a restart"
    );
}

#[actix_rt::test]
async fn a_lane_failing_past_its_budget_is_marked_failed_and_left_alone() {
    tokio::time::pause();
    let h = harness(policy(2, Duration::from_millis(100)));
    h.assign(&[0, 1], true).await;
    for _ in 0..3 {
        let current = h.status().await.lanes[0].incarnation;
        h.fail(lane(0, current)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let status = h.status().await;
    assert_eq!(status.failed_lanes, 1);
    assert_eq!(status.lanes[0].state, LaneState::Failed);
    assert_eq!(status.lanes[0].restarts, 2);
    assert_eq!(
        status.lanes[1].state,
        LaneState::Running,
        "the other lane runs on"
    );
    let registered = h.seen(|s| s.registered.len());
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        h.seen(|s| s.registered.len()),
        registered,
        "a failed lane is not retried"
    );
    // An old incarnation's last words change nothing.
    h.fail(lane(1, 1)).await;
    assert_eq!(h.status().await.lane_restarts, 2);
}

#[actix_rt::test]
async fn a_stray_record_of_a_partition_without_a_lane_rejoins_the_group() {
    tokio::time::pause();
    let h = harness(policy(2, Duration::from_millis(100)));
    h.assign(&[0], true).await;
    h.supervisor
        .send(StrayRecord {
            partition: 7,
            offset: 12,
        })
        .await
        .unwrap();
    assert_eq!(h.seen(|s| s.rejoins), 1);
    // One with a lane rewinds that lane instead.
    h.supervisor
        .send(StrayRecord {
            partition: 0,
            offset: 12,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.seen(|s| (s.rejoins, s.spawned.len())), (1, 2));
}

#[actix_rt::test]
async fn failing_commits_with_files_waiting_pause_every_partition_until_they_succeed() {
    tokio::time::pause();
    let h = harness(policy(2, Duration::from_millis(100)));
    h.assign(&[0, 1, 2], true).await;
    h.commits.consecutive_failures.store(3, Relaxed);
    h.commits
        .oldest_pending_ms
        .store(chrono::Utc::now().timestamp_millis(), Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.seen(|s| s.paused.clone()), [0, 1, 2]);
    h.commits.consecutive_failures.store(0, Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.seen(|s| s.resumed.clone()), [0, 1, 2]);
}

#[actix_rt::test]
async fn lag_is_unknown_until_a_lane_knows_where_it_stands_and_the_same_everywhere() {
    tokio::time::pause();
    let h = harness(policy(2, Duration::from_millis(100)));
    h.assign(&[0], true).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The table records 100 and the high watermark is 1,000.
    let status = h.status().await;
    assert_eq!(status.lanes[0].lag, Some(900));
    h.supervisor
        .send(Committed {
            epoch: 1,
            offsets: BTreeMap::from([(0, 400)]),
            rows: 300,
            snapshot_id: None,
        })
        .await
        .unwrap();
    assert_eq!(h.status().await.lanes[0].lag, Some(600));
    let view = h.supervisor.send(GetDegradation).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let view_after = h.supervisor.send(GetDegradation).await.unwrap();
    let total = |v: &DegradationView| {
        v.signals
            .iter()
            .find(|s| s.name == Signal::TotalLag.as_str())
            .map(|s| s.value)
    };
    assert!(total(&view).is_some());
    assert_eq!(total(&view_after), Some(600.0), "the level sees the same lag");
}
