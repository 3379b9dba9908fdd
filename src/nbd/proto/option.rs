//! Handshake and option-haggling messages (fixed newstyle only).
//!
//! Invariants: same as the parent module — pure, panic-free on any input,
//! every wire length checked against [`MAX_OPTION_LEN`] / [`MAX_STRING`]
//! before use, big-endian fields.

use super::*;

pub const GREETING_LEN: usize = 18;
pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Size + flags + 124 zero bytes, the reply to NBD_OPT_EXPORT_NAME.
pub const EXPORT_NAME_REPLY_LEN: usize = 8 + 2 + 124;

/// Server greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags.
pub fn encode_server_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    let (a, rest) = out.split_at_mut(8);
    let (b, c) = rest.split_at_mut(8);
    a.copy_from_slice(&NBDMAGIC.to_be_bytes());
    b.copy_from_slice(&IHAVEOPT.to_be_bytes());
    c.copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// Parse the server greeting; returns the handshake flags.
pub fn parse_server_greeting(bytes: &[u8]) -> Result<u16> {
    let mut r = Reader::new(bytes);
    let m1 = r.u64()?;
    if m1 != NBDMAGIC {
        return Err(ProtoError::BadMagic {
            expected: NBDMAGIC,
            got: m1,
        });
    }
    let m2 = r.u64()?;
    if m2 != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            got: m2,
        });
    }
    r.u16()
}

/// Parse the client's 32-bit flags; reject unknown bits and NO_ZEROES that
/// the server did not offer.
pub fn parse_client_flags(bytes: &[u8], server_flags: u16) -> Result<u32> {
    let flags = Reader::new(bytes).u32()?;
    let mut known = FLAG_C_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        known |= FLAG_C_NO_ZEROES;
    }
    if flags & !known != 0 {
        return Err(ProtoError::Invalid("unknown client flags"));
    }
    Ok(flags)
}

/// Option request header (after IHAVEOPT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub opt: u32,
    pub len: u32,
}

/// Parse a 16-byte option header; the data length is capped.
pub fn parse_option_header(bytes: &[u8]) -> Result<OptionHeader> {
    let mut r = Reader::new(bytes);
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            got: magic,
        });
    }
    let h = OptionHeader {
        opt: r.u32()?,
        len: r.u32()?,
    };
    check_cap("option data", h.len.into(), MAX_OPTION_LEN)?;
    Ok(h)
}

/// Fuzz entry point: one complete option request. Returns header, data, consumed.
pub fn parse_option(bytes: &[u8]) -> Result<(OptionHeader, &[u8], usize)> {
    let mut r = Reader::new(bytes);
    let h = parse_option_header(r.bytes(OPTION_HEADER_LEN)?)?;
    let data = r.bytes(h.len as usize)?;
    Ok((h, data, OPTION_HEADER_LEN + data.len()))
}

pub fn encode_option(opt: u32, data: &[u8]) -> Result<Vec<u8>> {
    check_cap("option data", data.len() as u64, MAX_OPTION_LEN)?;
    let len = u32::try_from(data.len()).map_err(|_| ProtoError::Overflow("option length"))?;
    let mut out = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Ok(out)
}

/// Data of NBD_OPT_EXPORT_NAME: the whole payload is the name.
pub fn parse_export_name(data: &[u8]) -> Result<String> {
    Reader::new(data).string(data.len())
}

/// Data of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn parse_go(data: &[u8]) -> Result<GoRequest> {
    let mut r = Reader::new(data);
    let nlen = r.u32()?;
    let name = r.string(nlen as usize)?;
    let count = r.u16()?;
    let mut infos = Vec::with_capacity(usize::from(count).min(r.remaining() / 2));
    for _ in 0..count {
        infos.push(r.u16()?);
    }
    r.finish()?;
    Ok(GoRequest { name, infos })
}

pub fn encode_go(req: &GoRequest) -> Result<Vec<u8>> {
    let count = u16::try_from(req.infos.len()).map_err(|_| ProtoError::Overflow("info count"))?;
    let mut out = Vec::new();
    out.extend_from_slice(&str_len(&req.name)?.to_be_bytes());
    out.extend_from_slice(req.name.as_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for i in &req.infos {
        out.extend_from_slice(&i.to_be_bytes());
    }
    Ok(out)
}

/// Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest> {
    let mut r = Reader::new(data);
    let nlen = r.u32()?;
    let export = r.string(nlen as usize)?;
    let count = r.u32()?;
    // Each query needs at least 4 bytes, so `count` is bounded by the data.
    if u64::from(count).saturating_mul(4) > r.remaining() as u64 {
        return Err(ProtoError::Truncated {
            need: usize::try_from(count)
                .unwrap_or(usize::MAX)
                .saturating_mul(4),
            have: r.remaining(),
        });
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let qlen = r.u32()?;
        queries.push(r.string(qlen as usize)?);
    }
    r.finish()?;
    Ok(MetaRequest { export, queries })
}

pub fn encode_meta_request(req: &MetaRequest) -> Result<Vec<u8>> {
    let count =
        u32::try_from(req.queries.len()).map_err(|_| ProtoError::Overflow("query count"))?;
    let mut out = Vec::new();
    out.extend_from_slice(&str_len(&req.export)?.to_be_bytes());
    out.extend_from_slice(req.export.as_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for q in &req.queries {
        out.extend_from_slice(&str_len(q)?.to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    check_cap("option data", out.len() as u64, MAX_OPTION_LEN)?;
    Ok(out)
}

/// Option reply header (20 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub opt: u32,
    pub kind: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    pub fn is_error(&self) -> bool {
        self.kind & REP_FLAG_ERROR != 0
    }
}

pub fn parse_option_reply_header(bytes: &[u8]) -> Result<OptionReplyHeader> {
    let mut r = Reader::new(bytes);
    let magic = r.u64()?;
    if magic != OPT_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: OPT_REPLY_MAGIC,
            got: magic,
        });
    }
    let h = OptionReplyHeader {
        opt: r.u32()?,
        kind: r.u32()?,
        len: r.u32()?,
    };
    check_cap("option reply", h.len.into(), MAX_OPTION_LEN)?;
    Ok(h)
}

/// Fuzz entry point: one complete option reply. Returns header, data, consumed.
pub fn parse_option_reply(bytes: &[u8]) -> Result<(OptionReplyHeader, &[u8], usize)> {
    let mut r = Reader::new(bytes);
    let h = parse_option_reply_header(r.bytes(OPTION_REPLY_HEADER_LEN)?)?;
    let data = r.bytes(h.len as usize)?;
    Ok((h, data, OPTION_REPLY_HEADER_LEN + data.len()))
}

pub fn encode_option_reply(opt: u32, kind: u32, data: &[u8]) -> Result<Vec<u8>> {
    check_cap("option reply", data.len() as u64, MAX_OPTION_LEN)?;
    let len = u32::try_from(data.len()).map_err(|_| ProtoError::Overflow("reply length"))?;
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Ok(out)
}

/// Payload of an NBD_REP_INFO reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    Name(String),
    Description(String),
    BlockSize { min: u32, preferred: u32, max: u32 },
    Unknown(u16),
}

pub fn parse_info(data: &[u8]) -> Result<Info> {
    let mut r = Reader::new(data);
    let info = match r.u16()? {
        INFO_EXPORT => Info::Export {
            size: r.u64()?,
            flags: r.u16()?,
        },
        INFO_NAME => Info::Name(r.string(r.remaining())?),
        INFO_DESCRIPTION => Info::Description(r.string(r.remaining())?),
        INFO_BLOCK_SIZE => Info::BlockSize {
            min: r.u32()?,
            preferred: r.u32()?,
            max: r.u32()?,
        },
        other => return Ok(Info::Unknown(other)),
    };
    r.finish()?;
    Ok(info)
}

pub fn encode_info(info: &Info) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match info {
        Info::Export { size, flags } => {
            out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
            out.extend_from_slice(&size.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
        Info::Name(s) | Info::Description(s) => {
            str_len(s)?;
            let kind = if matches!(info, Info::Name(_)) {
                INFO_NAME
            } else {
                INFO_DESCRIPTION
            };
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Info::BlockSize {
            min,
            preferred,
            max,
        } => {
            out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            for v in [min, preferred, max] {
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
        Info::Unknown(kind) => out.extend_from_slice(&kind.to_be_bytes()),
    }
    Ok(out)
}

/// NBD_REP_META_CONTEXT payload: (context id, name).
pub fn parse_meta_context_reply(data: &[u8]) -> Result<(u32, String)> {
    let mut r = Reader::new(data);
    let id = r.u32()?;
    let name = r.string(r.remaining())?;
    Ok((id, name))
}

pub fn encode_meta_context_reply(id: u32, name: &str) -> Result<Vec<u8>> {
    str_len(name)?;
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    Ok(out)
}

/// NBD_REP_SERVER payload: export name (any trailing description ignored).
pub fn parse_rep_server(data: &[u8]) -> Result<String> {
    let mut r = Reader::new(data);
    let nlen = r.u32()?;
    r.string(nlen as usize)
}

pub fn encode_rep_server(name: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&str_len(name)?.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    Ok(out)
}

/// Reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zeroes unless NO_ZEROES.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(EXPORT_NAME_REPLY_LEN);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.resize(EXPORT_NAME_REPLY_LEN, 0);
    }
    out
}

/// Parse size and transmission flags (the first 10 bytes).
pub fn parse_export_name_reply(bytes: &[u8]) -> Result<(u64, u16)> {
    let mut r = Reader::new(bytes);
    Ok((r.u64()?, r.u16()?))
}

/// Text of an error option reply, lossily decoded and capped.
pub fn option_error_message(data: &[u8]) -> String {
    let cap = data.len().min(MAX_STRING as usize);
    String::from_utf8_lossy(data.get(..cap).unwrap_or_default()).into_owned()
}
