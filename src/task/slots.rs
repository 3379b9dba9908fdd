//! A bounded number of jobs at once (the service's global limit): a counting semaphore that
//! gives up when the waiting task is cancelled.

use super::Cancel;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Clone)]
pub struct Slots(Arc<(Mutex<usize>, Condvar)>, usize);

/// A taken slot; dropping it frees it.
pub struct Slot(Slots);

impl Slots {
    /// `n` jobs at once (at least one).
    pub fn new(n: usize) -> Slots {
        Slots(Arc::new((Mutex::new(n.max(1)), Condvar::new())), n.max(1))
    }

    /// Wait for a slot; None once `cancel` fires first.
    pub fn take(&self, cancel: &Cancel) -> Option<Slot> {
        let (m, cv) = &*self.0;
        let mut free = crate::sys::lock(m);
        loop {
            if cancel.is_cancelled() {
                return None;
            }
            if *free > 0 {
                *free -= 1;
                return Some(Slot(self.clone()));
            }
            free = cv
                .wait_timeout(free, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// A slot if one is free now.
    pub fn try_take(&self) -> Option<Slot> {
        let mut free = crate::sys::lock(&self.0 .0);
        (*free > 0).then(|| {
            *free -= 1;
            Slot(self.clone())
        })
    }

    /// How many jobs at once.
    pub fn limit(&self) -> usize {
        self.1
    }

    /// Free slots now.
    pub fn free(&self) -> usize {
        *crate::sys::lock(&self.0 .0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (m, cv) = &*self.0 .0;
        *crate::sys::lock(m) += 1;
        cv.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_bound_and_free_and_a_cancelled_wait_gives_up() {
        let s = Slots::new(1);
        let a = s.take(&Cancel::new()).unwrap();
        assert_eq!(s.free(), 0);
        let c = Cancel::new();
        let (s2, c2) = (s.clone(), c.clone());
        let waiter = std::thread::spawn(move || s2.take(&c2).is_some());
        std::thread::sleep(Duration::from_millis(50));
        c.cancel("test");
        assert!(!waiter.join().unwrap(), "gave up when cancelled");
        drop(a);
        assert_eq!(s.free(), 1);
        assert!(s.take(&Cancel::new()).is_some());
    }
}
