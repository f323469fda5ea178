//! A typed blocking client of the resource manager (used by the metadata server, tools and
//! tests).

use std::time::Duration;

use maru_proto::stats::RmStats;
use maru_proto::{
    Access, Handle, Hello, HelloOk, Request, Response, RmAllocation, Role, ServerUrl,
};
use maru_transport::{BlockingConn, TransportError};

use crate::RmClientError;

/// One handshaken connection. The identity given at connect time (host, pid, start time) is
/// the owner of every region allocated through it.
pub struct RmClient {
    conn: BlockingConn,
}

fn unexpected(r: Response) -> RmClientError {
    TransportError::Unexpected(format!("{r:?}")).into()
}

impl RmClient {
    /// Connects as this process ([`maru_transport::local_identity`]).
    pub fn connect(url: &ServerUrl, role: Role, timeout: Duration) -> Result<Self, RmClientError> {
        Self::connect_with(url, role, timeout, None)
    }

    /// [`RmClient::connect`], proving first on TCP that this process holds the cluster
    /// secret (a resource manager that requires it refuses everyone else).
    pub fn connect_with(
        url: &ServerUrl,
        role: Role,
        timeout: Duration,
        secret: Option<&maru_transport::auth::ClusterSecret>,
    ) -> Result<Self, RmClientError> {
        let (host, pid, start_time) = maru_transport::local_identity();
        let hello = Hello::sessionless(role, &host, pid, start_time);
        Ok(RmClient {
            conn: BlockingConn::connect_with(url, &hello, timeout, secret)?,
        })
    }

    /// Connects as this process, a metadata server ([`Role::Server`]) with the durable
    /// identity `server_id`: regions allocated through it wait out the resource manager's
    /// server grace when this process dies, and a successor presenting the same identity
    /// adopts them at its Hello (over the Unix socket, or TCP with the cluster secret).
    pub fn connect_server(
        url: &ServerUrl,
        server_id: &[u8; maru_proto::SESSION_TOKEN_LEN],
        timeout: Duration,
        secret: Option<&maru_transport::auth::ClusterSecret>,
    ) -> Result<Self, RmClientError> {
        let (host, pid, start_time) = maru_transport::local_identity();
        let hello = Hello {
            session_token: Some(*server_id),
            ..Hello::sessionless(Role::Server, &host, pid, start_time)
        };
        Ok(RmClient {
            conn: BlockingConn::connect_with(url, &hello, timeout, secret)?,
        })
    }

    /// Connects under an explicit identity. Tests use it to play a remote host or a process
    /// whose start time changed; `start_time` 0 lets a same-host resource manager read it.
    pub fn connect_as(
        url: &ServerUrl,
        role: Role,
        host: &str,
        pid: u32,
        start_time: u64,
        timeout: Duration,
    ) -> Result<Self, RmClientError> {
        let hello = Hello::sessionless(role, host, pid, start_time);
        Ok(RmClient {
            conn: BlockingConn::connect(url, &hello, timeout)?,
        })
    }

    /// What the resource manager said at the handshake (its hostname, version).
    pub fn peer(&self) -> &HelloOk {
        self.conn.peer()
    }

    /// A region of at least `size` bytes (rounded up to the pool's alignment), from the pool
    /// with path `pool` or the first with room.
    pub fn alloc(&mut self, size: u64, pool: Option<&str>) -> Result<Handle, RmClientError> {
        match self.conn.call(&Request::RmAlloc { size, pool })? {
            Response::Handle(h) => Ok(h),
            other => Err(unexpected(other)),
        }
    }

    /// Frees a region this connection's identity owns.
    pub fn free(&mut self, h: &Handle) -> Result<(), RmClientError> {
        match self.conn.call(&Request::RmFree { handle: h.clone() })? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// How to map a region (any holder of a genuine handle may ask).
    pub fn get_access(&mut self, h: &Handle) -> Result<Access, RmClientError> {
        match self
            .conn
            .call(&Request::RmGetAccess { handle: h.clone() })?
        {
            Response::Access(a) => Ok(a),
            other => Err(unexpected(other)),
        }
    }

    pub fn stats(&mut self) -> Result<RmStats, RmClientError> {
        match self.conn.call(&Request::RmStats)? {
            Response::RmStats(json) => {
                serde_json::from_str(&json).map_err(|e| RmClientError::BadStats(e.to_string()))
            }
            other => Err(unexpected(other)),
        }
    }

    /// Every allocation, with owners.
    pub fn list(&mut self) -> Result<Vec<RmAllocation>, RmClientError> {
        match self.conn.call(&Request::RmList)? {
            Response::RmAllocations(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    pub fn heartbeat(&mut self) -> Result<(), RmClientError> {
        match self.conn.call(&Request::Heartbeat)? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Says goodbye and closes the connection.
    pub fn goodbye(mut self) -> Result<(), RmClientError> {
        match self.conn.call(&Request::Goodbye)? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The underlying connection (tests send raw or hostile requests through it).
    pub fn conn_mut(&mut self) -> &mut BlockingConn {
        &mut self.conn
    }
}
