//! Client side of the fixed-newstyle handshake: STRUCTURED_REPLY,
//! SET_META_CONTEXT, then GO (falling back to EXPORT_NAME if GO is
//! unsupported).
//!
//! Invariants: every option reply is checked to answer the option we sent;
//! reply data is capped by `proto` before allocation; the number of replies
//! accepted per option is bounded (`MAX_REPLIES`).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ClientError, ConnectOptions};
use crate::nbd::proto::*;

const MAX_REPLIES: usize = 1024;

/// Result of a successful handshake.
#[derive(Debug, Clone, Default)]
pub(super) struct Negotiation {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub contexts: Vec<(u32, String)>,
    pub block_size: Option<(u32, u32, u32)>,
}

pub(super) async fn handshake<S>(
    s: &mut S,
    export: &str,
    opts: &ConnectOptions,
) -> Result<Negotiation, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = [0u8; GREETING_LEN];
    s.read_exact(&mut greeting).await?;
    let hflags = parse_server_greeting(&greeting)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Unsupported(
            "server does not do fixed newstyle",
        ));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    s.write_all(&cflags.to_be_bytes()).await?;

    let mut neg = Negotiation::default();
    if opts.structured_replies {
        let (h, _) = request(s, OPT_STRUCTURED_REPLY, &[]).await?;
        neg.structured = h.kind == REP_ACK;
    }
    if neg.structured && !opts.meta_contexts.is_empty() {
        neg.contexts = set_meta_context(s, export, &opts.meta_contexts).await?;
    }
    match go(s, export, &mut neg).await {
        Err(ClientError::OptionRefused {
            reply: REP_ERR_UNSUP,
            ..
        }) => export_name(s, export, no_zeroes, &mut neg).await?,
        other => other?,
    }
    Ok(neg)
}

async fn send_option<S: AsyncWrite + Unpin>(
    s: &mut S,
    opt: u32,
    data: &[u8],
) -> Result<(), ClientError> {
    s.write_all(&encode_option(opt, data)?).await?;
    s.flush().await?;
    Ok(())
}

async fn read_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    opt: u32,
) -> Result<(OptionReplyHeader, Vec<u8>), ClientError> {
    let mut hdr = [0u8; OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut hdr).await?;
    let h = parse_option_reply_header(&hdr)?;
    if h.opt != opt {
        return Err(ProtoError::Invalid("option reply for a different option").into());
    }
    let mut data = vec![0u8; h.len as usize];
    s.read_exact(&mut data).await?;
    Ok((h, data))
}

fn refused(h: &OptionReplyHeader, data: &[u8]) -> ClientError {
    ClientError::OptionRefused {
        opt: h.opt,
        reply: h.kind,
        message: option_error_message(data),
    }
}

/// Send an option that has a single reply; `ERR_UNSUP` is returned as a
/// header (callers decide), other errors become `OptionRefused`.
async fn request<S>(
    s: &mut S,
    opt: u32,
    data: &[u8],
) -> Result<(OptionReplyHeader, Vec<u8>), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_option(s, opt, data).await?;
    let (h, d) = read_reply(s, opt).await?;
    match h.kind {
        REP_ACK | REP_ERR_UNSUP => Ok((h, d)),
        _ => Err(refused(&h, &d)),
    }
}

async fn set_meta_context<S>(
    s: &mut S,
    export: &str,
    queries: &[String],
) -> Result<Vec<(u32, String)>, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = MetaRequest {
        export: export.to_string(),
        queries: queries.to_vec(),
    };
    send_option(s, OPT_SET_META_CONTEXT, &encode_meta_request(&req)?).await?;
    let mut contexts = Vec::new();
    for _ in 0..MAX_REPLIES {
        let (h, d) = read_reply(s, OPT_SET_META_CONTEXT).await?;
        match h.kind {
            REP_META_CONTEXT => contexts.push(parse_meta_context_reply(&d)?),
            REP_ACK => return Ok(contexts),
            // The server can't do metadata contexts: carry on without them.
            _ if h.is_error() => return Ok(Vec::new()),
            _ => return Err(ProtoError::Invalid("unexpected reply to SET_META_CONTEXT").into()),
        }
    }
    Err(ProtoError::Invalid("too many option replies").into())
}

async fn go<S>(s: &mut S, export: &str, neg: &mut Negotiation) -> Result<(), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = GoRequest {
        name: export.to_string(),
        infos: vec![INFO_BLOCK_SIZE],
    };
    send_option(s, OPT_GO, &encode_go(&req)?).await?;
    let mut have_export = false;
    for _ in 0..MAX_REPLIES {
        let (h, d) = read_reply(s, OPT_GO).await?;
        match h.kind {
            REP_INFO => match parse_info(&d)? {
                Info::Export { size, flags } => {
                    (neg.size, neg.flags, have_export) = (size, flags, true);
                }
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => neg.block_size = Some((min, preferred, max)),
                _ => {}
            },
            REP_ACK if have_export => return Ok(()),
            REP_ACK => {
                return Err(ProtoError::Invalid("GO acknowledged without NBD_INFO_EXPORT").into())
            }
            _ if h.is_error() => return Err(refused(&h, &d)),
            _ => return Err(ProtoError::Invalid("unexpected reply to GO").into()),
        }
    }
    Err(ProtoError::Invalid("too many option replies").into())
}

/// Old-style export selection; no error reporting possible (server hangs up).
async fn export_name<S>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
    neg: &mut Negotiation,
) -> Result<(), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_option(s, OPT_EXPORT_NAME, export.as_bytes()).await?;
    let mut buf = [0u8; EXPORT_NAME_REPLY_LEN];
    let n = if no_zeroes { 10 } else { EXPORT_NAME_REPLY_LEN };
    let dst = buf
        .get_mut(..n)
        .ok_or(ProtoError::Invalid("reply length"))?;
    s.read_exact(dst).await?;
    (neg.size, neg.flags) = parse_export_name_reply(&buf)?;
    Ok(())
}
