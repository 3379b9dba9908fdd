//! `holdfast export`: serve a backup over NBD until SIGINT/SIGTERM.

use crate::image::ImageReader;
use crate::jobs::export::{BackupExport, Overlay};
use crate::nbd::{Export, Server, ServerConfig};
use crate::repo::Repo;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub enum Listen {
    Unix(PathBuf),
    Tcp(String),
}

/// `unix:PATH`, `tcp:PORT` (loopback) or `tcp:HOST:PORT`.
pub fn parse_listen(s: &str) -> Result<Listen> {
    let bad = || {
        Error::Invalid(format!(
            "--listen {s:?}: use unix:PATH, tcp:PORT (127.0.0.1) or tcp:HOST:PORT"
        ))
    };
    if let Some(p) = s.strip_prefix("unix:") {
        if p.is_empty() {
            return Err(bad());
        }
        return Ok(Listen::Unix(PathBuf::from(p)));
    }
    let rest = s.strip_prefix("tcp:").ok_or_else(bad)?;
    let addr = if rest.parse::<u16>().is_ok() {
        format!("127.0.0.1:{rest}")
    } else {
        rest.to_string()
    };
    let (_, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    Ok(Listen::Tcp(addr))
}

/// A serving export decodes and drops thousands of chunk buffers (up to 256 KiB) a second:
/// glibc would `mmap`/`munmap` the larger ones and trim the heap after bursts, so every new
/// buffer page-faulted in. Keep them in the heap instead (bounded by the trim threshold).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator tunables; called before the serving threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

pub struct ExportArgs<'a> {
    pub spec: &'a str,
    pub disk: Option<&'a str>,
    pub listen: &'a str,
    pub writable: bool,
    pub keep_overlay: Option<&'a Path>,
    /// Memory for decoded chunks.
    pub cache_bytes: u64,
}

pub fn run(repo_dir: &Path, a: ExportArgs<'_>) -> Result<()> {
    let listen = parse_listen(a.listen)?;
    if a.keep_overlay.is_some() && !a.writable {
        return Err(Error::Invalid("--keep-overlay needs --writable".into()));
    }
    if let Listen::Unix(p) = &listen {
        if p.exists() {
            return Err(Error::Invalid(format!(
                "{} exists; remove it or pick another socket path",
                p.display()
            )));
        }
    }
    keep_freed_memory();
    let repo = Arc::new(Repo::open(repo_dir)?);
    repo.sync()?;
    let m = repo.resolve(a.spec)?;
    let disk = crate::jobs::restore::pick_disk(&m, a.disk)?.clone();
    // Counted in chunks of the repository's average size; at least a few segments' worth.
    let avg = u64::from(repo.config.chunker.avg_size.max(1));
    let cache_chunks = usize::try_from(a.cache_bytes / avg)
        .unwrap_or(usize::MAX)
        .max(256);
    let reader = ImageReader::open(repo.clone(), &disk, cache_chunks)?;
    let tmp_dir;
    let overlay = if a.writable {
        let (path, keep) = match a.keep_overlay {
            Some(p) => (p.to_path_buf(), true),
            None => {
                tmp_dir =
                    std::env::temp_dir().join(format!("holdfast-overlay-{}", std::process::id()));
                std::fs::create_dir_all(&tmp_dir)
                    .map_err(|e| Error::io(format!("create {}", tmp_dir.display()), e))?;
                (tmp_dir.join("overlay"), false)
            }
        };
        Some(
            Overlay::create(&path, disk.size, keep)
                .map_err(|e| Error::io(format!("create overlay {}", path.display()), e))?,
        )
    } else {
        None
    };
    let export: Arc<dyn Export> = Arc::new(BackupExport::new(reader, overlay));
    let name = disk.name.clone();
    let server = Server::new(
        ServerConfig::default(),
        [(String::new(), export.clone()), (name.clone(), export)],
    );
    // Few blocking threads: decodes are CPU work, and dozens of threads taking turns on the
    // cores cost more in switches than they win (measured: 0.94 s → 0.85 s per 1.18 GB on 2 cores).
    let blocking = (crate::jobs::workers() * 2).max(4);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(blocking)
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the runtime", e))?;
    let mode = if a.writable {
        "writable (overlay)"
    } else {
        "read-only"
    };
    let result = rt.block_on(async {
        // Caught before the "serving" line: a signal right after it must stop cleanly.
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io("catch SIGINT", e))?;
        let mut term =
            signal(SignalKind::terminate()).map_err(|e| Error::io("catch SIGTERM", e))?;
        let stop = server.shutdown_handle();
        let serve = match &listen {
            Listen::Unix(p) => {
                let l = tokio::net::UnixListener::bind(p)
                    .map_err(|e| Error::io(format!("listen on {}", p.display()), e))?;
                println!(
                    "serving {}@{} disk {name} ({mode}) at nbd+unix:///{name}?socket={}",
                    m.vm,
                    m.id,
                    p.display()
                );
                tokio::spawn(async move { server.serve_unix(l).await })
            }
            Listen::Tcp(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::io(format!("listen on {addr}"), e))?;
                let local = l.local_addr().map_err(|e| Error::io("listen", e))?;
                println!(
                    "serving {}@{} disk {name} ({mode}) at nbd://{local}/{name}",
                    m.vm, m.id
                );
                tokio::spawn(async move { server.serve_tcp(l).await })
            }
        };
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        stop.shutdown();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(15), serve).await;
        Ok::<(), Error>(())
    });
    if let Listen::Unix(p) = &listen {
        let _ = std::fs::remove_file(p);
    }
    if a.writable && a.keep_overlay.is_none() {
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("holdfast-overlay-{}", std::process::id())),
        );
    }
    result
}
