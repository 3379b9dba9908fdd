//! Server transmission phase: read requests, run them on the export with
//! `spawn_blocking` (reads the export can answer from memory at once run
//! inline), write replies.
//!
//! Invariants:
//! - One reader loop per connection; each valid request runs in its own
//!   task. At most `max_in_flight` requests and `max_buffered_bytes` of
//!   READ/WRITE payload are outstanding per connection (semaphores taken
//!   *before* reading a payload or spawning), so memory is bounded.
//! - Every reply (all chunks of it) is written while holding the writer
//!   lock, so messages never interleave mid-message.
//! - Requests are validated with `proto::validate_request` before they touch
//!   the export; an invalid request gets an error reply. A bad magic, or a
//!   WRITE whose payload is larger than `MAX_PAYLOAD` (stream can't be
//!   resynchronised) closes the connection.
//! - With structured replies, READ answers use OFFSET_DATA / OFFSET_HOLE
//!   chunks (zero extents from `block_status` become holes) and errors use
//!   ERROR chunks; without, simple replies only.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{watch, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::debug;

use super::{Negotiated, ServerConfig};
use crate::nbd::export::{Export, ReadPart};
use crate::nbd::proto::*;

/// Most extents sent in one BLOCK_STATUS chunk.
const MAX_REPLY_EXTENTS: usize = 1024;

struct Conn<W> {
    export: Arc<dyn Export>,
    structured: bool,
    base_allocation: Option<u32>,
    writer: Mutex<BufWriter<W>>,
}

/// Permits held by a request until its reply has been written.
struct Held {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

struct Limits {
    slots: Arc<Semaphore>,
    budget: Arc<Semaphore>,
}

pub(super) async fn run<R, W>(
    neg: Negotiated,
    rd: R,
    wr: W,
    mut stop: watch::Receiver<bool>,
    cfg: &ServerConfig,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let state = TransmissionState {
        size: neg.export.size(),
        read_only: neg.flags & FLAG_READ_ONLY != 0,
        structured: neg.structured,
        meta_contexts: usize::from(neg.base_allocation.is_some()),
        shutting_down: false,
    };
    let conn = Arc::new(Conn {
        export: neg.export,
        structured: neg.structured,
        base_allocation: neg.base_allocation,
        writer: Mutex::new(BufWriter::with_capacity(256 * 1024, wr)),
    });
    let limits = Limits {
        slots: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
        budget: Arc::new(Semaphore::new(
            cfg.max_buffered_bytes.max(MAX_PAYLOAD) as usize
        )),
    };
    let mut tasks = JoinSet::new();
    let result = loop {
        if let Some(Ok(Err(e))) = tasks.try_join_next() {
            break Err(e); // a reply could not be written
        }
        let idle = cfg.idle_timeout.filter(|_| tasks.is_empty());
        let req = match next_request(&mut rd, &mut stop, idle).await {
            Ok(Some(req)) => req,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        if let Err(e) = admit(&conn, &mut rd, req, &state, &limits, &mut tasks).await {
            break Err(e);
        }
    };
    drain(tasks, cfg).await;
    let mut w = conn.writer.lock().await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
    result
}

/// Next request header; `None` on a clean end (EOF, NBD_CMD_DISC, shutdown).
/// A bad magic is an error (the stream can't be trusted any more).
/// With `idle`, a client that sends nothing for that long is let go (`None`).
async fn next_request<R: AsyncRead + Unpin>(
    rd: &mut R,
    stop: &mut watch::Receiver<bool>,
    idle: Option<std::time::Duration>,
) -> io::Result<Option<Request>> {
    let mut hdr = [0u8; REQUEST_LEN];
    let idle_over = async {
        match idle {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => return Ok(None),
        _ = idle_over => {
            tracing::debug!("connection idle for {idle:?}: closing");
            return Ok(None);
        }
        r = rd.read_exact(&mut hdr) => match r {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        },
    }
    let req =
        parse_request_header(&hdr).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((req.cmd != CMD_DISC).then_some(req))
}

/// Take the request's permits, read its payload, then either spawn it or
/// answer with its validation error.
async fn admit<R, W>(
    conn: &Arc<Conn<W>>,
    rd: &mut R,
    req: Request,
    state: &TransmissionState,
    limits: &Limits,
    tasks: &mut JoinSet<io::Result<()>>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let slot = limits
        .slots
        .clone()
        .acquire_owned()
        .await
        .map_err(io::Error::other)?;
    let verdict = validate_request(&req, state);
    let bytes = match req.cmd {
        CMD_READ | CMD_WRITE if req.len <= MAX_PAYLOAD => Some(
            limits
                .budget
                .clone()
                .acquire_many_owned(req.len)
                .await
                .map_err(io::Error::other)?,
        ),
        _ => None,
    };
    let payload = match read_payload(rd, &req).await {
        Ok(p) => p,
        Err(e) => {
            if let Err(v) = &verdict {
                let _ = send_error(conn, req.cookie, v.errno(), &v.to_string()).await;
            }
            return Err(e);
        }
    };
    let held = Held {
        _slot: slot,
        _bytes: bytes,
    };
    match verdict {
        Ok(()) => {
            tasks.spawn(handle(conn.clone(), req, payload, held));
            Ok(())
        }
        Err(e) => {
            debug!("rejecting request {req:?}: {e}");
            send_error(conn, req.cookie, e.errno(), &e.to_string()).await
        }
    }
}

/// Wait for in-flight requests, at most `drain_timeout`, then abort the rest.
async fn drain(mut tasks: JoinSet<io::Result<()>>, cfg: &ServerConfig) {
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(cfg.drain_timeout, all).await.is_err() {
        debug!("drain timed out; aborting in-flight requests");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Read the WRITE payload that follows a header. Oversized payloads can't be
/// skipped safely, so they end the connection.
async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, req: &Request) -> io::Result<Vec<u8>> {
    let n = req.payload_len();
    if n == 0 {
        return Ok(Vec::new());
    }
    if n > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "write payload too large",
        ));
    }
    let mut buf = vec![0u8; n as usize];
    rd.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Run a blocking export call off the async threads. A panic becomes EIO.
async fn blocking<T, F>(export: &Arc<dyn Export>, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce(&dyn Export) -> io::Result<T> + Send + 'static,
{
    let export = export.clone();
    tokio::task::spawn_blocking(move || f(export.as_ref()))
        .await
        .map_err(|e| io::Error::other(format!("export task failed: {e}")))?
}

async fn handle<W>(conn: Arc<Conn<W>>, req: Request, payload: Vec<u8>, held: Held) -> io::Result<()>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (off, len) = (req.offset, req.len);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let result = match req.cmd {
        CMD_READ => return read(&conn, req).await.map(|_| drop(held)),
        CMD_BLOCK_STATUS => return block_status(&conn, req).await,
        CMD_WRITE => blocking(&conn.export, move |e| e.write_at(&payload, off)).await,
        CMD_FLUSH => blocking(&conn.export, |e| e.flush()).await,
        CMD_TRIM => blocking(&conn.export, move |e| e.trim(off, len)).await,
        CMD_WRITE_ZEROES => {
            let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
            blocking(&conn.export, move |e| e.write_zeroes(off, len, may_trim)).await
        }
        _ => Err(io::Error::from(io::ErrorKind::InvalidInput)),
    };
    let result = match result {
        Ok(()) if fua && req.cmd != CMD_FLUSH => blocking(&conn.export, |e| e.flush()).await,
        other => other,
    };
    match result {
        Ok(()) => send(&conn, &[&encode_simple_reply(0, req.cookie)]).await,
        Err(e) => send_error(&conn, req.cookie, errno_from_io(&e), &e.to_string()).await,
    }
}

async fn send<W: AsyncWrite + Unpin>(conn: &Conn<W>, parts: &[&[u8]]) -> io::Result<()> {
    let mut w = conn.writer.lock().await;
    for p in parts {
        w.write_all(p).await?;
    }
    w.flush().await
}

/// Error reply: a structured ERROR chunk if negotiated, else a simple reply.
async fn send_error<W: AsyncWrite + Unpin>(
    conn: &Conn<W>,
    cookie: u64,
    errno: u32,
    msg: &str,
) -> io::Result<()> {
    if !conn.structured {
        return send(conn, &[&encode_simple_reply(errno, cookie)]).await;
    }
    let chunk =
        encode_error_chunk(REPLY_FLAG_DONE, cookie, errno, msg).map_err(io::Error::other)?;
    send(conn, &[&chunk]).await
}

/// One piece of a structured READ reply.
enum Piece {
    Data(u64, Vec<ReadPart>),
    Hole(u64, u32),
}

async fn read<W: AsyncWrite + Unpin>(conn: &Conn<W>, req: Request) -> io::Result<()> {
    let (off, len) = (req.offset, req.len);
    if !conn.structured {
        // From memory on this thread when the export can; else on the blocking pool.
        let now = conn
            .export
            .read_parts_now(off, len)
            .map(|r| r.and_then(|p| exact(p, len)));
        let parts = match now {
            Some(r) => r,
            None => blocking(&conn.export, move |e| exact(e.read_parts(off, len)?, len)).await,
        };
        return match parts {
            Ok(parts) => {
                let mut w = conn.writer.lock().await;
                send_data(&mut w, &encode_simple_reply(0, req.cookie), &parts).await
            }
            Err(e) => send_error(conn, req.cookie, errno_from_io(&e), "").await,
        };
    }
    let df = req.flags & CMD_FLAG_DF != 0;
    let now = read_pieces(conn.export.as_ref(), off, len, df, true);
    let pieces = match now {
        Some(r) => r,
        None => {
            blocking(&conn.export, move |e| {
                read_pieces(e, off, len, df, false)
                    .unwrap_or_else(|| Err(io::Error::other("no answer")))
            })
            .await
        }
    };
    match pieces {
        Ok(p) => send_pieces(conn, req.cookie, p).await,
        Err(e) => send_error(conn, req.cookie, errno_from_io(&e), &e.to_string()).await,
    }
}

/// Read `[off, off+len)` as data and hole pieces (holes only where the
/// export reports STATE_ZERO; one data piece when `df`). With `now`, only
/// from memory (`read_parts_now`): `None` when the export would block.
/// Without `now`, never `None`.
fn read_pieces(
    e: &dyn Export,
    off: u64,
    len: u32,
    df: bool,
    now: bool,
) -> Option<io::Result<Vec<Piece>>> {
    let status = match (df, now) {
        (true, _) => Ok(vec![(len, 0)]),
        (false, true) => e.block_status_now(off, len)?,
        (false, false) => e.block_status(off, len),
    };
    let extents = status.unwrap_or_else(|_| vec![(len, 0)]);
    let end = off.saturating_add(len.into());
    let mut pieces = Vec::new();
    let mut pos = off;
    let rest = (end > off).then_some((u32::MAX, 0));
    for (elen, flags) in extents.into_iter().chain(rest) {
        let n = u64::from(elen).min(end - pos);
        if n == 0 {
            break;
        }
        let n32 = u32::try_from(n).unwrap_or(u32::MAX); // n <= len
        if flags & STATE_ZERO != 0 {
            pieces.push(Piece::Hole(pos, n32));
        } else {
            let parts = match now {
                true => e.read_parts_now(pos, n32)?,
                false => e.read_parts(pos, n32),
            };
            match parts.and_then(|p| exact(p, n32)) {
                Ok(p) => pieces.push(Piece::Data(pos, p)),
                Err(err) => return Some(Err(err)),
            }
        }
        pos += n;
    }
    Some(Ok(pieces))
}

/// Read parts, checked to cover exactly `len` bytes: a reply must carry the length it announces.
fn exact(parts: Vec<ReadPart>, len: u32) -> io::Result<Vec<ReadPart>> {
    if parts.iter().map(ReadPart::len).sum::<usize>() != len as usize {
        return Err(io::Error::other(
            "the export returned a read of the wrong length",
        ));
    }
    Ok(parts)
}

/// Most buffers handed to one `writev`.
const MAX_IOV: usize = 256;

/// Write `head` and then `parts` straight to the socket: whatever the buffered writer holds
/// goes first, then one `writev` per [`MAX_IOV`] slices, so shared buffers are never copied
/// into the writer's buffer.
async fn send_data<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    head: &[u8],
    parts: &[ReadPart],
) -> io::Result<()> {
    w.flush().await?;
    let mut slices: Vec<io::IoSlice<'_>> = Vec::with_capacity(parts.len() + 1);
    slices.push(io::IoSlice::new(head));
    slices.extend(
        parts
            .iter()
            .flat_map(ReadPart::slices)
            .filter(|s| !s.is_empty())
            .map(io::IoSlice::new),
    );
    let inner = w.get_mut();
    let mut rest: &mut [io::IoSlice<'_>] = &mut slices;
    while !rest.is_empty() {
        let take = rest.len().min(MAX_IOV);
        let n = inner.write_vectored(&rest[..take]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut rest, n);
    }
    inner.flush().await
}

async fn send_pieces<W: AsyncWrite + Unpin>(
    conn: &Conn<W>,
    cookie: u64,
    pieces: Vec<Piece>,
) -> io::Result<()> {
    let mut w = conn.writer.lock().await;
    let count = pieces.len();
    if count == 0 {
        w.write_all(&encode_none_chunk(cookie)).await?;
    }
    for (i, piece) in pieces.into_iter().enumerate() {
        let flags = if i + 1 == count { REPLY_FLAG_DONE } else { 0 };
        match piece {
            Piece::Data(off, parts) => {
                let dlen = parts.iter().map(ReadPart::len).sum::<usize>();
                let dlen = u32::try_from(dlen).map_err(io::Error::other)?;
                let hdr = encode_offset_data_header(flags, cookie, off, dlen)
                    .map_err(io::Error::other)?;
                send_data(&mut w, &hdr, &parts).await?;
            }
            Piece::Hole(off, n) => {
                let chunk = encode_offset_hole(flags, cookie, off, n).map_err(io::Error::other)?;
                w.write_all(&chunk).await?;
            }
        }
    }
    w.flush().await
}

async fn block_status<W: AsyncWrite + Unpin>(conn: &Conn<W>, req: Request) -> io::Result<()> {
    let (off, len) = (req.offset, req.len);
    let Some(id) = conn.base_allocation else {
        return send_error(conn, req.cookie, EINVAL, "no metadata context").await;
    };
    let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
    match blocking(&conn.export, move |e| e.block_status(off, len)).await {
        Ok(ext) => {
            let ext = sanitize_extents(ext, len, req_one);
            let chunk = encode_block_status(REPLY_FLAG_DONE, req.cookie, id, &ext)
                .map_err(io::Error::other)?;
            send(conn, &[&chunk]).await
        }
        Err(e) => send_error(conn, req.cookie, errno_from_io(&e), &e.to_string()).await,
    }
}

/// Make backend extents valid on the wire: non-zero lengths, total within
/// `len`, bounded count, one extent for REQ_ONE, never empty.
pub(crate) fn sanitize_extents(ext: Vec<(u32, u32)>, len: u32, req_one: bool) -> Vec<(u32, u32)> {
    let max = if req_one { 1 } else { MAX_REPLY_EXTENTS };
    let mut left = len;
    let mut out = Vec::new();
    for (elen, flags) in ext {
        let n = elen.min(left);
        if n == 0 {
            continue;
        }
        out.push((n, flags));
        left -= n;
        if left == 0 || out.len() >= max {
            break;
        }
    }
    if out.is_empty() {
        out.push((len.max(1), 0));
    }
    out
}
