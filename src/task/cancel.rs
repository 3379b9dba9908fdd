//! A request to stop, shared between whoever asks (a signal handler, a user cancelling a task
//! through the service) and the job that checks it at safe points.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Clone, Default)]
pub struct Cancel(Arc<Inner>);

#[derive(Default)]
struct Inner {
    /// Who asked, once someone did.
    by: Mutex<Option<String>>,
    cv: Condvar,
}

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Ask the job to stop; `by` says who (`SIGINT`, `SIGHUP`, `user alice`). The first ask wins.
    pub fn cancel(&self, by: &str) {
        let mut g = crate::sys::lock(&self.0.by);
        if g.is_none() {
            *g = Some(by.to_string());
        }
        self.0.cv.notify_all();
    }

    /// True when both are the same cancel (clones of one another).
    pub fn same_as(&self, other: &Cancel) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    pub fn is_cancelled(&self) -> bool {
        crate::sys::lock(&self.0.by).is_some()
    }

    /// Who asked to stop, if anyone did.
    pub fn by(&self) -> Option<String> {
        crate::sys::lock(&self.0.by).clone()
    }

    /// `Err(Cancelled)` once someone asked to stop: call it at safe points.
    pub fn check(&self) -> crate::Result<()> {
        match self.by() {
            Some(by) => Err(crate::Error::Cancelled { by }),
            None => Ok(()),
        }
    }

    /// Block until someone asks to stop, or `timeout` passes; true when asked.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let g = crate::sys::lock(&self.0.by);
        let (g, _) = self
            .0
            .cv
            .wait_timeout_while(g, timeout, |by| by.is_none())
            .unwrap_or_else(|p| p.into_inner());
        g.is_some()
    }

    /// Block until someone asks to stop.
    pub fn wait(&self) {
        while !self.wait_timeout(Duration::from_secs(3600)) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_cancel_wins_and_wakes_waiters() {
        let c = Cancel::new();
        assert!(c.check().is_ok());
        assert!(!c.wait_timeout(Duration::from_millis(10)));
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.wait());
        c.cancel("SIGHUP");
        c.cancel("SIGINT");
        t.join().unwrap();
        assert_eq!(c.by().as_deref(), Some("SIGHUP"));
        assert_eq!(c.check().unwrap_err().code(), "cancelled");
    }
}
