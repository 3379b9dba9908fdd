//! Errors of the guest filesystem readers, and their one mapping to errno.

use thiserror::Error;

/// What went wrong while reading a guest disk.
///
/// `Io` is reserved for failures of the underlying [`Device`](super::Device): the bytes could
/// not be read. Everything that is wrong *with* the bytes (a guest owns them) is `Corrupt`,
/// `TooLarge` or `Unsupported`.
#[derive(Debug, Error)]
pub enum GuestFsError {
    #[error("reading {len} bytes of the disk at offset {offset} failed: {source}")]
    Io {
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("not a symbolic link")]
    NotSymlink,
    #[error("guest filesystem is corrupt: {0}")]
    Corrupt(String),
    #[error("guest filesystem structure exceeds a safety limit: {0}")]
    TooLarge(String),
    #[error("not supported by the guest filesystem reader: {0}")]
    Unsupported(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// Result of the guest filesystem readers.
pub type Result<T, E = GuestFsError> = std::result::Result<T, E>;

impl GuestFsError {
    /// The errno a FUSE reply should carry for this error.
    pub fn errno(&self) -> i32 {
        match self {
            GuestFsError::Io { .. } => libc::EIO,
            GuestFsError::NotFound => libc::ENOENT,
            GuestFsError::NotDir => libc::ENOTDIR,
            GuestFsError::IsDir => libc::EISDIR,
            GuestFsError::NotSymlink => libc::EINVAL,
            GuestFsError::Corrupt(_) => libc::EIO,
            GuestFsError::TooLarge(_) => libc::EFBIG,
            GuestFsError::Unsupported(_) => libc::EOPNOTSUPP,
            GuestFsError::Invalid(_) => libc::EINVAL,
        }
    }

    /// True when the device failed (as opposed to the guest's bytes being bad).
    pub fn is_io(&self) -> bool {
        matches!(self, GuestFsError::Io { .. })
    }
}

/// Shorthand for a `Corrupt` error.
pub(crate) fn corrupt(msg: impl Into<String>) -> GuestFsError {
    GuestFsError::Corrupt(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        let io = GuestFsError::Io {
            offset: 0,
            len: 1,
            source: std::io::Error::other("x"),
        };
        assert_eq!(io.errno(), libc::EIO);
        assert_eq!(GuestFsError::NotFound.errno(), libc::ENOENT);
        assert_eq!(GuestFsError::NotDir.errno(), libc::ENOTDIR);
        assert_eq!(GuestFsError::IsDir.errno(), libc::EISDIR);
        assert_eq!(GuestFsError::NotSymlink.errno(), libc::EINVAL);
        assert_eq!(corrupt("x").errno(), libc::EIO);
    }
}
