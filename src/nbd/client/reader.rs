//! The client's reply reader: one task per connection that owns the read
//! half, parses replies and completes pending requests by cookie.
//!
//! Invariants: reply payloads are capped by `proto` before allocation;
//! chunks are checked against their request (type, range, context id,
//! no overlap); READ data is received straight into the caller's buffer;
//! any protocol or I/O error ends the task, and then every pending request
//! and every later one fails with `ClientError::Disconnected`.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use bytes::BytesMut;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::{ClientError, Op, OpKind, Output, Shared};
use crate::nbd::proto::*;

pub(super) async fn reader_task<R: AsyncRead + Unpin>(
    shared: Arc<Shared>,
    mut rd: R,
    ids: Vec<u32>,
) {
    let why = match read_replies(&shared, &mut rd, &ids).await {
        Ok(()) => "server closed the connection".to_string(),
        Err(e) => e.to_string(),
    };
    let ops: Vec<Op> = {
        let mut p = shared.lock();
        p.closed = Some(why.clone());
        p.ops.drain().map(|(_, op)| op).collect()
    };
    for op in ops {
        let _ = op.tx.send(Err(ClientError::Disconnected(why.clone())));
    }
}

/// Read replies until EOF (Ok) or a protocol/I/O error.
async fn read_replies<R: AsyncRead + Unpin>(
    shared: &Shared,
    rd: &mut R,
    ids: &[u32],
) -> Result<(), ClientError> {
    loop {
        let mut magic = [0u8; 4];
        match rd.read_exact(&mut magic).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let magic = u32::from_be_bytes(magic);
        let rest_len = reply_header_rest_len(magic).ok_or(ProtoError::BadMagic {
            expected: STRUCTURED_REPLY_MAGIC.into(),
            got: magic.into(),
        })?;
        let mut rest = [0u8; CHUNK_HEADER_LEN - 4];
        let rest = rest
            .get_mut(..rest_len)
            .ok_or(ProtoError::Invalid("header length"))?;
        rd.read_exact(rest).await?;
        match parse_reply_header(magic, rest)? {
            ReplyHeader::Simple { error, cookie } => on_simple(shared, rd, error, cookie).await?,
            ReplyHeader::Chunk(h) if h.kind == REPLY_TYPE_OFFSET_DATA && h.len > 8 => {
                // Data goes straight from the socket into the caller's buffer (the common,
                // large case): the range is checked and claimed first.
                let mut off = [0u8; 8];
                rd.read_exact(&mut off).await?;
                let n = u64::from(h.len - 8);
                let (mut buf, at) = claim(shared, h.cookie, u64::from_be_bytes(off), n)?;
                let got = rd.read_exact(&mut buf[at..at + n as usize]).await;
                put_back(shared, h.cookie, buf);
                got?;
                on_chunk(shared, &h, Chunk::None, ids)?;
            }
            ReplyHeader::Chunk(h) => {
                let mut payload = vec![0u8; h.len as usize];
                rd.read_exact(&mut payload).await?;
                let chunk = parse_chunk(&h, &payload)?;
                on_chunk(shared, &h, chunk, ids)?;
            }
        }
    }
}

async fn on_simple<R: AsyncRead + Unpin>(
    shared: &Shared,
    rd: &mut R,
    error: u32,
    cookie: u64,
) -> Result<(), ClientError> {
    let mut op = shared
        .lock()
        .ops
        .remove(&cookie)
        .ok_or(ProtoError::Invalid("reply for unknown cookie"))?;
    if error != 0 {
        let _ = op.tx.send(Err(ClientError::Server {
            errno: error,
            message: String::new(),
        }));
        return Ok(());
    }
    let out = match &mut op.kind {
        OpKind::Read { buf, .. } => {
            let mut buf = buf
                .take()
                .ok_or(ProtoError::Invalid("read buffer in use"))?;
            rd.read_exact(&mut buf).await?;
            Output::Data(buf)
        }
        OpKind::Status { .. } => {
            return Err(ProtoError::Invalid("simple reply to block status").into())
        }
        OpKind::Plain => Output::Done,
    };
    let _ = op.tx.send(Ok(out));
    Ok(())
}

/// Which parts of a READ's buffer replies have filled: ranges relative to the request,
/// disjoint, neighbours merged (in-order replies keep this one entry long).
#[derive(Default)]
pub(super) struct Coverage {
    ranges: BTreeMap<u64, u64>,
    total: u64,
}

impl Coverage {
    /// Record `[start, end)`; a range that overlaps one already filled is a protocol error
    /// (the spec forbids overlapping chunks, and counting them twice could hide a gap).
    fn add(&mut self, start: u64, end: u64) -> Result<(), ProtoError> {
        let overlap = ProtoError::Invalid("reply chunks overlap");
        let mut new = (start, end);
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e > start {
                return Err(overlap);
            }
            if e == start {
                self.ranges.remove(&s);
                new.0 = s;
            }
        }
        if let Some((&s, &e)) = self.ranges.range(start..).next() {
            if s < end {
                return Err(overlap);
            }
            if s == end {
                self.ranges.remove(&s);
                new.1 = e;
            }
        }
        self.ranges.insert(new.0, new.1);
        self.total += end - start;
        Ok(())
    }
}

/// Check that `n` bytes at `offset` belong to the pending READ `cookie` and were not filled
/// before, record them, and lend out its buffer with the index they start at.
fn claim(
    shared: &Shared,
    cookie: u64,
    offset: u64,
    n: u64,
) -> Result<(BytesMut, usize), ProtoError> {
    let mut p = shared.lock();
    let op = p
        .ops
        .get_mut(&cookie)
        .ok_or(ProtoError::Invalid("chunk for unknown cookie"))?;
    let OpKind::Read {
        offset: base,
        buf,
        covered,
    } = &mut op.kind
    else {
        return Err(ProtoError::Invalid("chunk type does not match the request"));
    };
    let b = buf
        .as_mut()
        .ok_or(ProtoError::Invalid("read buffer in use"))?;
    let (start, end) = target(b.len(), *base, offset, n)?;
    covered.add(start as u64, end as u64)?;
    Ok((buf.take().unwrap_or_default(), start))
}

fn put_back(shared: &Shared, cookie: u64, b: BytesMut) {
    if let Some(OpKind::Read { buf, .. }) =
        shared.lock().ops.get_mut(&cookie).map(|op| &mut op.kind)
    {
        *buf = Some(b);
    }
}

/// Fold one chunk into its pending operation and complete the operation on its last chunk.
fn on_chunk(
    shared: &Shared,
    h: &ChunkHeader,
    chunk: Chunk<'_>,
    ids: &[u32],
) -> Result<(), ClientError> {
    let mut p = shared.lock();
    let op = p
        .ops
        .get_mut(&h.cookie)
        .ok_or(ProtoError::Invalid("chunk for unknown cookie"))?;
    apply_chunk(op, chunk, ids)?;
    if !h.is_done() {
        return Ok(());
    }
    let op = p
        .ops
        .remove(&h.cookie)
        .ok_or(ProtoError::Invalid("chunk for unknown cookie"))?;
    drop(p);
    let result = match (op.error, op.kind) {
        (Some((errno, message)), _) => Err(ClientError::Server { errno, message }),
        (
            None,
            OpKind::Read {
                buf: Some(buf),
                covered,
                ..
            },
        ) if covered.total == buf.len() as u64 => Ok(Output::Data(buf)),
        (None, OpKind::Read { .. }) => {
            Err(ProtoError::Invalid("read reply does not cover the request").into())
        }
        (None, OpKind::Status { by_id }) => Ok(Output::Status(by_id)),
        (None, OpKind::Plain) => Ok(Output::Done),
    };
    let _ = op.tx.send(result);
    Ok(())
}

/// Fold one chunk into the pending operation; inconsistent chunks are errors.
fn apply_chunk(op: &mut Op, chunk: Chunk<'_>, ids: &[u32]) -> Result<(), ProtoError> {
    match (chunk, &mut op.kind) {
        (Chunk::None, _) => {}
        (Chunk::Error { errno, message, .. }, _) => {
            op.error.get_or_insert((errno, message));
        }
        (
            Chunk::OffsetData { offset, data },
            OpKind::Read {
                offset: base,
                buf: Some(buf),
                covered,
            },
        ) => {
            let (s, e) = target(buf.len(), *base, offset, data.len() as u64)?;
            covered.add(s as u64, e as u64)?;
            buf[s..e].copy_from_slice(data);
        }
        (
            Chunk::OffsetHole { offset, len },
            OpKind::Read {
                offset: base,
                buf: Some(buf),
                covered,
            },
        ) => {
            let (s, e) = target(buf.len(), *base, offset, len.into())?;
            covered.add(s as u64, e as u64)?;
            buf[s..e].fill(0);
        }
        (
            Chunk::BlockStatus {
                context_id,
                extents,
            },
            OpKind::Status { by_id },
        ) => {
            if !ids.contains(&context_id) || by_id.insert(context_id, extents).is_some() {
                return Err(ProtoError::Invalid("unexpected block status context"));
            }
        }
        _ => return Err(ProtoError::Invalid("chunk type does not match the request")),
    }
    Ok(())
}

/// The indexes of a READ buffer of `len` bytes at `base` that a chunk at `offset` of `n`
/// bytes covers.
fn target(len: usize, base: u64, offset: u64, n: u64) -> Result<(usize, usize), ProtoError> {
    let outside = ProtoError::Invalid("chunk outside the requested range");
    let start = offset.checked_sub(base).ok_or(outside.clone())?;
    let end = start.checked_add(n).ok_or(outside.clone())?;
    match (usize::try_from(start), usize::try_from(end)) {
        (Ok(s), Ok(e)) if e <= len => Ok((s, e)),
        _ => Err(outside),
    }
}

#[cfg(test)]
mod tests {
    //! The reply reader against scripted server bytes: replies in pieces land where they
    //! belong, and a hostile server's overlapping, stray or incomplete chunks are errors.
    use super::*;
    use crate::nbd::client::{Op, Pending, Shared};
    use std::sync::atomic::AtomicU64;
    use tokio::sync::oneshot;

    const BASE: u64 = 1 << 20;
    const LEN: usize = 100;

    fn data(flags: u16, cookie: u64, offset: u64, bytes: &[u8]) -> Vec<u8> {
        let mut v = encode_offset_data_header(flags, cookie, offset, bytes.len() as u32).unwrap();
        v.extend_from_slice(bytes);
        v
    }

    /// One pending READ of LEN bytes at BASE (cookie 1), its buffer full of stale 0xEE bytes;
    /// feed `script`, then return what the READ got.
    fn run(script: Vec<u8>) -> Result<Vec<u8>, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async move {
            let shared = Arc::new(Shared {
                writer: tokio::sync::Mutex::new(Box::new(tokio::io::sink())),
                pending: std::sync::Mutex::new(Pending::default()),
                next_cookie: AtomicU64::new(2),
            });
            let (tx, rx) = oneshot::channel();
            let buf = BytesMut::from(&[0xEEu8; LEN][..]);
            let kind = OpKind::Read {
                offset: BASE,
                buf: Some(buf),
                covered: Coverage::default(),
            };
            shared.lock().ops.insert(
                1,
                Op {
                    kind,
                    error: None,
                    tx,
                    _slot: None,
                },
            );
            reader_task(shared, &script[..], vec![]).await;
            match rx.await {
                Ok(Ok(Output::Data(d))) => Ok(d.to_vec()),
                Ok(Ok(_)) => Err("not data".into()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("dropped".into()),
            }
        })
    }

    fn body() -> Vec<u8> {
        (0..LEN as u8).map(|i| i.wrapping_mul(7) | 1).collect()
    }

    #[test]
    fn pieces_in_any_order_fill_the_buffer() {
        let b = body();
        let mut s = data(0, 1, BASE + 60, &b[60..]);
        s.extend(encode_offset_hole(0, 1, BASE + 30, 30).unwrap());
        s.extend(data(REPLY_FLAG_DONE, 1, BASE, &b[..30]));
        let mut want = b.clone();
        want[30..60].fill(0);
        assert_eq!(run(s), Ok(want));
    }

    #[test]
    fn one_piece_and_simple_replies_are_received_whole() {
        let b = body();
        assert_eq!(run(data(REPLY_FLAG_DONE, 1, BASE, &b)), Ok(b.clone()));
        let mut s = encode_simple_reply(0, 1).to_vec();
        s.extend_from_slice(&b);
        assert_eq!(run(s), Ok(b));
    }

    #[test]
    fn hostile_replies_are_errors_never_stale_bytes() {
        let b = body();
        // Overlapping pieces that add up to the request length, leaving 10 stale bytes.
        let mut s = data(0, 1, BASE, &b[..60]);
        s.extend(data(REPLY_FLAG_DONE, 1, BASE + 50, &b[50..90]));
        assert!(run(s).unwrap_err().contains("reply chunks overlap"));
        // A hole over data already received.
        let mut s = data(0, 1, BASE, &b[..60]);
        s.extend(encode_offset_hole(REPLY_FLAG_DONE, 1, BASE + 59, 41).unwrap());
        assert!(run(s).unwrap_err().contains("reply chunks overlap"));
        // Done before every byte came.
        let s = data(REPLY_FLAG_DONE, 1, BASE, &b[..99]);
        assert!(run(s).unwrap_err().contains("does not cover the request"));
        // Outside the request, before and after it.
        assert!(run(data(REPLY_FLAG_DONE, 1, BASE - 1, &b))
            .unwrap_err()
            .contains("outside the requested range"));
        assert!(run(data(REPLY_FLAG_DONE, 1, BASE + 1, &b))
            .unwrap_err()
            .contains("outside the requested range"));
        assert!(run(data(REPLY_FLAG_DONE, 1, u64::MAX - 10, &b[..20]))
            .unwrap_err()
            .contains("outside the requested range"));
        // Another cookie, and data cut short by the end of the stream.
        assert!(run(data(REPLY_FLAG_DONE, 7, BASE, &b))
            .unwrap_err()
            .contains("unknown cookie"));
        let mut s = data(REPLY_FLAG_DONE, 1, BASE, &b);
        s.truncate(s.len() - 1);
        assert!(run(s).unwrap_err().starts_with("connection lost"));
        // A server error chunk wins over the data.
        let mut s = data(0, 1, BASE, &b);
        s.extend(encode_error_chunk(REPLY_FLAG_DONE, 1, 5, "disk on fire").unwrap());
        assert_eq!(run(s), Err("server error 5: disk on fire".into()));
    }
}
