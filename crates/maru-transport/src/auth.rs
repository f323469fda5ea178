//! Proof that a TCP peer holds the cluster secret: a challenge–response at the start of a
//! connection, before its first frame (before any Hello, so before any state changes).
//!
//! ```text
//! client → server   "MRAU" v1 0 0 0   client nonce (32)            40 bytes
//! server → client   "MRAU" v1 status 0 0   server nonce (32)       40 bytes
//! client → server   MAC(k, "client", cn, sn)                         32 bytes
//! server → client   "MRAU" v1 status 0 0   MAC(k, "server", cn, sn) 40 bytes
//! ```
//!
//! MAC is keyed BLAKE3 (a PRF) under the 32-byte secret `k`. Both nonces are fresh random
//! bytes, so a recorded exchange replayed to a daemon fails (its server nonce differs), and a
//! recorded daemon answer replayed to a client fails (its client nonce differs): each side
//! proves it holds the secret, to the other, on this connection. Daemons accept the current
//! and the previous secret (rotation) and answer with the one the client used.
//!
//! What it protects: who may open a session or touch the resource manager over TCP, and that
//! clients talk to the real daemons. What it does not: the bytes after the handshake travel
//! in plaintext and unauthenticated (a party that can rewrite packets on the path can alter
//! or read them after the exchange); the chunk data never travels, only metadata does.
//!
//! A daemon that requires the proof and gets a plain frame instead answers with an
//! `Unauthenticated` error frame and closes, so an old or unconfigured client sees why.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use maru_proto::{encode_error, ErrorCode, WireError};

/// First bytes of an authentication message (a frame begins with `MARU`).
pub const AUTH_MAGIC: [u8; 4] = *b"MRAU";
const VERSION: u8 = 1;
const NONCE_LEN: usize = 32;
const MSG_LEN: usize = 8 + NONCE_LEN;
/// Statuses of a daemon's answers.
const OK: u8 = 0;
const REFUSED: u8 = 1;
/// The daemon has no secret and cannot prove anything.
const NO_SECRET: u8 = 2;

/// Environment variable naming the secret file when a client's configuration does not.
pub const SECRET_ENV: &str = "MARU_SECRET_FILE";

/// Why a handshake or a secret file failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("secret file {path}: {reason}")]
    SecretFile { path: PathBuf, reason: String },
    #[error("the peer did not prove it holds the cluster secret: {0}")]
    Refused(String),
    #[error("authentication exchange failed: {0}")]
    Io(#[from] io::Error),
}

/// The cluster secret, from a file of one or two lines of 64 hex digits: the current secret,
/// then optionally the previous one (accepted by daemons during a rotation; clients use the
/// current one). The file must not be readable by group or others.
#[derive(Clone)]
pub struct ClusterSecret {
    pub path: PathBuf,
    current: [u8; 32],
    previous: Option<[u8; 32]>,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterSecret({})", self.path.display())
    }
}

fn parse_hex(line: &str) -> Option<[u8; 32]> {
    let line = line.trim();
    if line.len() != 64 || !line.is_ascii() {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&line[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(k)
}

fn hex(k: &[u8; 32]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

fn random() -> io::Result<[u8; 32]> {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).map_err(|e| io::Error::other(format!("getrandom: {e}")))?;
    Ok(k)
}

impl ClusterSecret {
    /// Reads and checks `path`: mode without group/other bits, one or two hex lines.
    pub fn load(path: &Path) -> Result<ClusterSecret, AuthError> {
        let bad = |reason: String| AuthError::SecretFile {
            path: path.to_owned(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(bad(format!(
                "mode {mode:o} lets other users read it; run `chmod 600 {}`",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let current = lines
            .next()
            .and_then(parse_hex)
            .ok_or_else(|| bad("the first line is not 64 hex digits".into()))?;
        let previous = match lines.next() {
            None => None,
            Some(l) => Some(
                parse_hex(l).ok_or_else(|| bad("the second line is not 64 hex digits".into()))?,
            ),
        };
        if lines.next().is_some() {
            return Err(bad("more than two secrets (current, previous)".into()));
        }
        Ok(ClusterSecret {
            path: path.to_owned(),
            current,
            previous,
        })
    }

    /// Writes a fresh random secret to `path` (mode 0600, replacing the file atomically).
    pub fn generate(path: &Path) -> Result<ClusterSecret, AuthError> {
        let k = random()?;
        let tmp = path.with_extension("tmp");
        let write = || -> io::Result<()> {
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            writeln!(f, "{}", hex(&k))?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| AuthError::SecretFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(ClusterSecret {
            path: path.to_owned(),
            current: k,
            previous: None,
        })
    }

    fn keys(&self) -> impl Iterator<Item = &[u8; 32]> {
        std::iter::once(&self.current).chain(self.previous.as_ref())
    }
}

fn mac(key: &[u8; 32], side: &[u8], cn: &[u8; NONCE_LEN], sn: &[u8; NONCE_LEN]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(b"maru-auth-v1 ");
    h.update(side);
    h.update(cn);
    h.update(sn);
    *h.finalize().as_bytes()
}

/// Constant-time comparison (blake3's `Hash` equality is).
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    blake3::Hash::from_bytes(*a) == blake3::Hash::from_bytes(*b)
}

fn header(status: u8) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&AUTH_MAGIC);
    h[4] = VERSION;
    h[5] = status;
    h
}

fn read_msg(s: &mut impl Read) -> io::Result<([u8; 8], [u8; 32])> {
    let mut buf = [0u8; MSG_LEN];
    s.read_exact(&mut buf)?;
    let mut head = [0u8; 8];
    head.copy_from_slice(&buf[..8]);
    let mut body = [0u8; 32];
    body.copy_from_slice(&buf[8..]);
    Ok((head, body))
}

fn check_head(head: &[u8; 8]) -> Result<u8, AuthError> {
    if head[..4] != AUTH_MAGIC || head[4] != VERSION {
        return Err(AuthError::Refused(
            "the peer does not speak the authentication handshake (version 1)".into(),
        ));
    }
    Ok(head[5])
}

/// The client's side, on a freshly connected TCP stream (with its timeouts already set).
pub fn client_handshake(s: &mut TcpStream, secret: &ClusterSecret) -> Result<(), AuthError> {
    let cn = random()?;
    let mut hello = Vec::with_capacity(MSG_LEN);
    hello.extend_from_slice(&header(OK));
    hello.extend_from_slice(&cn);
    s.write_all(&hello)?;
    let mut first = [0u8; 4];
    s.read_exact(&mut first)?;
    if first == *b"MARU" {
        return Err(AuthError::Refused(
            "the daemon answered with a frame: it does not authenticate TCP clients (started \
             with --insecure-tcp or without a secret)"
                .into(),
        ));
    }
    let mut rest = [0u8; MSG_LEN - 4];
    s.read_exact(&mut rest)?;
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&first);
    head[4..].copy_from_slice(&rest[..4]);
    let mut sn = [0u8; 32];
    sn.copy_from_slice(&rest[4..]);
    match check_head(&head)? {
        OK => {}
        NO_SECRET => {
            return Err(AuthError::Refused(
                "the daemon has no cluster secret to prove itself with".into(),
            ))
        }
        other => return Err(AuthError::Refused(format!("daemon status {other}"))),
    }
    s.write_all(&mac(&secret.current, b"client", &cn, &sn))?;
    let (head, proof) = read_msg(s)?;
    match check_head(&head)? {
        OK => {}
        REFUSED => {
            return Err(AuthError::Refused(format!(
                "the daemon refused this client's secret ({}): it is not the cluster's current \
                 or previous secret",
                secret.path.display()
            )))
        }
        other => return Err(AuthError::Refused(format!("daemon status {other}"))),
    }
    if !same(&proof, &mac(&secret.current, b"server", &cn, &sn)) {
        return Err(AuthError::Refused(
            "the daemon's proof does not match this client's secret: it is not the cluster's \
             daemon"
                .into(),
        ));
    }
    Ok(())
}

/// What a daemon asks of its TCP peers.
pub struct Acceptor {
    secret: Mutex<(ClusterSecret, Option<SystemTime>)>,
    /// Peers that do not authenticate are refused (else they are served in plaintext).
    pub required: bool,
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// How a connection's handshake ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    /// The peer proved it holds the secret.
    Authenticated,
    /// The peer sent a frame straight away and the daemon does not require the proof.
    Plain,
}

impl Acceptor {
    pub fn new(secret: ClusterSecret, required: bool) -> Acceptor {
        let m = mtime(&secret.path);
        Acceptor {
            secret: Mutex::new((secret, m)),
            required,
        }
    }

    /// The secret, re-read when its file changed (rotation without a restart); a file that
    /// no longer loads keeps the last good secret, with a warning.
    fn current(&self) -> ClusterSecret {
        let mut g = self.secret.lock().unwrap_or_else(|e| e.into_inner());
        let now = mtime(&g.0.path);
        if now != g.1 {
            match ClusterSecret::load(&g.0.path) {
                Ok(s) => *g = (s, now),
                Err(e) => {
                    tracing::warn!("keeping the cluster secret loaded before: {e}");
                    g.1 = now;
                }
            }
        }
        g.0.clone()
    }

    /// The daemon's side, before the connection's first frame, bounded by `deadline` (the
    /// connection's handshake bound). `Err` means: close the connection (a refusal has been
    /// answered already).
    pub fn accept(&self, s: &mut TcpStream, deadline: Instant) -> Result<Accepted, AuthError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(AuthError::Refused("no handshake in time".into()));
        }
        let old = s.read_timeout().ok().flatten();
        s.set_read_timeout(Some(left))?;
        let r = self.exchange(s);
        s.set_read_timeout(old)?;
        r
    }

    fn exchange(&self, s: &mut TcpStream) -> Result<Accepted, AuthError> {
        let mut first = [0u8; 4];
        // Peek: a plain peer's bytes stay for the frame reader.
        let mut got = 0;
        while got < 4 {
            got = s.peek(&mut first)?;
            if got == 0 {
                return Err(AuthError::Refused("closed before the handshake".into()));
            }
            if got < 4 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        if first != AUTH_MAGIC {
            if !self.required {
                return Ok(Accepted::Plain);
            }
            let mut tx = Vec::new();
            encode_error(
                &mut tx,
                0,
                &WireError::new(
                    ErrorCode::Unauthenticated,
                    "this daemon requires TCP clients to prove they hold the cluster secret: \
                     give the client the secret file (MaruConfig secret_file, or the \
                     MARU_SECRET_FILE environment variable)",
                ),
            );
            let _ = s.write_all(&tx);
            return Err(AuthError::Refused(
                "a plain frame on an authenticated port".into(),
            ));
        }
        let (head, cn) = read_msg(s)?;
        check_head(&head)?;
        let secret = self.current();
        let sn = random()?;
        let mut challenge = Vec::with_capacity(MSG_LEN);
        challenge.extend_from_slice(&header(OK));
        challenge.extend_from_slice(&sn);
        s.write_all(&challenge)?;
        let mut proof = [0u8; 32];
        s.read_exact(&mut proof)?;
        let Some(key) = secret
            .keys()
            .find(|k| same(&proof, &mac(k, b"client", &cn, &sn)))
        else {
            let mut no = Vec::with_capacity(MSG_LEN);
            no.extend_from_slice(&header(REFUSED));
            no.extend_from_slice(&[0u8; 32]);
            let _ = s.write_all(&no);
            return Err(AuthError::Refused(
                "wrong secret (neither the current nor the previous one)".into(),
            ));
        };
        let mut yes = Vec::with_capacity(MSG_LEN);
        yes.extend_from_slice(&header(OK));
        yes.extend_from_slice(&mac(key, b"server", &cn, &sn));
        s.write_all(&yes)?;
        Ok(Accepted::Authenticated)
    }
}

/// How a daemon treats TCP peers.
#[derive(Debug, Clone, Default)]
pub enum TcpAuth {
    /// No secret: plaintext, allowed on loopback addresses only.
    #[default]
    Loopback,
    /// Plaintext without authentication on any address (`--insecure-tcp`).
    Insecure,
    /// Peers prove they hold the secret; with `required` false, peers that do not try are
    /// still served in plaintext (a loopback-only embedded daemon and its older clients).
    Secret {
        secret: ClusterSecret,
        required: bool,
    },
}

impl TcpAuth {
    /// What a listener on `addr` checks, or why it may not listen there.
    pub fn acceptor(&self, addr: std::net::SocketAddr) -> Result<Option<Acceptor>, String> {
        match self {
            TcpAuth::Loopback if !addr.ip().is_loopback() => Err(format!(
                "TCP on {addr} without a cluster secret would let anyone who reaches it in: \
                 pass --secret-file FILE (and give clients the same file: secret_file / \
                 {SECRET_ENV}), or --insecure-tcp to serve plaintext without authentication"
            )),
            TcpAuth::Loopback | TcpAuth::Insecure => Ok(None),
            TcpAuth::Secret { secret, required } => {
                Ok(Some(Acceptor::new(secret.clone(), *required)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Duration;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        for x in [&c, &s] {
            x.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        (c, s)
    }

    fn run(
        client: ClusterSecret,
        daemon: ClusterSecret,
    ) -> (Result<(), AuthError>, Result<Accepted, AuthError>) {
        let (mut c, mut s) = pair();
        let acc = Acceptor::new(daemon, true);
        let t =
            std::thread::spawn(move || acc.accept(&mut s, Instant::now() + Duration::from_secs(5)));
        let r = client_handshake(&mut c, &client);
        drop(c);
        (r, t.join().unwrap())
    }

    #[test]
    fn the_same_secret_passes_and_another_is_refused_both_ways() {
        let d = dir();
        let a = ClusterSecret::generate(&d.path().join("a")).unwrap();
        let b = ClusterSecret::generate(&d.path().join("b")).unwrap();
        let (c, s) = run(a.clone(), a.clone());
        assert!(c.is_ok(), "{c:?}");
        assert_eq!(s.unwrap(), Accepted::Authenticated);
        let (c, s) = run(b, a);
        assert!(matches!(c, Err(AuthError::Refused(_))), "{c:?}");
        assert!(s.is_err());
    }

    #[test]
    fn a_rotated_daemon_accepts_the_previous_secret() {
        let d = dir();
        let old = ClusterSecret::generate(&d.path().join("old")).unwrap();
        let new = ClusterSecret::generate(&d.path().join("new")).unwrap();
        let both = d.path().join("both");
        std::fs::write(
            &both,
            format!("{}\n{}\n", hex(&new.current), hex(&old.current)),
        )
        .unwrap();
        std::fs::set_permissions(&both, std::fs::Permissions::from_mode(0o600)).unwrap();
        let daemon = ClusterSecret::load(&both).unwrap();
        for client in [old, new] {
            let (c, s) = run(client, daemon.clone());
            assert!(c.is_ok(), "{c:?}");
            assert!(s.is_ok());
        }
    }

    #[test]
    fn a_replayed_client_proof_fails() {
        // Record a good exchange's client messages, then replay them on a new connection.
        let d = dir();
        let k = ClusterSecret::generate(&d.path().join("k")).unwrap();
        let cn = [7u8; 32];
        let (mut c, mut s) = pair();
        let acc = Acceptor::new(k.clone(), true);
        let t =
            std::thread::spawn(move || acc.accept(&mut s, Instant::now() + Duration::from_secs(5)));
        let mut first = header(OK).to_vec();
        first.extend_from_slice(&cn);
        c.write_all(&first).unwrap();
        let (_, sn) = read_msg(&mut c).unwrap();
        let recorded = mac(&k.current, b"client", &cn, &sn);
        c.write_all(&recorded).unwrap();
        read_msg(&mut c).unwrap();
        assert!(t.join().unwrap().is_ok());

        let (mut c, mut s) = pair();
        let acc = Acceptor::new(k, true);
        let t =
            std::thread::spawn(move || acc.accept(&mut s, Instant::now() + Duration::from_secs(5)));
        c.write_all(&first).unwrap();
        let (_, sn2) = read_msg(&mut c).unwrap();
        assert_ne!(sn, sn2, "a fresh server nonce per connection");
        c.write_all(&recorded).unwrap();
        let (head, _) = read_msg(&mut c).unwrap();
        assert_eq!(head[5], REFUSED);
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn a_secret_readable_by_others_is_refused() {
        let d = dir();
        let p = d.path().join("s");
        ClusterSecret::generate(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = ClusterSecret::load(&p).unwrap_err().to_string();
        assert!(e.contains("mode 640") && e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn a_plain_frame_is_served_or_refused_as_the_daemon_requires() {
        let d = dir();
        let k = ClusterSecret::generate(&d.path().join("k")).unwrap();
        for required in [false, true] {
            let (mut c, mut s) = pair();
            c.write_all(b"MARU and the rest of a frame").unwrap();
            let acc = Acceptor::new(k.clone(), required);
            let r = acc.accept(&mut s, Instant::now() + Duration::from_secs(5));
            if required {
                assert!(r.is_err());
                let (h, payload) = crate::read_frame(&mut c).unwrap();
                match maru_proto::decode_response(&h, &payload).unwrap() {
                    maru_proto::Response::Error(e) => {
                        assert_eq!(e.code, ErrorCode::Unauthenticated)
                    }
                    other => panic!("{other:?}"),
                }
            } else {
                assert_eq!(r.unwrap(), Accepted::Plain);
                let mut four = [0u8; 4];
                s.read_exact(&mut four).unwrap();
                assert_eq!(&four, b"MARU", "the frame's bytes are left for the reader");
            }
        }
    }

    #[test]
    fn without_a_secret_only_loopback_may_be_bound_unless_insecure() {
        let any: std::net::SocketAddr = "0.0.0.0:5555".parse().unwrap();
        let lo: std::net::SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let e = TcpAuth::Loopback.acceptor(any).err().unwrap();
        assert!(
            e.contains("--secret-file") && e.contains("--insecure-tcp"),
            "{e}"
        );
        assert!(TcpAuth::Loopback.acceptor(lo).unwrap().is_none());
        assert!(TcpAuth::Insecure.acceptor(any).unwrap().is_none());
    }
}
