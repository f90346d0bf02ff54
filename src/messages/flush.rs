use actix::Message;

/// Travels down a lane behind the data: each stage finishes what it holds,
/// forwards the flush, and replies once everything downstream has flushed.
/// Used for a clean shutdown (final commit).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Flush;
