//! Drops records whose (exchange, symbol, trade id) the lane has already
//! seen. Exact: a record is dropped only on an exact key match. Numeric ids
//! (per-symbol increasing, like Binance's) go to [`OrderedIds`], which
//! remembers all of them in little memory; other ids to the recent window.
//!
//! Both start empty in every lane incarnation: a lane rebuilt from the last
//! committed offsets replays records it may have seen before the failure,
//! and those must not be mistaken for duplicates.

use actix::prelude::*;

use crate::dedup::{OrderedIds, RecentIds, numeric_id};
use crate::messages::{ChunkSink, Flush, TradeChunk};
use crate::metrics as m;

#[derive(Debug, Default)]
pub struct DeduplicatorCounters {
    pub num_checked: u64,
    pub num_dropped: u64,
}

impl DeduplicatorCounters {
    fn record_chunk(&mut self, checked: usize, dropped: usize) {
        self.num_checked += checked as u64;
        self.num_dropped += dropped as u64;
        if dropped > 0 {
            metrics::counter!(m::DUPLICATES_DROPPED).increment(dropped as u64);
        }
    }
}

pub struct Deduplicator {
    window: RecentIds,
    ordered: OrderedIds,
    downstream: ChunkSink,
    mailbox_capacity: usize,
    pub counters: DeduplicatorCounters,
}

impl Deduplicator {
    pub fn new(downstream: ChunkSink, window_capacity: usize, mailbox_capacity: usize) -> Self {
        Self {
            window: RecentIds::new(window_capacity),
            ordered: OrderedIds::default(),
            downstream,
            mailbox_capacity,
            counters: DeduplicatorCounters::default(),
        }
    }
}

impl Actor for Deduplicator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
    }
}

impl Handler<TradeChunk> for Deduplicator {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, mut chunk: TradeChunk, _: &mut Context<Self>) -> Self::Result {
        let before = chunk.trades.len();
        let (window, ordered) = (&mut self.window, &mut self.ordered);
        chunk.trades.retain(|t| match numeric_id(&t.trade_id) {
            Some(id) => ordered.insert(&t.exchange, &t.symbol, id),
            None => window.insert(&t.exchange, &t.symbol, &t.trade_id),
        });
        self.counters.record_chunk(before, before - chunk.trades.len());
        let next = self.downstream.chunks.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let _ = next.send(chunk).await;
            }
            .into_actor(self),
        ))
    }
}

impl Handler<Flush> for Deduplicator {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, flush: Flush, _: &mut Context<Self>) -> Self::Result {
        let next = self.downstream.flush.clone();
        Box::pin(async move {
            let _ = next.send(flush).await;
        })
    }
}
