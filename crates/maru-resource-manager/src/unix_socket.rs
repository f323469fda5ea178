//! The resource manager's Unix socket: how a process of this host connects when it wants the
//! kernel, not its Hello, to say who it is (`SO_PEERCRED`). The metadata server of the same
//! host uses it (`--rm-address unix://PATH`). Its default place is the state directory, which
//! is private to the resource manager's user (0700), so only that user and root can reach it;
//! the socket itself is 0600 for the same reason wherever it is put.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Binds `path`, replacing a stale socket file left by a dead resource manager but never one
/// that a live process still answers on.
pub(crate) fn bind(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by a running process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
