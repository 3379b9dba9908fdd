//! Changes to the config file's policy and notification targets (the API's admins make
//! them): under a lock, checked whole before the file is replaced, so a bad change leaves
//! the file as it was.

use super::Appliance;
use crate::jobs::vms::VmsFile;
use crate::notify::{Event, NotifyConfig, Target};
use crate::policy::{PolicyConfig, VmPolicy};
use crate::{Error, Result};

impl Appliance {
    /// Load, change and save the config under its lock; `edit` sees the current file.
    pub(super) fn edit_config<T>(&self, edit: impl FnOnce(&mut VmsFile) -> Result<T>) -> Result<T> {
        let lock_path = self.config.with_extension("toml.lock");
        let _lock = crate::sys::FileLock::acquire(&lock_path)
            .map_err(|e| Error::io(format!("lock {}", lock_path.display()), e))?;
        let mut f = self.vms_file()?;
        let out = edit(&mut f)?;
        f.policy.check().map_err(Error::Usage)?;
        f.notify.check().map_err(Error::Usage)?;
        f.save(&self.config)?;
        Ok(out)
    }

    /// The policy as configured.
    pub fn policy_config(&self) -> Result<PolicyConfig> {
        Ok(self.vms_file()?.policy)
    }

    /// Replace the whole `[policy]` table.
    pub fn policy_set(&self, p: PolicyConfig) -> Result<PolicyConfig> {
        self.edit_config(|f| {
            f.policy = p;
            Ok(f.policy.clone())
        })
    }

    /// Set (or with None, remove) one VM's own policy.
    pub fn policy_set_vm(&self, vm: &str, p: Option<VmPolicy>) -> Result<crate::policy::Effective> {
        crate::names::check("VM", vm)?;
        self.edit_config(|f| {
            match p {
                Some(p) => {
                    f.policy.vm.insert(vm.to_string(), p);
                }
                None => {
                    f.policy.vm.remove(vm);
                }
            }
            Ok(f.policy.effective(vm))
        })
    }

    pub fn notify_config(&self) -> Result<NotifyConfig> {
        Ok(self.vms_file()?.notify)
    }

    /// Set (or with None, remove) a notification target.
    pub fn notify_set_target(&self, name: &str, t: Option<Target>) -> Result<()> {
        self.edit_config(|f| {
            match t {
                Some(t) => {
                    f.notify.target.insert(name.to_string(), t);
                }
                None => {
                    if f.notify.target.remove(name).is_none() {
                        return Err(Error::not_found(
                            crate::error::What::Target,
                            name,
                            format!("no notification target {name:?}"),
                        ));
                    }
                }
            }
            Ok(())
        })
    }

    /// Queue a test event for target `name`; the service delivers it like any other.
    pub fn notify_test(&self, name: &str) -> Result<Event> {
        let f = self.vms_file()?;
        if !f.notify.target.contains_key(name) {
            return Err(Error::not_found(
                crate::error::What::Target,
                name,
                format!("no notification target {name:?}"),
            ));
        }
        let mut e = Event::new("test", "ok", Vec::new());
        e.summary = Some(format!("a test of the notification target {name}"));
        crate::notify::enqueue(&self.dir, name, &e)
            .map_err(|x| Error::io(format!("queue the test event for {name}"), x))?;
        Ok(e)
    }
}
