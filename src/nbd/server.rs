//! Async NBD server: listener loop, connection limit, shutdown and the
//! fixed-newstyle handshake. The transmission phase is in [`transmit`].
//!
//! Invariants:
//! - At most `max_connections` connections are served at once (a semaphore
//!   permit is taken before `accept` and held by the connection task), and at
//!   most `max_per_client` from one TCP address: a connection over that is
//!   closed at once, so one client cannot take every slot and lock others out.
//! - Each connection is its own task; a failure in one (bad peer, I/O
//!   error, panic in an `Export`) never stops the listener or other clients.
//! - The handshake is bounded in time (`handshake_timeout`) and in count of
//!   options (`MAX_OPTIONS`); option data is capped before allocation. With
//!   `idle_timeout`, a connection that sends no request for that long while
//!   none is in flight is closed (off by default: a VM booted from an export
//!   may leave its disk idle for hours).
//! - After `ShutdownHandle::shutdown`, no new connection is accepted, and
//!   connections stop reading requests, finish in-flight ones (bounded by
//!   `drain_timeout`) and close; `serve_*` returns once all have ended.

mod transmit;

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::export::Export;
use super::proto::*;

/// Most options accepted in one handshake before the server hangs up.
const MAX_OPTIONS: usize = 128;
/// Metadata context id we hand out for `base:allocation`.
const BASE_ALLOCATION_ID: u32 = 1;

/// Tunables; `Default` gives sane values.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub max_connections: usize,
    /// Connections served at once from one TCP address (unix sockets: the global limit).
    pub max_per_client: usize,
    /// Close a connection idle in transmission (no request, none in flight) this long.
    pub idle_timeout: Option<Duration>,
    /// Requests processed concurrently per connection.
    pub max_in_flight: usize,
    /// Payload bytes (READ + WRITE) buffered per connection.
    pub max_buffered_bytes: u32,
    pub handshake_timeout: Duration,
    /// How long a stopping connection waits for in-flight requests.
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 64,
            max_per_client: 16,
            idle_timeout: None,
            max_in_flight: 16,
            max_buffered_bytes: 2 * MAX_PAYLOAD,
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Stops a running [`Server`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

/// Serves a fixed set of named exports ("" is the default export).
pub struct Server {
    exports: Arc<BTreeMap<String, Arc<dyn Export>>>,
    config: ServerConfig,
    shutdown: Arc<watch::Sender<bool>>,
}

/// What a successful handshake leaves for the transmission phase.
pub(crate) struct Negotiated {
    export: Arc<dyn Export>,
    structured: bool,
    flags: u16,
    /// Id of `base:allocation` if the client selected it for this export.
    base_allocation: Option<u32>,
}

/// A connection and the address it came from (none for a unix socket).
type Accepted<S> = (S, Option<std::net::IpAddr>);

trait Listen {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_one(
        &self,
    ) -> impl std::future::Future<Output = io::Result<Accepted<Self::Stream>>> + Send;
}

impl Listen for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> io::Result<Accepted<Self::Stream>> {
        let s = self.accept().await?.0;
        grow_send_buffer(&s);
        Ok((s, None))
    }
}

/// Bytes a unix connection may queue towards its client.
const UNIX_SEND_BUFFER: libc::c_int = 4 << 20;

/// A unix socket queues at most its sender's buffer (208 KiB by default, `net.core.wmem_default`),
/// so a 1 MiB reply wakes the connection's writer five times. 4 MiB halves the context
/// switches of a sequential copy. Root may go past `net.core.wmem_max` (SO_SNDBUFFORCE);
/// anyone else gets what that limit allows. Best effort: a failure keeps the default.
fn grow_send_buffer(s: &tokio::net::UnixStream) {
    use std::os::fd::AsRawFd;
    let n = UNIX_SEND_BUFFER;
    let set = |opt| {
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int; the fd is open.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const n).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    if set(libc::SO_SNDBUFFORCE) != 0 {
        set(libc::SO_SNDBUF);
    }
}

impl Listen for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> io::Result<Accepted<Self::Stream>> {
        let (s, peer) = self.accept().await?;
        s.set_nodelay(true)?;
        Ok((s, Some(peer.ip())))
    }
}

/// Connections open per client address.
#[derive(Default)]
struct PerClient(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection counted for its address; dropping it uncounts it.
struct ClientSlot {
    clients: Arc<PerClient>,
    ip: std::net::IpAddr,
}

impl PerClient {
    /// A slot for a connection from `ip`, or None when it already has `max` open.
    fn take(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<ClientSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= max.max(1) {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            clients: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut m = self.clients.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Server {
    pub fn new(
        config: ServerConfig,
        exports: impl IntoIterator<Item = (String, Arc<dyn Export>)>,
    ) -> Self {
        let (tx, _rx) = watch::channel(false);
        Server {
            exports: Arc::new(exports.into_iter().collect()),
            config,
            shutdown: Arc::new(tx),
        }
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    pub async fn serve_unix(&self, listener: UnixListener) -> io::Result<()> {
        self.serve(listener).await
    }

    pub async fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        self.serve(listener).await
    }

    async fn serve<L: Listen>(&self, listener: L) -> io::Result<()> {
        let limit = Arc::new(Semaphore::new(self.config.max_connections.max(1)));
        let clients = Arc::new(PerClient::default());
        let mut stop = self.shutdown.subscribe();
        let mut conns = JoinSet::new();
        loop {
            while conns.try_join_next().is_some() {}
            let permit = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                p = limit.clone().acquire_owned() => p.map_err(io::Error::other)?,
            };
            let stream = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                s = listener.accept_one() => s,
            };
            let (stream, peer) = match stream {
                Ok(s) => s,
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let slot = match peer {
                Some(ip) => match clients.take(ip, self.config.max_per_client) {
                    Some(slot) => Some(slot),
                    None => {
                        debug!(
                            "{ip} has {} connections open: closing a new one",
                            self.config.max_per_client
                        );
                        continue; // drops the stream and the permit
                    }
                },
                None => None,
            };
            let (exports, config, stop) = (
                self.exports.clone(),
                self.config.clone(),
                self.shutdown.subscribe(),
            );
            conns.spawn(async move {
                serve_connection(stream, &exports, &config, stop).await;
                drop((permit, slot));
            });
        }
        while conns.join_next().await.is_some() {}
        Ok(())
    }
}

async fn serve_connection<S>(
    stream: S,
    exports: &BTreeMap<String, Arc<dyn Export>>,
    config: &ServerConfig,
    stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let hs = tokio::time::timeout(
        config.handshake_timeout,
        handshake(exports, &mut rd, &mut wr, &stop),
    );
    let mut stopping = stop.clone();
    // A client idling in the handshake must not delay shutdown.
    let hs = tokio::select! {
        r = hs => r,
        _ = stopping.wait_for(|s| *s) => return debug!("handshake aborted by shutdown"),
    };
    let neg = match hs {
        Ok(Ok(Some(neg))) => neg,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return debug!("handshake failed: {e}"),
        Err(_) => return debug!("handshake timed out"),
    };
    if let Err(e) = transmit::run(neg, rd, wr, stop, config).await {
        debug!("connection ended: {e}");
    }
}

fn invalid(e: ProtoError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Flags sent for an export, given whether structured replies are on.
fn transmission_flags(export: &dyn Export, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
    if export.read_only() {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    if export.can_multi_conn() {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

/// Per-connection option-phase state.
#[derive(Default)]
struct OptState {
    structured: bool,
    no_zeroes: bool,
    /// Export named in the last SET_META_CONTEXT and whether it selected base:allocation.
    meta: Option<(String, bool)>,
}

enum Step {
    Continue,
    Go(Negotiated),
    Close,
}

async fn handshake<R, W>(
    exports: &BTreeMap<String, Arc<dyn Export>>,
    rd: &mut R,
    wr: &mut W,
    stop: &watch::Receiver<bool>,
) -> io::Result<Option<Negotiated>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let hflags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
    wr.write_all(&encode_server_greeting(hflags)).await?;
    wr.flush().await?;
    let mut cflags = [0u8; 4];
    rd.read_exact(&mut cflags).await?;
    let cflags = parse_client_flags(&cflags, hflags).map_err(invalid)?;
    let mut st = OptState {
        no_zeroes: cflags & FLAG_C_NO_ZEROES != 0,
        ..Default::default()
    };
    for _ in 0..MAX_OPTIONS {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        rd.read_exact(&mut hdr).await?;
        let h = parse_option_header(&hdr).map_err(invalid)?;
        let mut data = vec![0u8; h.len as usize];
        rd.read_exact(&mut data).await?;
        if *stop.borrow() && h.opt != OPT_ABORT {
            reply(wr, h.opt, REP_ERR_SHUTDOWN, b"server shutting down").await?;
            return Ok(None);
        }
        let step = handle_option(exports, &mut st, h.opt, &data, wr).await?;
        wr.flush().await?;
        match step {
            Step::Continue => {}
            Step::Go(neg) => return Ok(Some(neg)),
            Step::Close => return Ok(None),
        }
    }
    debug!("too many options, closing");
    Ok(None)
}

async fn reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    wr.write_all(&encode_option_reply(opt, kind, data).map_err(invalid)?)
        .await
}

async fn handle_option<W: AsyncWrite + Unpin>(
    exports: &BTreeMap<String, Arc<dyn Export>>,
    st: &mut OptState,
    opt: u32,
    data: &[u8],
    wr: &mut W,
) -> io::Result<Step> {
    match opt {
        OPT_EXPORT_NAME => {
            let found = parse_export_name(data)
                .ok()
                .and_then(|n| exports.get(&n).map(|e| (n, e)));
            let Some((name, export)) = found else {
                return Ok(Step::Close); // cannot return an error here
            };
            let flags = transmission_flags(export.as_ref(), st.structured);
            wr.write_all(&encode_export_name_reply(
                export.size(),
                flags,
                st.no_zeroes,
            ))
            .await?;
            Ok(Step::Go(negotiated(st, &name, export, flags)))
        }
        OPT_ABORT => {
            let _ = reply(wr, opt, REP_ACK, &[]).await;
            Ok(Step::Close)
        }
        OPT_LIST if !data.is_empty() => invalid_option(wr, opt, "LIST takes no data").await,
        OPT_LIST => {
            for name in exports.keys() {
                reply(
                    wr,
                    opt,
                    REP_SERVER,
                    &encode_rep_server(name).map_err(invalid)?,
                )
                .await?;
            }
            reply(wr, opt, REP_ACK, &[]).await.map(|_| Step::Continue)
        }
        OPT_INFO | OPT_GO => info_or_go(exports, st, opt, data, wr).await,
        OPT_STRUCTURED_REPLY if !data.is_empty() => invalid_option(wr, opt, "takes no data").await,
        OPT_STRUCTURED_REPLY => {
            st.structured = true;
            reply(wr, opt, REP_ACK, &[]).await.map(|_| Step::Continue)
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            meta_context(exports, st, opt, data, wr).await
        }
        _ => {
            reply(wr, opt, REP_ERR_UNSUP, b"unsupported option").await?;
            Ok(Step::Continue)
        }
    }
}

async fn invalid_option<W: AsyncWrite + Unpin>(
    wr: &mut W,
    opt: u32,
    msg: &str,
) -> io::Result<Step> {
    reply(wr, opt, REP_ERR_INVALID, msg.as_bytes()).await?;
    Ok(Step::Continue)
}

fn negotiated(st: &OptState, name: &str, export: &Arc<dyn Export>, flags: u16) -> Negotiated {
    let base = match &st.meta {
        Some((meta_export, true)) if meta_export == name => Some(BASE_ALLOCATION_ID),
        _ => None,
    };
    Negotiated {
        export: export.clone(),
        structured: st.structured,
        flags,
        base_allocation: base,
    }
}

async fn info_or_go<W: AsyncWrite + Unpin>(
    exports: &BTreeMap<String, Arc<dyn Export>>,
    st: &OptState,
    opt: u32,
    data: &[u8],
    wr: &mut W,
) -> io::Result<Step> {
    let Ok(req) = parse_go(data) else {
        return invalid_option(wr, opt, "malformed INFO/GO").await;
    };
    let Some(export) = exports.get(&req.name) else {
        reply(wr, opt, REP_ERR_UNKNOWN, b"no such export").await?;
        return Ok(Step::Continue);
    };
    let flags = transmission_flags(export.as_ref(), st.structured);
    let mut infos = vec![
        Info::Export {
            size: export.size(),
            flags,
        },
        Info::BlockSize {
            min: 1,
            preferred: 4096,
            max: MAX_PAYLOAD,
        },
    ];
    if req.infos.contains(&INFO_NAME) {
        infos.push(Info::Name(req.name.clone()));
    }
    for info in &infos {
        reply(wr, opt, REP_INFO, &encode_info(info).map_err(invalid)?).await?;
    }
    reply(wr, opt, REP_ACK, &[]).await?;
    if opt == OPT_INFO {
        return Ok(Step::Continue);
    }
    Ok(Step::Go(negotiated(st, &req.name, export, flags)))
}

async fn meta_context<W: AsyncWrite + Unpin>(
    exports: &BTreeMap<String, Arc<dyn Export>>,
    st: &mut OptState,
    opt: u32,
    data: &[u8],
    wr: &mut W,
) -> io::Result<Step> {
    let set = opt == OPT_SET_META_CONTEXT;
    if set {
        st.meta = None; // replaced even on failure
    }
    if !st.structured {
        return invalid_option(wr, opt, "structured replies required").await;
    }
    let Ok(req) = parse_meta_request(data) else {
        return invalid_option(wr, opt, "malformed meta context request").await;
    };
    if !exports.contains_key(&req.export) {
        reply(wr, opt, REP_ERR_UNKNOWN, b"no such export").await?;
        return Ok(Step::Continue);
    }
    let wanted = if set {
        req.queries.iter().any(|q| q == CONTEXT_BASE_ALLOCATION)
    } else {
        req.queries.is_empty()
            || req
                .queries
                .iter()
                .any(|q| q == CONTEXT_BASE_ALLOCATION || q == "base:")
    };
    if wanted {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        let payload = encode_meta_context_reply(id, CONTEXT_BASE_ALLOCATION).map_err(invalid)?;
        reply(wr, opt, REP_META_CONTEXT, &payload).await?;
    }
    if set {
        st.meta = Some((req.export, wanted));
    }
    reply(wr, opt, REP_ACK, &[]).await?;
    Ok(Step::Continue)
}
