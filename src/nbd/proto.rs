//! NBD wire format: constants, errors and pure encode/decode functions for
//! the transmission phase (requests, simple replies, structured reply
//! chunks). The option phase (`option.rs`) and replies (`reply.rs`) live in
//! submodules, re-exported here.
//!
//! Invariants:
//! - Every function here is pure: no I/O, no global state.
//! - Nothing here panics on any input. Wire data is read through [`Reader`],
//!   which bounds-checks every access; all length/offset arithmetic is
//!   checked; no `unwrap`/`expect`/slice indexing on wire data.
//! - Every length read from the wire is checked against a cap
//!   ([`MAX_OPTION_LEN`], [`MAX_PAYLOAD`], [`MAX_STRING`]) before anything is
//!   allocated for it.
//! - All integers are big-endian on the wire.

mod option;
mod reply;
#[cfg(test)]
mod tests;

pub use option::*;
pub use reply::*;

// ---- magics ----
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---- handshake flags (server) / client flags ----
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- transmission flags ----
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// The server fails a WRITE_ZEROES with CMD_FLAG_FAST_ZERO at once (ENOTSUP) when zeroing
/// would be no faster than writing zeros.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- options ----
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// ---- option reply types ----
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// ---- NBD_REP_INFO types ----
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- commands ----
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// ---- command flags ----
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---- structured reply ----
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// ---- base:allocation state flags ----
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:*` contexts: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";

// ---- error numbers ----
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// ---- sizes and caps ----
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;
/// Cap on option data (client -> server) and option reply data.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Cap on a request's data length (READ / WRITE) and on a chunk payload.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Spec limit for strings (export names, messages, context names).
pub const MAX_STRING: u32 = 4096;

/// Everything that can be wrong with a message; each maps to one NBD errno.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic: expected {expected:#x}, got {got:#x}")]
    BadMagic { expected: u64, got: u64 },
    #[error("truncated message: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("{what} too large: {len} > {max}")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    #[error("invalid flags {flags:#x} for command {cmd}")]
    BadFlags { cmd: u16, flags: u16 },
    #[error("range {offset}+{len} is past the end of the export ({size})")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("write {offset}+{len} is past the end of the export ({size})")]
    NoSpace { offset: u64, len: u64, size: u64 },
    #[error("export is read-only")]
    ReadOnly,
    #[error("value overflow: {0}")]
    Overflow(&'static str),
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    #[error("server is shutting down")]
    Shutdown,
    #[error("invalid message: {0}")]
    Invalid(&'static str),
    #[error("string is not valid (UTF-8, no NUL)")]
    BadString,
}

impl ProtoError {
    /// The NBD error number to put in a reply for this error.
    pub fn errno(&self) -> u32 {
        match self {
            ProtoError::ReadOnly => EPERM,
            ProtoError::NoSpace { .. } => ENOSPC,
            ProtoError::Overflow(_) => EOVERFLOW,
            ProtoError::NotSupported(_) => ENOTSUP,
            ProtoError::Shutdown => ESHUTDOWN,
            ProtoError::BadMagic { .. }
            | ProtoError::Truncated { .. }
            | ProtoError::TooLarge { .. }
            | ProtoError::UnknownCommand(_)
            | ProtoError::BadFlags { .. }
            | ProtoError::OutOfRange { .. }
            | ProtoError::Invalid(_)
            | ProtoError::BadString => EINVAL,
        }
    }
}

/// Map an I/O error from an export backend to an NBD errno.
pub fn errno_from_io(err: &std::io::Error) -> u32 {
    use std::io::ErrorKind as K;
    match err.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem => EPERM,
        K::InvalidInput | K::UnexpectedEof => EINVAL,
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => ENOSPC,
        K::Unsupported => ENOTSUP,
        K::OutOfMemory => ENOMEM,
        _ => EIO,
    }
}

pub type Result<T, E = ProtoError> = std::result::Result<T, E>;

/// Bounds-checked big-endian cursor over untrusted bytes.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub fn rest(self) -> &'a [u8] {
        self.buf
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(ProtoError::Truncated {
                need: n,
                have: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }
    pub fn u16(&mut self) -> Result<u16> {
        self.array().map(u16::from_be_bytes)
    }
    pub fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_be_bytes)
    }
    pub fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_be_bytes)
    }
    /// A string of `len` bytes: must be UTF-8, NUL-free and within [`MAX_STRING`].
    pub fn string(&mut self, len: usize) -> Result<String> {
        check_cap("string", len as u64, MAX_STRING)?;
        decode_string(self.bytes(len)?)
    }
    /// Error unless every byte was consumed.
    pub fn finish(&self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Invalid("trailing bytes"))
        }
    }
}

pub(crate) fn check_cap(what: &'static str, len: u64, max: u32) -> Result<()> {
    if len > u64::from(max) {
        return Err(ProtoError::TooLarge {
            what,
            len,
            max: u64::from(max),
        });
    }
    Ok(())
}

pub(crate) fn decode_string(b: &[u8]) -> Result<String> {
    if b.contains(&0) {
        return Err(ProtoError::BadString);
    }
    String::from_utf8(b.to_vec()).map_err(|_| ProtoError::BadString)
}

/// Length of a string as a u32 wire field, enforcing [`MAX_STRING`].
pub(crate) fn str_len(s: &str) -> Result<u32> {
    check_cap("string", s.len() as u64, MAX_STRING)?;
    u32::try_from(s.len()).map_err(|_| ProtoError::Overflow("string length"))
}

// ======================= transmission: requests =======================

/// Transmission-phase request header (28 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        let fields = [
            &REQUEST_MAGIC.to_be_bytes()[..],
            &self.flags.to_be_bytes(),
            &self.cmd.to_be_bytes(),
            &self.cookie.to_be_bytes(),
            &self.offset.to_be_bytes(),
            &self.len.to_be_bytes(),
        ];
        let mut pos = 0;
        for f in fields {
            if let Some(dst) = out.get_mut(pos..pos + f.len()) {
                dst.copy_from_slice(f);
            }
            pos += f.len();
        }
        out
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.cmd == CMD_WRITE {
            self.len
        } else {
            0
        }
    }
}

/// Parse a request header; only the magic is checked here (so a server can
/// still answer an otherwise bad request by cookie). See [`validate_request`].
pub fn parse_request_header(bytes: &[u8]) -> Result<Request> {
    let mut r = Reader::new(bytes);
    let magic = r.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: REQUEST_MAGIC.into(),
            got: magic.into(),
        });
    }
    Ok(Request {
        flags: r.u16()?,
        cmd: r.u16()?,
        cookie: r.u64()?,
        offset: r.u64()?,
        len: r.u32()?,
    })
}

/// What a server has negotiated; needed to validate requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionState {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub meta_contexts: usize,
    pub shutting_down: bool,
}

fn allowed_flags(cmd: u16, st: &TransmissionState) -> Result<u16> {
    let df = if st.structured { CMD_FLAG_DF } else { 0 };
    Ok(match cmd {
        CMD_READ => CMD_FLAG_FUA | df,
        CMD_WRITE | CMD_TRIM | CMD_FLUSH => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        CMD_DISC => 0,
        other => return Err(ProtoError::UnknownCommand(other)),
    })
}

/// Check a request against the negotiated state: known command, documented
/// flags, payload caps, bounds and write permission. Pure.
pub fn validate_request(req: &Request, st: &TransmissionState) -> Result<()> {
    let allowed = allowed_flags(req.cmd, st)?;
    if req.flags & !allowed != 0 {
        return Err(ProtoError::BadFlags {
            cmd: req.cmd,
            flags: req.flags,
        });
    }
    if st.shutting_down && req.cmd != CMD_DISC {
        return Err(ProtoError::Shutdown);
    }
    let writes = matches!(req.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && st.read_only {
        return Err(ProtoError::ReadOnly);
    }
    match req.cmd {
        CMD_READ | CMD_WRITE => check_cap("request length", req.len.into(), MAX_PAYLOAD)?,
        CMD_BLOCK_STATUS if !st.structured || st.meta_contexts == 0 => {
            return Err(ProtoError::Invalid("block status without meta context"));
        }
        CMD_BLOCK_STATUS if req.len == 0 => {
            return Err(ProtoError::Invalid("zero-length block status"))
        }
        CMD_DISC | CMD_FLUSH => {
            return match req.offset == 0 && req.len == 0 {
                true => Ok(()),
                false => Err(ProtoError::Invalid("offset/length must be zero")),
            };
        }
        _ => {}
    }
    let end = req
        .offset
        .checked_add(req.len.into())
        .ok_or(ProtoError::OutOfRange {
            offset: req.offset,
            len: req.len.into(),
            size: st.size,
        })?;
    if end > st.size {
        let (offset, len, size) = (req.offset, u64::from(req.len), st.size);
        return Err(match writes {
            true => ProtoError::NoSpace { offset, len, size },
            false => ProtoError::OutOfRange { offset, len, size },
        });
    }
    Ok(())
}

/// Fuzz entry point: parse one complete request (header plus the WRITE
/// payload, which must be fully present) from `bytes`. Returns the request,
/// its payload and the number of bytes consumed.
pub fn parse_request(bytes: &[u8]) -> Result<(Request, &[u8], usize)> {
    let mut r = Reader::new(bytes);
    let req = parse_request_header(r.bytes(REQUEST_LEN)?)?;
    let st = TransmissionState {
        size: u64::MAX,
        read_only: false,
        structured: true,
        meta_contexts: 1,
        shutting_down: false,
    };
    allowed_flags(req.cmd, &st)?;
    check_cap("request length", req.payload_len().into(), MAX_PAYLOAD)?;
    let payload = r.bytes(req.payload_len() as usize)?;
    Ok((req, payload, REQUEST_LEN + payload.len()))
}
