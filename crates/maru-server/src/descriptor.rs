//! Region descriptors for local clients (`Request::Descriptor`): the server opens the file
//! that holds a region — read-only, or read-write for its owner — and the connection passes
//! the descriptor over the Unix socket with the reply (SCM_RIGHTS), so a client maps it
//! without any permission on the pool file of its own.
//!
//! What the kernel then enforces is the descriptor's access mode: a read-only descriptor
//! cannot be mapped writable (`mmap(PROT_WRITE, MAP_SHARED)` is `EACCES`), whatever the
//! client does. What it covers is the file: in an FS_DAX pool one region (a file per
//! region); in a shm pool (one file) the whole pool, so a read-only descriptor reads every
//! region and an owner's read-write one can map any range of the file. A DEV_DAX device is
//! not split into descriptors: its clients open its path, as before.

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

use maru_proto::{Access, ErrorCode, WireError};

/// Opens the file of `access` for a client: read-only, or read-write.
pub(crate) fn open(access: &Access, writable: bool) -> Result<OwnedFd, WireError> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(&access.path)
        .map_err(|e| {
            WireError::new(
                ErrorCode::Unavailable,
                format!("cannot open {} for a descriptor: {e}", access.path),
            )
        })?;
    let meta = file.metadata().map_err(|e| {
        WireError::new(
            ErrorCode::Unavailable,
            format!("cannot stat {}: {e}", access.path),
        )
    })?;
    if meta.file_type().is_char_device() || !meta.is_file() {
        return Err(WireError::new(
            ErrorCode::Unavailable,
            format!(
                "{} is a device, not split into descriptors: map it by its path",
                access.path
            ),
        ));
    }
    Ok(file.into())
}
