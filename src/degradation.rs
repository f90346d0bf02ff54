//! The degradation level and the state machine that moves it.
//!
//! Five levels, NORMAL(0) … CIRCUIT_BREAK(4). The [`Supervisor`] samples
//! [`Signals`] on a tick and feeds them to a [`Degradation`]:
//!
//! - it escalates as soon as any signal reaches a level's `escalate`
//!   threshold, straight to the highest level reached;
//! - it de-escalates one level at a time, only after every signal has stayed
//!   below the current level's `recover` threshold for the whole cooldown.
//!   The cooldown starts again after every change, so a signal oscillating
//!   around a threshold cannot make the level flap;
//! - an operator can force a level (with a reason and an optional expiry);
//!   the automatic level keeps being computed underneath and takes over
//!   again when the force is cleared or expires.
//!
//! Time comes in as an argument (`now`), so tests drive it without sleeping.
//!
//! [`Supervisor`]: crate::actors::Supervisor

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How far K2 has stepped back from processing everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum DegradationLevel {
    /// Everything is processed.
    #[default]
    Normal = 0,
    /// Non-essential work is skipped and batches grow to cut commit overhead.
    Soft = 1,
    /// LOW priority (reference data) is shed.
    Graceful = 2,
    /// NORMAL priority (tier-3 symbols) is shed too.
    Aggressive = 3,
    /// Only CRITICAL (tier-1 symbols) is processed.
    CircuitBreak = 4,
}

impl DegradationLevel {
    pub const ALL: [DegradationLevel; 5] = [
        DegradationLevel::Normal,
        DegradationLevel::Soft,
        DegradationLevel::Graceful,
        DegradationLevel::Aggressive,
        DegradationLevel::CircuitBreak,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DegradationLevel::Normal => "NORMAL",
            DegradationLevel::Soft => "SOFT",
            DegradationLevel::Graceful => "GRACEFUL",
            DegradationLevel::Aggressive => "AGGRESSIVE",
            DegradationLevel::CircuitBreak => "CIRCUIT_BREAK",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    fn from_index(index: usize) -> Self {
        Self::ALL[index.min(4)]
    }

    fn below(self) -> Self {
        Self::from_index(self.index().saturating_sub(1))
    }
}

impl fmt::Display for DegradationLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown degradation level `{0}`; expected one of NORMAL, SOFT, GRACEFUL, AGGRESSIVE, CIRCUIT_BREAK")]
pub struct UnknownLevel(pub String);

impl FromStr for DegradationLevel {
    type Err = UnknownLevel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|level| level.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownLevel(s.to_string()))
    }
}

impl Serialize for DegradationLevel {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for DegradationLevel {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The signals the level is computed from, named as in config and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    /// Records between the committed offsets and the high watermarks, all partitions.
    TotalLag,
    /// The largest lag of one partition.
    PartitionLag,
    /// Resident memory as a fraction of `memory_budget_bytes`.
    Memory,
    /// Bytes buffered in batchers, all lanes.
    BatcherBytes,
    /// Duration of the last commit, or the time since the oldest pending
    /// files arrived if a commit is overdue (a stuck commit counts).
    CommitLatency,
    /// Commits failed in a row.
    CommitFailures,
    /// The storage circuit breaker: 0 closed, 1 half open, 2 open.
    CircuitBreaker,
    /// The smallest retention headroom of a partition, as a fraction: the
    /// records retention will delete before it reaches the next record to
    /// read, over what the log retains (1 = caught up). Lower is worse.
    RetentionHeadroomRatio,
    /// The smallest retention headroom of a partition, in seconds at the
    /// current rates in and out. Lower is worse.
    RetentionHeadroomSeconds,
}

impl Signal {
    pub const ALL: [Signal; 9] = [
        Signal::TotalLag,
        Signal::PartitionLag,
        Signal::Memory,
        Signal::BatcherBytes,
        Signal::CommitLatency,
        Signal::CommitFailures,
        Signal::CircuitBreaker,
        Signal::RetentionHeadroomRatio,
        Signal::RetentionHeadroomSeconds,
    ];

    /// Whether a level is entered when the signal falls to its threshold
    /// (headroom), rather than when it rises to it.
    pub fn lower_is_worse(self) -> bool {
        matches!(
            self,
            Signal::RetentionHeadroomRatio | Signal::RetentionHeadroomSeconds
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Signal::TotalLag => "total_lag_records",
            Signal::PartitionLag => "partition_lag_records",
            Signal::Memory => "memory_ratio",
            Signal::BatcherBytes => "batcher_bytes",
            Signal::CommitLatency => "commit_latency_ms",
            Signal::CommitFailures => "commit_failures",
            Signal::CircuitBreaker => "circuit_breaker",
            Signal::RetentionHeadroomRatio => "retention_headroom_ratio",
            Signal::RetentionHeadroomSeconds => "retention_headroom_s",
        }
    }
}

/// One sample of every signal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Signals {
    pub total_lag_records: f64,
    pub partition_lag_records: f64,
    pub memory_ratio: f64,
    pub batcher_bytes: f64,
    pub commit_latency_ms: f64,
    pub commit_failures: f64,
    pub circuit_breaker: f64,
    pub retention_headroom_ratio: f64,
    /// Infinite while no partition's headroom is closing.
    pub retention_headroom_s: f64,
}

impl Default for Signals {
    /// Nothing pressing: no lag, no failures, full headroom.
    fn default() -> Self {
        Self {
            total_lag_records: 0.0,
            partition_lag_records: 0.0,
            memory_ratio: 0.0,
            batcher_bytes: 0.0,
            commit_latency_ms: 0.0,
            commit_failures: 0.0,
            circuit_breaker: 0.0,
            retention_headroom_ratio: 1.0,
            retention_headroom_s: f64::INFINITY,
        }
    }
}

impl Signals {
    pub fn get(&self, signal: Signal) -> f64 {
        match signal {
            Signal::TotalLag => self.total_lag_records,
            Signal::PartitionLag => self.partition_lag_records,
            Signal::Memory => self.memory_ratio,
            Signal::BatcherBytes => self.batcher_bytes,
            Signal::CommitLatency => self.commit_latency_ms,
            Signal::CommitFailures => self.commit_failures,
            Signal::CircuitBreaker => self.circuit_breaker,
            Signal::RetentionHeadroomRatio => self.retention_headroom_ratio,
            Signal::RetentionHeadroomSeconds => self.retention_headroom_s,
        }
    }
}

/// Thresholds of one signal for SOFT, GRACEFUL, AGGRESSIVE and
/// CIRCUIT_BREAK (in that order). A level is entered when the signal is at
/// or above its `escalate` value and may be left once the signal stays
/// below its `recover` value; for a signal where lower is worse
/// ([`Signal::lower_is_worse`]: headroom), at or below and above.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    pub escalate: [f64; 4],
    pub recover: [f64; 4],
}

impl Thresholds {
    fn new(escalate: [f64; 4], recover: [f64; 4]) -> Self {
        Self { escalate, recover }
    }

    /// The highest level whose escalate threshold `value` reaches.
    fn level_reached(&self, value: f64, lower_is_worse: bool) -> DegradationLevel {
        let reached = self
            .escalate
            .iter()
            .take_while(|t| {
                if lower_is_worse {
                    value <= **t
                } else {
                    value >= **t
                }
            })
            .count();
        DegradationLevel::from_index(reached)
    }

    /// Whether `value` lets `level` be left (NORMAL is never left).
    fn allows_leaving(&self, level: DegradationLevel, value: f64, lower_is_worse: bool) -> bool {
        if level == DegradationLevel::Normal {
            return true;
        }
        let recover = self.recover[level.index() - 1];
        if lower_is_worse {
            value > recover
        } else {
            value < recover
        }
    }

    fn validate(&self, name: &str, lower_is_worse: bool) -> Result<(), String> {
        let all = self.escalate.iter().chain(&self.recover);
        let never = if lower_is_worse { NEVER_BELOW } else { NEVER };
        if all.clone().any(|v| v.is_nan() || (*v < 0.0 && *v != never)) {
            return Err(format!("degradation.{name}: thresholds must be numbers >= 0"));
        }
        let (order, worse): (&str, fn(f64, f64) -> bool) = if lower_is_worse {
            ("increase", |a, b| a < b)
        } else {
            ("decrease", |a, b| a > b)
        };
        if self.escalate.windows(2).any(|w| worse(w[0], w[1])) {
            return Err(format!(
                "degradation.{name}.escalate must not {order} from SOFT to CIRCUIT_BREAK, got {:?}",
                self.escalate
            ));
        }
        for (i, (up, down)) in self.escalate.iter().zip(&self.recover).enumerate() {
            if worse(*down, *up) {
                let level = DegradationLevel::from_index(i + 1);
                let side = if lower_is_worse { "below" } else { "above" };
                return Err(format!(
                    "degradation.{name}: the {level} recover threshold {down} is {side} its escalate threshold {up} (the level could never settle)"
                ));
            }
        }
        Ok(())
    }

    /// Whether `threshold` can ever be reached by the signal.
    pub fn reachable(threshold: f64, lower_is_worse: bool) -> bool {
        if lower_is_worse {
            threshold >= 0.0
        } else {
            threshold < NEVER
        }
    }
}

/// `[degradation]`: the tick, the cooldown and every signal's thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DegradationConfig {
    /// How often the supervisor samples the signals.
    pub tick_ms: u64,
    /// How long every signal must stay below the current level's recover
    /// thresholds before the level steps down one.
    pub cooldown_s: u64,
    /// Memory K2 may use; `memory_ratio` is resident memory over this.
    pub memory_budget_bytes: u64,
    /// SOFT and above: batch targets (rows, bytes, age) grow by this factor.
    pub soft_batch_growth: u32,
    pub total_lag_records: Thresholds,
    pub partition_lag_records: Thresholds,
    pub memory_ratio: Thresholds,
    pub batcher_bytes: Thresholds,
    pub commit_latency_ms: Thresholds,
    pub commit_failures: Thresholds,
    pub circuit_breaker: Thresholds,
    /// Lower is worse: a level is entered when the headroom falls to it.
    pub retention_headroom_ratio: Thresholds,
    /// Lower is worse: a level is entered when the headroom falls to it.
    pub retention_headroom_s: Thresholds,
}

/// A threshold no sample reaches: the signal never drives that level.
pub const NEVER: f64 = 1e18;
/// The same for a signal where lower is worse (headroom never falls below 0).
pub const NEVER_BELOW: f64 = -1.0;

impl Default for DegradationConfig {
    fn default() -> Self {
        Self {
            tick_ms: 250,
            cooldown_s: 30,
            memory_budget_bytes: 4 << 30,
            soft_batch_growth: 2,
            total_lag_records: Thresholds::new(
                [500_000.0, 2_000_000.0, 5_000_000.0, 10_000_000.0],
                [250_000.0, 1_000_000.0, 2_500_000.0, 5_000_000.0],
            ),
            partition_lag_records: Thresholds::new(
                [200_000.0, 1_000_000.0, 2_000_000.0, 5_000_000.0],
                [100_000.0, 500_000.0, 1_000_000.0, 2_500_000.0],
            ),
            memory_ratio: Thresholds::new([0.7, 0.8, 0.9, 0.95], [0.6, 0.7, 0.8, 0.85]),
            batcher_bytes: Thresholds::new([512e6, 1024e6, 1536e6, 2048e6], [256e6, 512e6, 1024e6, 1536e6]),
            commit_latency_ms: Thresholds::new(
                [10_000.0, 30_000.0, 60_000.0, NEVER],
                [5_000.0, 15_000.0, 30_000.0, NEVER],
            ),
            commit_failures: Thresholds::new([3.0, 10.0, NEVER, NEVER], [1.0, 1.0, NEVER, NEVER]),
            circuit_breaker: Thresholds::new([2.0, NEVER, NEVER, NEVER], [1.0, NEVER, NEVER, NEVER]),
            retention_headroom_ratio: Thresholds::new([0.5, 0.35, 0.2, 0.1], [0.6, 0.45, 0.3, 0.2]),
            retention_headroom_s: Thresholds::new([60.0, 30.0, 15.0, 5.0], [120.0, 60.0, 30.0, 10.0]),
        }
    }
}

impl DegradationConfig {
    pub fn thresholds(&self, signal: Signal) -> &Thresholds {
        match signal {
            Signal::TotalLag => &self.total_lag_records,
            Signal::PartitionLag => &self.partition_lag_records,
            Signal::Memory => &self.memory_ratio,
            Signal::BatcherBytes => &self.batcher_bytes,
            Signal::CommitLatency => &self.commit_latency_ms,
            Signal::CommitFailures => &self.commit_failures,
            Signal::CircuitBreaker => &self.circuit_breaker,
            Signal::RetentionHeadroomRatio => &self.retention_headroom_ratio,
            Signal::RetentionHeadroomSeconds => &self.retention_headroom_s,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.tick_ms == 0 {
            return Err("degradation.tick_ms must be at least 1".into());
        }
        if self.memory_budget_bytes == 0 {
            return Err("degradation.memory_budget_bytes must be at least 1".into());
        }
        if self.soft_batch_growth == 0 {
            return Err("degradation.soft_batch_growth must be at least 1".into());
        }
        Signal::ALL
            .iter()
            .try_for_each(|s| self.thresholds(*s).validate(s.as_str(), s.lower_is_worse()))
    }
}

/// Who set the level.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Mode {
    Auto,
    Forced {
        level: DegradationLevel,
        reason: String,
        /// Unix milliseconds when the force ends by itself; None: until cleared.
        expires_at_ms: Option<i64>,
        #[serde(skip)]
        expires: Option<Instant>,
    },
}

/// One change of the effective level.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transition {
    pub from: DegradationLevel,
    pub to: DegradationLevel,
    /// Why: the signal and threshold, or the operator's reason.
    pub cause: String,
    /// Unix milliseconds.
    pub at_ms: i64,
}

/// How many transitions the history keeps.
pub const HISTORY: usize = 50;

/// The level state machine. Feed it samples with [`Degradation::observe`].
#[derive(Debug)]
pub struct Degradation {
    config: DegradationConfig,
    cooldown: Duration,
    /// The level the signals call for (with hysteresis).
    auto: DegradationLevel,
    mode: Mode,
    /// Since when every signal has been below `auto`'s recover thresholds.
    calm_since: Option<Instant>,
    last: Signals,
    history: VecDeque<Transition>,
}

impl Degradation {
    pub fn new(config: DegradationConfig) -> Self {
        Self {
            cooldown: Duration::from_secs(config.cooldown_s),
            config,
            auto: DegradationLevel::Normal,
            mode: Mode::Auto,
            calm_since: None,
            last: Signals::default(),
            history: VecDeque::new(),
        }
    }

    /// The level in force.
    pub fn level(&self) -> DegradationLevel {
        match &self.mode {
            Mode::Auto => self.auto,
            Mode::Forced { level, .. } => *level,
        }
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    pub fn auto_level(&self) -> DegradationLevel {
        self.auto
    }

    pub fn config(&self) -> &DegradationConfig {
        &self.config
    }

    pub fn last_signals(&self) -> &Signals {
        &self.last
    }

    /// Oldest first.
    pub fn history(&self) -> impl Iterator<Item = &Transition> {
        self.history.iter()
    }

    /// Takes one sample. Returns the transition of the level in force, if any.
    pub fn observe(&mut self, signals: Signals, now: Instant, now_ms: i64) -> Option<Transition> {
        self.last = signals;
        let before = self.level();
        if let Mode::Forced {
            expires: Some(expires),
            reason,
            ..
        } = &self.mode
            && now >= *expires
        {
            let cause = format!("force expired ({reason}); back to auto");
            self.mode = Mode::Auto;
            self.step_auto(&signals, now);
            return self.record(before, cause, now_ms);
        }
        let cause = self.step_auto(&signals, now);
        match self.mode {
            Mode::Auto => self.record(before, cause?, now_ms),
            Mode::Forced { .. } => None,
        }
    }

    /// Moves the automatic level; returns why it moved.
    fn step_auto(&mut self, signals: &Signals, now: Instant) -> Option<String> {
        let (mut reached, mut culprit) = (DegradationLevel::Normal, None);
        for signal in Signal::ALL {
            let level = self
                .config
                .thresholds(signal)
                .level_reached(signals.get(signal), signal.lower_is_worse());
            if level > reached {
                (reached, culprit) = (level, Some(signal));
            }
        }
        if reached > self.auto {
            let signal = culprit.expect("a level above NORMAL was reached by a signal");
            let threshold = self.config.thresholds(signal).escalate[reached.index() - 1];
            self.auto = reached;
            self.calm_since = None;
            return Some(format!(
                "{} {} {} {}",
                signal.as_str(),
                signals.get(signal),
                if signal.lower_is_worse() { "<=" } else { ">=" },
                threshold
            ));
        }
        let calm = Signal::ALL.iter().all(|s| {
            self.config
                .thresholds(*s)
                .allows_leaving(self.auto, signals.get(*s), s.lower_is_worse())
        });
        if !calm || self.auto == DegradationLevel::Normal {
            self.calm_since = None;
            return None;
        }
        let since = *self.calm_since.get_or_insert(now);
        if now.duration_since(since) < self.cooldown {
            return None;
        }
        let from = self.auto;
        self.auto = from.below();
        // The next step down needs a cooldown of its own.
        self.calm_since = None;
        Some(format!(
            "every signal below the {from} recover thresholds for {}s",
            self.cooldown.as_secs()
        ))
    }

    /// Forces `level` until cleared or `ttl` passes.
    pub fn force(
        &mut self,
        level: DegradationLevel,
        reason: String,
        ttl: Option<Duration>,
        now: Instant,
        now_ms: i64,
    ) -> Option<Transition> {
        let before = self.level();
        self.mode = Mode::Forced {
            level,
            expires_at_ms: ttl.map(|t| now_ms + t.as_millis() as i64),
            expires: ttl.map(|t| now + t),
            reason: reason.clone(),
        };
        self.record(before, format!("forced: {reason}"), now_ms)
    }

    /// Returns to the automatic level.
    pub fn clear_force(&mut self, now_ms: i64) -> Option<Transition> {
        if self.mode == Mode::Auto {
            return None;
        }
        let before = self.level();
        self.mode = Mode::Auto;
        self.record(before, "force cleared; back to auto".into(), now_ms)
    }

    fn record(&mut self, before: DegradationLevel, cause: String, now_ms: i64) -> Option<Transition> {
        let after = self.level();
        if after == before {
            return None;
        }
        let transition = Transition {
            from: before,
            to: after,
            cause,
            at_ms: now_ms,
        };
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(transition.clone());
        Some(transition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DegradationConfig {
        DegradationConfig {
            cooldown_s: 30,
            ..DegradationConfig::default()
        }
    }

    fn lag(total: f64) -> Signals {
        Signals {
            total_lag_records: total,
            ..Signals::default()
        }
    }

    /// A clock the tests move by hand.
    struct Clock {
        start: Instant,
        elapsed: Duration,
    }

    impl Clock {
        fn new() -> Self {
            Self {
                start: Instant::now(),
                elapsed: Duration::ZERO,
            }
        }

        fn advance(&mut self, by: Duration) -> (Instant, i64) {
            self.elapsed += by;
            (self.start + self.elapsed, self.elapsed.as_millis() as i64)
        }
    }

    fn headroom(ratio: f64) -> Signals {
        Signals {
            retention_headroom_ratio: ratio,
            ..Signals::default()
        }
    }

    #[test]
    fn falling_retention_headroom_raises_the_level_and_it_steps_down_only_above_recover() {
        let mut d = Degradation::new(config());
        let mut clock = Clock::new();
        let (now, ms) = clock.advance(Duration::from_secs(1));
        assert_eq!(d.observe(headroom(0.9), now, ms), None);
        let (now, ms) = clock.advance(Duration::from_secs(1));
        let t = d.observe(headroom(0.15), now, ms).expect("a transition");
        assert_eq!(t.to, DegradationLevel::Aggressive);
        assert_eq!(t.cause, "retention_headroom_ratio 0.15 <= 0.2");
        // Back above AGGRESSIVE's escalate but not above its recover (0.3): stays.
        for _ in 0..40 {
            let (now, ms) = clock.advance(Duration::from_secs(1));
            assert_eq!(d.observe(headroom(0.25), now, ms), None);
        }
        // Above recover for the cooldown: one level down.
        let mut lowered = None;
        for _ in 0..31 {
            let (now, ms) = clock.advance(Duration::from_secs(1));
            lowered = lowered.or(d.observe(headroom(0.5), now, ms));
        }
        assert_eq!(lowered.expect("stepped down").to, DegradationLevel::Graceful);
    }

    #[test]
    fn seconds_of_headroom_that_are_not_closing_in_never_raise_the_level() {
        let mut d = Degradation::new(config());
        let (now, ms) = Clock::new().advance(Duration::from_secs(1));
        let sample = Signals {
            retention_headroom_s: f64::INFINITY,
            ..Signals::default()
        };
        assert_eq!(d.observe(sample, now, ms), None);
        let sample = Signals {
            retention_headroom_s: 4.5,
            ..Signals::default()
        };
        assert_eq!(
            d.observe(sample, now, ms).expect("a transition").to,
            DegradationLevel::CircuitBreak
        );
    }

    #[test]
    fn headroom_thresholds_must_fall_from_soft_to_circuit_break_and_recover_above_them() {
        let mut config = DegradationConfig::default();
        config.retention_headroom_ratio.escalate = [0.1, 0.2, 0.3, 0.4];
        let err = config.validate().unwrap_err();
        assert!(
            err.contains("retention_headroom_ratio.escalate must not increase"),
            "{err}"
        );
        let mut config = DegradationConfig::default();
        config.retention_headroom_s.recover[0] = 10.0;
        let err = config.validate().unwrap_err();
        assert!(
            err.contains("SOFT recover threshold 10 is below its escalate threshold 60 "),
            "{err}"
        );
        let mut config = DegradationConfig::default();
        config.retention_headroom_s.escalate = [60.0, 30.0, NEVER_BELOW, NEVER_BELOW];
        config.retention_headroom_s.recover = [120.0, 60.0, NEVER_BELOW, NEVER_BELOW];
        config.validate().expect("never is allowed");
    }

    #[test]
    fn escalates_at_once_to_the_highest_level_reached() {
        let mut d = Degradation::new(config());
        let mut clock = Clock::new();
        let (now, ms) = clock.advance(Duration::ZERO);
        assert_eq!(d.observe(lag(100.0), now, ms), None);
        let t = d.observe(lag(5_000_000.0), now, ms).expect("escalates");
        assert_eq!(
            (t.from, t.to),
            (DegradationLevel::Normal, DegradationLevel::Aggressive)
        );
        assert_eq!(t.cause, "total_lag_records 5000000 >= 5000000");
        assert_eq!(d.level(), DegradationLevel::Aggressive);
    }

    #[test]
    fn de_escalates_one_level_per_cooldown() {
        let mut d = Degradation::new(config());
        let mut clock = Clock::new();
        let (now, ms) = clock.advance(Duration::ZERO);
        d.observe(lag(5_000_000.0), now, ms);
        let mut steps = Vec::new();
        // Calm from now on: one step down per 30 s, never two at once.
        for _ in 0..(4 * 120) {
            let (now, ms) = clock.advance(Duration::from_millis(250));
            if let Some(t) = d.observe(lag(0.0), now, ms) {
                steps.push((t.to, t.at_ms));
            }
        }
        assert_eq!(
            steps,
            vec![
                (DegradationLevel::Graceful, 30_250),
                (DegradationLevel::Soft, 60_500),
                (DegradationLevel::Normal, 90_750),
            ]
        );
    }

    #[test]
    fn a_signal_oscillating_around_a_threshold_does_not_flap() {
        let mut d = Degradation::new(config());
        let mut clock = Clock::new();
        let mut transitions = 0;
        // Around SOFT's escalate threshold (500k), above its recover (250k).
        for i in 0..10_000 {
            let value = if i % 2 == 0 { 499_000.0 } else { 501_000.0 };
            let (now, ms) = clock.advance(Duration::from_millis(250));
            transitions += d.observe(lag(value), now, ms).is_some() as usize;
        }
        assert_eq!(transitions, 1, "one escalation, then steady");
        assert_eq!(d.level(), DegradationLevel::Soft);

        // Around the recover threshold (250k): a single sample above it
        // restarts the cooldown, so the level holds.
        for i in 0..10_000 {
            let value = if i % 20 == 0 { 251_000.0 } else { 249_000.0 };
            let (now, ms) = clock.advance(Duration::from_millis(250));
            transitions += d.observe(lag(value), now, ms).is_some() as usize;
        }
        assert_eq!(transitions, 1);
        assert_eq!(d.level(), DegradationLevel::Soft);
    }

    #[test]
    fn every_signal_must_be_calm_to_step_down() {
        let mut d = Degradation::new(config());
        let mut clock = Clock::new();
        let (now, ms) = clock.advance(Duration::ZERO);
        d.observe(lag(600_000.0), now, ms);
        let busy_memory = Signals {
            memory_ratio: 0.65, // below SOFT's escalate (0.7), above its recover (0.6)
            ..Signals::default()
        };
        for _ in 0..1_000 {
            let (now, ms) = clock.advance(Duration::from_millis(250));
            assert_eq!(d.observe(busy_memory, now, ms), None);
        }
        assert_eq!(d.level(), DegradationLevel::Soft);
    }

    #[test]
    fn a_forced_level_holds_until_cleared_and_auto_keeps_tracking() {
        let mut d = Degradation::new(config());
        let mut clock = Clock::new();
        let (now, ms) = clock.advance(Duration::ZERO);
        let t = d
            .force(DegradationLevel::CircuitBreak, "drill".into(), None, now, ms)
            .expect("changes the level");
        assert_eq!(t.cause, "forced: drill");
        let (now, ms) = clock.advance(Duration::from_secs(1));
        assert_eq!(d.observe(lag(600_000.0), now, ms), None, "forced wins");
        assert_eq!(d.level(), DegradationLevel::CircuitBreak);
        assert_eq!(d.auto_level(), DegradationLevel::Soft);
        let t = d.clear_force(ms).expect("returns to auto");
        assert_eq!(
            (t.from, t.to),
            (DegradationLevel::CircuitBreak, DegradationLevel::Soft)
        );
        assert_eq!(d.mode(), &Mode::Auto);
        assert_eq!(d.clear_force(ms), None);
    }

    #[test]
    fn a_force_expires_by_itself() {
        let mut d = Degradation::new(config());
        let mut clock = Clock::new();
        let (now, ms) = clock.advance(Duration::ZERO);
        d.force(
            DegradationLevel::Aggressive,
            "load test".into(),
            Some(Duration::from_secs(300)),
            now,
            ms,
        );
        match d.mode() {
            Mode::Forced { expires_at_ms, .. } => assert_eq!(*expires_at_ms, Some(300_000)),
            Mode::Auto => panic!("forced"),
        }
        let (now, ms) = clock.advance(Duration::from_secs(299));
        assert_eq!(d.observe(lag(0.0), now, ms), None);
        let (now, ms) = clock.advance(Duration::from_secs(1));
        let t = d.observe(lag(0.0), now, ms).expect("expired");
        assert_eq!(
            (t.from, t.to),
            (DegradationLevel::Aggressive, DegradationLevel::Normal)
        );
        assert!(t.cause.starts_with("force expired (load test)"), "{}", t.cause);
    }

    #[test]
    fn history_keeps_the_last_fifty() {
        let mut d = Degradation::new(config());
        for i in 0..60 {
            let level = if i % 2 == 0 {
                DegradationLevel::Soft
            } else {
                DegradationLevel::Normal
            };
            d.force(level, format!("#{i}"), None, Instant::now(), i);
        }
        let history: Vec<_> = d.history().collect();
        assert_eq!(history.len(), HISTORY);
        assert_eq!(history[0].cause, "forced: #10");
        assert_eq!(history[49].cause, "forced: #59");
    }

    #[test]
    fn levels_parse_case_insensitively_and_name_unknown_ones() {
        assert_eq!("aggressive".parse(), Ok(DegradationLevel::Aggressive));
        assert_eq!("CIRCUIT_BREAK".parse(), Ok(DegradationLevel::CircuitBreak));
        let err = "PANIC".parse::<DegradationLevel>().unwrap_err();
        assert!(err.to_string().contains("`PANIC`"), "{err}");
    }

    #[test]
    fn thresholds_that_could_never_settle_are_rejected() {
        let mut config = DegradationConfig::default();
        config.total_lag_records.recover[0] = 600_000.0;
        let err = config.validate().unwrap_err();
        assert!(err.contains("SOFT recover threshold 600000"), "{err}");
        assert!(DegradationConfig::default().validate().is_ok());
    }
}
