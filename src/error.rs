//! The top-level error: every module's typed error, plus the job-level failures a user can act on.

use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
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
    Qmp(#[from] crate::qmp::QmpError),
    #[error("{0}")]
    Busy(String),
    #[error(
        "interrupted (SIGINT/SIGTERM): nothing was committed; run the command again to finish"
    )]
    Interrupted,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Damaged(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return Error::Store(crate::store::StoreError::Full(what.into()));
        }
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// Process exit code: 1 for errors, 3 for damaged data, 4 for a busy VM or repository.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Damaged(_) | Error::Chunk(crate::chunk::ChunkError::Corrupt { .. }) => 3,
            Error::Busy(_) => 4,
            Error::Interrupted => 130,
            _ => 1,
        }
    }
}
