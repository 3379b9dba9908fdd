//! `holdfast mount`: every backup as a read-only FUSE filesystem, down to the files inside the
//! guest's filesystems. The only module that names `fuser`; the tree itself comes from
//! `browse` (disks, partitions, guest filesystems) and the catalog (VMs and backups).
//!
//! ```text
//! /<vm>/latest -> <id>                      the newest backup (a symlink)
//! /<vm>/<id>/<disk>.img                     the raw disk, random access
//! /<vm>/<id>/<disk>/p1.img                  a raw partition
//! /<vm>/<id>/<disk>/p1/...                  the partition's files (ext2/3/4, FAT, NTFS)
//! /<vm>/<id>/<disk>/fs/...                  a disk that is one filesystem without a table
//! ```
//!
//! Invariants:
//! - Read-only: the mount is `ro`, opens for writing fail with EROFS, and nothing under it
//!   writes to the repository.
//! - Inode numbers are allocated once per node for the life of the mount; a guest inode maps
//!   to one mount inode, so hard links share an inode number.
//! - Errors map to errno in one place ([`errno`]); damaged data is EIO for the reads that touch
//!   it (logged with backup, disk and offset) and the rest of the mount keeps working.
//! - Backups are immutable: their nodes are cached by the kernel for long; VM directories
//!   and `latest` are re-read from the catalog every second so new backups show up.

mod mountinfo;

pub use mountinfo::{clean_stale, holdfast_mount, unmount};

use crate::browse::{Browser, DiskView};
use crate::error::What;
use crate::guestfs::{self, Kind};
use crate::repo::{Manifest, Repo};
use crate::task::{Ctx, Serving};
use crate::{Error, Result};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEntry, ReplyOpen, Request,
};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Kernel cache lifetime of nodes that never change (everything inside a backup).
const TTL_STATIC: Duration = Duration::from_secs(300);
/// VM directories and `latest`: new backups appear within this.
const TTL_DYNAMIC: Duration = Duration::from_secs(1);
/// Decoded chunks kept for the whole mount (64 KiB on average: 64 MiB).
const CACHE_CHUNKS: usize = 1024;

pub struct MountConfig {
    /// Only this VM's backups.
    pub vm: Option<String>,
    /// Let every user browse (the guests' own permissions still apply).
    pub allow_other: bool,
    /// Threads serving kernel requests.
    pub threads: usize,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Node {
    Root,
    Vm(Arc<str>),
    Backup(Arc<str>, Arc<str>),
    Latest(Arc<str>),
    DiskImg(u32),
    DiskDir(u32),
    PartImg(u32, u16),
    /// A guest inode of partition `.1` of disk slot `.0`.
    Fs(u32, u16, u64),
}

/// One disk of one backup, opened on first use.
struct DiskSlot {
    manifest: Arc<Manifest>,
    disk: usize,
    /// Opened on first use; a failure is not kept (the next access tries again).
    view: Mutex<Option<Arc<DiskView>>>,
}

#[derive(Default)]
struct Inodes {
    nodes: Vec<Node>,
    ids: HashMap<Node, u64>,
    disks: Vec<Arc<DiskSlot>>,
    disk_ids: HashMap<(String, String, String), u32>,
}

type BackupList = Arc<Vec<Arc<Manifest>>>;

struct Entry {
    name: OsString,
    node: Node,
    kind: FileType,
}

pub struct HoldfastFs {
    browser: Browser,
    vm_filter: Option<String>,
    inodes: RwLock<Inodes>,
    backups: Mutex<Option<(Instant, BackupList)>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<Entry>>>>,
    next_fh: AtomicU64,
    mounted: SystemTime,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Guest inodes get computed inode numbers, so browsing millions of files grows no table:
/// bit 63 set, then 19 bits of disk slot, 4 bits of partition, 40 bits of guest inode. The few
/// that do not fit (and every other node) get numbers from the table.
const PACKED: u64 = 1 << 63;

fn packed(n: &Node) -> Option<u64> {
    match *n {
        Node::Fs(d, p, g) if d < (1 << 19) && p < 16 && g < (1 << 40) => {
            Some(PACKED | u64::from(d) << 44 | u64::from(p) << 40 | g)
        }
        _ => None,
    }
}

fn unpack(i: u64) -> Option<Node> {
    (i & PACKED != 0).then_some(Node::Fs(
        ((i >> 44) & 0x7ffff) as u32,
        ((i >> 40) & 0xf) as u16,
        i & ((1 << 40) - 1),
    ))
}

/// holdfast errors as errno: the one mapping is [`Error::errno`].
fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

fn guest_errno(e: &guestfs::GuestFsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn to_time(t: guestfs::Time) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(t.nanos.min(999_999_999)));
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(t.secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + nanos
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
    }
}

impl HoldfastFs {
    pub fn new(repo: Arc<Repo>, vm_filter: Option<String>) -> HoldfastFs {
        let mut inodes = Inodes::default();
        inodes.nodes.push(Node::Root);
        inodes.ids.insert(Node::Root, 1);
        HoldfastFs {
            browser: Browser::new(repo, CACHE_CHUNKS, true),
            vm_filter,
            inodes: RwLock::new(inodes),
            backups: Mutex::new(None),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            mounted: SystemTime::now(),
        }
    }

    fn ino(&self, node: &Node) -> u64 {
        if let Some(i) = packed(node) {
            return i;
        }
        if let Some(i) = self
            .inodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .ids
            .get(node)
        {
            return *i;
        }
        let mut w = self.inodes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = w.ids.get(node) {
            return *i;
        }
        w.nodes.push(node.clone());
        let i = w.nodes.len() as u64;
        w.ids.insert(node.clone(), i);
        i
    }

    fn node(&self, ino: INodeNo) -> std::result::Result<Node, Errno> {
        let i = u64::from(ino);
        if let Some(n) = unpack(i) {
            return Ok(n);
        }
        let r = self.inodes.read().unwrap_or_else(|p| p.into_inner());
        i.checked_sub(1)
            .and_then(|k| r.nodes.get(k as usize))
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    /// Committed backups (of the filtered VM), re-read from the catalog at most once a second.
    fn backups(&self) -> std::result::Result<Arc<Vec<Arc<Manifest>>>, Errno> {
        let mut g = lock(&self.backups);
        if let Some((at, list)) = g.as_ref() {
            if at.elapsed() < TTL_DYNAMIC {
                return Ok(list.clone());
            }
        }
        let repo = self.browser.repo();
        let _ = repo.catalog.refresh();
        let ms = repo.manifests(self.vm_filter.as_deref()).map_err(|e| {
            tracing::error!("cannot list backups: {e}");
            errno(&e)
        })?;
        let list = Arc::new(ms.into_iter().map(Arc::new).collect::<Vec<_>>());
        *g = Some((Instant::now(), list.clone()));
        Ok(list)
    }

    fn manifest(&self, vm: &str, id: &str) -> std::result::Result<Arc<Manifest>, Errno> {
        self.backups()?
            .iter()
            .find(|m| m.vm == vm && m.id == id)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn latest(&self, vm: &str) -> std::result::Result<Arc<Manifest>, Errno> {
        // Manifests come oldest first within each VM.
        self.backups()?
            .iter()
            .rev()
            .find(|m| m.vm == vm)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn slot_id(&self, m: &Arc<Manifest>, disk: usize) -> u32 {
        let key = (m.vm.clone(), m.id.clone(), m.disks[disk].name.clone());
        if let Some(i) = self
            .inodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .disk_ids
            .get(&key)
        {
            return *i;
        }
        let mut w = self.inodes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = w.disk_ids.get(&key) {
            return *i;
        }
        let i = w.disks.len() as u32;
        w.disks.push(Arc::new(DiskSlot {
            manifest: m.clone(),
            disk,
            view: Mutex::new(None),
        }));
        w.disk_ids.insert(key, i);
        i
    }

    fn slot(&self, i: u32) -> std::result::Result<Arc<DiskSlot>, Errno> {
        self.inodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .disks
            .get(i as usize)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn view(&self, slot: &DiskSlot) -> std::result::Result<Arc<DiskView>, Errno> {
        let mut g = lock(&slot.view);
        if let Some(v) = g.as_ref() {
            return Ok(v.clone());
        }
        let v = self
            .browser
            .disk(&slot.manifest, &slot.manifest.disks[slot.disk])
            .map_err(|e| {
                tracing::error!(
                    "{}@{} disk {}: {e}",
                    slot.manifest.vm,
                    slot.manifest.id,
                    slot.manifest.disks[slot.disk].name
                );
                errno(&e)
            })?;
        *g = Some(v.clone());
        Ok(v)
    }

    fn fs(
        &self,
        d: u32,
        p: u16,
    ) -> std::result::Result<(Arc<DiskView>, Arc<dyn guestfs::Filesystem>), Errno> {
        let view = self.view(&*self.slot(d)?)?;
        let fs = view
            .parts()
            .get(usize::from(p))
            .and_then(|p| p.fs())
            .ok_or(Errno::ENOENT)?;
        Ok((view, fs))
    }

    fn dir_attr(&self, ino: u64, time: SystemTime) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_attr(&self, ino: u64, size: u64, data: u64, time: SystemTime) -> FileAttr {
        // Raw disks and partitions hold every guest file, whatever its mode: root only.
        FileAttr {
            size,
            blocks: data.div_ceil(512),
            kind: FileType::RegularFile,
            perm: 0o400,
            nlink: 1,
            ..self.dir_attr(ino, time)
        }
    }

    /// Attributes of `node`, and how long the kernel may cache them.
    fn attr(&self, node: &Node) -> std::result::Result<(FileAttr, Duration), Errno> {
        let ino = self.ino(node);
        let btime = |m: &Manifest| {
            UNIX_EPOCH
                + Duration::from_millis(if m.time_ms > 0 {
                    m.time_ms
                } else {
                    m.time * 1000
                })
        };
        Ok(match node {
            Node::Root => (self.dir_attr(ino, self.mounted), TTL_DYNAMIC),
            Node::Vm(vm) => (self.dir_attr(ino, btime(&*self.latest(vm)?)), TTL_DYNAMIC),
            Node::Backup(vm, id) => (
                self.dir_attr(ino, btime(&*self.manifest(vm, id)?)),
                TTL_STATIC,
            ),
            Node::Latest(vm) => {
                let m = self.latest(vm)?;
                let a = FileAttr {
                    kind: FileType::Symlink,
                    perm: 0o777,
                    size: m.id.len() as u64,
                    ..self.dir_attr(ino, btime(&m))
                };
                (a, TTL_DYNAMIC)
            }
            Node::DiskImg(d) => {
                let s = self.slot(*d)?;
                let e = &s.manifest.disks[s.disk];
                (
                    self.file_attr(ino, e.size, e.data_bytes, btime(&s.manifest)),
                    TTL_STATIC,
                )
            }
            Node::DiskDir(d) => (
                self.dir_attr(ino, btime(&self.slot(*d)?.manifest)),
                TTL_STATIC,
            ),
            Node::PartImg(d, p) => {
                let s = self.slot(*d)?;
                let part = self
                    .view(&s)?
                    .parts()
                    .get(usize::from(*p))
                    .cloned()
                    .ok_or(Errno::ENOENT)?;
                (
                    self.file_attr(ino, part.len, part.len, btime(&s.manifest)),
                    TTL_STATIC,
                )
            }
            Node::Fs(d, p, gino) => {
                let (_, fs) = self.fs(*d, *p)?;
                let a = fs.getattr(*gino).map_err(|e| guest_errno(&e))?;
                (self.guest_attr(ino, &a), TTL_STATIC)
            }
        })
    }

    fn guest_attr(&self, ino: u64, a: &guestfs::Attr) -> FileAttr {
        let mtime = to_time(a.mtime);
        FileAttr {
            ino: INodeNo(ino),
            size: a.size,
            blocks: a.blocks,
            atime: to_time(a.atime),
            mtime,
            ctime: to_time(a.ctime),
            crtime: a.crtime.map(to_time).unwrap_or(mtime),
            kind: file_type(a.kind),
            perm: a.perm & 0o7777,
            nlink: a.nlink.max(1),
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    /// The entries of directory `node` (without `.` and `..`).
    fn children(&self, node: &Node) -> std::result::Result<Vec<Entry>, Errno> {
        let dir = |name: &str, node: Node| Entry {
            name: name.into(),
            node,
            kind: FileType::Directory,
        };
        let mut out = Vec::new();
        match node {
            Node::Root => {
                let backups = self.backups()?;
                let mut seen = std::collections::BTreeSet::new();
                for m in backups.iter() {
                    if seen.insert(m.vm.clone()) {
                        out.push(dir(&m.vm, Node::Vm(m.vm.as_str().into())));
                    }
                }
            }
            Node::Vm(vm) => {
                for m in self.backups()?.iter().filter(|m| *m.vm == **vm) {
                    out.push(dir(&m.id, Node::Backup(vm.clone(), m.id.as_str().into())));
                }
                if !out.is_empty() {
                    out.push(Entry {
                        name: "latest".into(),
                        node: Node::Latest(vm.clone()),
                        kind: FileType::Symlink,
                    });
                }
            }
            Node::Backup(vm, id) => {
                let m = self.manifest(vm, id)?;
                for (i, d) in m.disks.iter().enumerate() {
                    let slot = self.slot_id(&m, i);
                    out.push(Entry {
                        name: format!("{}.img", d.name).into(),
                        node: Node::DiskImg(slot),
                        kind: FileType::RegularFile,
                    });
                    out.push(dir(&d.name, Node::DiskDir(slot)));
                }
            }
            Node::DiskDir(d) => {
                let view = self.view(&*self.slot(*d)?)?;
                for (i, p) in view.parts().iter().enumerate() {
                    let i = u16::try_from(i).map_err(|_| Errno::EFBIG)?;
                    if !p.whole {
                        out.push(Entry {
                            name: format!("{}.img", p.name).into(),
                            node: Node::PartImg(*d, i),
                            kind: FileType::RegularFile,
                        });
                    }
                    if let Some(fs) = p.fs() {
                        out.push(dir(&p.name, Node::Fs(*d, i, fs.root())));
                    }
                }
            }
            Node::Fs(d, p, gino) => {
                let (_, fs) = self.fs(*d, *p)?;
                for e in fs.readdir(*gino).map_err(|e| guest_errno(&e))? {
                    // A damaged or hostile directory: the kernel rejects a whole listing that
                    // holds a name it cannot use.
                    if e.name.is_empty()
                        || e.name.contains(&b'/')
                        || e.name.contains(&0)
                        || e.name == b"."
                        || e.name == b".."
                    {
                        continue;
                    }
                    out.push(Entry {
                        name: OsString::from_vec(e.name),
                        node: Node::Fs(*d, *p, e.ino),
                        kind: file_type(e.kind),
                    });
                }
            }
            Node::Latest(_) | Node::DiskImg(_) | Node::PartImg(..) => return Err(Errno::ENOTDIR),
        }
        Ok(out)
    }

    fn lookup_node(&self, parent: &Node, name: &OsStr) -> std::result::Result<Node, Errno> {
        if let Node::Fs(d, p, gino) = parent {
            // Straight to the guest filesystem: a directory of 10,000 files is not listed per lookup.
            let (_, fs) = self.fs(*d, *p)?;
            let a = fs
                .lookup(*gino, name.as_bytes())
                .map_err(|e| guest_errno(&e))?
                .ok_or(Errno::ENOENT)?;
            return Ok(Node::Fs(*d, *p, a.ino));
        }
        self.children(parent)?
            .into_iter()
            .find(|e| e.name == name)
            .map(|e| e.node)
            .ok_or(Errno::ENOENT)
    }

    fn read_node(
        &self,
        node: &Node,
        offset: u64,
        size: u32,
    ) -> std::result::Result<Vec<u8>, Errno> {
        let mut buf = vec![0u8; size as usize];
        let n = match node {
            Node::DiskImg(d) => {
                let view = self.view(&*self.slot(*d)?)?;
                view.read(&mut buf, offset).map_err(|e| {
                    tracing::error!(
                        "{}: cannot read {size} bytes at offset {offset}: {e}",
                        view.label
                    );
                    errno(&e)
                })?
            }
            Node::PartImg(d, p) => {
                let view = self.view(&*self.slot(*d)?)?;
                let part = view
                    .parts()
                    .get(usize::from(*p))
                    .cloned()
                    .ok_or(Errno::ENOENT)?;
                part.read(&mut buf, offset).map_err(|_| Errno::EIO)?
            }
            Node::Fs(d, p, gino) => {
                let (view, fs) = self.fs(*d, *p)?;
                fs.read(*gino, offset, &mut buf).map_err(|e| {
                    if e.is_io() {
                        tracing::error!("{}: guest inode {gino}: {e}", view.label);
                    }
                    guest_errno(&e)
                })?
            }
            _ => return Err(Errno::EISDIR),
        };
        buf.truncate(n);
        Ok(buf)
    }
}

impl fuser::Filesystem for HoldfastFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS
                | fuser::InitFlags::FUSE_READDIRPLUS_AUTO
                | fuser::InitFlags::FUSE_PARALLEL_DIROPS,
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self
            .node(parent)
            .and_then(|p| self.lookup_node(&p, name))
            .and_then(|n| self.attr(&n))
        {
            Ok((a, ttl)) => reply.entry(&ttl, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino).and_then(|n| self.attr(&n)) {
            Ok((a, ttl)) => reply.attr(&ttl, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.node(ino).and_then(|n| match n {
            Node::Latest(vm) => Ok(self.latest(&vm)?.id.as_bytes().to_vec()),
            Node::Fs(d, p, gino) => self.fs(d, p)?.1.readlink(gino).map_err(|e| guest_errno(&e)),
            _ => Err(Errno::EINVAL),
        });
        match r {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != fuser::OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.node(ino) {
            Ok(Node::DiskImg(_) | Node::PartImg(..) | Node::Fs(..)) => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Ok(_) => reply.error(Errno::EISDIR),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        match self
            .node(ino)
            .and_then(|n| self.read_node(&n, offset, size))
        {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino).and_then(|n| self.children(&n)) {
            Ok(list) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                lock(&self.dirs).insert(fh, Arc::new(list));
                // The root and VM directories change with new backups; the rest never does.
                let flags = match self.node(ino) {
                    Ok(Node::Root | Node::Vm(_)) => FopenFlags::empty(),
                    _ => FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
                };
                reply.opened(FileHandle(fh), flags);
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(list) = lock(&self.dirs).get(&u64::from(fh)).cloned() else {
            return reply.error(Errno::EBADF);
        };
        // Offsets are shared with readdirplus (the kernel may mix them on one handle):
        // 0 is ".", 1 is "..", 2 + i is entry i.
        for i in offset as usize..list.len() + 2 {
            let full = match i {
                0 | 1 => reply.add(
                    ino,
                    i as u64 + 1,
                    FileType::Directory,
                    if i == 0 { "." } else { ".." },
                ),
                _ => {
                    let e = &list[i - 2];
                    reply.add(INodeNo(self.ino(&e.node)), i as u64 + 1, e.kind, &e.name)
                }
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(list) = lock(&self.dirs).get(&u64::from(fh)).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let me = match self.node(ino).and_then(|n| self.attr(&n)) {
            Ok(a) => a,
            Err(e) => return reply.error(e),
        };
        for i in offset as usize..list.len() + 2 {
            let full = match i {
                0 | 1 => reply.add(
                    ino,
                    i as u64 + 1,
                    if i == 0 { "." } else { ".." },
                    &me.1,
                    &me.0,
                    Generation(0),
                ),
                _ => {
                    let e = &list[i - 2];
                    let Ok((a, ttl)) = self.attr(&e.node) else {
                        continue;
                    };
                    reply.add(a.ino, i as u64 + 1, &e.name, &ttl, &a, Generation(0))
                }
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: fuser::ReplyEmpty,
    ) {
        lock(&self.dirs).remove(&u64::from(fh));
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: fuser::ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }
}

/// The mount point must be a directory that is not a holdfast mount yet (a stale one, whose
/// process died, is removed first).
fn check_mountpoint(mountpoint: &Path, ctx: &Ctx) -> Result<()> {
    let meta = std::fs::metadata(mountpoint);
    match meta {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::usage(format!(
                "{} is not a directory; mount on an empty directory",
                mountpoint.display()
            )))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
        Err(_) => {
            return Err(Error::not_found(
                What::Directory,
                mountpoint.display().to_string(),
                format!(
                    "{} does not exist; create it first (mkdir -p {})",
                    mountpoint.display(),
                    mountpoint.display()
                ),
            ))
        }
    }
    if clean_stale(mountpoint)? {
        ctx.info(&format!(
            "removed a stale holdfast mount at {} (its process had died)",
            mountpoint.display()
        ));
    }
    if let Some(m) = holdfast_mount(mountpoint) {
        return Err(Error::busy(
            "mount",
            format!(
                "{} is already a holdfast mount ({}); unmount it first with `holdfast umount {}`",
                mountpoint.display(),
                m.source,
                mountpoint.display()
            ),
        ));
    }
    Ok(())
}

/// Mount the backups at `mountpoint` and serve until unmounted (`holdfast umount`) or until
/// `ctx` is cancelled (then it unmounts itself). Reports [`Serving`] once the mount is in place.
pub fn serve(repo: Arc<Repo>, mountpoint: &Path, cfg: MountConfig, ctx: &Ctx) -> Result<()> {
    check_mountpoint(mountpoint, ctx)?;
    let fs = HoldfastFs::new(repo, cfg.vm);
    let mut options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoAtime,
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::FSName(format!("holdfast:{}", std::process::id())),
        fuser::MountOption::Subtype("holdfast".into()),
    ];
    options.dedup();
    let mut config = fuser::Config::default();
    config.mount_options = options;
    config.acl = if cfg.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(cfg.threads.max(1));
    config.clone_fd = true;
    ctx.check()?;
    let session = fuser::Session::new(fs, mountpoint, &config)
        .map_err(|e| Error::io(format!("mount FUSE at {}", mountpoint.display()), e))?;
    // Watched from the moment the mount exists: a cancel (a signal the moment the mount is
    // ready, too) unmounts it rather than leaving a stale mount behind.
    let at = mountpoint.to_path_buf();
    let cancel = ctx.cancel.clone();
    let _ = std::thread::Builder::new()
        .name("holdfast-unmount".into())
        .spawn(move || {
            cancel.wait();
            if let Err(e) = unmount(&at, false) {
                // Busy: detach now; the mount ends when the last open file closes.
                tracing::warn!("{e}; detaching it instead");
                let _ = unmount(&at, true);
            }
        });
    let at = mountpoint.display().to_string();
    ctx.events.serving(&Serving {
        what: "holdfast backups".into(),
        at: at.clone(),
        stop: format!("`holdfast umount {at}` or Ctrl-C"),
    });
    session.run().map_err(|e| {
        Error::io(
            format!("serve the FUSE mount at {}", mountpoint.display()),
            e,
        )
    })
}
