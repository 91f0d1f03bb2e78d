//! Reading frames from a quinn receive stream.

use quinn::{ReadError, RecvStream, VarInt};

use crate::framing::{ChunkQueue, Decoder, Frame, FrameError};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadFail {
    #[error("malformed frame")]
    Frame(#[from] FrameError),
    #[error("stream read failed")]
    Read(#[from] ReadError),
}

/// Frames from one receive stream. [`FrameReader::next`] is cancel-safe: all decoding state
/// lives in `self`, and the only await is quinn's cancel-safe `read_chunk`.
pub(crate) struct FrameReader {
    recv: RecvStream,
    queue: ChunkQueue,
    decoder: Decoder,
    eof: bool,
}

impl FrameReader {
    pub(crate) fn new(recv: RecvStream, max_body: usize) -> Self {
        FrameReader {
            recv,
            queue: ChunkQueue::new(),
            decoder: Decoder::new(max_body),
            eof: false,
        }
    }

    /// The next frame, `None` at a clean end of stream.
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, ReadFail> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.queue)? {
                return Ok(Some(frame));
            }
            if self.eof {
                self.decoder.finish(&self.queue)?;
                return Ok(None);
            }
            // Only asked for when the decoder needs more, so the queue holds at most one frame
            // head, one accepted body and one chunk.
            match self.recv.read_chunk(usize::MAX, true).await? {
                Some(chunk) => self.queue.push(chunk.bytes),
                None => self.eof = true,
            }
        }
    }

    /// A frame that is already buffered, without waiting for the network.
    pub(crate) fn try_next(&mut self) -> Result<Option<Frame>, FrameError> {
        self.decoder.decode(&mut self.queue)
    }

    /// Tells the peer to stop sending on this stream.
    pub(crate) fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(VarInt::from_u32(code));
    }
}
