//! Serving one disk of a backup over NBD until the job is cancelled (SIGINT/SIGTERM/SIGHUP in
//! the CLI, a user through the service): the listener, the runtime, a clean shutdown.

use super::{BackupExport, Overlay};
use crate::image::ImageReader;
use crate::nbd::{Export, Server, ServerConfig};
use crate::repo::{DiskEntry, Manifest, Repo};
use crate::task::{Ctx, Serving};
use crate::{Error, Result};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where an export listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(String),
}

impl Listen {
    /// `unix:PATH`, `tcp:PORT` (loopback) or `tcp:HOST:PORT`.
    pub fn parse(s: &str) -> Result<Listen> {
        let bad = || {
            Error::usage(format!(
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
}

pub struct ExportConfig {
    pub listen: Listen,
    /// Accept writes, into a local overlay (never the store).
    pub writable: bool,
    /// Keep the overlay at this path (and its map at PATH.map) on exit.
    pub keep_overlay: Option<PathBuf>,
    /// Memory for decoded chunks.
    pub cache_bytes: u64,
    /// Close a client that sends nothing for this long (none: never; a VM booted from the
    /// export may leave its disk idle for hours).
    pub idle_timeout: Option<Duration>,
}

impl ExportConfig {
    /// What can be refused before anything is opened.
    pub fn check(&self) -> Result<()> {
        if self.keep_overlay.is_some() && !self.writable {
            return Err(Error::usage("--keep-overlay needs --writable"));
        }
        if let Listen::Unix(p) = &self.listen {
            if p.exists() {
                return Err(Error::exists(
                    crate::error::What::Socket,
                    p.display().to_string(),
                    format!(
                        "{} exists; remove it or pick another socket path",
                        p.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub vm: String,
    pub backup: String,
    pub disk: String,
    /// The URI it was served at.
    pub uri: String,
    pub writable: bool,
    /// The overlay kept with `--keep-overlay`.
    pub overlay: Option<PathBuf>,
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

/// The overlay of a writable export: at `keep` (kept on exit), else in a temp directory of
/// this process (removed on exit).
fn open_overlay(cfg: &ExportConfig, size: u64) -> Result<Option<(Overlay, Option<PathBuf>)>> {
    if !cfg.writable {
        return Ok(None);
    }
    let (path, tmp_dir) = match &cfg.keep_overlay {
        Some(p) => (p.clone(), None),
        None => {
            let dir = std::env::temp_dir().join(format!("holdfast-overlay-{}", std::process::id()));
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
            (dir.join("overlay"), Some(dir))
        }
    };
    let overlay = Overlay::create(&path, size, cfg.keep_overlay.is_some())
        .map_err(|e| Error::io(format!("create overlay {}", path.display()), e))?;
    Ok(Some((overlay, tmp_dir)))
}

/// Serve disk `disk` of backup `m` as configured until `ctx` is cancelled; the store is never
/// written. Reports [`Serving`] once it listens.
pub fn serve(
    repo: Arc<Repo>,
    m: &Manifest,
    disk: &DiskEntry,
    cfg: &ExportConfig,
    ctx: &Ctx,
) -> Result<ExportReport> {
    cfg.check()?;
    keep_freed_memory();
    // Counted in chunks of the repository's average size; at least a few segments' worth.
    let avg = u64::from(repo.config.chunker.avg_size.max(1));
    let cache_chunks = usize::try_from(cfg.cache_bytes / avg)
        .unwrap_or(usize::MAX)
        .max(256);
    let reader = ImageReader::open(repo.clone(), disk, cache_chunks)?;
    let opened = open_overlay(cfg, disk.size)?;
    let tmp_dir = opened.as_ref().and_then(|(_, d)| d.clone());
    let export: Arc<dyn Export> = Arc::new(BackupExport::new(reader, opened.map(|(o, _)| o)));
    let config = ServerConfig {
        idle_timeout: cfg.idle_timeout,
        ..ServerConfig::default()
    };
    let server = Server::new(
        config,
        [(String::new(), export.clone()), (disk.name.clone(), export)],
    );
    let mode = if cfg.writable {
        "writable (overlay)"
    } else {
        "read-only"
    };
    let what = format!("{}@{} disk {} ({mode})", m.vm, m.id, disk.name);
    let result = run(server, cfg, &disk.name, &what, ctx);
    if let Listen::Unix(p) = &cfg.listen {
        let _ = std::fs::remove_file(p);
    }
    if let Some(d) = tmp_dir {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(ExportReport {
        vm: m.vm.clone(),
        backup: m.id.clone(),
        disk: disk.name.clone(),
        uri: result?,
        writable: cfg.writable,
        overlay: cfg.keep_overlay.clone(),
    })
}

/// Listen, announce, serve until cancelled, stop; the URI served.
fn run(server: Server, cfg: &ExportConfig, name: &str, what: &str, ctx: &Ctx) -> Result<String> {
    // Few blocking threads: decodes are CPU work, and dozens of threads taking turns on the
    // cores cost more in switches than they win (measured: 0.94 s → 0.85 s per 1.18 GB on 2 cores).
    let blocking = (crate::sys::workers() * 2).max(4);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(blocking)
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the runtime", e))?;
    rt.block_on(async {
        let stop = server.shutdown_handle();
        let (uri, serve) = match &cfg.listen {
            Listen::Unix(p) => {
                let l = tokio::net::UnixListener::bind(p)
                    .map_err(|e| Error::io(format!("listen on {}", p.display()), e))?;
                let uri = format!("nbd+unix:///{name}?socket={}", p.display());
                (uri, tokio::spawn(async move { server.serve_unix(l).await }))
            }
            Listen::Tcp(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::io(format!("listen on {addr}"), e))?;
                let local = l.local_addr().map_err(|e| Error::io("listen", e))?;
                let uri = format!("nbd://{local}/{name}");
                (uri, tokio::spawn(async move { server.serve_tcp(l).await }))
            }
        };
        ctx.events.serving(&Serving {
            what: what.to_string(),
            at: uri.clone(),
            stop: "Ctrl-C, SIGTERM or SIGHUP".into(),
        });
        while !ctx.cancel.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(15), serve).await;
        Ok(uri)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(Listen::parse("unix:/a").unwrap(), Listen::Unix("/a".into()));
        assert_eq!(
            Listen::parse("tcp:10809").unwrap(),
            Listen::Tcp("127.0.0.1:10809".into())
        );
        assert_eq!(
            Listen::parse("tcp:[::1]:9").unwrap(),
            Listen::Tcp("[::1]:9".into())
        );
        for bad in ["unix:", "tcp:", "tcp:x", "10809", "tcp:host:99999"] {
            assert_eq!(Listen::parse(bad).unwrap_err().code(), "usage", "{bad}");
        }
    }
}
