//! Per-(exchange, symbol) sequence tracking: in order, gap, late fill,
//! old/duplicate, reset.
//!
//! A gap is not reported the moment it is seen: feeds reorder a little, and
//! a late record that fills the hole would otherwise leave a false gap
//! event. Each gap waits for `reorder_window` further records of its symbol;
//! records that arrive in the meantime and fall into its holes fill them.
//! When the window closes, whatever is still missing becomes one
//! [`GapEvent`]; if nothing is, there is no event.
//!
//! A reset — the sequence starting again near 1 after a large drop, as
//! after an exchange session change — is a [`ResetEvent`], and tracking
//! restarts at the new number. The rule is configurable per exchange.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::per_symbol::PerSymbol;
use crate::state::Replay;

/// A lane's sequence state, shared by its sequencer and the committer.
pub type SequenceState = std::sync::Mutex<crate::state::EpochState<SequenceTracker>>;

/// When a lower sequence number means "the feed restarted" rather than
/// "an old record": it is at most `near_start` and at least `min_drop`
/// below the highest number seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResetRule {
    pub near_start: i64,
    pub min_drop: i64,
}

impl Default for ResetRule {
    fn default() -> Self {
        Self {
            near_start: 10,
            min_drop: 1_000,
        }
    }
}

/// The `[sequence]` config section: per-(exchange, symbol) sequence
/// tracking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SequenceConfig {
    /// Records of the same symbol a gap waits for late records to fill it
    /// before it is reported, so a little reordering does not produce false
    /// gap events. 0: report gaps at once.
    pub reorder_window: u32,
    /// Reset rule for exchanges not in `exchange_resets`.
    pub reset: ResetRule,
    /// Reset rules per exchange name, e.g. `[sequence.exchange_resets.ASX]`.
    pub exchange_resets: BTreeMap<String, ResetRule>,
}

impl Default for SequenceConfig {
    fn default() -> Self {
        Self {
            reorder_window: 64,
            reset: ResetRule::default(),
            exchange_resets: BTreeMap::new(),
        }
    }
}

/// What one record's sequence number means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The first record of a symbol, the next number, or a jump forward
    /// (which opens a gap).
    InOrder,
    /// A late record that filled a hole of a gap still in its window.
    LateFill,
    /// At or below the highest number seen and not in an open hole: a
    /// duplicate, or a record later than the reorder window. The
    /// deduplicator decides which.
    Old,
    /// The feed restarted at this number (see [`ResetRule`]).
    Reset,
}

/// Where a record came from, for the events it causes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordPosition {
    pub partition: i32,
    pub offset: i64,
    pub detected_at_us: i64,
}

/// Numbers missing between `expected` and `received` once the reorder
/// window closed. `missing` counts what was still missing then (late fills
/// within the window are not counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapEvent {
    pub exchange: String,
    pub symbol: String,
    pub expected: i64,
    pub received: i64,
    pub missing: i64,
    /// The record that revealed the gap.
    pub at: RecordPosition,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetEvent {
    pub exchange: String,
    pub symbol: String,
    /// Highest number seen before the reset.
    pub previous: i64,
    pub received: i64,
    pub at: RecordPosition,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SequenceEvent {
    Gap(GapEvent),
    Reset(ResetEvent),
}

impl SequenceEvent {
    pub fn exchange(&self) -> &str {
        match self {
            SequenceEvent::Gap(gap) => &gap.exchange,
            SequenceEvent::Reset(reset) => &reset.exchange,
        }
    }
}

/// A gap waiting for late fills.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PendingGap {
    expected: i64,
    received: i64,
    /// Still-missing numbers, as disjoint inclusive ranges in order.
    holes: Vec<(i64, i64)>,
    /// Records of the symbol still to come before the gap is reported.
    records_left: u32,
    at: RecordPosition,
}

impl PendingGap {
    fn missing(&self) -> i64 {
        self.holes.iter().map(|(lo, hi)| hi - lo + 1).sum()
    }

    /// Removes `n` from the holes; true if it was in one.
    fn fill(&mut self, n: i64) -> bool {
        let Some(i) = self.holes.iter().position(|&(lo, hi)| lo <= n && n <= hi) else {
            return false;
        };
        let (lo, hi) = self.holes[i];
        match (n == lo, n == hi) {
            (true, true) => {
                self.holes.remove(i);
            }
            (true, false) => self.holes[i].0 = n + 1,
            (false, true) => self.holes[i].1 = n - 1,
            (false, false) => {
                self.holes[i].1 = n - 1;
                self.holes.insert(i + 1, (n + 1, hi));
            }
        }
        true
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SymbolState {
    /// Highest number seen since tracking (re)started; None before the
    /// symbol's first record.
    high: Option<i64>,
    pending: Vec<PendingGap>,
}

/// Sequence state of the symbols one lane has seen.
#[derive(Debug, Default)]
pub struct SequenceTracker {
    config: SequenceConfig,
    symbols: PerSymbol<SymbolState>,
    /// Events of a replay, which are not reported again.
    replayed_events: Vec<SequenceEvent>,
}

impl SequenceTracker {
    pub fn new(config: SequenceConfig) -> Self {
        Self {
            config,
            symbols: PerSymbol::default(),
            replayed_events: Vec::new(),
        }
    }

    /// Classifies one record and appends the events it completes to `events`.
    pub fn observe(
        &mut self,
        exchange: &str,
        symbol: &str,
        sequence: i64,
        at: RecordPosition,
        events: &mut Vec<SequenceEvent>,
    ) -> Verdict {
        let window = self.config.reorder_window;
        let rule = self
            .config
            .exchange_resets
            .get(exchange)
            .copied()
            .unwrap_or(self.config.reset);
        let state = self.symbols.get_or_default(exchange, symbol);
        let Some(high) = state.high else {
            state.high = Some(sequence);
            return Verdict::InOrder;
        };

        let verdict = if sequence > high {
            if sequence > high + 1 {
                state.pending.push(PendingGap {
                    expected: high + 1,
                    received: sequence,
                    holes: vec![(high + 1, sequence - 1)],
                    // This record does not count against its own window.
                    records_left: window + 1,
                    at,
                });
            }
            state.high = Some(sequence);
            Verdict::InOrder
        } else if state.pending.iter_mut().any(|gap| gap.fill(sequence)) {
            Verdict::LateFill
        } else if sequence <= rule.near_start && high - sequence >= rule.min_drop {
            // Whatever the old session still missed is reported before the restart.
            for gap in state.pending.drain(..) {
                push_gap(events, exchange, symbol, gap);
            }
            events.push(SequenceEvent::Reset(ResetEvent {
                exchange: exchange.to_string(),
                symbol: symbol.to_string(),
                previous: high,
                received: sequence,
                at,
            }));
            state.high = Some(sequence);
            return Verdict::Reset;
        } else {
            Verdict::Old
        };

        // Every record of the symbol moves its open windows on.
        let mut i = 0;
        while i < state.pending.len() {
            let gap = &mut state.pending[i];
            gap.records_left = gap.records_left.saturating_sub(1);
            if gap.records_left == 0 || gap.holes.is_empty() {
                let gap = state.pending.remove(i);
                push_gap(events, exchange, symbol, gap);
            } else {
                i += 1;
            }
        }
        verdict
    }

    /// Records of (exchange, symbol) were shed before they were decoded, so
    /// their sequence numbers were never seen: the symbol's next record
    /// starts its tracking again, and its open windows are dropped (the shed
    /// records may have filled them). Continuity across a shed run is not
    /// judged here; `k2 backfill` sequences those records when it ingests
    /// them.
    pub fn restart(&mut self, exchange: &str, symbol: &str) {
        if let Some(state) = self.symbols.get_mut(exchange, symbol) {
            state.high = None;
            state.pending.clear();
        }
    }

    /// Closes every open window now (the lane is flushing), reporting what
    /// is still missing.
    pub fn close_windows(&mut self, events: &mut Vec<SequenceEvent>) {
        for (exchange, symbol, state) in self.symbols.iter_mut() {
            for gap in state.pending.drain(..) {
                push_gap(events, exchange, symbol, gap);
            }
        }
    }

    pub fn symbols(&self) -> usize {
        self.symbols.len()
    }
}

/// The committed copy of a lane's sequence state replays what records did;
/// a symbol's state is stored as JSON (small: a number and open gaps).
/// What one record (or one shed run of records) did to its symbol's
/// sequence state, for the epoch log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceOp {
    /// A record's sequence number and where it was read. Its offset is the
    /// log entry's own, so it is not kept twice (a log holds an entry for
    /// every record not yet committed).
    Observe {
        sequence: i64,
        partition: i32,
        detected_at_us: i64,
    },
    /// Records of the symbol were shed before decoding: tracking restarts.
    Restart,
}

impl SequenceOp {
    /// The op of a record observed at `at` (its offset goes in the log entry).
    pub fn observe(sequence: i64, at: RecordPosition) -> Self {
        Self::Observe {
            sequence,
            partition: at.partition,
            detected_at_us: at.detected_at_us,
        }
    }
}

// An epoch log entry (offset, symbol id, op) is 40 bytes, not the 56 it was
// with the record's whole position in the op.
const _: () = assert!(std::mem::size_of::<(i64, u32, SequenceOp)>() <= 40);

impl Replay for SequenceTracker {
    type Op = SequenceOp;

    fn replay(&mut self, offset: i64, exchange: &str, symbol: &str, op: &Self::Op) {
        match *op {
            SequenceOp::Observe {
                sequence,
                partition,
                detected_at_us,
            } => {
                let at = RecordPosition {
                    partition,
                    offset,
                    detected_at_us,
                };
                let mut events = std::mem::take(&mut self.replayed_events);
                self.observe(exchange, symbol, sequence, at, &mut events);
                events.clear();
                self.replayed_events = events;
            }
            SequenceOp::Restart => self.restart(exchange, symbol),
        }
    }

    fn encode(&self, exchange: &str, symbol: &str) -> Option<Vec<u8>> {
        let state = self.symbols.get(exchange, symbol)?;
        Some(serde_json::to_vec(state).expect("sequence state serialises"))
    }

    fn decode(&mut self, exchange: &str, symbol: &str, bytes: &[u8]) -> Result<(), String> {
        let state: SymbolState = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        *self.symbols.get_or_default(exchange, symbol) = state;
        Ok(())
    }
}

/// Reports `gap` if anything in it is still missing.
fn push_gap(events: &mut Vec<SequenceEvent>, exchange: &str, symbol: &str, gap: PendingGap) {
    let missing = gap.missing();
    if missing > 0 {
        events.push(SequenceEvent::Gap(GapEvent {
            exchange: exchange.to_string(),
            symbol: symbol.to_string(),
            expected: gap.expected,
            received: gap.received,
            missing,
            at: gap.at,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: i64) -> RecordPosition {
        RecordPosition {
            partition: 0,
            offset,
            detected_at_us: 1_000 + offset,
        }
    }

    /// Feeds `(symbol, sequence)` pairs (offsets 0, 1, …) and returns the
    /// verdicts and the events.
    fn feed(
        tracker: &mut SequenceTracker,
        exchange: &str,
        records: &[(&str, i64)],
    ) -> (Vec<Verdict>, Vec<SequenceEvent>) {
        let mut events = Vec::new();
        let verdicts = records
            .iter()
            .enumerate()
            .map(|(i, (symbol, seq))| tracker.observe(exchange, symbol, *seq, at(i as i64), &mut events))
            .collect();
        (verdicts, events)
    }

    fn gap(symbol: &str, expected: i64, received: i64, missing: i64, offset: i64) -> SequenceEvent {
        SequenceEvent::Gap(GapEvent {
            exchange: "ASX".into(),
            symbol: symbol.into(),
            expected,
            received,
            missing,
            at: at(offset),
        })
    }

    fn tracker(window: u32) -> SequenceTracker {
        SequenceTracker::new(SequenceConfig {
            reorder_window: window,
            ..SequenceConfig::default()
        })
    }

    use Verdict::*;

    #[test]
    fn a_symbol_shed_unseen_restarts_its_tracking_without_a_false_gap() {
        let mut t = tracker(4);
        let (_, events) = feed(&mut t, "ASX", &[("AAA", 1), ("AAA", 2), ("BBB", 1), ("AAA", 5)]);
        assert!(events.is_empty());
        // AAA 6..=40 were shed by key: never decoded, never seen here.
        t.restart("ASX", "AAA");
        let (verdicts, mut events) = feed(&mut t, "ASX", &[("AAA", 41), ("AAA", 42), ("BBB", 3)]);
        assert_eq!(verdicts, [InOrder, InOrder, InOrder]);
        t.close_windows(&mut events);
        // AAA's open window (3, 4 missing) was dropped with the restart; BBB's gap stands.
        assert_eq!(events, [gap("BBB", 2, 3, 1, 2)]);
    }

    #[test]
    fn a_restart_in_the_epoch_log_replays_to_the_same_state() {
        let mut live = crate::state::EpochState::new("s".into(), || tracker(4));
        let mut events = Vec::new();
        for (offset, seq) in [(0, 1), (1, 2), (3, 9)] {
            live.working.observe("ASX", "AAA", seq, at(offset), &mut events);
            live.record(offset, "ASX", "AAA", SequenceOp::observe(seq, at(offset)));
        }
        live.working.restart("ASX", "AAA");
        live.record(4, "ASX", "AAA", SequenceOp::Restart);
        live.working.observe("ASX", "AAA", 30, at(5), &mut events);
        live.record(5, "ASX", "AAA", SequenceOp::observe(30, at(5)));
        let staged = live.stage(6);
        let mut restored = crate::state::EpochState::new("s".into(), || tracker(4));
        restored.restore(6, &staged.entries).unwrap();
        let mut after = Vec::new();
        restored.working.observe("ASX", "AAA", 31, at(6), &mut after);
        restored.working.close_windows(&mut after);
        assert!(
            after.is_empty(),
            "the restored state has no gap before 30: {after:?}"
        );
    }

    #[test]
    fn consecutive_numbers_are_in_order_per_symbol_and_cause_no_events() {
        let mut t = tracker(2);
        let (verdicts, events) = feed(&mut t, "ASX", &[("BHP", 1), ("CBA", 7), ("BHP", 2), ("CBA", 8)]);
        assert_eq!(verdicts, [InOrder; 4]);
        assert!(events.is_empty());
        assert_eq!(t.symbols(), 2);
    }

    #[test]
    fn without_a_window_a_gap_is_reported_at_once_with_its_missing_count() {
        let mut t = tracker(0);
        let (verdicts, events) = feed(&mut t, "ASX", &[("BHP", 10), ("BHP", 14), ("BHP", 15)]);
        assert_eq!(verdicts, [InOrder, InOrder, InOrder]);
        assert_eq!(events, [gap("BHP", 11, 14, 3, 1)]);
    }

    #[test]
    fn a_late_record_within_the_window_closes_the_gap_without_an_event() {
        let mut t = tracker(2);
        let (verdicts, events) = feed(
            &mut t,
            "ASX",
            &[("BHP", 1), ("BHP", 2), ("BHP", 4), ("BHP", 3), ("BHP", 5)],
        );
        assert_eq!(verdicts, [InOrder, InOrder, InOrder, LateFill, InOrder]);
        assert!(events.is_empty(), "{events:?}");
    }

    #[test]
    fn a_partly_filled_gap_reports_what_is_still_missing_when_the_window_closes() {
        let mut t = tracker(2);
        // 2..=4 missing after 5; 3 arrives late; the window (2 records) closes at 6.
        let (verdicts, events) = feed(
            &mut t,
            "ASX",
            &[("BHP", 1), ("BHP", 5), ("BHP", 3), ("BHP", 6), ("BHP", 7)],
        );
        assert_eq!(verdicts, [InOrder, InOrder, LateFill, InOrder, InOrder]);
        assert_eq!(events, [gap("BHP", 2, 5, 2, 1)]);
        // A record later than the window is old, not a fill.
        let mut events = Vec::new();
        assert_eq!(t.observe("ASX", "BHP", 2, at(9), &mut events), Old);
        assert!(events.is_empty());
    }

    #[test]
    fn windows_count_records_of_their_own_symbol_only() {
        let mut t = tracker(1);
        let (_, events) = feed(
            &mut t,
            "ASX",
            &[
                ("BHP", 1),
                ("BHP", 3),
                ("CBA", 1),
                ("CBA", 2),
                ("CBA", 3),
                ("BHP", 2),
            ],
        );
        assert!(
            events.is_empty(),
            "other symbols' records must not close BHP's window: {events:?}"
        );
    }

    #[test]
    fn repeated_or_older_numbers_are_old_and_do_not_move_the_position() {
        let mut t = tracker(0);
        let (verdicts, events) = feed(&mut t, "ASX", &[("BHP", 5), ("BHP", 5), ("BHP", 3), ("BHP", 6)]);
        assert_eq!(verdicts, [InOrder, Old, Old, InOrder]);
        assert!(events.is_empty());
    }

    #[test]
    fn a_restart_near_one_after_a_large_drop_is_a_reset_and_tracking_restarts() {
        let mut t = tracker(0);
        let (verdicts, events) = feed(
            &mut t,
            "ASX",
            &[("BHP", 5_000), ("BHP", 1), ("BHP", 2), ("BHP", 4)],
        );
        assert_eq!(verdicts, [InOrder, Reset, InOrder, InOrder]);
        assert_eq!(
            events,
            [
                SequenceEvent::Reset(ResetEvent {
                    exchange: "ASX".into(),
                    symbol: "BHP".into(),
                    previous: 5_000,
                    received: 1,
                    at: at(1),
                }),
                gap("BHP", 3, 4, 1, 3),
            ]
        );
    }

    #[test]
    fn a_small_drop_or_a_low_number_far_from_one_is_old_not_a_reset() {
        let mut t = tracker(0);
        let (verdicts, events) = feed(
            &mut t,
            "ASX",
            &[("BHP", 50), ("BHP", 1), ("BHP", 5_000), ("BHP", 400)],
        );
        assert_eq!(verdicts, [InOrder, Old, InOrder, Old]);
        assert_eq!(events, [gap("BHP", 51, 5_000, 4_949, 2)]);
    }

    #[test]
    fn reset_rules_are_per_exchange() {
        let mut t = SequenceTracker::new(SequenceConfig {
            reorder_window: 0,
            reset: ResetRule::default(),
            exchange_resets: BTreeMap::from([(
                "BINANCE".to_string(),
                ResetRule {
                    near_start: 1,
                    min_drop: 10,
                },
            )]),
        });
        let mut events = Vec::new();
        t.observe("BINANCE", "BTCUSDT", 100, at(0), &mut events);
        assert_eq!(t.observe("BINANCE", "BTCUSDT", 1, at(1), &mut events), Reset);
        t.observe("ASX", "BHP", 100, at(2), &mut events);
        assert_eq!(t.observe("ASX", "BHP", 1, at(3), &mut events), Old);
    }

    #[test]
    fn a_reset_reports_the_old_sessions_open_gaps_first() {
        let mut t = tracker(5);
        let (_, events) = feed(&mut t, "ASX", &[("BHP", 5_000), ("BHP", 5_003), ("BHP", 1)]);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0], gap("BHP", 5_001, 5_003, 2, 1));
        assert!(matches!(events[1], SequenceEvent::Reset(_)));
    }

    #[test]
    fn closing_the_windows_reports_open_gaps() {
        let mut t = tracker(100);
        let (_, events) = feed(&mut t, "ASX", &[("BHP", 1), ("BHP", 4), ("BHP", 2)]);
        assert!(events.is_empty());
        let mut events = Vec::new();
        t.close_windows(&mut events);
        assert_eq!(events, [gap("BHP", 2, 4, 1, 1)]);
        t.close_windows(&mut events);
        assert_eq!(events.len(), 1, "a gap is reported once");
    }

    /// Feeds `records` (offsets `first..`) and returns each event with the
    /// offset of the record that reported it.
    fn feed_from(
        tracker: &mut SequenceTracker,
        first: usize,
        records: &[(&str, i64)],
    ) -> Vec<(usize, SequenceEvent)> {
        let mut out = Vec::new();
        for (i, (symbol, seq)) in records.iter().enumerate() {
            let mut events = Vec::new();
            tracker.observe("ASX", symbol, *seq, at((first + i) as i64), &mut events);
            out.extend(events.into_iter().map(|e| (first + i, e)));
        }
        out
    }

    /// A lane committed up to offset 4 while its sequencer had gone further,
    /// then was rebuilt from the state staged at 4: it reports exactly what
    /// an uninterrupted lane reports from offset 4 on (the gap open across
    /// the rewind, its late fill, an old record), nothing twice, nothing missed.
    #[test]
    fn state_staged_at_a_commit_resumes_exactly_after_a_rewind() {
        use crate::state::EpochState;
        let records = [
            ("BHP", 1),
            ("BHP", 2),
            ("BHP", 5), // opens a gap 3..=4, window 2
            ("CBA", 1),
            ("BHP", 3), // offset 4: a late fill
            ("CBA", 4), // a gap 2..=3
            ("BHP", 2), // old; closes the BHP window: 4 still missing
            ("BHP", 6),
            ("BHP", 7),
            ("CBA", 5),
            ("CBA", 6), // closes the CBA window
            ("CBA", 7),
        ];
        let uninterrupted = feed_from(&mut tracker(2), 0, &records);
        assert_eq!(
            uninterrupted,
            [(6, gap("BHP", 3, 5, 1, 2)), (10, gap("CBA", 2, 4, 2, 5))]
        );

        let mut lane = EpochState::new("s".into(), || tracker(2));
        for (i, (symbol, seq)) in records.iter().enumerate() {
            let position = at(i as i64);
            lane.working
                .observe("ASX", symbol, *seq, position, &mut Vec::new());
            lane.record(i as i64, "ASX", symbol, SequenceOp::observe(*seq, position));
        }
        let staged = lane.stage(4);
        let mut rebuilt = EpochState::new("s".into(), || tracker(2));
        rebuilt.restore(4, &staged.entries).unwrap();
        assert_eq!(feed_from(&mut rebuilt.working, 4, &records[4..]), uninterrupted);

        // Without the state, the rebuilt lane would miss both gaps.
        assert!(feed_from(&mut tracker(2), 4, &records[4..]).is_empty());
    }

    #[test]
    fn filling_the_middle_of_a_hole_splits_it() {
        let mut g = PendingGap {
            expected: 1,
            received: 10,
            holes: vec![(1, 9)],
            records_left: 1,
            at: at(0),
        };
        assert!(g.fill(5));
        assert_eq!(g.holes, [(1, 4), (6, 9)]);
        assert!(g.fill(1) && g.fill(9));
        assert_eq!(g.holes, [(2, 4), (6, 8)]);
        assert!(!g.fill(5), "already filled");
        assert_eq!(g.missing(), 6);
    }
}
