//! The lane's load-shedding stage (after dedup, before the batcher).
//!
//! At the level in force (the supervisor's [`LevelChanged`] broadcast) it
//! leaves out the trades whose priority that level sheds, and reference data
//! (always LOW) from GRACEFUL up. Shedding defers,
//! it does not lose: every shed record's offset goes into a [`ShedEntry`]
//! (per priority, offsets as ranges) that travels with the chunk and is
//! committed to `k2.shed_ledger` in the same epoch as the trades around it.
//! The chunk's offset range stays whole, so the partition's committed offset
//! moves past shed records exactly as past written ones.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;

use crate::degradation::DegradationLevel;
use crate::messages::{ChunkSink, Flush, LevelChanged, Stage, TradeChunk};
use crate::metrics as m;
use crate::model::{ReferenceRecord, Trade};
use crate::shedding::{OffsetRanges, Priority, ShedEntry, TierTable, ledger_entries};

#[derive(Debug, Default)]
pub struct LoadShedderCounters {
    pub num_passed: u64,
    pub num_shed: u64,
}

pub struct LoadShedderParams {
    pub lane: crate::messages::LaneId,
    pub topic: String,
    pub tiers: Arc<TierTable>,
    /// The level in force when the lane starts.
    pub level: DegradationLevel,
    pub downstream: ChunkSink,
    pub mailbox_capacity: usize,
    pub failures: actix::Recipient<crate::messages::LaneFailed>,
    pub faults: Arc<crate::faults::Faults>,
}

pub struct LoadShedder {
    params: LoadShedderParams,
    _panic: crate::actors::PanicReport,
    level: DegradationLevel,
    pub counters: LoadShedderCounters,
}

impl LoadShedder {
    pub fn new(params: LoadShedderParams) -> Self {
        Self {
            _panic: crate::actors::PanicReport {
                lane: params.lane,
                stage: Stage::LoadShedder,
                supervisor: params.failures.clone(),
            },
            level: params.level,
            params,
            counters: LoadShedderCounters::default(),
        }
    }
}

/// Splits `trades` into what `level` keeps and one ledger entry per shed
/// priority.
pub fn shed(
    trades: Vec<Trade>,
    level: DegradationLevel,
    tiers: &TierTable,
    topic: &str,
) -> (Vec<Trade>, Vec<ShedEntry>) {
    if level < DegradationLevel::Graceful {
        return (trades, Vec::new());
    }
    let mut kept = Vec::with_capacity(trades.len());
    let mut shed: BTreeMap<Priority, OffsetRanges> = BTreeMap::new();
    let mut partition = 0;
    for trade in trades {
        let priority = tiers.trade_priority(&trade.exchange, &trade.symbol);
        if priority.is_shed_at(level) {
            partition = trade.partition;
            shed.entry(priority).or_default().push(trade.offset);
        } else {
            kept.push(trade);
        }
    }
    let entries = ledger_entries(topic, partition, level, shed);
    (kept, entries)
}

/// Splits reference data (always LOW) into what `level` keeps and its ledger
/// entry.
pub fn shed_reference(
    reference: Vec<ReferenceRecord>,
    level: DegradationLevel,
    topic: &str,
) -> (Vec<ReferenceRecord>, Vec<ShedEntry>) {
    let Some(partition) = reference.first().map(|r| r.partition) else {
        return (reference, Vec::new());
    };
    if !Priority::Low.is_shed_at(level) {
        return (reference, Vec::new());
    }
    let mut offsets = OffsetRanges::default();
    for record in &reference {
        offsets.push(record.offset);
    }
    let entries = ledger_entries(
        topic,
        partition,
        level,
        BTreeMap::from([(Priority::Low, offsets)]),
    );
    (Vec::new(), entries)
}

impl Actor for LoadShedder {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.params.mailbox_capacity);
    }
}

impl Handler<TradeChunk> for LoadShedder {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, mut chunk: TradeChunk, _: &mut Context<Self>) -> Self::Result {
        self.params
            .faults
            .check_panic(Stage::LoadShedder, chunk.lane.partition);
        let trades = std::mem::take(&mut chunk.trades);
        let (kept, mut entries) = shed(trades, self.level, &self.params.tiers, &self.params.topic);
        let reference = std::mem::take(&mut chunk.side.reference);
        let (kept_reference, reference_entries) = shed_reference(reference, self.level, &self.params.topic);
        entries.extend(reference_entries);
        chunk.side.reference = kept_reference;
        for entry in &entries {
            self.counters.num_shed += entry.records;
            metrics::counter!(
                m::RECORDS_SHED,
                "priority" => entry.priority.as_str(),
                "level" => entry.level.as_str()
            )
            .increment(entry.records);
        }
        self.counters.num_passed += kept.len() as u64;
        chunk.trades = kept;
        chunk.side.shed.extend(entries);
        let forward = self.params.downstream.forward(chunk, Stage::LoadShedder);
        AtomicResponse::new(Box::pin(forward.into_actor(self)))
    }
}

impl Handler<LevelChanged> for LoadShedder {
    type Result = ();

    fn handle(&mut self, msg: LevelChanged, _: &mut Context<Self>) {
        self.level = msg.level;
    }
}

impl Handler<Flush> for LoadShedder {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Self::Result {
        Box::pin(
            self.params
                .downstream
                .forward_flush(self.params.lane, Stage::LoadShedder),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Side;
    use crate::shedding::SheddingConfig;

    fn trade(exchange: &str, symbol: &str, offset: i64) -> Trade {
        Trade {
            exchange: exchange.into(),
            symbol: symbol.into(),
            sequence: offset,
            trade_id: format!("{symbol}-{offset}").into(),
            price: 1,
            quantity: 1,
            side: Side::Buy,
            event_time_us: 0,
            ingest_time_us: 0,
            partition: 3,
            offset,
        }
    }

    fn chunk() -> Vec<Trade> {
        vec![
            trade("ASX", "BHP", 10),         // CRITICAL
            trade("ASX", "QBE", 11),         // HIGH
            trade("COINBASE", "X", 12),      // NORMAL
            trade("COINBASE", "X", 13),      // NORMAL
            trade("ASX", "QBE", 14),         // HIGH
            trade("BINANCE", "SUIUSDT", 16), // NORMAL (15 was a dead letter)
        ]
    }

    #[test]
    fn aggressive_sheds_normal_priority_into_one_ranged_entry() {
        let tiers = TierTable::new(&SheddingConfig::default());
        let (kept, entries) = shed(chunk(), DegradationLevel::Aggressive, &tiers, "t");
        let kept: Vec<i64> = kept.iter().map(|t| t.offset).collect();
        assert_eq!(kept, vec![10, 11, 14]);
        assert_eq!(entries.len(), 1);
        let entry = &entries[0];
        assert_eq!(entry.entry_id, "t/3/12/NORMAL");
        assert_eq!(entry.offsets.to_string(), "12-13,16");
        assert_eq!(entry.records, 3);
        assert_eq!(
            (entry.priority, entry.level),
            (Priority::Normal, DegradationLevel::Aggressive)
        );
    }

    fn reference(offset: i64) -> ReferenceRecord {
        ReferenceRecord {
            exchange: "ASX".into(),
            symbol: "BHP".into(),
            name: None,
            currency: None,
            tick_size: 1,
            lot_size: 1,
            status: "trading".into(),
            effective_time_us: 0,
            ingest_time_us: 0,
            partition: 3,
            offset,
        }
    }

    #[test]
    fn reference_data_is_kept_below_graceful_and_ledgered_as_low_from_graceful_up() {
        for level in [DegradationLevel::Normal, DegradationLevel::Soft] {
            let (kept, entries) = shed_reference(vec![reference(15), reference(17)], level, "t");
            assert_eq!((kept.len(), entries.len()), (2, 0), "{level:?}");
        }
        for level in [
            DegradationLevel::Graceful,
            DegradationLevel::Aggressive,
            DegradationLevel::CircuitBreak,
        ] {
            let (kept, entries) =
                shed_reference(vec![reference(15), reference(17), reference(18)], level, "t");
            assert!(kept.is_empty(), "{level:?}");
            assert_eq!(entries.len(), 1);
            let entry = &entries[0];
            assert_eq!(entry.entry_id, "t/3/15/LOW");
            assert_eq!(entry.offsets.to_string(), "15,17-18");
            assert_eq!(
                (entry.records, entry.priority, entry.level),
                (3, Priority::Low, level)
            );
        }
        let (kept, entries) = shed_reference(Vec::new(), DegradationLevel::CircuitBreak, "t");
        assert!(kept.is_empty() && entries.is_empty());
    }

    #[test]
    fn circuit_break_keeps_only_critical_and_soft_keeps_everything() {
        let tiers = TierTable::new(&SheddingConfig::default());
        let (kept, entries) = shed(chunk(), DegradationLevel::CircuitBreak, &tiers, "t");
        assert_eq!(kept.iter().map(|t| t.offset).collect::<Vec<_>>(), vec![10]);
        let by_priority: Vec<(Priority, String)> = entries
            .iter()
            .map(|e| (e.priority, e.offsets.to_string()))
            .collect();
        assert_eq!(
            by_priority,
            vec![
                (Priority::Normal, "12-13,16".to_string()),
                (Priority::High, "11,14".to_string()),
            ]
        );
        let (kept, entries) = shed(chunk(), DegradationLevel::Soft, &tiers, "t");
        assert_eq!((kept.len(), entries.len()), (6, 0));
    }
}
