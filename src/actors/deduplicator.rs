//! Drops records whose (exchange, symbol, trade id) was seen before, and
//! only those: numeric per-symbol ids are checked exactly (run + bitmap),
//! other ids against the pending ids of this lane and the process's exact
//! recent window; a hit in the long-window Bloom filter alone is a probable
//! duplicate, kept or dropped by policy and recorded either way (see
//! [`crate::dedup`]).
//!
//! The lane's exact ids are loaded from the state store at the lane's start
//! offset before the first chunk and staged with every commit; ids of an
//! uncommitted epoch are pending, so a lane rebuilt from the last committed
//! offsets never takes a replayed record for a duplicate.

use std::sync::{Arc, Mutex};

use crate::actors::stage_state::{StateLoad, load_before_first_chunk};
use crate::dedup::{IdVerdict, LaneIds, ProbablePolicy};
use crate::messages::{ChunkSink, Flush, LaneFailed, LaneId, Stage, TradeChunk};
use crate::metrics as m;
use crate::model::{ProbableDuplicate, now_us};
use crate::state::{StateStore, lock};
use actix::prelude::*;

#[derive(Debug, Default)]
pub struct DeduplicatorCounters {
    pub num_checked: u64,
    pub num_dropped: u64,
    pub num_probable: u64,
}

pub struct DeduplicatorParams {
    pub lane: LaneId,
    pub topic: String,
    pub ids: Arc<Mutex<LaneIds>>,
    pub store: Arc<dyn StateStore>,
    /// Where the lane starts: the exact ids are loaded at this offset.
    pub start_offset: Option<i64>,
    pub policy: ProbablePolicy,
    pub downstream: ChunkSink,
    pub failures: Recipient<LaneFailed>,
    pub mailbox_capacity: usize,
    pub faults: Arc<crate::faults::Faults>,
}

pub struct Deduplicator {
    params: DeduplicatorParams,
    _panic: crate::actors::PanicReport,
    pub counters: DeduplicatorCounters,
}

impl Deduplicator {
    pub fn new(params: DeduplicatorParams) -> Self {
        Self {
            _panic: crate::actors::PanicReport {
                lane: params.lane,
                stage: Stage::Deduplicator,
                supervisor: params.failures.clone(),
            },
            params,
            counters: DeduplicatorCounters::default(),
        }
    }
}

impl Actor for Deduplicator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.params.mailbox_capacity);
        let Some(offset) = self.params.start_offset else {
            return;
        };
        let load = StateLoad {
            lane: self.params.lane,
            stage: Stage::Deduplicator,
            label: crate::state::DEDUP_STAGE,
            store: self.params.store.clone(),
            scope: lock(&self.params.ids).ordered.scope().to_string(),
            offset,
            failures: self.params.failures.clone(),
        };
        load_before_first_chunk(ctx, load, move |act: &mut Self, entries| {
            lock(&act.params.ids).ordered.restore(offset, entries)
        });
    }
}

impl Handler<TradeChunk> for Deduplicator {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, mut chunk: TradeChunk, _: &mut Context<Self>) -> Self::Result {
        self.params
            .faults
            .check_panic(Stage::Deduplicator, chunk.lane.partition);
        let before = chunk.trades.len();
        let keep = self.params.policy == ProbablePolicy::Keep;
        let mut probable = Vec::new();
        {
            let mut ids = lock(&self.params.ids);
            chunk.trades.retain(|t| match ids.check(t, keep) {
                IdVerdict::New => true,
                IdVerdict::Duplicate => false,
                IdVerdict::ProbableDuplicate => {
                    probable.push(ProbableDuplicate {
                        exchange: t.exchange.to_string(),
                        symbol: t.symbol.to_string(),
                        trade_id: t.trade_id.to_string(),
                        topic: self.params.topic.clone(),
                        partition: t.partition,
                        offset: t.offset,
                        kept: keep,
                        detected_at_us: now_us(),
                    });
                    keep
                }
            });
        }
        let dropped = before - chunk.trades.len() - if keep { 0 } else { probable.len() };
        self.counters.num_checked += before as u64;
        self.counters.num_dropped += dropped as u64;
        if dropped > 0 {
            metrics::counter!(m::DUPLICATES_DROPPED).increment(dropped as u64);
        }
        if !probable.is_empty() {
            self.counters.num_probable += probable.len() as u64;
            let policy = if keep { "keep" } else { "drop" };
            metrics::counter!(m::PROBABLE_DUPLICATES, "policy" => policy).increment(probable.len() as u64);
            chunk.side.probable_duplicates.extend(probable);
        }
        let forward = self.params.downstream.forward(chunk, Stage::Deduplicator);
        AtomicResponse::new(Box::pin(forward.into_actor(self)))
    }
}

impl Handler<Flush> for Deduplicator {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Self::Result {
        Box::pin(
            self.params
                .downstream
                .forward_flush(self.params.lane, Stage::Deduplicator),
        )
    }
}
