//! Loading a lane stage's state from the state store when the stage starts
//! (the sequencer's positions, the deduplicator's exact ids).

use std::sync::Arc;

use actix::prelude::*;
use tracing::{debug, error, info, warn};

use crate::messages::{LaneError, LaneFailed, LaneId, Stage};
use crate::metrics as m;
use crate::state::{StateError, StateStore};

/// Whose state to load, and from where.
pub(crate) struct StateLoad {
    pub lane: LaneId,
    /// The stage as `LaneFailed` names it.
    pub stage: Stage,
    /// The stage in the state scope and in `k2_state_loads_total`.
    pub label: &'static str,
    pub store: Arc<dyn StateStore>,
    pub scope: String,
    /// The lane's start offset: the state in force there is loaded.
    pub offset: i64,
    pub failures: Recipient<LaneFailed>,
}

/// Loads the state before the actor handles any message (`ctx.wait`) and
/// hands it to `restore`. A failure to load or restore reports the lane
/// failed and stops the actor.
pub(crate) fn load_before_first_chunk<A>(
    ctx: &mut Context<A>,
    load: StateLoad,
    restore: impl FnOnce(&mut A, &[(String, Vec<u8>)]) -> Result<(), StateError> + 'static,
) where
    A: Actor<Context = Context<A>>,
{
    let (store, scope, offset) = (load.store.clone(), load.scope.clone(), load.offset);
    let fut = async move { store.load(&scope, offset).await };
    ctx.wait(actix::fut::wrap_future::<_, A>(fut).map(move |loaded, act, ctx| {
        let restored = loaded.and_then(|entries| match entries {
            Some(entries) => restore(act, &entries).map(|()| true),
            None => Ok(false),
        });
        match restored {
            Ok(found) => note_state_load(&load, found),
            Err(err) => {
                error!(lane = %load.lane, stage = %load.stage, error = %err, "cannot load the stage's state");
                load.failures.do_send(LaneFailed {
                    lane: load.lane,
                    stage: load.stage,
                    error: LaneError::StateLoad(err.to_string()),
                });
                ctx.stop();
            }
        }
    }));
}

/// Counts and logs how a stage's state load at lane start went.
fn note_state_load(load: &StateLoad, found: bool) {
    let (lane, stage, offset) = (load.lane, load.label, load.offset);
    let outcome = if found { "found" } else { "none" };
    metrics::counter!(m::STATE_LOADS, "stage" => stage, "outcome" => outcome).increment(1);
    if found {
        debug!(%lane, stage, offset, "stage state loaded");
    } else if load.store.survives_restart() {
        warn!(
            %lane, stage, offset, store = %load.store.describe(),
            "no saved state at the lane's start offset; starting empty (the first record of each symbol starts its tracking)"
        );
    } else {
        info!(%lane, stage, offset, "no state in this process for the partition yet; starting empty");
    }
}
