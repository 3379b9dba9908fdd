//! Async NBD client: connect by URI, handshake, then many requests in
//! flight over one connection.
//!
//! Invariants:
//! - Each request gets a fresh cookie and is registered in `pending` before
//!   its bytes are written; one reader task owns the socket's read half and
//!   completes requests by cookie. Writes of a request happen under one lock.
//! - At most `max_in_flight` requests are outstanding (semaphore).
//! - Replies are validated: unknown cookie, bad magic, unknown chunk type,
//!   data outside the requested range or a short READ reply are protocol
//!   errors; a protocol error or EOF fails every pending request and every
//!   later one (`ClientError::Disconnected`).
//! - Reply payloads are capped (`proto::MAX_PAYLOAD`) before allocation.

mod handshake;
mod reader;

use reader::Coverage;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{oneshot, Mutex, Semaphore};
use tokio::task::JoinHandle;

use super::proto::*;
use super::uri::{parse_uri, NbdUri};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Proto(#[from] ProtoError),
    #[error("bad URI: {0}")]
    Uri(String),
    #[error("server refused option {opt} with reply {reply:#x}: {message}")]
    OptionRefused {
        opt: u32,
        reply: u32,
        message: String,
    },
    #[error("server error {errno}: {message}")]
    Server { errno: u32, message: String },
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    #[error("connection lost: {0}")]
    Disconnected(String),
}

/// Handshake choices.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub structured_replies: bool,
    /// Contexts to select, e.g. `base:allocation`, `qemu:dirty-bitmap:NAME`.
    pub meta_contexts: Vec<String>,
    pub max_in_flight: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            structured_replies: true,
            meta_contexts: vec![CONTEXT_BASE_ALLOCATION.to_string()],
            max_in_flight: 16,
        }
    }
}

/// One block-status extent, absolute offset included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u32,
    pub flags: u32,
}

enum OpKind {
    Read {
        offset: u64,
        /// The caller's buffer, its length the request's; `None` only while the reader task
        /// is filling part of it straight from the socket.
        buf: Option<BytesMut>,
        /// Parts of `buf` the replies have filled so far.
        covered: Coverage,
    },
    Status {
        by_id: BTreeMap<u32, Vec<(u32, u32)>>,
    },
    Plain,
}

enum Output {
    Data(BytesMut),
    Status(BTreeMap<u32, Vec<(u32, u32)>>),
    Done,
}

struct Op {
    kind: OpKind,
    error: Option<(u32, String)>,
    tx: oneshot::Sender<Result<Output, ClientError>>,
    /// The request's in-flight slot, free again once its reply is complete (whether or not
    /// the caller has taken it yet).
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

#[derive(Default)]
struct Pending {
    ops: HashMap<u64, Op>,
    closed: Option<String>,
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

struct Shared {
    writer: Mutex<Writer>,
    pending: StdMutex<Pending>,
    next_cookie: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connected NBD client. Methods take `&self`; share it in an `Arc` to
/// issue requests from many tasks.
pub struct Client {
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    max_in_flight: u32,
    reader: JoinHandle<()>,
    size: u64,
    flags: u16,
    structured: bool,
    contexts: Vec<(u32, String)>,
    block_size: Option<(u32, u32, u32)>,
}

impl Client {
    /// Connect to `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST:PORT/EXPORT`.
    pub async fn connect(uri: &str, opts: &ConnectOptions) -> Result<Client, ClientError> {
        match parse_uri(uri).map_err(ClientError::Uri)? {
            NbdUri::Unix { socket, export } => {
                Client::from_stream(UnixStream::connect(socket).await?, &export, opts).await
            }
            NbdUri::Tcp { host, port, export } => {
                let s = TcpStream::connect((host.as_str(), port)).await?;
                s.set_nodelay(true)?;
                Client::from_stream(s, &export, opts).await
            }
        }
    }

    /// Handshake over an already connected stream.
    pub async fn from_stream<S>(
        mut stream: S,
        export: &str,
        opts: &ConnectOptions,
    ) -> Result<Client, ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let neg = handshake::handshake(&mut stream, export, opts).await?;
        let (rd, wr) = tokio::io::split(stream);
        let shared = Arc::new(Shared {
            writer: Mutex::new(Box::new(wr)),
            pending: StdMutex::new(Pending::default()),
            next_cookie: AtomicU64::new(1),
        });
        let ids: Vec<u32> = neg.contexts.iter().map(|c| c.0).collect();
        let reader = tokio::spawn(reader::reader_task(shared.clone(), BufReader::new(rd), ids));
        let max = u32::try_from(opts.max_in_flight.clamp(1, 1024)).unwrap_or(16);
        Ok(Client {
            shared,
            slots: Arc::new(Semaphore::new(max as usize)),
            max_in_flight: max,
            reader,
            size: neg.size,
            flags: neg.flags,
            structured: neg.structured,
            contexts: neg.contexts,
            block_size: neg.block_size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    /// Transmission flags as sent by the server.
    pub fn flags(&self) -> u16 {
        self.flags
    }
    pub fn is_read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }
    pub fn can_multi_conn(&self) -> bool {
        self.flags & FLAG_CAN_MULTI_CONN != 0
    }
    pub fn structured_replies(&self) -> bool {
        self.structured
    }
    /// Negotiated metadata contexts: (id, name).
    pub fn meta_contexts(&self) -> &[(u32, String)] {
        &self.contexts
    }
    /// (minimum, preferred, maximum) if the server sent NBD_INFO_BLOCK_SIZE.
    pub fn block_size(&self) -> Option<(u32, u32, u32)> {
        self.block_size
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        check_cap("read length", len.into(), MAX_PAYLOAD)?;
        Ok(self
            .read_into(offset, BytesMut::zeroed(len as usize))
            .await?
            .into())
    }

    /// Read `buf.len()` bytes at `offset` straight into `buf` (the reply data is received into
    /// it, no copy) and hand it back. Every byte is written by the reply or the request fails.
    pub async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, ClientError> {
        self.send_read(offset, buf).await?.data().await
    }

    /// Write a READ request for `buf.len()` bytes at `offset` and return without waiting for
    /// the reply: a caller sends several, then awaits each (no task per request).
    pub async fn send_read(&self, offset: u64, buf: BytesMut) -> Result<PendingRead, ClientError> {
        let len = u32::try_from(buf.len()).map_err(|_| ProtoError::Invalid("read length"))?;
        check_cap("read length", len.into(), MAX_PAYLOAD)?;
        let kind = OpKind::Read {
            offset,
            buf: Some(buf),
            covered: Coverage::default(),
        };
        Ok(PendingRead(
            self.send(CMD_READ, 0, offset, len, &[], kind).await?,
        ))
    }

    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        self.write_flags(offset, data, 0).await
    }

    /// Write with command flags (e.g. `CMD_FLAG_FUA`).
    pub async fn write_flags(
        &self,
        offset: u64,
        data: &[u8],
        flags: u16,
    ) -> Result<(), ClientError> {
        if self.is_read_only() {
            return Err(ClientError::Unsupported("export is read-only"));
        }
        let len = u32::try_from(data.len()).map_err(|_| ProtoError::Overflow("write length"))?;
        check_cap("write length", len.into(), MAX_PAYLOAD)?;
        self.send(CMD_WRITE, flags, offset, len, data, OpKind::Plain)
            .await?
            .output()
            .await
            .map(drop)
    }

    pub async fn flush(&self) -> Result<(), ClientError> {
        if self.flags & FLAG_SEND_FLUSH == 0 {
            return Err(ClientError::Unsupported("server does not support flush"));
        }
        self.send(CMD_FLUSH, 0, 0, 0, &[], OpKind::Plain)
            .await?
            .output()
            .await
            .map(drop)
    }

    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        if self.flags & FLAG_SEND_TRIM == 0 {
            return Err(ClientError::Unsupported("server does not support trim"));
        }
        self.send(CMD_TRIM, 0, offset, len, &[], OpKind::Plain)
            .await?
            .output()
            .await
            .map(drop)
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
    ) -> Result<(), ClientError> {
        if self.flags & FLAG_SEND_WRITE_ZEROES == 0 {
            return Err(ClientError::Unsupported(
                "server does not support write zeroes",
            ));
        }
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        self.send(CMD_WRITE_ZEROES, flags, offset, len, &[], OpKind::Plain)
            .await?
            .output()
            .await
            .map(drop)
    }

    /// WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO (the server must offer it): Ok(false) when the
    /// server says zeroing would be slow (ENOTSUP), so the caller picks another way.
    pub async fn write_zeroes_fast(&self, offset: u64, len: u32) -> Result<bool, ClientError> {
        if self.flags & FLAG_SEND_FAST_ZERO == 0 || self.flags & FLAG_SEND_WRITE_ZEROES == 0 {
            return Err(ClientError::Unsupported("server does not offer fast zero"));
        }
        let r = self
            .send(
                CMD_WRITE_ZEROES,
                CMD_FLAG_FAST_ZERO,
                offset,
                len,
                &[],
                OpKind::Plain,
            )
            .await?
            .output()
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(ClientError::Server { errno, .. }) if errno == ENOTSUP => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Block status for every negotiated context, keyed by context name.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<BTreeMap<String, Vec<Extent>>, ClientError> {
        if self.contexts.is_empty() {
            return Err(ClientError::Unsupported("no metadata context negotiated"));
        }
        let kind = OpKind::Status {
            by_id: BTreeMap::new(),
        };
        let Output::Status(by_id) = self
            .send(CMD_BLOCK_STATUS, 0, offset, len, &[], kind)
            .await?
            .output()
            .await?
        else {
            return Err(ProtoError::Invalid("wrong reply kind").into());
        };
        let mut out = BTreeMap::new();
        for (id, name) in &self.contexts {
            let raw = by_id.get(id).ok_or(ProtoError::Invalid(
                "context missing from block status reply",
            ))?;
            out.insert(name.clone(), absolute_extents(offset, raw));
        }
        Ok(out)
    }

    /// Block status of one negotiated context.
    pub async fn block_status_for(
        &self,
        offset: u64,
        len: u32,
        context: &str,
    ) -> Result<Vec<Extent>, ClientError> {
        let mut all = self.block_status(offset, len).await?;
        all.remove(context)
            .ok_or(ClientError::Unsupported("context was not negotiated"))
    }

    /// Wait for in-flight requests, send NBD_CMD_DISC and close.
    pub async fn disconnect(mut self) -> Result<(), ClientError> {
        let _all = self
            .slots
            .acquire_many(self.max_in_flight)
            .await
            .map_err(io::Error::other)?;
        let req = Request {
            flags: 0,
            cmd: CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        let sent = {
            let mut w = self.shared.writer.lock().await;
            let r = w.write_all(&req.encode()).await;
            let r = match r {
                Ok(()) => w.flush().await,
                e => e,
            };
            let _ = w.shutdown().await;
            r
        };
        if tokio::time::timeout(Duration::from_secs(5), &mut self.reader)
            .await
            .is_err()
        {
            self.reader.abort(); // Drop would do it too
        }
        sent.map_err(ClientError::from)
    }

    /// Register and write one request; its reply arrives through the returned [`Sent`].
    async fn send(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        kind: OpKind,
    ) -> Result<Sent, ClientError> {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let cookie = self.shared.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.shared.lock();
            if let Some(why) = &p.closed {
                return Err(ClientError::Disconnected(why.clone()));
            }
            p.ops.insert(
                cookie,
                Op {
                    kind,
                    error: None,
                    tx,
                    _slot: Some(slot),
                },
            );
        }
        let req = Request {
            flags,
            cmd,
            cookie,
            offset,
            len,
        };
        let written = async {
            let mut w = self.shared.writer.lock().await;
            w.write_all(&req.encode()).await?;
            w.write_all(payload).await?;
            w.flush().await
        };
        if let Err(e) = written.await {
            self.shared.lock().ops.remove(&cookie);
            return Err(e.into());
        }
        Ok(Sent { rx })
    }
}

/// A request on the wire, waiting for its reply.
struct Sent {
    rx: oneshot::Receiver<Result<Output, ClientError>>,
}

impl Sent {
    async fn output(self) -> Result<Output, ClientError> {
        self.rx
            .await
            .map_err(|_| ClientError::Disconnected("reader ended".into()))?
    }
}

/// A READ sent with [`Client::send_read`]: await [`PendingRead::data`] for its bytes.
pub struct PendingRead(Sent);

impl PendingRead {
    pub async fn data(self) -> Result<BytesMut, ClientError> {
        match self.0.output().await? {
            Output::Data(d) => Ok(d),
            _ => Err(ProtoError::Invalid("wrong reply kind").into()),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn absolute_extents(offset: u64, raw: &[(u32, u32)]) -> Vec<Extent> {
    let mut pos = offset;
    raw.iter()
        .map(|&(len, flags)| {
            let e = Extent {
                offset: pos,
                len,
                flags,
            };
            pos = pos.saturating_add(len.into());
            e
        })
        .collect()
}
