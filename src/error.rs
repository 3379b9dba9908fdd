//! The top-level error: every module's typed error, plus the failures of operations that a
//! user can act on.
//!
//! Each variant says what kind of failure it is; its message says what went wrong and what
//! to do, and sources are kept (`std::error::Error::source`). One `match` each decides:
//! - [`Error::code`]: the stable, machine-readable code (`"busy"`, `"not-found"`, …) that
//!   `--json` prints and the HTTP API maps to a status — never renamed once released;
//! - [`Error::exit_code`]: the CLI's exit status;
//! - [`Error::errno`]: what a FUSE reply or an NBD reply carries (through [`Error::to_io`]).
//!
//! The list of codes, with what each means, is in `docs/errors.md` and [`CODES`].

use crate::guestfs::GuestFsError;
use crate::qmp::QmpError;
use serde::Serialize;
use std::path::PathBuf;
use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a `NotFound`, `Exists` or `Limit` error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum What {
    Repository,
    Backup,
    Vm,
    Disk,
    Snapshot,
    Task,
    File,
    Directory,
    Socket,
    Mount,
    QemuNode,
    User,
    Token,
    Export,
    /// A notification target.
    Target,
}

/// Another operation holds what this one needs.
#[derive(Debug, Clone, Serialize)]
pub struct Busy {
    /// The VM that is busy (None: the repository or a mount point).
    pub vm: Option<String>,
    /// What runs there: `backup`, `restore`, `snapshot-create`, …
    pub operation: String,
    /// Its task id, when it has one.
    pub task: Option<String>,
    pub pid: Option<u32>,
    pub percent: Option<u8>,
    pub message: String,
}

#[derive(Debug, Error)]
pub enum Error {
    /// The request cannot be carried out as asked: a bad argument, a missing option, options
    /// that do not go together.
    #[error("{0}")]
    Usage(String),
    #[error("{message}")]
    NotFound {
        what: What,
        name: String,
        message: String,
    },
    #[error("{message}")]
    Exists {
        what: What,
        name: String,
        message: String,
    },
    /// A limit would be exceeded (snapshots per VM, …).
    #[error("{message}")]
    Limit {
        what: What,
        limit: u64,
        message: String,
    },
    /// Every backup slot of the VM is in use and its policy refuses new backups (or every
    /// backup in them is protected).
    #[error("{message}")]
    SlotsFull {
        vm: String,
        slots: u64,
        used: Vec<String>,
        message: String,
    },
    /// The state of the VM or the repository does not allow it now (a disk-only snapshot
    /// cannot be reverted while the VM runs, a newer overlay sits on top, …).
    #[error("{0}")]
    Conflict(String),
    /// This QEMU, disk format or guest filesystem cannot do it.
    #[error("{0}")]
    Unsupported(String),
    #[error("{}", .0.message)]
    Busy(Box<Busy>),
    /// Stopped on request (a signal, or a user cancelling the task) before it finished.
    #[error("interrupted ({by}): nothing was committed; run the command again to finish")]
    Cancelled { by: String },
    /// Stored data is damaged: a blob, a manifest, a record. Never turned into wrong bytes.
    #[error("{message}")]
    Damaged { what: String, message: String },
    /// A configuration file is invalid.
    #[error("{message}")]
    Config { path: PathBuf, message: String },
    /// QEMU (QMP or the guest agent) failed a step of an operation on a VM.
    #[error("VM {vm}: {step}: {source}")]
    Qemu {
        vm: String,
        step: String,
        #[source]
        source: Box<QmpError>,
    },
    /// A guest filesystem inside a backup could not be read.
    #[error("{part}: {path}: {source}")]
    Guest {
        part: String,
        path: String,
        #[source]
        source: GuestFsError,
    },
    /// An external tool (qemu-img) failed.
    #[error("{message}")]
    Tool { tool: &'static str, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Chunk(#[from] crate::chunk::ChunkError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Name(#[from] crate::names::NameError),
    #[error(transparent)]
    Qmp(Box<QmpError>),
    /// The caller did not say who they are, or it did not check out.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's role does not allow it.
    #[error("{0}")]
    Forbidden(String),
    /// Too many attempts (failed logins); wait and retry.
    #[error("{0}")]
    RateLimited(String),
    /// A request body over the limit.
    #[error("{0}")]
    TooLarge(String),
    /// A request body that parses but does not fit (unknown fields, wrong types).
    #[error("{0}")]
    InvalidBody(String),
    /// The backup is protected: unprotect it first.
    #[error("{0}")]
    Protected(String),
    /// An encrypted store's key is missing or wrong: a passphrase that opens none of its
    /// keys, a key file that is gone or belongs to another store, a secret file others can read.
    #[error("{0}")]
    Key(String),
    /// Something that should not happen (serialization of our own types, no randomness).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<QmpError> for Error {
    fn from(e: QmpError) -> Self {
        Error::Qmp(Box::new(e))
    }
}

/// Every stable error code, with what it means (docs/errors.md has the long form).
pub const CODES: &[(&str, &str)] = &[
    (
        "usage",
        "the request is malformed or its options do not go together",
    ),
    (
        "invalid-name",
        "a VM, disk or snapshot name breaks the naming rules",
    ),
    (
        "not-found",
        "the VM, backup, disk, snapshot, task or file does not exist",
    ),
    (
        "exists",
        "the name is taken or the target exists; nothing is overwritten",
    ),
    (
        "limit-reached",
        "a limit (snapshots per VM) would be exceeded",
    ),
    (
        "slots-full",
        "every backup slot of the VM is in use and its policy refuses new backups",
    ),
    (
        "conflict",
        "the current state of the VM or repository does not allow it now",
    ),
    (
        "unsupported",
        "this QEMU, disk format or guest filesystem cannot do it",
    ),
    ("busy", "another operation holds the VM or the repository"),
    (
        "cancelled",
        "stopped on request before it finished; nothing was committed",
    ),
    (
        "damaged",
        "stored data failed its checks; it is never returned as data",
    ),
    ("config", "a configuration file is invalid"),
    ("qemu", "QEMU, its QMP socket or the guest agent failed"),
    (
        "guest-fs",
        "a guest filesystem inside a backup could not be read",
    ),
    ("source", "the disk being backed up could not be read"),
    ("store", "the store failed an operation"),
    ("store-full", "the disk or quota of the store is full"),
    (
        "store-unavailable",
        "the remote store did not answer or refused",
    ),
    (
        "catalog",
        "the catalog failed; `holdfast catalog rebuild` recreates it",
    ),
    ("tool", "an external tool (qemu-img) failed"),
    ("io", "a local file or device operation failed"),
    (
        "process-ended",
        "the process running the task died (a task record only)",
    ),
    (
        "unauthenticated",
        "no credentials, or credentials that do not check out",
    ),
    ("forbidden", "the caller's role does not allow it"),
    (
        "rate-limited",
        "too many attempts (failed logins); wait and retry",
    ),
    ("too-large", "a request body over the limit"),
    (
        "invalid-body",
        "a request body that parses but does not fit: unknown fields, wrong types",
    ),
    ("protected", "the backup is protected: unprotect it first"),
    ("internal", "a bug: please report it"),
];

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        if matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        ) {
            return Error::Store(crate::store::StoreError::Full(what.into()));
        }
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Error::Usage(message.into())
    }

    pub fn not_found(what: What, name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::NotFound {
            what,
            name: name.into(),
            message: message.into(),
        }
    }

    pub fn exists(what: What, name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Exists {
            what,
            name: name.into(),
            message: message.into(),
        }
    }

    /// Busy, but not with a VM's task: a mount point, the repository.
    pub fn busy(operation: &str, message: impl Into<String>) -> Self {
        Error::Busy(Box::new(Busy {
            vm: None,
            operation: operation.to_string(),
            task: None,
            pid: None,
            percent: None,
            message: message.into(),
        }))
    }

    pub fn damaged(what: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Damaged {
            what: what.into(),
            message: message.into(),
        }
    }

    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn internal(message: impl std::fmt::Display) -> Self {
        Error::Internal(message.to_string())
    }

    /// A QMP failure during `step` (`creating the read point`) of an operation on `vm`.
    pub fn qemu<'a>(vm: &'a str, step: &'a str) -> impl FnOnce(QmpError) -> Error + 'a {
        move |source| Error::Qemu {
            vm: vm.to_string(),
            step: step.to_string(),
            source: Box::new(source),
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        use crate::chunk::ChunkError;
        use crate::store::StoreError;
        match self {
            Error::Usage(_) => "usage",
            Error::Name(_) => "invalid-name",
            Error::NotFound { .. } => "not-found",
            Error::Exists { .. } => "exists",
            Error::Limit { .. } => "limit-reached",
            Error::SlotsFull { .. } => "slots-full",
            Error::Conflict(_) => "conflict",
            Error::Unsupported(_) => "unsupported",
            Error::Busy(_) => "busy",
            Error::Cancelled { .. } => "cancelled",
            Error::Damaged { .. } => "damaged",
            Error::Chunk(ChunkError::Corrupt { .. } | ChunkError::BadId(_)) => "damaged",
            Error::Chunk(ChunkError::Params(_)) => "usage",
            Error::Config { .. } => "config",
            Error::Qemu { .. } | Error::Qmp(_) => "qemu",
            // A device read failing is a damaged chunk of the backup (re-hashed on read); a
            // guest filesystem that is itself corrupt was backed up faithfully.
            Error::Guest { source, .. } => match source {
                GuestFsError::NotFound => "not-found",
                GuestFsError::Io { .. } => "damaged",
                _ => "guest-fs",
            },
            Error::Source(_) => "source",
            Error::Store(StoreError::Full(_)) => "store-full",
            Error::Store(StoreError::Remote { .. }) => "store-unavailable",
            // A stored object that is gone or cut short is damage: the catalog or a manifest
            // says it is there. (Expected absences are handled where they happen.)
            Error::Store(StoreError::Corrupt { .. } | StoreError::NotFound(_)) => "damaged",
            Error::Store(_) => "store",
            Error::Catalog(crate::catalog::CatalogError::Busy(_)) => "busy",
            Error::Catalog(_) => "catalog",
            Error::Tool { .. } => "tool",
            Error::Io { .. } => "io",
            Error::Internal(_) => "internal",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::Forbidden(_) => "forbidden",
            Error::RateLimited(_) => "rate-limited",
            Error::TooLarge(_) => "too-large",
            Error::InvalidBody(_) => "invalid-body",
            Error::Protected(_) => "protected",
            Error::Key(_) => "key",
        }
    }

    /// The HTTP status the API answers with.
    pub fn http_status(&self) -> u16 {
        http_status_of(self.code())
    }

    /// Process exit code: 2 for usage errors, 3 for damaged data, 4 for a busy VM or
    /// repository, 130 when interrupted, 1 for the rest.
    pub fn exit_code(&self) -> i32 {
        exit_code_of(self.code())
    }

    /// The errno a FUSE or NBD reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self.code() {
            "not-found" => libc::ENOENT,
            "usage" | "invalid-name" | "too-large" | "invalid-body" => libc::EINVAL,
            "unauthenticated" | "forbidden" => libc::EACCES,
            "rate-limited" => libc::EAGAIN,
            "exists" => libc::EEXIST,
            "busy" => libc::EBUSY,
            "cancelled" => libc::EINTR,
            "unsupported" => libc::EOPNOTSUPP,
            "store-full" => libc::ENOSPC,
            _ => match self {
                Error::Guest { source, .. } => source.errno(),
                _ => libc::EIO,
            },
        }
    }

    /// As an `std::io::Error` for the NBD server and other I/O traits: the kind follows
    /// [`Error::errno`], the message is this error's.
    pub fn to_io(&self) -> std::io::Error {
        let kind = std::io::Error::from_raw_os_error(self.errno()).kind();
        std::io::Error::new(kind, self.to_string())
    }

    /// The JSON form (`--json`, the HTTP API, task records).
    pub fn to_body(&self) -> ErrorBody {
        let details = match self {
            Error::NotFound { what, name, .. } | Error::Exists { what, name, .. } => {
                serde_json::json!({ "what": what, "name": name })
            }
            Error::Limit { what, limit, .. } => serde_json::json!({ "what": what, "limit": limit }),
            Error::SlotsFull {
                vm, slots, used, ..
            } => serde_json::json!({ "vm": vm, "slots": slots, "used": used }),
            Error::Busy(b) => serde_json::json!({
                "vm": b.vm, "operation": b.operation, "task": b.task, "pid": b.pid,
                "percent": b.percent,
            }),
            Error::Damaged { what, .. } => serde_json::json!({ "what": what }),
            Error::Config { path, .. } => serde_json::json!({ "path": path }),
            Error::Qemu { vm, step, .. } => serde_json::json!({ "vm": vm, "step": step }),
            Error::Guest { part, path, .. } => serde_json::json!({ "part": part, "path": path }),
            _ => serde_json::Value::Null,
        };
        ErrorBody {
            code: self.code().to_string(),
            message: self.to_string(),
            details,
        }
    }
}

/// The HTTP status for an error code (docs/errors.md has the table).
pub fn http_status_of(code: &str) -> u16 {
    match code {
        "usage" | "invalid-name" => 400,
        "unauthenticated" => 401,
        "forbidden" => 403,
        "not-found" => 404,
        "exists" | "limit-reached" | "slots-full" | "conflict" | "busy" | "cancelled"
        | "protected" => 409,
        "too-large" => 413,
        "unsupported" | "invalid-body" | "guest-fs" => 422,
        "rate-limited" => 429,
        "qemu" | "source" | "store-unavailable" | "key" => 503,
        "store-full" => 507,
        _ => 500,
    }
}

/// The exit code for an error code (also for errors read back from task records): 2 for a
/// request the command line got wrong (as for clap's own parse errors), 3 for damaged data,
/// 4 busy, 130 cancelled, 1 for everything else.
pub fn exit_code_of(code: &str) -> i32 {
    match code {
        "usage" | "invalid-name" | "invalid-body" | "too-large" => 2,
        "damaged" => 3,
        "busy" => 4,
        "cancelled" => 130,
        _ => 1,
    }
}

/// An error as JSON: `{"code": "busy", "message": "…", "details": {…}}`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The stable code (docs/errors.md).
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    #[schema(value_type = Option<Object>)]
    pub details: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed_and_maps_to_an_exit_code() {
        let samples = [
            Error::usage("x"),
            Error::not_found(What::Backup, "vm@1", "x"),
            Error::exists(What::Snapshot, "s", "x"),
            Error::Conflict("x".into()),
            Error::Unsupported("x".into()),
            Error::Cancelled {
                by: "SIGINT".into(),
            },
            Error::damaged("blob", "x"),
            Error::config("/x", "x"),
            Error::internal("x"),
            Error::Busy(Box::new(Busy {
                vm: Some("a".into()),
                operation: "backup".into(),
                task: None,
                pid: Some(1),
                percent: Some(5),
                message: "x".into(),
            })),
        ];
        for e in &samples {
            assert!(
                CODES.iter().any(|(c, _)| *c == e.code()),
                "{} is not in CODES",
                e.code()
            );
        }
        assert_eq!(samples[0].exit_code(), 2);
        assert_eq!(samples[6].exit_code(), 3);
        assert_eq!(samples[9].exit_code(), 4);
        assert_eq!(samples[5].exit_code(), 130);
        assert_eq!(samples[1].errno(), libc::ENOENT);
        assert_eq!(samples[9].to_io().kind(), std::io::ErrorKind::ResourceBusy);
        let body = samples[9].to_body();
        assert_eq!(body.code, "busy");
        assert_eq!(body.details["operation"], "backup");
    }
}
