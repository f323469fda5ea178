//! Maps the client's errors onto the exception classes of `maru.errors` (one hierarchy under
//! `MaruError`; see that module for what each class also derives from):
//!
//! | client error | Python |
//! |---|---|
//! | `InvalidArgument`; server codes `InvalidArgument`, `BatchTooLarge`, `OutOfBounds`, `NoSuchPool`, `DoubleFree`, `UnknownRegion` | `InvalidArgumentError` |
//! | server code `KeyTooLong` (keys are also checked before they are sent) | `InvalidKeyError` |
//! | `Exhausted`; server code `PoolExhausted` | `PoolExhaustedError` |
//! | server code `PoolUnhealthy` | `PoolUnhealthyError` |
//! | `State` (never connected / closed) | `NotConnectedError` / `HandlerClosedError` |
//! | `Forked` | `ForkedHandlerError` |
//! | `Timeout` | `MaruTimeoutError` |
//! | `Transport` during connect; server codes `TooManyClients`, `SessionConflict` at connect | `ConnectFailedError` (`ServerBusyError` for `TooManyClients`) |
//! | `Transport` otherwise / after the server was lost | `ConnectionLostError` / `ServerLostError` |
//! | server codes `BadToken`, `NotOwner` | `PermissionDeniedError` |
//! | `Protocol`; server codes `BadFrame`, `UnsupportedVersion`, `UnknownMessage`, `FrameTooLarge`, `NotHandshaken` | `ProtocolError` |
//! | `Map` | `MapFailedError` |
//! | `WrongPool` (the file this host maps is another pool) | `WrongPoolError` |
//! | server codes `Unavailable`, `ShuttingDown`, `Storage`, `Internal` | `ServerError` |
//!
//! Every instance carries `code` (the server's code when it answered with one, else the
//! class's kind) and `op` (the handler operation that failed).

use maru_client::{ErrorCode, ErrorKind};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// An exception of class `class` (a name in `maru.errors`) with `message`, `code` and `op`.
pub fn raise(py: Python<'_>, class: &str, message: String, code: Option<&str>, op: &str) -> PyErr {
    let built = py
        .import("maru.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|cls| cls.call1((message.clone(),)))
        .and_then(|exc| {
            if let Some(code) = code {
                exc.setattr("code", code)?;
            }
            exc.setattr("op", op)?;
            Ok(exc)
        });
    match built {
        Ok(exc) => PyErr::from_value(exc),
        // Only if the package's own module cannot be imported: the message still gets out.
        Err(_) => PyRuntimeError::new_err(message),
    }
}

/// An argument the call cannot use (`InvalidArgumentError`); `message` names it.
pub fn invalid(message: impl Into<String>) -> PyErr {
    Python::attach(|py| raise(py, "InvalidArgumentError", message.into(), None, ""))
}

/// A key the call cannot use (`InvalidKeyError`).
pub fn invalid_key(message: impl Into<String>) -> PyErr {
    Python::attach(|py| raise(py, "InvalidKeyError", message.into(), None, ""))
}

/// The class of a server's refusal with `code` during `op`.
fn remote_class(code: ErrorCode, op: &str) -> &'static str {
    use ErrorCode::*;
    match code {
        InvalidArgument | BatchTooLarge | OutOfBounds | NoSuchPool | DoubleFree | UnknownRegion => {
            "InvalidArgumentError"
        }
        KeyTooLong => "InvalidKeyError",
        PoolExhausted | IndexFull => "PoolExhaustedError",
        PoolUnhealthy => "PoolUnhealthyError",
        BadToken | NotOwner | Unauthenticated => "PermissionDeniedError",
        TooManyClients => "ServerBusyError",
        SessionConflict if op == "connect" => "ConnectFailedError",
        SessionConflict => "ServerLostError",
        BadFrame | UnsupportedVersion | UnknownMessage | FrameTooLarge | NotHandshaken => {
            "ProtocolError"
        }
        Unavailable | ShuttingDown | Storage | Internal => "ServerError",
    }
}

/// The Python exception for a client error.
pub fn client_error(py: Python<'_>, e: &maru_client::Error) -> PyErr {
    let (class, code) = match e.kind() {
        ErrorKind::State if e.is_closed() => ("HandlerClosedError", None),
        ErrorKind::State => ("NotConnectedError", None),
        ErrorKind::Forked => ("ForkedHandlerError", None),
        ErrorKind::InvalidArgument => ("InvalidArgumentError", None),
        ErrorKind::Exhausted => ("PoolExhaustedError", None),
        ErrorKind::Timeout => ("MaruTimeoutError", None),
        ErrorKind::Remote(code) => (remote_class(code, e.op()), Some(format!("{code:?}"))),
        ErrorKind::Transport if e.is_server_lost() => ("ServerLostError", None),
        ErrorKind::Transport if e.op() == "connect" => ("ConnectFailedError", None),
        ErrorKind::Transport => ("ConnectionLostError", None),
        ErrorKind::Protocol => ("ProtocolError", None),
        ErrorKind::Map => ("MapFailedError", None),
        ErrorKind::WrongPool => ("WrongPoolError", None),
    };
    raise(py, class, e.to_string(), code.as_deref(), e.op())
}

/// `result.map_err(py_err(py))`: the exception for a client error, with its message.
pub fn py_err(py: Python<'_>) -> impl Fn(maru_client::Error) -> PyErr + '_ {
    move |e| client_error(py, &e)
}

/// A helper call (operator statistics) that could not reach the server.
pub fn helper_err(py: Python<'_>, e: impl std::fmt::Display) -> PyErr {
    raise(py, "ConnectionLostError", e.to_string(), None, "")
}
