use actix::Message;

use crate::degradation::DegradationLevel;

/// The supervisor's broadcast of the degradation level in force, sent to
/// the stages that act on it (load shedders, batchers, the committer) on
/// every change, and to each new lane's stages when they start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Message)]
#[rtype(result = "()")]
pub struct LevelChanged {
    pub level: DegradationLevel,
}
