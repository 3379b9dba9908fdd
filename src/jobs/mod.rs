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
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 64)
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
        return Err(crate::Error::Invalid(format!(
            "HOLDFAST_TEST_FAIL_AT={stage}: failing here on purpose"
        )));
    }
    let pause = std::env::var("HOLDFAST_TEST_PAUSE_AT").ok().and_then(|v| {
        v.strip_prefix(&format!("{stage}:"))
            .map(std::path::PathBuf::from)
    });
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

/// SIGINT and SIGTERM, caught from the moment `catch` returns (they no longer end the process
/// by default), on a small runtime of their own so any thread can wait for them.
pub struct Signals {
    rt: tokio::runtime::Runtime,
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn catch() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (int, term) = {
            let _in_rt = rt.enter();
            (
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            )
        };
        Ok(Signals { rt, int, term })
    }

    /// Block until the next SIGINT or SIGTERM.
    pub fn wait(&mut self) {
        let Signals { rt, int, term } = self;
        rt.block_on(async {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        });
    }
}

/// From now on, the first SIGINT or SIGTERM asks the running job to stop cleanly (a backup
/// stops reading, commits nothing, and a backup of a running VM tears down what it made in
/// QEMU); a second one ends the process at once (exit 130).
pub fn catch_interrupts() {
    let Ok(mut signals) = Signals::catch() else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("holdfast-signals".into())
        .spawn(move || {
            signals.wait();
            eprintln!("holdfast: interrupted: stopping cleanly (again to quit at once)");
            INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
            signals.wait();
            std::process::exit(130);
        });
}

/// True once an interrupt asked the job to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}
