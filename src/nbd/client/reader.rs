//! The client's reply reader: one task per connection that owns the read
//! half, parses replies and completes pending requests by cookie.
//!
//! Invariants: reply payloads are capped by `proto` before allocation;
//! chunks are checked against their request (type, range, context id);
//! any protocol or I/O error ends the task, and then every pending request
//! and every later one fails with `ClientError::Disconnected`.

use std::io;
use std::sync::Arc;

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
                // Data goes straight into its own buffer (the common, large case).
                let mut off = [0u8; 8];
                rd.read_exact(&mut off).await?;
                let spare = take_spare(shared, h.cookie);
                let data = read_into(rd, spare, h.len as usize - 8).await?;
                let chunk = Chunk::OffsetData { offset: u64::from_be_bytes(off), data: &[] };
                on_chunk(shared, &h, chunk, Some(data), ids)?;
            }
            ReplyHeader::Chunk(h) => {
                let mut payload = vec![0u8; h.len as usize];
                rd.read_exact(&mut payload).await?;
                let chunk = parse_chunk(&h, &payload)?;
                on_chunk(shared, &h, chunk, None, ids)?;
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
        OpKind::Read { len, spare, .. } => Output::Data(read_into(rd, std::mem::take(spare), *len as usize).await?),
        OpKind::Status { .. } => {
            return Err(ProtoError::Invalid("simple reply to block status").into())
        }
        OpKind::Plain => Output::Done,
    };
    let _ = op.tx.send(Ok(out));
    Ok(())
}

/// The caller's buffer of a pending READ (empty if it gave none or the op is unknown).
fn take_spare(shared: &Shared, cookie: u64) -> Vec<u8> {
    match shared.lock().ops.get_mut(&cookie).map(|op| &mut op.kind) {
        Some(OpKind::Read { spare, .. }) => std::mem::take(spare),
        _ => Vec::new(),
    }
}

/// Exactly `n` bytes into `v` (cleared; its allocation reused when large enough), without
/// zero-filling it first. `n` is capped by the caller (a request length or a checked chunk
/// length).
async fn read_into<R: AsyncRead + Unpin>(rd: &mut R, mut v: Vec<u8>, n: usize) -> Result<Vec<u8>, ClientError> {
    v.clear();
    // read_to_end probes with 32 bytes of room before it sees the end of the `take`.
    v.reserve(n + 32);
    (&mut *rd).take(n as u64).read_to_end(&mut v).await?;
    if v.len() != n {
        return Err(ClientError::Io(io::Error::from(io::ErrorKind::UnexpectedEof)));
    }
    Ok(v)
}

/// `owned`: the data of an OFFSET_DATA chunk, read into its own buffer (then `chunk`'s data
/// is empty).
fn on_chunk(
    shared: &Shared,
    h: &ChunkHeader,
    chunk: Chunk<'_>,
    owned: Option<Vec<u8>>,
    ids: &[u32],
) -> Result<(), ClientError> {
    let mut p = shared.lock();
    let op = p
        .ops
        .get_mut(&h.cookie)
        .ok_or(ProtoError::Invalid("chunk for unknown cookie"))?;
    match (owned, chunk) {
        (Some(data), Chunk::OffsetData { offset, .. }) => apply_data(op, offset, data)?,
        (_, chunk) => apply_chunk(op, chunk, ids)?,
    }
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
        (None, OpKind::Read { buf, covered, len, .. }) if covered == len && buf.len() as u64 == len => {
            Ok(Output::Data(buf))
        }
        (None, OpKind::Read { .. }) => {
            Err(ProtoError::Invalid("read reply does not cover the request").into())
        }
        (None, OpKind::Status { by_id }) => Ok(Output::Status(by_id)),
        (None, OpKind::Plain) => Ok(Output::Done),
    };
    let _ = op.tx.send(result);
    Ok(())
}

/// Fold the data of one OFFSET_DATA chunk into a pending READ.
fn apply_data(op: &mut Op, offset: u64, data: Vec<u8>) -> Result<(), ProtoError> {
    let OpKind::Read { offset: base, buf, len, covered, .. } = &mut op.kind else {
        return Err(ProtoError::Invalid("chunk type does not match the request"));
    };
    let n = data.len() as u64;
    if buf.is_empty() && *covered == 0 && offset == *base && n == *len {
        *buf = data;
    } else {
        alloc_read(buf, *len);
        read_target(buf, *base, offset, n)?.copy_from_slice(&data);
    }
    *covered = covered.saturating_add(n);
    Ok(())
}

/// The READ buffer, zero-filled to the request length, for replies that come in pieces.
fn alloc_read(buf: &mut Vec<u8>, len: u64) {
    if buf.is_empty() {
        buf.resize(len as usize, 0);
    }
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
                buf,
                len: rlen,
                covered,
                ..
            },
        ) => {
            alloc_read(buf, *rlen);
            let dst = read_target(buf, *base, offset, data.len() as u64)?;
            dst.copy_from_slice(data);
            *covered = covered.saturating_add(data.len() as u64);
        }
        (
            Chunk::OffsetHole { offset, len },
            OpKind::Read {
                offset: base,
                buf,
                len: rlen,
                covered,
                ..
            },
        ) => {
            alloc_read(buf, *rlen);
            read_target(buf, *base, offset, len.into())?.fill(0);
            *covered = covered.saturating_add(len.into());
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

/// The part of a READ buffer that a chunk at `offset` of `len` bytes covers.
fn read_target(buf: &mut [u8], base: u64, offset: u64, len: u64) -> Result<&mut [u8], ProtoError> {
    let outside = ProtoError::Invalid("chunk outside the requested range");
    let start = offset.checked_sub(base).ok_or(outside.clone())?;
    let end = start.checked_add(len).ok_or(outside.clone())?;
    let (start, end) = (usize::try_from(start), usize::try_from(end));
    match (start, end) {
        (Ok(s), Ok(e)) => buf.get_mut(s..e).ok_or(outside),
        _ => Err(outside),
    }
}
