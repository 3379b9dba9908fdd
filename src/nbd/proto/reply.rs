//! Transmission-phase replies: simple replies and structured reply chunks.
//!
//! Invariants: same as the parent module — pure, panic-free on any input,
//! chunk payload lengths capped at `MAX_PAYLOAD + 8` before allocation,
//! big-endian fields.

use super::*;

pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    let (a, rest) = out.split_at_mut(4);
    let (b, c) = rest.split_at_mut(4);
    a.copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.copy_from_slice(&error.to_be_bytes());
    c.copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Header of one structured reply chunk (20 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub len: u32,
}

impl ChunkHeader {
    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// A reply header as found on the wire: either kind of magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple { error: u32, cookie: u64 },
    Chunk(ChunkHeader),
}

/// Parse the header that follows a 4-byte reply magic already read as `magic`.
/// `rest` holds the following 12 (simple) or 16 (structured) bytes.
pub fn parse_reply_header(magic: u32, rest: &[u8]) -> Result<ReplyHeader> {
    let mut r = Reader::new(rest);
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(ReplyHeader::Simple {
            error: r.u32()?,
            cookie: r.u64()?,
        }),
        STRUCTURED_REPLY_MAGIC => {
            let h = ChunkHeader {
                flags: r.u16()?,
                kind: r.u16()?,
                cookie: r.u64()?,
                len: r.u32()?,
            };
            check_cap("chunk payload", h.len.into(), MAX_PAYLOAD.saturating_add(8))?;
            Ok(ReplyHeader::Chunk(h))
        }
        got => Err(ProtoError::BadMagic {
            expected: STRUCTURED_REPLY_MAGIC.into(),
            got: got.into(),
        }),
    }
}

/// Remaining header bytes after the 4-byte magic.
pub fn reply_header_rest_len(magic: u32) -> Option<usize> {
    match magic {
        SIMPLE_REPLY_MAGIC => Some(SIMPLE_REPLY_LEN - 4),
        STRUCTURED_REPLY_MAGIC => Some(CHUNK_HEADER_LEN - 4),
        _ => None,
    }
}

/// Decoded payload of a structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    None,
    OffsetData {
        offset: u64,
        data: &'a [u8],
    },
    OffsetHole {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        context_id: u32,
        extents: Vec<(u32, u32)>,
    },
    Error {
        errno: u32,
        message: String,
        offset: Option<u64>,
    },
}

/// Decode a chunk payload according to its header type.
pub fn parse_chunk<'a>(h: &ChunkHeader, payload: &'a [u8]) -> Result<Chunk<'a>> {
    if payload.len() != h.len as usize {
        return Err(ProtoError::Truncated {
            need: h.len as usize,
            have: payload.len(),
        });
    }
    let mut r = Reader::new(payload);
    let chunk = match h.kind {
        REPLY_TYPE_NONE if h.is_done() => Chunk::None,
        REPLY_TYPE_NONE => return Err(ProtoError::Invalid("NONE chunk without DONE")),
        REPLY_TYPE_OFFSET_DATA => {
            let offset = r.u64()?;
            if r.remaining() == 0 {
                return Err(ProtoError::Invalid("empty OFFSET_DATA"));
            }
            return Ok(Chunk::OffsetData {
                offset,
                data: r.rest(),
            });
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let (offset, len) = (r.u64()?, r.u32()?);
            if len == 0 {
                return Err(ProtoError::Invalid("zero-length hole"));
            }
            Chunk::OffsetHole { offset, len }
        }
        REPLY_TYPE_BLOCK_STATUS => parse_block_status(&mut r)?,
        kind if kind & 0x8000 != 0 => {
            let errno = r.u32()?;
            let mlen = r.u16()?;
            let message = String::from_utf8_lossy(r.bytes(mlen.into())?).into_owned();
            let offset = if kind == REPLY_TYPE_ERROR_OFFSET {
                Some(r.u64()?)
            } else {
                None
            };
            if errno == 0 {
                return Err(ProtoError::Invalid("error chunk with errno 0"));
            }
            // Unknown error types may carry extra fields: tolerated.
            return Ok(Chunk::Error {
                errno,
                message,
                offset,
            });
        }
        _ => return Err(ProtoError::Invalid("unknown chunk type")),
    };
    r.finish()?;
    Ok(chunk)
}

fn parse_block_status<'a>(r: &mut Reader<'_>) -> Result<Chunk<'a>> {
    let context_id = r.u32()?;
    if r.remaining() == 0 || !r.remaining().is_multiple_of(8) {
        return Err(ProtoError::Invalid("block status length"));
    }
    let mut extents = Vec::with_capacity(r.remaining() / 8);
    while r.remaining() > 0 {
        let (len, flags) = (r.u32()?, r.u32()?);
        if len == 0 {
            return Err(ProtoError::Invalid("zero-length extent"));
        }
        extents.push((len, flags));
    }
    Ok(Chunk::BlockStatus {
        context_id,
        extents,
    })
}

/// Fuzz entry point: parse one complete reply message. Simple replies carry
/// no data here (their READ payload length is only known from the request).
/// Returns the header, the decoded chunk (structured only) and bytes consumed.
pub fn parse_reply(bytes: &[u8]) -> Result<(ReplyHeader, Option<Chunk<'_>>, usize)> {
    let mut r = Reader::new(bytes);
    let magic = r.u32()?;
    let rest_len = reply_header_rest_len(magic).ok_or(ProtoError::BadMagic {
        expected: STRUCTURED_REPLY_MAGIC.into(),
        got: magic.into(),
    })?;
    let header = parse_reply_header(magic, r.bytes(rest_len)?)?;
    match header {
        ReplyHeader::Simple { .. } => Ok((header, None, 4 + rest_len)),
        ReplyHeader::Chunk(h) => {
            let payload = r.bytes(h.len as usize)?;
            let chunk = parse_chunk(&h, payload)?;
            Ok((header, Some(chunk), CHUNK_HEADER_LEN + payload.len()))
        }
    }
}

/// Encode a chunk header followed by `payload`. Fails if the payload does
/// not fit a u32 length.
pub fn encode_chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Result<Vec<u8>> {
    let len = u32::try_from(payload.len()).map_err(|_| ProtoError::Overflow("chunk length"))?;
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// OFFSET_DATA header + offset prefix; the caller appends `data_len` bytes.
pub fn encode_offset_data_header(
    flags: u16,
    cookie: u64,
    offset: u64,
    data_len: u32,
) -> Result<Vec<u8>> {
    let len = data_len
        .checked_add(8)
        .ok_or(ProtoError::Overflow("chunk length"))?;
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + 8);
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    Ok(out)
}

pub fn encode_offset_hole(flags: u16, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>> {
    let mut p = [0u8; 12];
    let (a, b) = p.split_at_mut(8);
    a.copy_from_slice(&offset.to_be_bytes());
    b.copy_from_slice(&len.to_be_bytes());
    encode_chunk(flags, REPLY_TYPE_OFFSET_HOLE, cookie, &p)
}

pub fn encode_block_status(
    flags: u16,
    cookie: u64,
    context_id: u32,
    extents: &[(u32, u32)],
) -> Result<Vec<u8>> {
    let mut p = Vec::with_capacity(4 + extents.len().saturating_mul(8));
    p.extend_from_slice(&context_id.to_be_bytes());
    for (len, fl) in extents {
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&fl.to_be_bytes());
    }
    encode_chunk(flags, REPLY_TYPE_BLOCK_STATUS, cookie, &p)
}

pub fn encode_error_chunk(flags: u16, cookie: u64, errno: u32, message: &str) -> Result<Vec<u8>> {
    let msg = message.as_bytes();
    let msg = msg
        .get(..msg.len().min(MAX_STRING as usize))
        .unwrap_or_default();
    let mlen = u16::try_from(msg.len()).map_err(|_| ProtoError::Overflow("message length"))?;
    let mut p = Vec::with_capacity(6 + msg.len());
    p.extend_from_slice(&errno.to_be_bytes());
    p.extend_from_slice(&mlen.to_be_bytes());
    p.extend_from_slice(msg);
    encode_chunk(flags, REPLY_TYPE_ERROR, cookie, &p)
}

pub fn encode_none_chunk(cookie: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN);
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    out.extend_from_slice(&REPLY_TYPE_NONE.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out
}
