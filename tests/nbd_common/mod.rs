//! Shared helpers for integration tests: sparse images, child-process
//! guards (killed by PID on drop), bounded waits, and an in-process server.
#![allow(dead_code)]
// Test harness: a failed setup step is a failed test, and unwrap says where.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast::nbd::{Export, FileExport, Server, ServerConfig, ShutdownHandle};

pub const IMG_SIZE: u64 = 8 << 20;
/// Data ranges of the test image; everything else is a hole.
pub const DATA: [(u64, u64); 3] = [
    (1 << 20, 64 << 10),
    (3 << 20, 192 << 10),
    (7 << 20, 1 << 20),
];

/// Byte at `pos` inside a data range (a non-zero, position-dependent pattern).
pub fn pattern(pos: u64) -> u8 {
    ((pos / 512) as u8)
        .wrapping_mul(31)
        .wrapping_add((pos % 251) as u8)
        | 1
}

/// Create a sparse raw image with [`DATA`] filled; returns its full contents.
pub fn make_sparse_image(path: &Path) -> Vec<u8> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(IMG_SIZE).unwrap();
    let mut all = vec![0u8; IMG_SIZE as usize];
    for (off, len) in DATA {
        let buf: Vec<u8> = (off..off + len).map(pattern).collect();
        f.write_all_at(&buf, off).unwrap();
        all[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
    f.sync_all().unwrap();
    all
}

/// Expected base:allocation map of the image: (offset, len, is_data).
pub fn expected_map() -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut pos = 0;
    for (off, len) in DATA {
        if off > pos {
            out.push((pos, off - pos, false));
        }
        out.push((off, len, true));
        pos = off + len;
    }
    if pos < IMG_SIZE {
        out.push((pos, IMG_SIZE - pos, false));
    }
    out
}

/// A child process killed (by its own PID) and reaped on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Poll (bounded: 10 s) until `path` exists.
pub fn wait_for_path(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawn `qemu-nbd ARGS -k SOCKET` and wait for the socket.
pub fn spawn_qemu_nbd(socket: &Path, args: &[&str]) -> ChildGuard {
    let child = Command::new("qemu-nbd")
        .args(args)
        .arg("-k")
        .arg(socket)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn qemu-nbd");
    let guard = ChildGuard(child);
    wait_for_path(socket);
    guard
}

/// Run a command to completion with a timeout; returns (status ok, stdout, stderr).
pub async fn run_tool(cmd: &str, args: &[&str]) -> (bool, String, String) {
    let child = tokio::process::Command::new(cmd)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{cmd} timed out"))
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Our server on a unix socket in `dir`, running on the current runtime.
pub struct TestServer {
    pub socket: PathBuf,
    pub stop: ShutdownHandle,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub fn start(
        dir: &Path,
        exports: Vec<(String, Arc<dyn Export>)>,
        config: ServerConfig,
    ) -> TestServer {
        let socket = dir.join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = Server::new(config, exports);
        let stop = server.shutdown_handle();
        let task = tokio::spawn(async move { server.serve_unix(listener).await });
        TestServer { socket, stop, task }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Stop the server and wait (bounded) for it to finish.
    pub async fn stop(self) {
        self.stop.shutdown();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
    }
}

pub fn file_export(path: &Path, read_only: bool) -> Arc<dyn Export> {
    Arc::new(FileExport::open(path, read_only).unwrap())
}
