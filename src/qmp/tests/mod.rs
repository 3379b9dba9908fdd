//! Tests of `qmp` against real QEMU (qemu-storage-daemon, qemu-system-x86_64 with TCG and no
//! guest OS) and against fake peers. Processes are started and killed by `harness`.

mod harness;
mod peer;
mod readpoint;
mod snapshot;
