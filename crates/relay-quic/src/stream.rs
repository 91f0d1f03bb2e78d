//! Reading frames from a quinn receive stream; on the receiving side, within the peer's byte
//! budget and the frame deadline.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mimi_wire::uri::ProviderDomain;
use quinn::{ReadError, RecvStream, VarInt};
use relay_adapter::{AdapterStats, Budget, ByteBudget, Held};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::framing::{ChunkQueue, Decoder, Frame, FrameError};

/// The budget is taken and given back in pieces of this many bytes: a stream of small frames
/// takes the budget's lock about once per piece rather than once per frame.
const PIECE: usize = 16 * 1024;

/// What a stream reserves to read when it does not know the next frame's length yet (it is
/// idle between frames, or has fewer than four bytes of one): small, since a peer may keep a
/// thousand room streams idle per connection.
const IDLE: usize = 1024;

/// The longest frame head: a request with a 65,535-byte target and a sequence number.
const MAX_HEAD: usize = 4 + 1 + 8 + 1 + 2 + 65_535 + 9 + 4;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadFail {
    #[error("malformed frame")]
    Frame(#[from] FrameError),
    #[error("stream read failed")]
    Read(#[from] ReadError),
    #[error("a frame took longer than the frame deadline")]
    Deadline,
}

/// What one receive stream holds of its peer's [`ByteBudget`]: the bytes in its queue plus
/// those of frames handed on and not yet answered (`used`), covered by reservations taken in
/// pieces (`reserved`). Every connection of the peer shares the budget and `wake`.
pub(crate) struct Ledger {
    budget: Arc<ByteBudget>,
    peer: ProviderDomain,
    wake: Arc<Notify>,
    stats: Arc<AdapterStats>,
    pieces: Vec<Held>,
    reserved: usize,
    used: usize,
    stalled: bool,
}

impl Ledger {
    pub(crate) fn new(
        budget: Arc<ByteBudget>,
        peer: ProviderDomain,
        wake: Arc<Notify>,
        stats: Arc<AdapterStats>,
    ) -> Self {
        Ledger {
            budget,
            peer,
            wake,
            stats,
            pieces: Vec::new(),
            reserved: 0,
            used: 0,
            stalled: false,
        }
    }

    fn slack(&self) -> usize {
        self.reserved - self.used
    }

    /// Makes room for `want` more bytes, all or nothing, reserving at least `at_least` when it
    /// must reserve: a frame whose length is known is admitted whole, so frames in assembly
    /// cannot split the budget between them and all wait for the rest. False when the peer is
    /// at its budget.
    fn ensure(&mut self, want: usize, at_least: usize) -> bool {
        let slack = self.slack();
        if slack >= want {
            return true;
        }
        let need = want - slack;
        // Look before reserving, so that a stream waiting for room counts one refusal, not
        // one per retry.
        let headroom = self
            .budget
            .limit()
            .saturating_sub(self.budget.held(&self.peer));
        if need <= headroom {
            // In pieces of at most PIECE, so that what a large frame held goes back piece by
            // piece as the stream drains, not only once it is empty.
            let mut left = need.max(at_least).min(headroom);
            while left > 0 {
                let n = left.min(PIECE);
                let Ok(held) = self.budget.reserve(&self.peer, n) else {
                    break;
                };
                self.reserved += n;
                self.pieces.push(held);
                left -= n;
            }
            if self.slack() >= want {
                self.stalled = false;
                return true;
            }
        }
        if !self.stalled {
            self.stalled = true;
            self.stats.refused(Budget::PeerBytes);
        }
        false
    }

    fn charge(&mut self, n: usize) {
        self.used += n;
        debug_assert!(self.used <= self.reserved);
    }

    /// `n` bytes are no longer held: a frame was answered or skipped bytes were discarded.
    /// Pieces no longer needed go back to the budget (one piece of slack is kept while the
    /// stream holds anything, to spare the lock on a busy stream).
    pub(crate) fn release(&mut self, n: usize) {
        self.used = self.used.saturating_sub(n);
        let keep = if self.used == 0 { 0 } else { PIECE };
        let mut freed = false;
        while let Some(last) = self.pieces.last() {
            if self.reserved - last.bytes() < self.used + keep {
                break;
            }
            self.reserved -= last.bytes();
            self.pieces.pop();
            freed = true;
        }
        if freed {
            self.wake.notify_waiters();
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        if !self.pieces.is_empty() {
            self.pieces.clear();
            self.wake.notify_waiters();
        }
    }
}

/// The receiving side's bounds on one stream.
struct Limited {
    ledger: Ledger,
    deadline: Duration,
    /// Fires `deadline` after the frame in assembly started; armed only while one is.
    timer: Pin<Box<Sleep>>,
    armed: bool,
}

/// Frames from one receive stream. [`FrameReader::next_frame`] is cancel-safe: all decoding
/// state lives in `self`, and its awaits (quinn's `read_chunk`, the deadline, the budget's
/// wake-up) lose nothing when dropped.
pub(crate) struct FrameReader {
    recv: RecvStream,
    queue: ChunkQueue,
    decoder: Decoder,
    eof: bool,
    max_body: usize,
    limited: Option<Limited>,
}

impl FrameReader {
    /// A reader with no budget or deadline: the sending side reading answers to its own
    /// requests.
    pub(crate) fn new(recv: RecvStream, max_body: usize) -> Self {
        FrameReader {
            recv,
            queue: ChunkQueue::new(),
            decoder: Decoder::new(max_body),
            eof: false,
            max_body,
            limited: None,
        }
    }

    /// A reader that holds no more than `ledger` admits and fails a frame that is not complete
    /// `deadline` after it started.
    pub(crate) fn limited(
        recv: RecvStream,
        max_body: usize,
        ledger: Ledger,
        deadline: Duration,
    ) -> Self {
        let mut reader = FrameReader::new(recv, max_body);
        reader.limited = Some(Limited {
            ledger,
            deadline,
            timer: Box::pin(tokio::time::sleep(deadline)),
            armed: false,
        });
        reader
    }

    /// The next frame, `None` at a clean end of stream.
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, ReadFail> {
        Ok(self.next_frame().await?.map(|(frame, _)| frame))
    }

    /// The next frame and the bytes it held, to be given back with [`FrameReader::release`]
    /// once it is answered; `None` at a clean end of stream.
    pub(crate) async fn next_frame(&mut self) -> Result<Option<(Frame, usize)>, ReadFail> {
        loop {
            if let Some(frame) = self.try_next_frame()? {
                if let Some(l) = &mut self.limited {
                    l.armed = false;
                }
                return Ok(Some(frame));
            }
            if self.eof {
                self.decoder.finish(&self.queue)?;
                return Ok(None);
            }
            let Some(l) = &mut self.limited else {
                // Only asked for when the decoder needs more, so the queue holds at most one
                // frame head, one accepted body and one chunk.
                match self.recv.read_chunk(usize::MAX, true).await? {
                    Some(chunk) => self.queue.push(chunk.bytes),
                    None => self.eof = true,
                }
                continue;
            };
            let in_frame = !self.queue.is_empty() || !self.decoder.is_idle();
            if !in_frame {
                l.armed = false;
            } else if !l.armed {
                l.timer.as_mut().reset(Instant::now() + l.deadline);
                l.armed = true;
            }
            // The rest of the frame at the front, whole (an over-limit body is skipped, so only
            // its head is held), or any room at all between frames.
            let (want, at_least) = match self.decoder.next_frame_len(&self.queue) {
                Some(len) => {
                    let len = if len > self.max_body.saturating_add(MAX_HEAD) {
                        len.min(MAX_HEAD)
                    } else {
                        len
                    };
                    (len.saturating_sub(self.queue.len()).max(1), PIECE)
                }
                None if self.decoder.is_idle() => (1, IDLE),
                None => (1, PIECE),
            };
            if !l.ledger.ensure(want, at_least) {
                // Over budget: stop reading (QUIC flow control pushes back on the peer) until
                // another stream of the peer gives bytes back.
                let wake = l.ledger.wake.clone();
                let notified = wake.notified();
                tokio::pin!(notified);
                // Registered before looking again, so a release in between is not missed.
                notified.as_mut().enable();
                if !l.ledger.ensure(want, at_least) {
                    tokio::select! {
                        () = notified => {}
                        () = &mut l.timer, if l.armed => return Err(ReadFail::Deadline),
                    }
                }
                continue;
            }
            let room = l.ledger.slack();
            tokio::select! {
                biased;
                chunk = self.recv.read_chunk(room, true) => match chunk? {
                    Some(chunk) => {
                        l.ledger.charge(chunk.bytes.len());
                        self.queue.push(chunk.bytes);
                    }
                    None => self.eof = true,
                },
                () = &mut l.timer, if l.armed => return Err(ReadFail::Deadline),
            }
        }
    }

    /// A frame that is already buffered, and the bytes it held, without waiting for the
    /// network.
    pub(crate) fn try_next_frame(&mut self) -> Result<Option<(Frame, usize)>, FrameError> {
        let before = self.queue.len();
        let frame = self.decoder.decode(&mut self.queue)?;
        let consumed = before - self.queue.len();
        match frame {
            Some(frame) => Ok(Some((frame, consumed))),
            None => {
                // Bytes of an over-limit body, discarded.
                self.release(consumed);
                Ok(None)
            }
        }
    }

    /// Gives back the bytes of a frame that has been answered.
    pub(crate) fn release(&mut self, n: usize) {
        if let Some(l) = &mut self.limited
            && n > 0
        {
            l.ledger.release(n);
        }
    }

    /// Tells the peer to stop sending on this stream.
    pub(crate) fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(VarInt::from_u32(code));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(budget: &Arc<ByteBudget>, stats: &Arc<AdapterStats>) -> Ledger {
        let peer: ProviderDomain = "a.example".parse().expect("domain");
        Ledger::new(budget.clone(), peer, Arc::new(Notify::new()), stats.clone())
    }

    #[test]
    fn a_frame_is_admitted_whole_or_not_at_all_and_pieces_go_back() {
        let stats = Arc::new(AdapterStats::default());
        let budget = ByteBudget::new(100 * 1024, stats.clone());
        let peer: ProviderDomain = "a.example".parse().expect("domain");
        let mut one = ledger(&budget, &stats);
        let mut two = ledger(&budget, &stats);
        assert!(one.ensure(70 * 1024, PIECE));
        one.charge(70 * 1024);
        // 30 KiB left: a 40 KiB frame is not started at all.
        assert!(!two.ensure(40 * 1024, PIECE));
        assert!(!two.ensure(40 * 1024, PIECE));
        assert_eq!(two.reserved, 0);
        assert_eq!(
            stats.refusals(Budget::PeerBytes),
            1,
            "one stall, one refusal"
        );
        // Answering most of it gives pieces back, keeping one piece of slack.
        one.release(60 * 1024);
        assert!(budget.held(&peer) <= 10 * 1024 + PIECE + PIECE);
        assert!(two.ensure(40 * 1024, PIECE));
        one.release(10 * 1024);
        assert_eq!(one.reserved, 0);
        drop(two);
        assert_eq!(budget.held(&peer), 0);
    }
}
