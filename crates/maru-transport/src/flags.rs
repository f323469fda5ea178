//! The command-line flags every daemon that listens on TCP shares: how long an unreachable
//! peer keeps its connections, and how TCP peers authenticate.

use std::path::PathBuf;
use std::time::Duration;

use crate::auth::{AuthError, ClusterSecret, TcpAuth};

/// `--dead-peer-secs`, `--secret-file` and `--insecure-tcp`, flattened into a daemon's
/// arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct TcpFlags {
    /// Seconds a TCP peer's host may stay unreachable (keepalive probes unanswered, data
    /// unacknowledged) before its connections are dropped (a client's session then ends).
    #[arg(long, default_value_t = 25, value_name = "SECS")]
    pub dead_peer_secs: u64,
    /// Cluster secret TCP peers must prove they hold (a 0600 file of 64 hex digits, or two
    /// lines during a rotation: current, then previous). Required when --host is not a
    /// loopback address, unless --insecure-tcp.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Serve TCP in plaintext without authentication on any address.
    #[arg(long, conflicts_with = "secret_file")]
    pub insecure_tcp: bool,
}

impl TcpFlags {
    pub fn dead_peer_after(&self) -> Duration {
        Duration::from_secs(self.dead_peer_secs)
    }

    /// The TCP authentication the flags ask for (the secret file is read and checked).
    pub fn auth(&self) -> Result<TcpAuth, AuthError> {
        Ok(match (&self.secret_file, self.insecure_tcp) {
            (_, true) => TcpAuth::Insecure,
            (Some(path), false) => TcpAuth::Secret {
                secret: ClusterSecret::load(path)?,
                required: true,
            },
            (None, false) => TcpAuth::Loopback,
        })
    }
}
