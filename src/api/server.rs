//! The listeners of `holdfast serve`: TCP (HTTPS on any address that is not loopback), and a
//! unix socket under the repository for local tools. Each connection is HTTP/1.1 (hyper)
//! with bounds a hostile client cannot stretch: headers within [`HEADER_TIMEOUT`] and
//! [`MAX_HEADER_BYTES`], a TLS handshake within [`HEADER_TIMEOUT`], at most
//! [`MAX_CONNECTIONS`] at once.
//!
//! Shutdown (SIGINT/SIGTERM, or the caller's cancel): stop accepting, cancel every job and
//! wait for them (a VM backup tears its read point down and its task record says
//! `cancelled`), then give open connections a moment to finish, and return.

use super::{Service, Shared};
use crate::jobs::vms::{ServiceSettings, VmsFile};
use crate::task::Cancel;
use crate::{Error, Result};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};

/// The default address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8470";
/// A request's headers (and a TLS handshake) must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Headers larger than this are refused (431).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Connections beyond this are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long shutdown waits for jobs to stop (a VM's read point is torn down in seconds).
pub const JOB_STOP_LIMIT: Duration = Duration::from_secs(60);
/// How long shutdown then waits for open requests.
const DRAIN_LIMIT: Duration = Duration::from_secs(3);

/// What `holdfast serve` was asked for (each overrides `[service]` of the config).
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub listen: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// HTTPS even on loopback.
    pub tls: bool,
    pub jobs: Option<usize>,
}

/// Where the service listens, once it does.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Ready {
    /// `http://ADDR` or `https://ADDR`.
    pub url: String,
    pub socket: PathBuf,
    /// The certificate's SHA-256 fingerprint under TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The self-signed certificate was made at this start.
    pub made_certificate: bool,
    pub jobs: usize,
}

/// The unix socket of a repository's service.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("holdfast.sock")
}

fn settings(config: &Path, o: &Options) -> Result<ServiceSettings> {
    let mut s = VmsFile::load(config)?.service;
    if let Some(l) = &o.listen {
        s.listen = Some(l.clone());
    }
    if o.tls_cert.is_some() || o.tls_key.is_some() {
        s.tls_cert = o.tls_cert.clone();
        s.tls_key = o.tls_key.clone();
    }
    if let Some(j) = o.jobs {
        s.jobs = Some(j);
    }
    if s.jobs == Some(0) {
        return Err(Error::usage("--jobs must be at least 1"));
    }
    Ok(s)
}

fn parse_listen(text: &str) -> Result<SocketAddr> {
    text.parse().map_err(|_| {
        Error::usage(format!(
            "--listen {text:?}: give an address and port, like 127.0.0.1:8470, [::1]:8470 or \
             0.0.0.0:8470 (HTTPS)"
        ))
    })
}

/// Claim the unix socket path: refuse while another service answers there, remove a stale one.
fn claim_socket(path: &Path) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::busy(
            "service",
            format!(
                "another holdfast serve runs on this repository (its socket {} answers)",
                path.display()
            ),
        ));
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(
            format!("remove the stale socket {}", path.display()),
            e,
        )),
    }
}

/// Run the service on repository `dir` until `stop` fires; `ready` hears where it listens.
pub fn run(
    dir: PathBuf,
    config: PathBuf,
    opts: Options,
    stop: Cancel,
    ready: impl FnOnce(&Ready),
) -> Result<()> {
    let settings = settings(&config, &opts)?;
    // Secrets others can read: refused before anything listens (the store's key file, the
    // users and their hashes, the TLS key).
    let secrets = [
        Some(dir.join(crate::repo::keys::KEYFILE)),
        Some(crate::auth::users_path(&config)),
        settings.tls_key.clone(),
        Some(dir.join("tls").join("key.pem")),
    ];
    for p in secrets.iter().flatten().filter(|p| p.exists()) {
        crate::repo::keys::check_secret_file(p)?;
    }
    crate::repo::Repo::open(&dir)?; // a clear error now, not on the first request
    let addr = parse_listen(settings.listen.as_deref().unwrap_or(DEFAULT_LISTEN))?;
    let given_cert = settings.tls_cert.is_some() || settings.tls_key.is_some();
    let tls = if opts.tls || given_cert || !addr.ip().is_loopback() {
        let names = vec![addr.ip().to_string()];
        let t = super::tls::load(
            &dir,
            settings.tls_cert.as_deref(),
            settings.tls_key.as_deref(),
            &names,
        )?;
        Some(t)
    } else {
        None
    };
    let socket = socket_path(&dir);
    claim_socket(&socket)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(crate::sys::workers().clamp(2, 8))
        .thread_name("holdfast-http")
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the service runtime", e))?;
    let service: Shared = Arc::new(Service::new(dir, config, settings, tls.is_some()));
    let result = rt.block_on(serve(
        service.clone(),
        addr,
        tls,
        socket.clone(),
        stop,
        ready,
    ));
    // Requests still open past the drain limit are dropped with the runtime.
    rt.shutdown_timeout(Duration::from_millis(500));
    let _ = std::fs::remove_file(&socket);
    result
}

async fn serve(
    s: Shared,
    addr: SocketAddr,
    tls: Option<super::tls::Tls>,
    socket: PathBuf,
    stop: Cancel,
    ready: impl FnOnce(&Ready),
) -> Result<()> {
    let tcp = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (another service listens there: pick another with --listen)"
        } else {
            ""
        };
        Error::io(format!("listen on {addr}{hint}"), e)
    })?;
    let unix = tokio::net::UnixListener::bind(&socket)
        .map_err(|e| Error::io(format!("listen on {}", socket.display()), e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("chmod {}", socket.display()), e))?;
    }
    let local = tcp
        .local_addr()
        .map_err(|e| Error::io("read the bound address", e))?;
    ready(&Ready {
        url: format!("{}://{local}", if tls.is_some() { "https" } else { "http" }),
        socket: socket.clone(),
        fingerprint: tls.as_ref().map(|t| t.fingerprint.clone()),
        made_certificate: tls.as_ref().is_some_and(|t| t.made),
        jobs: s.slots.limit(),
    });
    let router = super::router(s.clone());
    let (down_tx, down_rx) = watch::channel(false);
    let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.config));
    let tcp_loop = tokio::spawn(accept_tcp(
        tcp,
        acceptor,
        router.clone(),
        conns.clone(),
        down_rx.clone(),
    ));
    let unix_loop = tokio::spawn(accept_unix(unix, router, conns.clone(), down_rx.clone()));
    let scheduler = {
        let s = s.clone();
        std::thread::Builder::new()
            .name("holdfast-schedule".into())
            .spawn(move || super::schedule::run(s))
            .map_err(|e| Error::io("start the scheduler", e))?
    };

    let by = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            stop.wait();
            stop.by().unwrap_or_else(|| "a signal".into())
        })
        .await
        .map_err(Error::internal)?
    };
    tracing::info!("stopping ({by})");
    let _ = down_tx.send(true);
    s.shutdown.cancel(&by);
    // The scheduler starts nothing more once shutdown fired; it ends within a second.
    let _ = tokio::task::spawn_blocking(move || scheduler.join()).await;
    s.jobs.cancel_all(&format!("service shutdown ({by})"));
    let s2 = s.clone();
    let all_stopped = tokio::task::spawn_blocking(move || s2.jobs.join_all(JOB_STOP_LIMIT))
        .await
        .unwrap_or(false);
    if !all_stopped {
        tracing::warn!(
            "jobs still running after {} s: {:?}",
            JOB_STOP_LIMIT.as_secs(),
            s.jobs.ids()
        );
    }
    let _ = tcp_loop.await;
    let _ = unix_loop.await;
    // Connections end their current request and close; wait for that, briefly.
    let drained =
        tokio::time::timeout(DRAIN_LIMIT, conns.acquire_many(MAX_CONNECTIONS as u32)).await;
    if drained.is_err() {
        tracing::info!("closing connections still open");
    }
    if all_stopped {
        Ok(())
    } else {
        Err(Error::busy(
            "service",
            "jobs did not stop in time; their task records say where they were",
        ))
    }
}

async fn accept_tcp(
    l: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: axum::Router,
    conns: Arc<Semaphore>,
    mut down: watch::Receiver<bool>,
) {
    loop {
        let (stream, addr) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = down.changed() => return,
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            continue; // over the limit: the connection closes as it is dropped
        };
        let _ = stream.set_nodelay(true);
        let peer = super::auth::Peer {
            addr: Some(addr),
            uid: None,
        };
        let (router, down, tls) = (router.clone(), down.clone(), tls.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => connection(stream, peer, router, down).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => connection(s, peer, router, down).await,
                        Ok(Err(e)) => tracing::debug!("TLS handshake with {addr}: {e}"),
                        Err(_) => tracing::debug!("TLS handshake with {addr}: timed out"),
                    }
                }
            }
        });
    }
}

async fn accept_unix(
    l: tokio::net::UnixListener,
    router: axum::Router,
    conns: Arc<Semaphore>,
    mut down: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = l.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = down.changed() => return,
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            continue;
        };
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        let peer = super::auth::Peer { addr: None, uid };
        let (router, down) = (router.clone(), down.clone());
        tokio::spawn(async move {
            let _permit = permit;
            connection(stream, peer, router, down).await;
        });
    }
}

/// Serve HTTP/1.1 on one connection until the client closes it or shutdown asks.
async fn connection<I>(
    io: I,
    peer: super::auth::Peer,
    router: axum::Router,
    mut down: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt;
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        router.clone().oneshot(req.map(axum::body::Body::new))
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let conn = b.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("connection: {e}");
            }
        }
        _ = down.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
