//! The committer's book of files waiting for a commit, apart from actors:
//! which lane incarnation each partition accepts files from, the pending
//! range of each partition, what a commit takes and what a failed commit
//! puts back, and when a commit is due (and when the batchers flush for
//! it, [`CommitSchedule`]). Time is passed in.
//!
//! Rules:
//! - A partition accepts files only from its current lane incarnation, and
//!   incarnations only move forward: a registration older than the newest
//!   one seen for the partition (a superseded restart arriving late) is
//!   refused, so it can never make the live lane's files stale.
//! - Files must continue the partition's pending range exactly; anything
//!   else means the lane lost track and is rebuilt.
//! - Files refused as stale are normal for a moment (an old lane's
//!   stragglers); a partition that gets only stale files for longer than a
//!   commit interval is an error the committer reports.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicI64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::time::Instant;

use crate::messages::{FilesWritten, LaneId, Superseded};
use crate::storage::commit::PartitionRange;

/// Files of one partition that wait for the next commit.
#[derive(Debug)]
pub struct Pending {
    pub lane: LaneId,
    pub range: PartitionRange,
    pub file_bytes: u64,
    /// The lane's last files came from a flush of a caught-up lane.
    pub caught_up: bool,
}

/// What became of a lane's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// In the next commit.
    Yes,
    /// From a lane incarnation that is not the partition's current one.
    /// `stale_for`: how long the partition has received only stale files.
    Stale {
        current: Option<u64>,
        stale_for: Duration,
    },
    /// They do not start where the partition's pending range ends; the
    /// pending range was dropped and the lane must be rebuilt.
    NotContiguous { pending_next: i64, first_offset: i64 },
}

/// When a commit is due.
#[derive(Debug, Clone)]
pub struct DuePolicy {
    pub interval: Duration,
    /// Once every pending range is caught up, a commit is due this long
    /// after the last one (None: caught-up files wait like any others),
    /// unless the commit due by the interval is nearer than the lead.
    pub caught_up_gap: Option<Duration>,
    pub max_rows: u64,
    pub max_bytes: u64,
}

/// How long before a commit due by the interval the batchers flush for it
/// ([`CommitSchedule`]): a tenth of the interval, 20 to 200 ms, time for
/// every lane's flush to reach the committer first.
pub fn flush_lead(interval: Duration) -> Duration {
    (interval / 10).clamp(Duration::from_millis(20), Duration::from_millis(200))
}

/// The commit due by the interval after `due` that is still ahead of
/// `now`: dues stay an interval apart, whatever commits ran early (rows,
/// bytes, caught up) or did not run at all (nothing pending), so that
/// neither moves the one the batchers flush for.
pub fn next_due_after(due: Instant, interval: Duration, now: Instant) -> Instant {
    if now < due || interval.is_zero() {
        return due.max(now);
    }
    let behind = now.duration_since(due).as_nanos();
    let steps = behind / interval.as_nanos() + 1;
    due + interval * u32::try_from(steps).unwrap_or(u32::MAX)
}

/// When the next commit is due by its interval, published by the committer
/// for the batchers: each flushes what it holds a short lead before it, so
/// that a trade waits about one interval for its commit instead of a batch
/// age and then an interval (a flush that missed the commit's start waited
/// for the next one).
#[derive(Debug)]
pub struct CommitSchedule {
    /// Unix milliseconds; 0 until the committer starts.
    next_due_ms: AtomicI64,
    interval_ms: i64,
    lead_ms: i64,
}

impl CommitSchedule {
    pub fn new(interval: Duration) -> Self {
        Self {
            next_due_ms: AtomicI64::new(0),
            interval_ms: interval.as_millis().min(i64::MAX as u128) as i64,
            lead_ms: flush_lead(interval).as_millis() as i64,
        }
    }

    pub fn set_next_due(&self, unix_ms: i64) {
        self.next_due_ms.store(unix_ms, Relaxed);
    }

    /// For a batcher holding rows: the commit its flush is for and when to
    /// flush (unix ms). `served` is the due its last such flush was for: it
    /// flushes once per commit, so rows that came after that flush aim at
    /// the commit after (an interval later, until the committer says when).
    /// None before the committer started.
    pub fn flush_at(&self, served: i64) -> Option<(i64, i64)> {
        let next = self.next_due_ms.load(Relaxed);
        if next == 0 {
            return None;
        }
        let due = if next > served {
            next
        } else {
            served + self.interval_ms
        };
        Some((due, due - self.lead_ms))
    }
}

/// What a commit being due depends on besides the book.
#[derive(Debug, Clone, Copy)]
pub struct CommitTimes {
    /// When the last commit ended.
    pub last_commit: Instant,
    /// The commit due by the interval ([`next_due_after`]).
    pub next_due: Instant,
    /// A failed commit's backoff.
    pub retry_after: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct PendingFiles {
    /// Current lane incarnation of each partition this process owns.
    lanes: HashMap<i32, u64>,
    /// Newest incarnation ever registered per partition (kept after release).
    newest: HashMap<i32, u64>,
    ranges: BTreeMap<i32, Pending>,
    rows: u64,
    bytes: u64,
    /// Partitions receiving only stale files, since when.
    stale_since: HashMap<i32, Instant>,
}

impl PendingFiles {
    /// `lane` becomes its partition's current incarnation; the files of
    /// older incarnations are dropped. Refused if a newer one registered.
    pub fn register(&mut self, lane: LaneId) -> Result<(), Superseded> {
        let newest = self.newest.entry(lane.partition).or_default();
        if lane.incarnation < *newest {
            return Err(Superseded {
                lane,
                newest: *newest,
            });
        }
        *newest = lane.incarnation;
        self.lanes.insert(lane.partition, lane.incarnation);
        self.stale_since.remove(&lane.partition);
        self.drop_partition(lane.partition);
        Ok(())
    }

    /// The partition left this process: forget its lane and its files.
    pub fn release(&mut self, partition: i32) {
        self.lanes.remove(&partition);
        self.stale_since.remove(&partition);
        self.drop_partition(partition);
    }

    /// Whether `lane` is its partition's current incarnation.
    pub fn is_current(&self, lane: LaneId) -> bool {
        self.lanes.get(&lane.partition) == Some(&lane.incarnation)
    }

    /// Takes a lane's files into the partition's pending range.
    pub fn accept(&mut self, files: FilesWritten, now: Instant) -> Accepted {
        let partition = files.lane.partition;
        if !self.is_current(files.lane) {
            let since = *self.stale_since.entry(partition).or_insert(now);
            return Accepted::Stale {
                current: self.lanes.get(&partition).copied(),
                stale_for: now.saturating_duration_since(since),
            };
        }
        self.stale_since.remove(&partition);
        match self.ranges.get_mut(&partition) {
            Some(p) if p.range.next_offset != files.first_offset => {
                let pending_next = p.range.next_offset;
                self.drop_partition(partition);
                return Accepted::NotContiguous {
                    pending_next,
                    first_offset: files.first_offset,
                };
            }
            Some(p) => {
                p.range.next_offset = files.next_offset;
                p.range.rows += files.rows;
                p.range.files.extend(files.data_files);
                p.range.side.extend(files.side);
                p.file_bytes += files.file_bytes;
                p.caught_up = files.caught_up;
            }
            None => {
                self.ranges.insert(
                    partition,
                    Pending {
                        lane: files.lane,
                        range: PartitionRange {
                            partition,
                            first_offset: files.first_offset,
                            next_offset: files.next_offset,
                            files: files.data_files,
                            rows: files.rows,
                            side: files.side,
                        },
                        file_bytes: files.file_bytes,
                        caught_up: files.caught_up,
                    },
                );
            }
        }
        self.rows += files.rows;
        self.bytes += files.file_bytes;
        Accepted::Yes
    }

    /// Everything pending, for a commit.
    pub fn take(&mut self) -> Vec<Pending> {
        self.rows = 0;
        self.bytes = 0;
        std::mem::take(&mut self.ranges).into_values().collect()
    }

    /// A commit of `taken` failed: put each range back in front of what its
    /// lane sent meanwhile, unless the lane was rebuilt or revoked.
    pub fn restore(&mut self, taken: Vec<Pending>) {
        for mut pending in taken {
            let partition = pending.range.partition;
            if !self.is_current(pending.lane) {
                continue;
            }
            if let Some(newer) = self.ranges.remove(&partition) {
                // Files that arrived during the commit continue the range.
                self.rows -= newer.range.rows;
                self.bytes -= newer.file_bytes;
                pending.range.next_offset = newer.range.next_offset;
                pending.range.rows += newer.range.rows;
                pending.range.files.extend(newer.range.files);
                pending.range.side.extend(newer.range.side);
                pending.file_bytes += newer.file_bytes;
                pending.caught_up = newer.caught_up;
            }
            self.rows += pending.range.rows;
            self.bytes += pending.file_bytes;
            self.ranges.insert(partition, pending);
        }
    }

    fn drop_partition(&mut self, partition: i32) {
        if let Some(p) = self.ranges.remove(&partition) {
            self.rows -= p.range.rows;
            self.bytes -= p.file_bytes;
        }
    }

    /// Whether a commit is due: files wait, no retry backoff runs, and the
    /// commit due by the interval (`next_due`) has come, or the rows or
    /// bytes reached their limit, or every pending range is caught up (its
    /// lane read all Kafka had) and the caught-up gap since the last commit
    /// passed, unless the commit due by the interval is within the lead
    /// (the lanes are flushing for it: it takes them all at once).
    pub fn is_due(&self, policy: &DuePolicy, now: Instant, times: CommitTimes) -> bool {
        !self.ranges.is_empty()
            && times.retry_after.is_none_or(|t| now >= t)
            && (now >= times.next_due
                || self.rows >= policy.max_rows
                || self.bytes >= policy.max_bytes
                || policy.caught_up_gap.is_some_and(|gap| {
                    now.saturating_duration_since(times.last_commit) >= gap
                        && now + flush_lead(policy.interval) < times.next_due
                        && self.all_caught_up()
                }))
    }

    /// Every pending range ends with a caught-up flush.
    pub fn all_caught_up(&self) -> bool {
        self.ranges.values().all(|p| p.caught_up)
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The current lane of `partition`, if this process owns it.
    pub fn current(&self, partition: i32) -> Option<u64> {
        self.lanes.get(&partition).copied()
    }

    /// Partitions that have received only stale files, and since when.
    pub fn stale(&self) -> impl Iterator<Item = (i32, Instant)> + '_ {
        self.stale_since.iter().map(|(p, t)| (*p, *t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SideRows;

    fn lane(partition: i32, incarnation: u64) -> LaneId {
        LaneId {
            partition,
            incarnation,
        }
    }

    fn files(lane: LaneId, first_offset: i64, next_offset: i64) -> FilesWritten {
        FilesWritten {
            lane,
            first_offset,
            next_offset,
            data_files: Vec::new(),
            rows: (next_offset - first_offset) as u64,
            file_bytes: 10,
            side: SideRows::default(),
            caught_up: false,
        }
    }

    fn ranges(book: &mut PendingFiles) -> Vec<(i32, i64, i64)> {
        let taken = book.take();
        let out = taken
            .iter()
            .map(|p| (p.range.partition, p.range.first_offset, p.range.next_offset))
            .collect();
        book.restore(taken);
        out
    }

    #[test]
    fn contiguous_files_of_the_current_lane_merge_into_one_range() {
        let now = Instant::now();
        let mut book = PendingFiles::default();
        book.register(lane(0, 1)).unwrap();
        book.register(lane(1, 2)).unwrap();
        assert_eq!(book.accept(files(lane(0, 1), 0, 10), now), Accepted::Yes);
        assert_eq!(book.accept(files(lane(0, 1), 10, 25), now), Accepted::Yes);
        assert_eq!(book.accept(files(lane(1, 2), 7, 9), now), Accepted::Yes);
        assert_eq!((book.rows(), book.bytes()), (27, 30));
        assert_eq!(ranges(&mut book), [(0, 0, 25), (1, 7, 9)]);
    }

    #[test]
    fn files_that_skip_or_repeat_offsets_drop_the_range_and_say_so() {
        let now = Instant::now();
        let mut book = PendingFiles::default();
        book.register(lane(0, 1)).unwrap();
        book.accept(files(lane(0, 1), 0, 10), now);
        assert_eq!(
            book.accept(files(lane(0, 1), 12, 20), now),
            Accepted::NotContiguous {
                pending_next: 10,
                first_offset: 12
            }
        );
        assert!(book.is_empty());
        assert_eq!((book.rows(), book.bytes()), (0, 0));
    }

    #[test]
    fn a_registration_older_than_the_newest_is_refused_even_after_a_release() {
        let mut book = PendingFiles::default();
        book.register(lane(0, 5)).unwrap();
        assert_eq!(
            book.register(lane(0, 3)),
            Err(Superseded {
                lane: lane(0, 3),
                newest: 5
            })
        );
        assert_eq!(book.current(0), Some(5), "the live lane stays current");
        book.release(0);
        assert!(book.register(lane(0, 4)).is_err(), "a late one after a revoke");
        book.register(lane(0, 6)).unwrap();
        assert_eq!(book.current(0), Some(6));
    }

    #[test]
    fn a_new_incarnation_drops_the_old_ones_files_and_refuses_its_stragglers() {
        let t0 = Instant::now();
        let mut book = PendingFiles::default();
        book.register(lane(0, 1)).unwrap();
        book.accept(files(lane(0, 1), 0, 10), t0);
        book.register(lane(0, 2)).unwrap();
        assert!(book.is_empty());
        assert_eq!(
            book.accept(files(lane(0, 1), 10, 20), t0),
            Accepted::Stale {
                current: Some(2),
                stale_for: Duration::ZERO
            }
        );
        // Stale for as long as nothing current arrives.
        assert_eq!(
            book.accept(files(lane(0, 1), 20, 30), t0 + Duration::from_secs(3)),
            Accepted::Stale {
                current: Some(2),
                stale_for: Duration::from_secs(3)
            }
        );
        assert_eq!(book.stale().count(), 1);
        assert_eq!(
            book.accept(files(lane(0, 2), 0, 5), t0 + Duration::from_secs(4)),
            Accepted::Yes
        );
        assert_eq!(book.stale().count(), 0, "current files end the episode");
    }

    #[test]
    fn a_failed_commit_goes_back_in_front_of_what_arrived_meanwhile() {
        let now = Instant::now();
        let mut book = PendingFiles::default();
        book.register(lane(0, 1)).unwrap();
        book.register(lane(1, 1)).unwrap();
        book.register(lane(2, 1)).unwrap();
        book.accept(files(lane(0, 1), 0, 10), now);
        book.accept(files(lane(1, 1), 0, 10), now);
        book.accept(files(lane(2, 1), 0, 10), now);
        let taken = book.take();
        assert!(book.is_empty());
        // During the commit: partition 0 sends more, partition 1 is rebuilt,
        // partition 2 is revoked.
        book.accept(files(lane(0, 1), 10, 15), now);
        book.register(lane(1, 2)).unwrap();
        book.release(2);
        book.restore(taken);
        assert_eq!(ranges(&mut book), [(0, 0, 15)]);
        assert_eq!((book.rows(), book.bytes()), (15, 20));
    }

    /// The times of a committer whose last commit ended at `last` and
    /// whose next commit is due by the interval at `due`.
    fn times(last: Instant, due: Instant, retry_after: Option<Instant>) -> CommitTimes {
        CommitTimes {
            last_commit: last,
            next_due: due,
            retry_after,
        }
    }

    #[test]
    fn a_commit_is_due_on_interval_rows_or_bytes_and_never_during_a_retry_backoff() {
        let policy = DuePolicy {
            interval: Duration::from_secs(2),
            caught_up_gap: None,
            max_rows: 100,
            max_bytes: 1_000,
        };
        let t0 = Instant::now();
        let due = t0 + Duration::from_secs(2);
        let mut book = PendingFiles::default();
        assert!(
            !book.is_due(&policy, t0 + Duration::from_secs(9), times(t0, due, None)),
            "nothing pending"
        );
        book.register(lane(0, 1)).unwrap();
        book.accept(files(lane(0, 1), 0, 10), t0);
        assert!(!book.is_due(&policy, t0 + Duration::from_secs(1), times(t0, due, None)));
        assert!(book.is_due(&policy, t0 + Duration::from_secs(2), times(t0, due, None)));
        let retry = Some(t0 + Duration::from_secs(5));
        assert!(!book.is_due(&policy, t0 + Duration::from_secs(3), times(t0, due, retry)));
        assert!(book.is_due(&policy, t0 + Duration::from_secs(5), times(t0, due, retry)));
        book.accept(files(lane(0, 1), 10, 110), t0);
        assert!(
            book.is_due(&policy, t0, times(t0, due, None)),
            "rows reached the limit"
        );
    }

    /// When input stops, every lane ends with a caught-up flush: the commit
    /// need not wait out the interval, only the gap since the last commit.
    /// One lane still reading keeps the others waiting.
    #[test]
    fn caught_up_files_are_due_after_the_gap_once_every_range_is_caught_up() {
        let policy = DuePolicy {
            interval: Duration::from_secs(2),
            caught_up_gap: Some(Duration::from_millis(500)),
            max_rows: 1_000_000,
            max_bytes: 1_000_000,
        };
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let t = times(t0, at(2_000), None);
        let caught_up = |lane, first, next| FilesWritten {
            caught_up: true,
            ..files(lane, first, next)
        };
        let mut book = PendingFiles::default();
        book.register(lane(0, 1)).unwrap();
        book.register(lane(1, 1)).unwrap();
        book.accept(caught_up(lane(0, 1), 0, 10), t0);
        assert!(!book.is_due(&policy, at(400), t), "within the gap");
        assert!(book.is_due(&policy, at(500), t));
        book.accept(files(lane(1, 1), 0, 10), t0);
        assert!(!book.is_due(&policy, at(600), t), "lane 1 still reading");
        book.accept(caught_up(lane(1, 1), 10, 12), t0);
        assert!(book.is_due(&policy, at(600), t));
        // Within the lead of the commit due by the interval the lanes are
        // flushing for it: one commit takes them all when it comes.
        assert!(
            !book.is_due(&policy, at(1_850), t),
            "the interval's commit is near"
        );
        assert!(book.is_due(&policy, at(2_000), t));
        book.accept(files(lane(0, 1), 10, 20), t0);
        assert!(!book.is_due(&policy, at(600), t), "lane 0 read more since");
        let off = DuePolicy {
            caught_up_gap: None,
            ..policy
        };
        book.accept(caught_up(lane(0, 1), 20, 21), t0);
        assert!(!book.is_due(&off, at(1_500), t), "off: the interval rules");
    }

    #[test]
    fn dues_stay_an_interval_apart_whatever_ran_between() {
        let interval = Duration::from_secs(2);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // Ahead: unchanged (an early commit does not move it).
        assert_eq!(next_due_after(at(2_000), interval, at(1_500)), at(2_000));
        // Reached or passed: the next one of the cadence, not now + interval.
        assert_eq!(next_due_after(at(2_000), interval, at(2_000)), at(4_000));
        assert_eq!(next_due_after(at(2_000), interval, at(2_030)), at(4_000));
        // Idle for a while: whole intervals on.
        assert_eq!(next_due_after(at(2_000), interval, at(9_100)), at(10_000));
    }

    #[test]
    fn a_batcher_flushes_a_lead_before_the_commit_due_and_once_per_commit() {
        let schedule = CommitSchedule::new(Duration::from_secs(2));
        // Nothing before the committer published a due.
        assert_eq!(schedule.flush_at(0), None);
        schedule.set_next_due(10_000);
        // A tenth of the interval ahead (at most 200 ms).
        assert_eq!(schedule.flush_at(0), Some((10_000, 9_800)));
        // Flushed for that commit: rows that come after aim at the one after,
        // an interval later until the committer says when it is due.
        assert_eq!(schedule.flush_at(10_000), Some((12_000, 11_800)));
        schedule.set_next_due(12_000);
        assert_eq!(schedule.flush_at(10_000), Some((12_000, 11_800)));
        // The lead stays between 20 and 200 ms whatever the interval.
        let short = CommitSchedule::new(Duration::from_millis(100));
        short.set_next_due(1_000);
        assert_eq!(short.flush_at(0), Some((1_000, 980)));
        let long = CommitSchedule::new(Duration::from_secs(60));
        long.set_next_due(100_000);
        assert_eq!(long.flush_at(0), Some((100_000, 99_800)));
    }
}
