//! VMs that run in QEMU, declared in the config file (`vms.toml` in the repository unless
//! `--config`/`HOLDFAST_CONFIG` names another) or on the command line.
//!
//! ```toml
//! [defaults]
//! snapshot_ttl = "10d"     # how long a user snapshot lives unless --ttl says otherwise
//! snapshot_limit = 1       # snapshots per VM
//!
//! [tasks]
//! keep = 100               # finished task records kept per VM
//!
//! [vm.web-01]
//! qmp = "/run/qemu/web-01.qmp"          # QEMU's QMP socket (qemu-system or qemu-storage-daemon)
//! agent = "/run/qemu/web-01.qga"        # optional: the guest agent, for --quiesce
//! work_dir = "/var/lib/holdfast/work/web-01"   # optional: fleecing images, NBD socket
//! nbd_socket = "/run/qsd/nbd.sock"      # optional: an NBD server this QEMU already runs
//! snapshot_limit = 2                    # optional: overrides [defaults]
//! [vm.web-01.disks]
//! root = "disk0"                        # disk name = QEMU block node name
//! ```
//!
//! Invariants: the file is rewritten atomically (temp file, fsync, rename); every name is
//! checked on load, so a bad hand edit is a clear error naming the VM and the field.

use crate::error::What;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_TTL: Duration = Duration::from_secs(10 * 86400);
pub const DEFAULT_LIMIT: u32 = 1;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_limit: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub qmp: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<PathBuf>,
    /// The unix socket of an NBD server this QEMU already runs (QEMU has one): read points are
    /// exported there instead of on a server holdfast starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_socket: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_limit: Option<u32>,
    /// Disk name → QEMU block node name.
    pub disks: BTreeMap<String, String>,
}

/// `[service]`: how `holdfast serve` runs (each can be overridden on its command line).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    /// `HOST:PORT` [default: 127.0.0.1:8470]; off loopback only HTTPS is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Jobs run at once [default: 2]; more wait, queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<usize>,
    /// Directories on the appliance that API restores may write into.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restore_dirs: Vec<PathBuf>,
    /// Storage price for the cost figures, dollars per GB-month [default: 0.05].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_per_gb_month: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
}

/// `[tasks]`: how many finished task records to keep.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskSettings {
    /// Finished task records kept per VM (and for tasks without a VM) [default: 100].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<usize>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmsFile {
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default, skip_serializing_if = "is_default")]
    pub tasks: TaskSettings,
    #[serde(default, skip_serializing_if = "is_default_service")]
    pub service: ServiceSettings,
    /// Schedules, retention, snapshot lifespans ([`crate::policy`]).
    #[serde(default, skip_serializing_if = "is_default_policy")]
    pub policy: crate::policy::PolicyConfig,
    /// Where events go ([`crate::notify`]).
    #[serde(default, skip_serializing_if = "is_default_notify")]
    pub notify: crate::notify::NotifyConfig,
    #[serde(default)]
    pub vm: BTreeMap<String, VmConfig>,
}

fn is_default_notify(p: &crate::notify::NotifyConfig) -> bool {
    p.target.is_empty()
}

fn is_default_policy(p: &crate::policy::PolicyConfig) -> bool {
    *p == crate::policy::PolicyConfig::default()
}

fn is_default(t: &TaskSettings) -> bool {
    *t == TaskSettings::default()
}

fn is_default_service(t: &ServiceSettings) -> bool {
    *t == ServiceSettings::default()
}

/// A VM as the jobs use it: its name and resolved settings.
#[derive(Clone, Debug)]
pub struct Vm {
    pub name: String,
    pub qmp: PathBuf,
    pub agent: Option<PathBuf>,
    /// Absolute; holdfast's fleecing images and NBD socket for this VM's QEMU.
    pub work_dir: PathBuf,
    pub nbd_socket: Option<PathBuf>,
    pub disks: Vec<(String, String)>,
    pub snapshot_ttl: Duration,
    pub snapshot_limit: u32,
    /// No snapshot of this VM lives longer; a longer `--ttl` is refused.
    pub snapshot_max_lifespan: Duration,
}

pub use crate::policy::parse_duration;

impl VmsFile {
    /// The config file `path`; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<VmsFile> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(VmsFile::default()),
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        let f: VmsFile = toml::from_str(&text).map_err(|e| {
            let msg = format!(
                "{} is not valid: {}",
                path.display(),
                e.to_string().trim().replace('\n', " ")
            );
            Error::config(path, msg)
        })?;
        for (name, vm) in &f.vm {
            crate::names::check("VM", name)?;
            for (disk, node) in &vm.disks {
                crate::names::check("disk", disk)?;
                if node.is_empty() {
                    return Err(Error::config(
                        path,
                        format!(
                            "{}: VM {name}: disk {disk} has an empty node name",
                            path.display()
                        ),
                    ));
                }
            }
            for d in [&vm.snapshot_ttl, &f.defaults.snapshot_ttl]
                .into_iter()
                .flatten()
            {
                parse_duration(d).map_err(|e| {
                    Error::config(
                        path,
                        format!("{}: VM {name}: snapshot_ttl {e}", path.display()),
                    )
                })?;
            }
        }
        f.policy
            .check()
            .and_then(|_| f.notify.check())
            .map_err(|e| Error::config(path, format!("{}: {e}", path.display())))?;
        Ok(f)
    }

    /// Write atomically (temp file, fsync, rename, fsync the directory).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = format!(
            "# holdfast VMs: edit by hand or with `holdfast vm add/remove`\n{}",
            toml::to_string_pretty(self).map_err(Error::internal)?
        );
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        crate::sys::write_atomic(path, text.as_bytes(), true)
            .map_err(|e| Error::io(format!("write {}", path.display()), e))
    }

    /// Finished task records to keep per VM.
    pub fn task_keep(&self) -> usize {
        self.tasks.keep.unwrap_or(crate::task::DEFAULT_KEEP)
    }

    /// The VM `name` with its settings resolved; `repo_dir` gives the default work directory.
    pub fn vm(&self, name: &str, repo_dir: &Path, config_path: &Path) -> Result<Vm> {
        let c = self.vm.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.vm.keys().map(String::as_str).collect();
            let known = if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            };
            Error::not_found(
                What::Vm,
                name,
                format!(
                    "VM {name:?} is not declared in {} (declared: {known}); add it with \
                     `holdfast vm add {name} --qmp SOCKET --disk NAME=NODE`",
                    config_path.display()
                ),
            )
        })?;
        self.resolve(name, c, repo_dir)
    }

    pub fn resolve(&self, name: &str, c: &VmConfig, repo_dir: &Path) -> Result<Vm> {
        let ttl = c
            .snapshot_ttl
            .as_ref()
            .or(self.defaults.snapshot_ttl.as_ref())
            .map(|s| parse_duration(s))
            .transpose()
            .map_err(Error::Usage)?
            .unwrap_or(DEFAULT_TTL);
        let policy = self.policy.effective(name);
        let limit = c
            .snapshot_limit
            .or(policy.snapshot_limit)
            .or(self.defaults.snapshot_limit)
            .unwrap_or(DEFAULT_LIMIT);
        let ttl = ttl.min(policy.max_lifespan());
        let work = c
            .work_dir
            .clone()
            .unwrap_or_else(|| repo_dir.join("work").join(name));
        let work_dir = std::path::absolute(&work)
            .map_err(|e| Error::io(format!("resolve {}", work.display()), e))?;
        Ok(Vm {
            name: name.into(),
            qmp: c.qmp.clone(),
            agent: c.agent.clone(),
            work_dir,
            nbd_socket: c.nbd_socket.clone(),
            disks: c
                .disks
                .iter()
                .map(|(a, b)| (a.clone(), b.clone()))
                .collect(),
            snapshot_ttl: ttl,
            snapshot_limit: limit,
            snapshot_max_lifespan: policy.max_lifespan(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10d").unwrap(), Duration::from_secs(864000));
        assert_eq!(parse_duration("12h").unwrap(), Duration::from_secs(43200));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        for bad in ["", "d", "-1d", "3x", "0d", "1.5d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_round_trip_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vms.toml");
        assert_eq!(VmsFile::load(&p).unwrap(), VmsFile::default());
        let mut f = VmsFile::default();
        f.vm.insert(
            "web-01".into(),
            VmConfig {
                qmp: "/run/q.sock".into(),
                agent: None,
                work_dir: None,
                nbd_socket: None,
                snapshot_ttl: Some("3d".into()),
                snapshot_limit: None,
                disks: [("root".to_string(), "disk0".to_string())].into(),
            },
        );
        f.save(&p).unwrap();
        let g = VmsFile::load(&p).unwrap();
        assert_eq!(g, f);
        let vm = g.vm("web-01", d.path(), &p).unwrap();
        assert_eq!(
            (vm.snapshot_ttl, vm.snapshot_limit),
            (Duration::from_secs(3 * 86400), 1)
        );
        assert_eq!(vm.work_dir, d.path().join("work/web-01"));
        let e = g.vm("db", d.path(), &p).unwrap_err().to_string();
        assert!(
            e.contains("VM \"db\" is not declared") && e.contains("declared: web-01"),
            "{e}"
        );
        std::fs::write(&p, "[vm.x]\nqmp = 3\n").unwrap();
        assert!(VmsFile::load(&p)
            .unwrap_err()
            .to_string()
            .contains("is not valid"));
        std::fs::write(
            &p,
            "[vm.x]\nqmp = \"/q\"\nsnapshot_ttl = \"soon\"\n[vm.x.disks]\nroot = \"n\"\n",
        )
        .unwrap();
        assert!(VmsFile::load(&p)
            .unwrap_err()
            .to_string()
            .contains("snapshot_ttl"));
    }
}
