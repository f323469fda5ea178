//! The Unix-socket listener: created with its mode already set, so no one outside the owner
//! and group can connect even for a moment, and bound over a stale socket file but never over
//! a live server's.

use std::fs::Permissions;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::server::ServerError;

/// Mode of the Unix socket whatever the umask: owner and group may connect (like the pool
/// file), others may not.
const UNIX_SOCKET_MODE: u32 = 0o660;

/// Binds a Unix socket, replacing a stale socket file left by a dead server but never one a
/// live server still answers on.
pub(crate) fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    let bind_err = |source| ServerError::BindUnix {
        path: path.to_owned(),
        source,
    };
    match listen_unix(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::UnixInUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(bind_err)?;
            listen_unix(path).map_err(bind_err)
        }
        Err(e) => Err(bind_err(e)),
    }
}

/// `UnixListener::bind` in three steps — socket and bind, chmod to [`UNIX_SOCKET_MODE`],
/// listen — so the socket file has its mode before anyone can connect (a connect before
/// `listen` is refused), whatever the umask leaves at bind time.
fn listen_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data, for which all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a Unix socket path must be shorter than {} bytes, without NUL",
                addr.sun_path.len()
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len =
        (std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns; OwnedFd closes it on every path.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised sockaddr_un and `len` (path plus its NUL, checked
    // above to fit) does not exceed its size; the kernel only reads it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let listening = std::fs::set_permissions(path, Permissions::from_mode(UNIX_SOCKET_MODE))
        .and_then(|()| {
            // SAFETY: listen(2) on the bound socket this function owns.
            match unsafe { libc::listen(fd.as_raw_fd(), libc::SOMAXCONN) } {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            }
        });
    if let Err(e) = listening {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}
