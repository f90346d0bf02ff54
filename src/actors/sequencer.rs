//! Tracks per-(exchange, symbol) sequence numbers of a lane. Records pass
//! through unchanged; gaps (once their reorder window closed) and resets
//! travel with the chunk to `k2.sequence_gaps` (committed with the records
//! around them), are counted by exchange (metrics) and logged at debug
//! level.
//!
//! The lane's sequence state is loaded from the state store at the lane's
//! start offset before the first chunk, and staged with every commit (see
//! [`crate::state`]), so a rebuilt or moved lane continues exactly.

use std::sync::Arc;

use actix::prelude::*;
use tracing::debug;

use crate::actors::stage_state::{StateLoad, load_before_first_chunk};
use crate::messages::{ChunkSink, Flush, LaneFailed, LaneId, Stage, TradeChunk};
use crate::metrics as m;
use crate::model::{SequenceEventRow, now_us};
use crate::sequence::{RecordPosition, SequenceEvent, SequenceOp, Verdict};
use crate::state::{StateStore, lock};

pub use crate::sequence::SequenceState;

#[derive(Debug, Default)]
pub struct SequencerCounters {
    pub num_gaps: u64,
    pub num_missing: u64,
    pub num_resets: u64,
    pub num_late_fills: u64,
    pub num_old: u64,
}

impl SequencerCounters {
    /// Counts and logs `events`. Metrics are added once per exchange per
    /// call (per chunk), and each event is a debug line: a feed with many
    /// gaps must not flood the log or the metrics recorder.
    fn record_events(&mut self, events: &[SequenceEvent]) {
        if events.is_empty() {
            return;
        }
        // (exchange, gaps, missing, resets); a chunk holds few exchanges.
        let mut by_exchange: Vec<(&str, u64, u64, u64)> = Vec::new();
        for event in events {
            let exchange = event.exchange();
            let index = match by_exchange.iter().position(|(e, ..)| *e == exchange) {
                Some(index) => index,
                None => {
                    by_exchange.push((exchange, 0, 0, 0));
                    by_exchange.len() - 1
                }
            };
            let entry = &mut by_exchange[index];
            match event {
                SequenceEvent::Gap(gap) => {
                    entry.1 += 1;
                    entry.2 += gap.missing as u64;
                    debug!(
                        exchange = %gap.exchange,
                        symbol = %gap.symbol,
                        expected = gap.expected,
                        received = gap.received,
                        missing = gap.missing,
                        partition = gap.at.partition,
                        offset = gap.at.offset,
                        "sequence gap"
                    );
                }
                SequenceEvent::Reset(reset) => {
                    entry.3 += 1;
                    debug!(
                        exchange = %reset.exchange,
                        symbol = %reset.symbol,
                        previous = reset.previous,
                        received = reset.received,
                        partition = reset.at.partition,
                        offset = reset.at.offset,
                        "sequence reset"
                    );
                }
            }
        }
        for (exchange, gaps, missing, resets) in by_exchange {
            self.num_gaps += gaps;
            self.num_missing += missing;
            self.num_resets += resets;
            if gaps > 0 {
                metrics::counter!(m::SEQUENCE_GAPS, "exchange" => exchange.to_string()).increment(gaps);
                metrics::counter!(m::SEQUENCE_MISSING, "exchange" => exchange.to_string()).increment(missing);
            }
            if resets > 0 {
                metrics::counter!(m::SEQUENCE_RESETS, "exchange" => exchange.to_string()).increment(resets);
            }
        }
    }
}

pub struct SequencerParams {
    pub lane: LaneId,
    pub topic: String,
    pub state: Arc<SequenceState>,
    pub store: Arc<dyn StateStore>,
    /// Where the lane starts: the state is loaded at this offset.
    pub start_offset: Option<i64>,
    pub downstream: ChunkSink,
    pub failures: Recipient<LaneFailed>,
    pub mailbox_capacity: usize,
    pub faults: Arc<crate::faults::Faults>,
}

pub struct Sequencer {
    params: SequencerParams,
    _panic: crate::actors::PanicReport,
    events: Vec<SequenceEvent>,
    /// Offset after the last chunk seen (for events reported at flush).
    next_offset: Option<i64>,
    pub counters: SequencerCounters,
}

impl Sequencer {
    pub fn new(params: SequencerParams) -> Self {
        Self {
            _panic: crate::actors::PanicReport {
                lane: params.lane,
                stage: Stage::Sequencer,
                supervisor: params.failures.clone(),
            },
            params,
            events: Vec::new(),
            next_offset: None,
            counters: SequencerCounters::default(),
        }
    }

    fn row(&self, event: &SequenceEvent, reported_offset: i64) -> SequenceEventRow {
        let topic = self.params.topic.clone();
        match event {
            SequenceEvent::Gap(gap) => SequenceEventRow {
                kind: "gap",
                exchange: gap.exchange.clone(),
                symbol: gap.symbol.clone(),
                expected: Some(gap.expected),
                received: gap.received,
                missing: Some(gap.missing),
                previous: None,
                topic,
                partition: gap.at.partition,
                offset: gap.at.offset,
                reported_offset,
                detected_at_us: gap.at.detected_at_us,
            },
            SequenceEvent::Reset(reset) => SequenceEventRow {
                kind: "reset",
                exchange: reset.exchange.clone(),
                symbol: reset.symbol.clone(),
                expected: None,
                received: reset.received,
                missing: None,
                previous: Some(reset.previous),
                topic,
                partition: reset.at.partition,
                offset: reset.at.offset,
                reported_offset,
                detected_at_us: reset.at.detected_at_us,
            },
        }
    }
}

impl Actor for Sequencer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.params.mailbox_capacity);
        let Some(offset) = self.params.start_offset else {
            return; // nothing committed yet: the state starts empty
        };
        let load = StateLoad {
            lane: self.params.lane,
            stage: Stage::Sequencer,
            label: crate::state::SEQUENCER_STAGE,
            store: self.params.store.clone(),
            scope: lock(&self.params.state).scope().to_string(),
            offset,
            failures: self.params.failures.clone(),
        };
        // No chunk is handled before the state is in place.
        load_before_first_chunk(ctx, load, move |act: &mut Self, entries| {
            lock(&act.params.state).restore(offset, entries)
        });
    }
}

impl Handler<TradeChunk> for Sequencer {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, mut chunk: TradeChunk, _: &mut Context<Self>) -> Self::Result {
        self.params
            .faults
            .check_panic(Stage::Sequencer, chunk.lane.partition);
        let now = now_us();
        let state = self.params.state.clone();
        let mut state = lock(&state);
        // Symbols whose records were shed before decoding: their numbers
        // were never seen, so their tracking restarts (no false gap).
        for (exchange, symbol) in std::mem::take(&mut chunk.shed_symbols) {
            state.working.restart(&exchange, &symbol);
            state.record(chunk.first_offset, &exchange, &symbol, SequenceOp::Restart);
        }
        let mut rows = Vec::new();
        for trade in &chunk.trades {
            let at = RecordPosition {
                partition: trade.partition,
                offset: trade.offset,
                detected_at_us: now,
            };
            let before = self.events.len();
            let verdict = state.working.observe(
                &trade.exchange,
                &trade.symbol,
                trade.sequence,
                at,
                &mut self.events,
            );
            state.record(
                trade.offset,
                &trade.exchange,
                &trade.symbol,
                SequenceOp::observe(trade.sequence, at),
            );
            match verdict {
                Verdict::InOrder | Verdict::Reset => {}
                Verdict::LateFill => self.counters.num_late_fills += 1,
                Verdict::Old => self.counters.num_old += 1,
            }
            for event in &self.events[before..] {
                rows.push(self.row(event, trade.offset));
            }
        }
        drop(state);
        self.counters.record_events(&self.events);
        self.events.clear();
        chunk.side.sequence_events.extend(rows);
        self.next_offset = Some(chunk.next_offset);
        let forward = self.params.downstream.forward(chunk, Stage::Sequencer);
        AtomicResponse::new(Box::pin(forward.into_actor(self)))
    }
}

impl Handler<Flush> for Sequencer {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Self::Result {
        // The lane is stopping. A store that outlives the process keeps open
        // gap windows for the next owner; otherwise they are final now, and
        // reported on an empty chunk at the end of the lane's range.
        let mut tail = None;
        if !self.params.store.survives_restart()
            && let Some(next_offset) = self.next_offset
        {
            lock(&self.params.state).working.close_windows(&mut self.events);
            if !self.events.is_empty() {
                let rows = self.events.iter().map(|e| self.row(e, next_offset - 1)).collect();
                self.counters.record_events(&self.events);
                self.events.clear();
                tail = Some(TradeChunk {
                    lane: self.params.lane,
                    first_offset: next_offset,
                    next_offset,
                    trades: Vec::new(),
                    shed_symbols: Vec::new(),
                    side: crate::model::SideRows {
                        sequence_events: rows,
                        ..Default::default()
                    },
                    caught_up: false,
                });
            }
        }
        let tail = tail.map(|chunk| self.params.downstream.forward(chunk, Stage::Sequencer));
        let flush = self
            .params
            .downstream
            .forward_flush(self.params.lane, Stage::Sequencer);
        Box::pin(async move {
            if let Some(tail) = tail {
                tail.await;
            }
            flush.await;
        })
    }
}
