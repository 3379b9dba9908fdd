//! Test hooks at named stages of a job, compiled in only with the `test-hooks` feature (the
//! test build turns it on through the crate's dev-dependency on itself; a release build
//! refuses it). Without the feature every hook is an empty inline function.
//!
//! - `HOLDFAST_TEST_KILL_AT=STAGE` kills this process at STAGE (as `kill -9` would);
//! - `HOLDFAST_TEST_FAIL_AT=STAGE` fails the job there with an error;
//! - `HOLDFAST_TEST_PAUSE_AT=STAGE:PATH` creates `PATH.waiting` and waits (at most 5 minutes)
//!   until `PATH` exists; `HOLDFAST_TEST_PAUSE_BEFORE_COMMIT=PATH` is `before-commit:PATH`;
//! - `HOLDFAST_TEST_CRASH_AFTER_PACKS=N` aborts a backup after its N-th pack;
//! - `HOLDFAST_TEST_SEGMENT_DELAY_MS=N` makes a backup wait N ms before reading each segment
//!   (a slow disk: progress that tests can watch rise).
//!
//! Stages: `after-read-point`, `before-commit`, `after-commit`.

#[cfg(all(feature = "test-hooks", not(debug_assertions)))]
compile_error!("the test-hooks feature is for test builds only; build releases without it");

#[cfg(feature = "test-hooks")]
mod imp {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    fn pause_path(stage: &str) -> Option<PathBuf> {
        let at = std::env::var("HOLDFAST_TEST_PAUSE_AT")
            .ok()
            .and_then(|v| v.strip_prefix(&format!("{stage}:")).map(PathBuf::from));
        let legacy = (stage == "before-commit")
            .then(|| std::env::var_os("HOLDFAST_TEST_PAUSE_BEFORE_COMMIT").map(PathBuf::from))
            .flatten();
        at.or(legacy)
    }

    pub fn point(stage: &str) -> crate::Result<()> {
        let is = |var: &str| std::env::var(var).is_ok_and(|s| s == stage);
        if is("HOLDFAST_TEST_KILL_AT") {
            tracing::warn!("HOLDFAST_TEST_KILL_AT={stage}: killing this process");
            // SAFETY: sending a signal to ourselves has no memory-safety preconditions.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        if is("HOLDFAST_TEST_FAIL_AT") {
            return Err(crate::Error::internal(format!(
                "HOLDFAST_TEST_FAIL_AT={stage}: failing here on purpose"
            )));
        }
        if let Some(path) = pause_path(stage) {
            let _ = std::fs::write(path.with_extension("waiting"), b"");
            let t = Instant::now();
            while !path.exists() && t.elapsed() < Duration::from_secs(300) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    pub fn crash_after_packs() -> Option<u64> {
        std::env::var("HOLDFAST_TEST_CRASH_AFTER_PACKS")
            .ok()
            .and_then(|v| v.parse().ok())
    }

    pub fn segment_delay() {
        static DELAY: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
        let ms = DELAY.get_or_init(|| {
            std::env::var("HOLDFAST_TEST_SEGMENT_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
        });
        if let Some(ms) = ms {
            std::thread::sleep(Duration::from_millis(*ms));
        }
    }
}

#[cfg(not(feature = "test-hooks"))]
mod imp {
    #[inline(always)]
    pub fn point(_stage: &str) -> crate::Result<()> {
        Ok(())
    }

    #[inline(always)]
    pub fn crash_after_packs() -> Option<u64> {
        None
    }

    #[inline(always)]
    pub fn segment_delay() {}
}

pub(crate) use imp::{crash_after_packs, point, segment_delay};
