//! Who a process is, as a [`maru_proto::Hello`] states it and the resource manager's reaper
//! checks it: hostname, pid, and the pid's start time (which tells a reused pid apart). And
//! who is on the other end of a socket as the kernel knows it, which a daemon believes
//! instead of a Hello: the pid and uid of a Unix-socket peer (`SO_PEERCRED`), and whether a
//! given process holds the other end of a loopback TCP connection.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;

/// This process's identity for a [`maru_proto::Hello`]: hostname, pid and start time.
pub fn local_identity() -> (String, u32, u64) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    let pid = std::process::id();
    (host, pid, process_start_time(pid).unwrap_or(0))
}

/// Start time of `pid` in clock ticks since boot (`/proc/PID/stat` field 22), `None` when the
/// process does not exist. Pid reuse gives the same pid a different start time.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: skip past it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// A Unix-socket peer as the kernel recorded it when it connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The credentials of the process at the other end of a connected Unix socket
/// (`SO_PEERCRED`: taken by the kernel at `connect`, whatever the peer says later).
pub fn unix_peer_cred(sock: &impl AsRawFd) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live ucred of exactly that
    // size, and updates `len`; the fd is a socket the caller holds open.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: u32::try_from(cred.pid).unwrap_or(0),
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// This process's effective uid.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether a TCP connection comes from this host's own network stack: the peer's address is
/// a loopback address or the very address the connection reached (a process here
/// connecting to one of this host's addresses).
pub fn tcp_peer_is_local(stream: &TcpStream) -> bool {
    match (stream.peer_addr(), stream.local_addr()) {
        (Ok(peer), Ok(local)) => peer.ip().is_loopback() || peer.ip() == local.ip(),
        _ => false,
    }
}

/// `/proc/net/tcp` spelling of an address: the IP's 32-bit words in host order, then the
/// port, in upper-case hex.
fn proc_net_addr(a: &SocketAddr) -> String {
    let words: Vec<[u8; 4]> = match a.ip() {
        IpAddr::V4(ip) => vec![ip.octets()],
        IpAddr::V6(ip) => ip
            .octets()
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect(),
    };
    let mut s: String = words
        .iter()
        .map(|w| format!("{:08X}", u32::from_ne_bytes(*w)))
        .collect();
    s.push_str(&format!(":{:04X}", a.port()));
    s
}

/// Whether process `pid` holds the other end of `stream`, a TCP connection between two
/// processes of this host: the peer socket's inode is looked up in `/proc/net/tcp{,6}` and
/// searched among `pid`'s descriptors. `Err` when that cannot be told (no `/proc`, no
/// permission to read `pid`'s descriptors).
pub fn tcp_peer_held_by(stream: &TcpStream, pid: u32) -> Result<bool, String> {
    let peer = stream.peer_addr().map_err(|e| e.to_string())?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    // The peer's socket: its local address is our peer address and its remote one ours.
    let (want_local, want_remote) = (proc_net_addr(&peer), proc_net_addr(&local));
    let table = if peer.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let text = std::fs::read_to_string(table).map_err(|e| format!("{table}: {e}"))?;
    let inode = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 9 && f[1] == want_local && f[2] == want_remote)
        .map(|f| f[9].to_owned())
        .ok_or_else(|| format!("the peer socket {peer} is not in {table}"))?;
    let target = format!("socket:[{inode}]");
    let dir = format!("/proc/{pid}/fd");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("{dir}: {e}")),
    };
    Ok(entries
        .filter_map(Result::ok)
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == target.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_readable_and_missing_pid_is_none() {
        let (_, pid, start) = local_identity();
        assert!(start > 0);
        assert_eq!(process_start_time(pid), Some(start));
        assert_eq!(process_start_time(u32::MAX), None);
    }

    #[test]
    fn the_kernel_names_a_unix_peer() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let cred = unix_peer_cred(&a).unwrap();
        assert_eq!(cred.pid, std::process::id());
        assert_eq!(cred.uid, effective_uid());
    }

    #[test]
    fn a_loopback_tcp_peer_is_found_in_its_process_only() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server_side, _) = l.accept().unwrap();
        assert!(tcp_peer_is_local(&server_side));
        assert_eq!(tcp_peer_held_by(&server_side, std::process::id()), Ok(true));
        // pid 1 (init) holds no socket of this test.
        assert_ne!(tcp_peer_held_by(&server_side, 1), Ok(true));
    }
}
