//! One connection to a VM's QEMU for the length of a job: the small runtime the QMP client
//! needs and the client itself, with every QMP failure named by VM and step.
//!
//! Backups, snapshots and `doctor` all talk to QEMU through this; it is the one place that
//! knows how to connect, what "the VM is not running" looks like, and how to close.

use super::vms::Vm;
use crate::qmp::{self, Client, QmpError};
use crate::{Error, Result};
use std::future::Future;
use std::time::Duration;

/// Bound of the QMP connect and greeting.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

pub struct VmSession {
    vm: String,
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the QMP runtime", e))
}

impl VmSession {
    /// Connect to the VM's QMP socket.
    pub fn connect(vm: &Vm) -> Result<VmSession> {
        let rt = runtime()?;
        let client = rt
            .block_on(Client::connect(&vm.qmp, CONNECT_WAIT))
            .map_err(Error::qemu(&vm.name, "connecting to QMP"))?;
        Ok(VmSession {
            vm: vm.name.clone(),
            rt,
            client: Some(client),
        })
    }

    /// Connect, or None when the VM is not running (no socket, or nobody listening on it).
    pub fn try_connect(vm: &Vm) -> Result<Option<VmSession>> {
        let rt = runtime()?;
        match rt.block_on(Client::connect(&vm.qmp, CONNECT_WAIT)) {
            Ok(client) => Ok(Some(VmSession {
                vm: vm.name.clone(),
                rt,
                client: Some(client),
            })),
            Err(QmpError::Connect { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENOENT) | Some(libc::ECONNREFUSED)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(Error::qemu(&vm.name, "connecting to QMP")(e)),
        }
    }

    pub fn vm(&self) -> &str {
        &self.vm
    }

    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("open until close")
    }

    /// Run one QMP step; a failure is named by the VM and `step` (`creating the read point`).
    pub fn run<'s, T, F, Fut>(&'s self, step: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(&'s Client) -> Fut,
        Fut: Future<Output = qmp::Result<T>>,
    {
        self.rt
            .block_on(f(self.client()))
            .map_err(Error::qemu(&self.vm, step))
    }

    /// Wait for any future on the session's runtime (the guest agent, several steps at once).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Close the QMP connection (one client at a time: free it before another connects).
    pub fn close(mut self) {
        self.close_client();
    }

    fn close_client(&mut self) {
        if let Some(c) = self.client.take() {
            self.rt.block_on(c.close());
        }
    }
}

impl Drop for VmSession {
    fn drop(&mut self) {
        self.close_client();
    }
}
