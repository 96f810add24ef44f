//! Frames on a stream (QUIC's, or the TLS-over-TCP byte stream): the async reading and writing of
//! [`pgcourier_proto::frame`]'s length-prefixed frames, and a reader that
//! counts what it read (what a cut link wasted). Used by both session
//! drivers (`sender/src/ship.rs`, `receiver/src/ingest.rs`) between the
//! QUIC streams and the session cores in `pgcourier_proto::session`.

use pgcourier_proto::frame::{self, decode_frame, Frame, FrameError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection stream failed")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), WireError> {
    let buf = frame::encode_frame(frame)?;
    w.write_all(&buf).await?;
    // TLS over TCP holds what it encrypted until flushed (QUIC's streams
    // send on their own: a no-op there).
    w.flush().await?;
    Ok(())
}

/// Read one frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = frame::frame_len(len)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(decode_frame(&body)?))
}

/// A reader that counts the bytes it has read: the receiver compares it with
/// the bytes of whole frames to know how much of a batch cut by the link it
/// had to discard.
pub struct Counting<R> {
    inner: R,
    pub bytes: u64,
}

impl<R> Counting<R> {
    pub fn new(inner: R) -> Counting<R> {
        Counting { inner, bytes: 0 }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        self.bytes += read;
        poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgcourier_proto::frame::{decode_batch, encode_batch};
    use pgcourier_proto::record::{Piece, Record};
    use pgcourier_proto::Lsn;

    fn rec(seq: u64) -> Vec<u8> {
        Record {
            seq,
            only_for: None,
            commit_lsn: Lsn(seq * 100),
            commit_time: 0,
            xid: 1,
            part: 0,
            last: true,
            end_lsn: Lsn(seq * 100 + 50),
            pieces: vec![Piece::Message(vec![b'I'; 300])],
        }
        .encode()
        .unwrap()
    }

    #[tokio::test]
    async fn frames_round_trip_through_a_stream() {
        let records: Vec<_> = (5..9).map(rec).collect();
        let batch = encode_batch(&records, 5, 3).unwrap();
        let mut buf = Vec::new();
        write_frame(&mut buf, &Frame::Ack { durable_seq: 4 })
            .await
            .unwrap();
        write_frame(&mut buf, &batch).await.unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).await.unwrap(),
            Some(Frame::Ack { durable_seq: 4 })
        );
        let Some(Frame::Batch {
            first_seq,
            last_seq,
            raw_len,
            payload,
        }) = read_frame(&mut r).await.unwrap()
        else {
            panic!("expected a batch");
        };
        assert_eq!(
            decode_batch(first_seq, last_seq, raw_len, &payload).unwrap(),
            records
        );
        assert_eq!(read_frame(&mut r).await.unwrap(), None);
    }

    #[tokio::test]
    async fn huge_length_prefix_is_refused_without_allocating() {
        let mut bytes = u32::MAX.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        assert!(matches!(
            read_frame(&mut &bytes[..]).await,
            Err(WireError::Frame(FrameError::FrameTooLarge(_)))
        ));
    }
}
