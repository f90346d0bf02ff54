//! Tracks per-(exchange, symbol) sequence numbers of a lane. Records pass
//! through unchanged; gaps (once their reorder window closed) and resets are
//! counted by exchange (metrics) and logged at debug level. Storing them in
//! `k2.sequence_gaps` and serving them over HTTP comes with persistent
//! sequence state.

use actix::prelude::*;
use tracing::debug;

use crate::messages::{ChunkSink, Flush, TradeChunk};
use crate::metrics as m;
use crate::model::now_us;
use crate::sequence::{RecordPosition, SequenceConfig, SequenceEvent, SequenceTracker, Verdict};

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

pub struct Sequencer {
    tracker: SequenceTracker,
    events: Vec<SequenceEvent>,
    downstream: ChunkSink,
    mailbox_capacity: usize,
    pub counters: SequencerCounters,
}

impl Sequencer {
    pub fn new(config: SequenceConfig, downstream: ChunkSink, mailbox_capacity: usize) -> Self {
        Self {
            tracker: SequenceTracker::new(config),
            events: Vec::new(),
            downstream,
            mailbox_capacity,
            counters: SequencerCounters::default(),
        }
    }
}

impl Actor for Sequencer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
    }
}

impl Handler<TradeChunk> for Sequencer {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, chunk: TradeChunk, _: &mut Context<Self>) -> Self::Result {
        let now = now_us();
        for trade in &chunk.trades {
            let at = RecordPosition {
                partition: trade.partition,
                offset: trade.offset,
                detected_at_us: now,
            };
            match self.tracker.observe(
                &trade.exchange,
                &trade.symbol,
                trade.sequence,
                at,
                &mut self.events,
            ) {
                Verdict::InOrder | Verdict::Reset => {}
                Verdict::LateFill => self.counters.num_late_fills += 1,
                Verdict::Old => self.counters.num_old += 1,
            }
        }
        self.counters.record_events(&self.events);
        self.events.clear();
        let next = self.downstream.chunks.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let _ = next.send(chunk).await;
            }
            .into_actor(self),
        ))
    }
}

impl Handler<Flush> for Sequencer {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, flush: Flush, _: &mut Context<Self>) -> Self::Result {
        // The lane is stopping: gaps still waiting for late records are final.
        self.tracker.close_windows(&mut self.events);
        self.counters.record_events(&self.events);
        self.events.clear();
        let next = self.downstream.flush.clone();
        Box::pin(async move {
            let _ = next.send(flush).await;
        })
    }
}
