//! Maps the client's error kinds onto Python exceptions:
//!
//! | kind | Python |
//! |---|---|
//! | not connected, closed | `RuntimeError` |
//! | bad argument, pool exhausted | `ValueError` |
//! | no reply within `timeout_ms` | `TimeoutError` |
//! | the server refused (typed code) | `maru.MaruError` with `.code` = the code's name |
//! | connection lost, bad reply, mapping failed | `maru.MaruError` with `.code` `ConnectionLost`, `BadReply`, `MapFailed` |

use maru_client::ErrorKind;
use pyo3::exceptions::{PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(
    maru,
    MaruError,
    PyRuntimeError,
    "An error from the Maru server or the connection to it; `.code` names it (e.g. 'PoolExhausted', 'ConnectionLost')."
);

fn maru_error(py: Python<'_>, code: &str, msg: String) -> PyErr {
    let err = MaruError::new_err(msg);
    // Setting an attribute on a fresh exception instance cannot fail in practice; if it did,
    // the error would still carry its message.
    let _ = err.value(py).setattr("code", code);
    err
}

/// The Python exception for an error of `kind` with message `msg`.
pub fn to_py(py: Python<'_>, kind: ErrorKind, msg: String) -> PyErr {
    match kind {
        ErrorKind::State => PyRuntimeError::new_err(msg),
        ErrorKind::InvalidArgument | ErrorKind::Exhausted => PyValueError::new_err(msg),
        ErrorKind::Timeout => PyTimeoutError::new_err(msg),
        ErrorKind::Remote(code) => maru_error(py, &format!("{code:?}"), msg),
        ErrorKind::Transport => maru_error(py, "ConnectionLost", msg),
        ErrorKind::Protocol => maru_error(py, "BadReply", msg),
        ErrorKind::Map => maru_error(py, "MapFailed", msg),
    }
}

/// `result.map_err(py_err(py))`: the exception for a client error, with its message.
pub fn py_err(py: Python<'_>) -> impl Fn(maru_client::Error) -> PyErr + '_ {
    move |e| to_py(py, e.kind(), e.to_string())
}
