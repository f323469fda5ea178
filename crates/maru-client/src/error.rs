//! The client's one error type: [`Error`], carrying an [`ErrorKind`] that bindings map to
//! their own exception types (the Python package maps them to RuntimeError, ValueError,
//! TimeoutError and `maru.MaruError`), the handler operation that failed, a message that
//! says what happened, and the transport, server or mapping error it came from.

use std::fmt;
use std::io;
use std::time::Duration;

use maru_proto::{ErrorCode, Response, WireError};
use maru_shm::ShmError;
use maru_transport::TransportError;

/// `Result` with the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an error is, independent of the operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The handler is not connected, or closed.
    State,
    /// The handler's session belongs to the process this one was forked from (see
    /// [`MaruConfig::reconnect_after_fork`](crate::MaruConfig::reconnect_after_fork)).
    Forked,
    /// The caller passed something unusable (size above the chunk size, bad key, unknown page).
    InvalidArgument,
    /// No page is free and the handler may not (or could not) get another region.
    Exhausted,
    /// The server did not answer, or did not take the request, within `timeout_ms`.
    Timeout,
    /// The server answered with a typed error.
    Remote(ErrorCode),
    /// The connection failed or was lost (also: the server was lost earlier, see
    /// [`Error::is_server_lost`]).
    Transport,
    /// The server's reply made no sense (wrong type, out-of-range location).
    Protocol,
    /// A region could not be mapped.
    Map,
    /// The file or device a region would be mapped from is not the pool the grant names: its
    /// header carries another pool's UUID, or none (this host's `pool_path` names the wrong
    /// device). Nothing was mapped.
    WrongPool,
}

/// A failed operation of the client. `Display` is the whole message (with the words of the
/// error it came from); [`std::error::Error::source`] is that error itself.
pub struct Error(Box<Inner>);

#[derive(Debug)]
struct Inner {
    kind: ErrorKind,
    /// The handler operation that failed (`"store_bytes"`, `"retrieve"`, …), or, until the
    /// operation's boundary names it, the request or step that did.
    op: &'static str,
    message: String,
    origin: Origin,
}

/// Where an error came from; decides what the handler does next with the connection, the
/// page and the session.
#[derive(Debug)]
enum Origin {
    /// The handler itself refused (an argument, its own books, a reply it could not use).
    Handler,
    /// The exchange with the server failed short of an answer.
    Transport(TransportError),
    /// The server answered with a typed error.
    Remote(WireError),
    /// Shared memory could not be mapped or written.
    Shm(ShmError),
    /// The handler was closed.
    Closed,
    /// The metadata server was lost, and the session with it.
    ServerLost,
}

impl Error {
    fn with(kind: ErrorKind, op: &'static str, message: String, origin: Origin) -> Error {
        Error(Box::new(Inner {
            kind,
            op,
            message,
            origin,
        }))
    }

    /// The handler refused with `message`.
    pub(crate) fn new(kind: ErrorKind, op: &'static str, message: impl Into<String>) -> Error {
        Error::with(kind, op, message.into(), Origin::Handler)
    }

    pub(crate) fn invalid(op: &'static str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument, op, message)
    }

    pub(crate) fn protocol(op: &'static str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Protocol, op, message)
    }

    /// An exchange for request `op` that failed. The kind follows from the failure: a send
    /// that could not finish within `timeout` (the socket's write timeout) is a
    /// [`ErrorKind::Timeout`], like a reply that did not come; a request the codec refused is
    /// the caller's [`ErrorKind::InvalidArgument`].
    pub(crate) fn transport(op: &'static str, e: TransportError, timeout: Duration) -> Error {
        use ErrorKind::*;
        let ms = timeout.as_millis();
        let (kind, message) = match &e {
            TransportError::Timeout => (
                Timeout,
                format!("no reply from the server to {op} within {ms} ms"),
            ),
            TransportError::Io(io) if is_send_timeout(io) => (
                Timeout,
                format!("the server did not take the {op} request within {ms} ms"),
            ),
            TransportError::Io(io) => (
                Transport,
                format!("connection to the server lost during {op}: {io}"),
            ),
            TransportError::Closed => (
                Transport,
                format!("the server closed the connection during {op}"),
            ),
            TransportError::Connect { .. } => (Transport, e.to_string()),
            TransportError::Decode(d) => (Protocol, format!("bad reply to {op}: {d}")),
            TransportError::Encode(_) => (InvalidArgument, e.to_string()),
            TransportError::Mismatch { .. } => (Protocol, e.to_string()),
            TransportError::Unexpected(got) => {
                (Protocol, format!("unexpected reply to {op}: {got}"))
            }
        };
        Error::with(kind, op, message, Origin::Transport(e))
    }

    /// A socket operation for `op` that failed outside a send or a reply wait.
    pub(crate) fn io(op: &'static str, e: io::Error) -> Error {
        let message = format!("connection to the server lost during {op}: {e}");
        let origin = Origin::Transport(TransportError::Io(e));
        Error::with(ErrorKind::Transport, op, message, origin)
    }

    /// The server refused request `op` with a typed error.
    pub(crate) fn remote(op: &'static str, e: WireError) -> Error {
        let message = format!("server refused {op}: {e}");
        Error::with(ErrorKind::Remote(e.code), op, message, Origin::Remote(e))
    }

    /// A well-formed reply to `op` of the wrong type.
    pub(crate) fn unexpected(op: &'static str, got: &Response) -> Error {
        let got = format!("{got:?}");
        let message = format!("unexpected reply to {op}: {got}");
        let origin = Origin::Transport(TransportError::Unexpected(got));
        Error::with(ErrorKind::Protocol, op, message, origin)
    }

    /// Shared memory failed: `message` says what was being done, `e` how it failed.
    pub(crate) fn shm(kind: ErrorKind, op: &'static str, message: String, e: ShmError) -> Error {
        Error::with(kind, op, message, Origin::Shm(e))
    }

    pub(crate) fn not_connected(last_error: Option<&str>) -> Error {
        let last = last_error
            .map(|e| format!(" (last connect failed: {e})"))
            .unwrap_or_default();
        let message = format!("MaruHandler is not connected; call connect() first{last}");
        Error::new(ErrorKind::State, "", message)
    }

    pub(crate) fn forked() -> Error {
        let message = "this MaruHandler was connected in the parent of this forked process; \
                       its session stays the parent's (create a new handler here, or set \
                       MaruConfig.reconnect_after_fork to have it reconnect by itself)"
            .to_owned();
        Error::new(ErrorKind::Forked, "", message)
    }

    pub(crate) fn closed() -> Error {
        let message = "MaruHandler is closed".to_owned();
        Error::with(ErrorKind::State, "", message, Origin::Closed)
    }

    /// The metadata server died or shut down (or ended the session). The handler's owned
    /// regions were detached from the pool: views still read, writes through them stay
    /// private. Only a new handler can go on.
    pub(crate) fn server_lost() -> Error {
        let message = "the metadata server connection was lost and this session with it (no \
                       restarted server took the session back within the timeout); close() \
                       and reconnect with a new handler"
            .to_owned();
        Error::with(ErrorKind::Transport, "", message, Origin::ServerLost)
    }

    /// Write-behind registrations that failed after their `store` had returned (reported by
    /// `flush`): `failed` of them; the first one's kind and message.
    pub(crate) fn deferred(failed: u64, first_kind: ErrorKind, first: &str) -> Error {
        let message = format!("{failed} write-behind store(s) failed; the first: {first}");
        Error::new(first_kind, "flush", message)
    }

    /// Names the handler operation the error ends; the outermost operation's name stays.
    pub(crate) fn during(mut self, op: &'static str) -> Error {
        self.0.op = op;
        self
    }

    /// The same error with another kind and message (the cause stays).
    pub(crate) fn recast(mut self, kind: ErrorKind, message: String) -> Error {
        self.0.kind = kind;
        self.0.message = message;
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The handler operation that failed, e.g. `"store_bytes"` or `"connect"`.
    pub fn op(&self) -> &'static str {
        self.0.op
    }

    /// The message, as `Display` shows it.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The server's error code, if it answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match &self.0.origin {
            Origin::Remote(e) => Some(e.code),
            _ => None,
        }
    }

    /// The handler was closed; nothing more can be done with it.
    pub fn is_closed(&self) -> bool {
        matches!(self.0.origin, Origin::Closed)
    }

    /// The metadata server was lost earlier, and this handler's session with it: close it
    /// and connect a new one.
    pub fn is_server_lost(&self) -> bool {
        matches!(self.0.origin, Origin::ServerLost)
    }

    /// Whether the connection it happened on can still be used: after a typed error reply,
    /// a request the codec refused before sending, or a timeout waiting for a reply (the
    /// request went out whole; its late reply is skipped).
    pub(crate) fn keeps_connection(&self) -> bool {
        matches!(
            &self.0.origin,
            Origin::Remote(_)
                | Origin::Transport(TransportError::Encode(_) | TransportError::Timeout)
        )
    }

    /// Whether the connection was found dead (closed or failed), so an idempotent request
    /// may go again on a fresh one. A send that timed out is not: the server is alive but
    /// not reading.
    pub(crate) fn found_connection_dead(&self) -> bool {
        self.0.kind == ErrorKind::Transport
            && matches!(
                &self.0.origin,
                Origin::Transport(TransportError::Closed | TransportError::Io(_))
            )
    }

    /// Whether the error shows the session gone: the server closed or reset the connection
    /// (it died or shut down), the socket is no longer connected, or the server says the
    /// session ended.
    pub(crate) fn means_session_lost(&self) -> bool {
        match &self.0.origin {
            Origin::Transport(e) => {
                e.peer_went_away()
                    || matches!(e, TransportError::Io(io) if io.kind() == io::ErrorKind::NotConnected)
            }
            Origin::Remote(e) => e.code == ErrorCode::SessionConflict,
            _ => false,
        }
    }

    /// Whether the request certainly had no effect at the server (it refused it, or it was
    /// never sent). After a timeout or a lost connection the server may still have applied
    /// it, so a page sent for registration must not be reused.
    pub(crate) fn surely_not_applied(&self) -> bool {
        matches!(
            &self.0.origin,
            Origin::Remote(_)
                | Origin::Transport(TransportError::Encode(_) | TransportError::Connect { .. })
        )
    }
}

/// A write that could not finish within the socket's write timeout. Reads never fail this
/// way: every read follows a poll, and a read that would block is tried again.
fn is_send_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.0.kind)
            .field("op", &self.0.op)
            .field("message", &self.0.message)
            .field("origin", &self.0.origin)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0.origin {
            Origin::Transport(e) => Some(e),
            Origin::Remote(e) => Some(e),
            Origin::Shm(e) => Some(e),
            Origin::Handler | Origin::Closed | Origin::ServerLost => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(1500);

    fn io(kind: io::ErrorKind) -> TransportError {
        TransportError::Io(io::Error::from(kind))
    }

    #[test]
    fn an_error_is_one_pointer() {
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
    }

    #[test]
    fn transport_failures_get_their_kind_and_the_clients_words() {
        let e = Error::transport("exists", TransportError::Timeout, T);
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert_eq!(
            e.to_string(),
            "no reply from the server to exists within 1500 ms"
        );
        assert!(e.keeps_connection() && !e.surely_not_applied() && !e.means_session_lost());

        let e = Error::transport("register", io(io::ErrorKind::WouldBlock), T);
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert_eq!(
            e.to_string(),
            "the server did not take the register request within 1500 ms"
        );
        assert!(!e.keeps_connection(), "part of the frame may be out");
        assert!(!e.found_connection_dead() && !e.means_session_lost());

        let e = Error::transport("lookup", TransportError::Closed, T);
        assert_eq!(e.kind(), ErrorKind::Transport);
        assert_eq!(
            e.to_string(),
            "the server closed the connection during lookup"
        );
        assert!(e.found_connection_dead() && e.means_session_lost());

        for kind in [
            io::ErrorKind::NotConnected,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
        ] {
            let e = Error::transport("stats", io(kind), T);
            assert_eq!(e.kind(), ErrorKind::Transport);
            assert!(e.means_session_lost(), "{kind:?}");
            assert!(e
                .to_string()
                .starts_with("connection to the server lost during stats: "));
        }

        let refused = TransportError::Connect {
            url: "tcp://127.0.0.1:1".into(),
            source: io::ErrorKind::ConnectionRefused.into(),
        };
        let e = Error::transport("connect", refused, T);
        assert_eq!(e.kind(), ErrorKind::Transport);
        assert!(e
            .to_string()
            .starts_with("cannot connect to tcp://127.0.0.1:1: "));
        assert!(e.surely_not_applied() && !e.found_connection_dead());
    }

    #[test]
    fn a_typed_refusal_keeps_the_connection_and_names_its_code() {
        let e = Error::remote(
            "exists",
            WireError::new(ErrorCode::Internal, "fake failure"),
        );
        assert_eq!(e.kind(), ErrorKind::Remote(ErrorCode::Internal));
        assert_eq!(e.code(), Some(ErrorCode::Internal));
        assert!(e.to_string().starts_with("server refused exists: "));
        assert!(e.to_string().contains("fake failure"));
        assert!(e.keeps_connection() && e.surely_not_applied() && !e.means_session_lost());
        let conflict = Error::remote("hello", WireError::new(ErrorCode::SessionConflict, "x"));
        assert!(conflict.means_session_lost());
        assert!(std::error::Error::source(&conflict).is_some());
    }

    #[test]
    fn state_errors_say_what_to_do() {
        let e = Error::not_connected(Some("cannot connect to x: refused"));
        assert_eq!(e.kind(), ErrorKind::State);
        assert_eq!(
            e.to_string(),
            "MaruHandler is not connected; call connect() first (last connect failed: cannot \
             connect to x: refused)"
        );
        assert!(!e.is_closed() && !e.is_server_lost());
        let e = Error::closed().during("exists");
        assert_eq!((e.kind(), e.op()), (ErrorKind::State, "exists"));
        assert!(e.is_closed());
        let e = Error::server_lost();
        assert_eq!(e.kind(), ErrorKind::Transport);
        assert!(e.is_server_lost() && !e.means_session_lost() && !e.found_connection_dead());
        assert!(e.to_string().contains("close()"));
    }

    #[test]
    fn a_deferred_failure_keeps_the_first_ones_kind() {
        let e = Error::deferred(3, ErrorKind::Timeout, "store of \"k\": no reply");
        assert_eq!((e.kind(), e.op()), (ErrorKind::Timeout, "flush"));
        assert_eq!(
            e.to_string(),
            "3 write-behind store(s) failed; the first: store of \"k\": no reply"
        );
    }
}
