//! Task records: what runs, what ran, and following one until it ends.

use super::Appliance;
use crate::task::{self, TaskRecord};
use crate::Result;
use std::time::Duration;

/// Which task records to list.
#[derive(Clone, Debug, Default)]
pub struct TaskFilter {
    /// Only tasks on this VM.
    pub vm: Option<String>,
    /// Only tasks running now.
    pub running: bool,
}

/// How often a followed task's record is read again.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

impl Appliance {
    /// Task records, oldest first, as they stand (a task whose process died reads as failed).
    pub fn tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskRecord>> {
        if let Some(v) = &filter.vm {
            crate::names::check("VM", v)?;
        }
        Ok(task::list(&self.dir)?
            .into_iter()
            .filter(|t| filter.vm.as_ref().is_none_or(|v| t.vms.contains(v)))
            .filter(|t| !filter.running || t.is_running())
            .collect())
    }

    /// One task (an id prefix works).
    pub fn task(&self, id: &str) -> Result<TaskRecord> {
        task::read(&self.dir, id)
    }

    /// Follow task `id` until it ends (or this handle is cancelled): `on_change` gets every
    /// new state of its record, the first one included. Returns the last.
    pub fn follow(&self, id: &str, on_change: &mut dyn FnMut(&TaskRecord)) -> Result<TaskRecord> {
        let mut last = self.task(id)?;
        on_change(&last);
        // Bounded by the task itself: a record stops being `running` when its process ends.
        while last.is_running() && !self.cancel.wait_timeout(FOLLOW_POLL) {
            let now = task::read(&self.dir, &last.id)?;
            if now != last {
                on_change(&now);
                last = now;
            }
        }
        Ok(last)
    }
}
