//! Jobs: backup, restore, verify, forget, gc, stats. Each takes a `Repo` and a `Progress`.

pub mod backup;
pub mod browse;
pub mod export;
pub mod files;
pub mod gc;
pub mod lock;
pub mod progress;
pub mod restore;
pub mod snapshot;
pub mod stats;
pub mod verify;
pub mod vmbackup;
pub mod vms;

pub use progress::{NoProgress, Progress};

/// Worker threads for CPU-bound stages (hashing, compression, decompression).
pub fn workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 64)
}

/// Test hooks at named stages of a job: `HOLDFAST_TEST_KILL_AT=STAGE` kills this process there
/// (as `kill -9` would), `HOLDFAST_TEST_FAIL_AT=STAGE` fails the job there with an error, and
/// `HOLDFAST_TEST_PAUSE_AT=STAGE:PATH` creates `PATH.waiting` and waits (at most 5 minutes)
/// until `PATH` exists.
pub(crate) fn test_point(stage: &str) -> crate::Result<()> {
    let is = |var: &str| std::env::var(var).is_ok_and(|s| s == stage);
    if is("HOLDFAST_TEST_KILL_AT") {
        eprintln!("holdfast: HOLDFAST_TEST_KILL_AT={stage}: killing this process");
        // SAFETY: sending a signal to ourselves.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    if is("HOLDFAST_TEST_FAIL_AT") {
        return Err(crate::Error::Invalid(format!("HOLDFAST_TEST_FAIL_AT={stage}: failing here on purpose")));
    }
    let pause = std::env::var("HOLDFAST_TEST_PAUSE_AT").ok().and_then(|v| v.strip_prefix(&format!("{stage}:")).map(std::path::PathBuf::from));
    if let Some(path) = pause {
        let _ = std::fs::write(path.with_extension("waiting"), b"");
        let t = std::time::Instant::now();
        while !path.exists() && t.elapsed() < std::time::Duration::from_secs(300) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    Ok(())
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on, the first SIGINT or SIGTERM asks the running job to stop cleanly (a backup
/// stops reading, commits nothing, and a backup of a running VM tears down what it made in
/// QEMU); a second one ends the process at once (exit 130).
pub fn catch_interrupts() {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("holdfast-signals".into()).spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else { return };
            let _ = ready_tx.send(());
            for n in 0.. {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                if n > 0 {
                    std::process::exit(130);
                }
                eprintln!("holdfast: interrupted: stopping cleanly (again to quit at once)");
                INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
    });
    if spawned.is_ok() {
        let _ = ready_rx.recv_timeout(std::time::Duration::from_secs(2));
    }
}

/// True once an interrupt asked the job to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}
