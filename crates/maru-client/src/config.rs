//! [`MaruConfig`]: the Rust mirror of the Python `maru.MaruConfig`, with the same fields, the
//! same defaults and the same validation rules.

use std::fmt;
use std::time::Duration;

use maru_proto::{ServerUrl, MAX_NAMESPACE_LEN, MAX_STRING_LEN};

use crate::error::{Error, Result};

/// One mebibyte.
pub const MIB: u64 = 1024 * 1024;

/// Default server address (the original Maru's).
pub const DEFAULT_SERVER_URL: &str = "tcp://localhost:5555";

/// The least time a call waits for its reply while still holding the caller's context (the
/// GIL in Python) before it hands the rest of the wait to the [`crate::WaitHook`]. The
/// session widens the window to what the replies it measures need (the time within which
/// 999 in 1000 of them came, up to [`crate::MAX_REPLY_GRACE`]), so that on a slow or loaded
/// machine, too, ordinary replies arrive inside it and the caller never gives up the GIL
/// (which costs a 5 ms switch interval when another thread is busy).
pub const DEFAULT_REPLY_GRACE: Duration = Duration::from_micros(50);

/// Handler configuration. `Default` gives the original Maru's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaruConfig {
    /// `tcp://host:port` or `unix:///path` of the metadata server.
    pub server_url: String,
    /// A label for this handler in the server's statistics and logs. Several handlers may
    /// share one (tensor-parallel workers of one instance): what a handler owns, pins and
    /// holds belongs to its session, never to its instance id.
    pub instance_id: String,
    /// The tenant whose keys this handler sees and writes. "" (the default) is the shared
    /// namespace; handlers of different namespaces never see each other's keys.
    pub namespace: String,
    /// Bytes of the first owned region, requested at the first `alloc` (never at connect).
    pub pool_size: u64,
    /// Size of one page (one KV chunk).
    pub chunk_size_bytes: u64,
    /// Connect when the handler is created (the Python binding acts on it).
    pub auto_connect: bool,
    /// Bound on every wait for the server (connect, each reply).
    pub timeout_ms: u64,
    /// Pipelining: the calls of the handler's threads share one connection, each with its
    /// own request id, instead of taking a connection each (descriptor requests, and those
    /// that wait on the resource manager while other calls are in flight, still take one of
    /// their own). A call that is alone
    /// waits exactly as on a connection of its own. `false`: a connection per concurrent
    /// call.
    pub use_async_rpc: bool,
    /// With `use_async_rpc`, the most calls in flight at once on the shared connection (a
    /// caller beyond it waits, within its timeout, for one to end); it also bounds the idle
    /// connections kept (concurrent callers beyond it get a fresh connection that is closed
    /// afterwards).
    pub max_inflight: u32,
    /// Map every live region at connect instead of lazily at first retrieve.
    pub eager_map: bool,
    /// Ask the server for another region when every owned page is taken.
    pub auto_expand: bool,
    /// Size of an expansion region; `None` means `pool_size`.
    pub expand_size: Option<u64>,
    /// See [`DEFAULT_REPLY_GRACE`].
    pub reply_grace: Duration,
    /// Spend the reply grace polling the socket without sleeping. A reply that comes inside
    /// the grace is then seen at once, with no wake-up and no timer: calls are 25–35 %
    /// faster, for at most `reply_grace` of CPU per call.
    /// Connections whose replies keep missing the grace (a loaded machine) fall back to
    /// sleeping by themselves. `false` always sleeps.
    pub busy_poll: bool,
    /// Write-behind registration: a single-key `store` sends its registration and returns
    /// without waiting for the reply ([`crate::StoreOutcome::Sent`]), so storing a stream of
    /// chunks costs the copies, not a round trip each. Replies are collected by later calls
    /// (up to 64 in flight). Every later call of this handler sees its own stores (reads
    /// first wait for the outstanding replies); *other* instances see a key once the server
    /// has processed it — call `flush()` before telling them about it. Failures surface from
    /// `flush()`. Off by default: a plain `store` returns once the key is visible to everyone.
    pub write_behind: bool,
    /// What a handler does in a child made by `fork()` after it connected: refuse every call
    /// with [`ErrorKind::Forked`](crate::ErrorKind::Forked) (`false`, the default), or leave
    /// the parent's session alone and connect a session of its own on the child's first call
    /// (`true`). Either way the child never writes to, shuts down or says goodbye on the
    /// parent's connections (see `fork.rs`).
    pub reconnect_after_fork: bool,
    /// The cluster secret file (see `maru_transport::auth`): over TCP the handler proves it
    /// holds it, and checks the server does, before anything else. `None`: the
    /// `MARU_SECRET_FILE` environment variable, else no proof (servers that require one
    /// refuse the connection with `Unauthenticated`). Unix sockets need none.
    pub secret_file: Option<String>,
    /// This host's path of the pool, when it names the pool's file or device differently
    /// from the resource manager's host (hosts behind one CXL switch each see the device
    /// under a path of their own): regions are mapped from it instead of the path the server
    /// reports (for an FS_DAX pool, the pool's directory). `None`: the `MARU_POOL_PATH`
    /// environment variable, else the server's path. Either way the file's pool header must
    /// carry the UUID of the pool the region was granted from, or the mapping is refused with
    /// [`ErrorKind::WrongPool`](crate::ErrorKind::WrongPool).
    pub pool_path: Option<String>,
}

/// The environment variable that names this host's path of the pool when
/// [`MaruConfig::pool_path`] does not.
pub const POOL_PATH_ENV: &str = "MARU_POOL_PATH";

impl Default for MaruConfig {
    fn default() -> Self {
        MaruConfig {
            server_url: DEFAULT_SERVER_URL.to_owned(),
            instance_id: random_uuid4(),
            namespace: String::new(),
            pool_size: 100 * MIB,
            chunk_size_bytes: MIB,
            auto_connect: true,
            timeout_ms: 2000,
            use_async_rpc: true,
            max_inflight: 64,
            eager_map: true,
            auto_expand: true,
            expand_size: None,
            reply_grace: DEFAULT_REPLY_GRACE,
            busy_poll: true,
            write_behind: false,
            reconnect_after_fork: false,
            secret_file: None,
            pool_path: None,
        }
    }
}

/// A refused field: an [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument)
/// that names it.
fn invalid(field: &'static str, reason: impl fmt::Display) -> Error {
    Error::invalid("config", format!("invalid {field}: {reason}"))
}

impl MaruConfig {
    /// Checks every field; returns the parsed server URL.
    pub fn validate(&self) -> Result<ServerUrl> {
        let url =
            ServerUrl::parse(&self.server_url).map_err(|e| invalid("server_url", e.to_string()))?;
        if let ServerUrl::Unix(path) = &url {
            if !path.is_absolute() {
                return Err(invalid(
                    "server_url",
                    format!("unix socket path {} is not absolute", path.display()),
                ));
            }
        }
        if self.instance_id.is_empty() {
            return Err(invalid("instance_id", "must not be empty"));
        }
        if self.instance_id.len() > MAX_STRING_LEN {
            return Err(invalid(
                "instance_id",
                format!("longer than {MAX_STRING_LEN} bytes"),
            ));
        }
        if self.namespace.len() > MAX_NAMESPACE_LEN {
            return Err(invalid(
                "namespace",
                format!("longer than {MAX_NAMESPACE_LEN} bytes"),
            ));
        }
        if self.chunk_size_bytes == 0 {
            return Err(invalid("chunk_size_bytes", "must be positive"));
        }
        // A page must fit a register message's u64 offset arithmetic with room to spare.
        if self.chunk_size_bytes > (1 << 40) {
            return Err(invalid("chunk_size_bytes", "larger than 1 TiB"));
        }
        if self.pool_size < self.chunk_size_bytes {
            return Err(invalid(
                "pool_size",
                format!(
                    "{} is smaller than chunk_size_bytes {}",
                    self.pool_size, self.chunk_size_bytes
                ),
            ));
        }
        if self.timeout_ms == 0 {
            return Err(invalid("timeout_ms", "must be positive"));
        }
        if self.max_inflight == 0 {
            return Err(invalid("max_inflight", "must be at least 1"));
        }
        if let Some(p) = &self.pool_path {
            if !p.starts_with('/') {
                return Err(invalid(
                    "pool_path",
                    format!("{p:?} is not an absolute path"),
                ));
            }
        }
        if let Some(expand) = self.expand_size {
            if !self.auto_expand {
                return Err(invalid(
                    "expand_size",
                    "is set but auto_expand is false (expansion would never happen)",
                ));
            }
            if expand < self.chunk_size_bytes {
                return Err(invalid(
                    "expand_size",
                    format!(
                        "{expand} is smaller than chunk_size_bytes {}",
                        self.chunk_size_bytes
                    ),
                ));
            }
        }
        Ok(url)
    }

    /// The cluster secret to prove over TCP: [`MaruConfig::secret_file`], else the file named
    /// by `MARU_SECRET_FILE`, else none. A file readable by others, or not a secret, is an
    /// `InvalidArgument` that says why.
    pub fn cluster_secret(&self) -> Result<Option<maru_transport::auth::ClusterSecret>> {
        let path = match &self.secret_file {
            Some(p) => Some(std::path::PathBuf::from(p)),
            None => std::env::var_os(maru_transport::auth::SECRET_ENV).map(Into::into),
        };
        path.map(|p| maru_transport::auth::ClusterSecret::load(&p))
            .transpose()
            .map_err(|e| invalid("secret_file", e))
    }

    /// This host's path of the pool: [`MaruConfig::pool_path`], else `MARU_POOL_PATH` (an
    /// empty value counts as unset), else none (the server's path is used).
    pub fn pool_path_here(&self) -> Option<std::path::PathBuf> {
        match &self.pool_path {
            Some(p) => Some(p.into()),
            None => std::env::var_os(POOL_PATH_ENV)
                .filter(|v| !v.is_empty())
                .map(Into::into),
        }
    }

    /// Bytes requested per expansion.
    pub fn expand_bytes(&self) -> u64 {
        self.expand_size.unwrap_or(self.pool_size)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Distance between two pages of a region: the chunk size rounded up to 4 KiB, because
    /// registered offsets must be multiples of 4096 (so any page can be mapped on its own).
    pub fn page_stride(&self) -> u64 {
        self.chunk_size_bytes.div_ceil(4096) * 4096
    }
}

/// A random (version 4) UUID in its canonical text form: the default instance id.
pub fn random_uuid4() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_original_ones_and_valid() {
        let c = MaruConfig::default();
        assert_eq!(c.server_url, "tcp://localhost:5555");
        assert_eq!(c.pool_size, 100 * MIB);
        assert_eq!(c.chunk_size_bytes, MIB);
        assert!(c.auto_connect && c.use_async_rpc && c.eager_map && c.auto_expand);
        assert_eq!(
            (c.timeout_ms, c.max_inflight, c.expand_size),
            (2000, 64, None)
        );
        assert_eq!(c.expand_bytes(), c.pool_size);
        c.validate().unwrap();
        assert_ne!(c.instance_id, MaruConfig::default().instance_id);
    }

    #[test]
    fn uuid_is_version_4() {
        let u = random_uuid4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn invalid_values_are_refused() {
        let ok = MaruConfig::default();
        let cases: Vec<(&str, MaruConfig)> = vec![
            (
                "chunk_size_bytes",
                MaruConfig {
                    chunk_size_bytes: 0,
                    ..ok.clone()
                },
            ),
            (
                "pool_size",
                MaruConfig {
                    pool_size: MIB - 1,
                    ..ok.clone()
                },
            ),
            (
                "expand_size",
                MaruConfig {
                    auto_expand: false,
                    expand_size: Some(MIB),
                    ..ok.clone()
                },
            ),
            (
                "expand_size",
                MaruConfig {
                    expand_size: Some(1),
                    ..ok.clone()
                },
            ),
            (
                "timeout_ms",
                MaruConfig {
                    timeout_ms: 0,
                    ..ok.clone()
                },
            ),
            (
                "max_inflight",
                MaruConfig {
                    max_inflight: 0,
                    ..ok.clone()
                },
            ),
            (
                "server_url",
                MaruConfig {
                    server_url: "http://x".into(),
                    ..ok.clone()
                },
            ),
            (
                "server_url",
                MaruConfig {
                    server_url: "unix://relative.sock".into(),
                    ..ok.clone()
                },
            ),
            (
                "instance_id",
                MaruConfig {
                    instance_id: String::new(),
                    ..ok.clone()
                },
            ),
            (
                "pool_path",
                MaruConfig {
                    pool_path: Some("dev/dax0.0".into()),
                    ..ok.clone()
                },
            ),
        ];
        for (field, cfg) in cases {
            match cfg.validate() {
                Err(e) => {
                    assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
                    assert!(
                        e.to_string().starts_with(&format!("invalid {field}: ")),
                        "{e}"
                    );
                }
                Ok(_) => panic!("{field}: accepted {cfg:?}"),
            }
        }
        let unix = MaruConfig {
            server_url: "unix:///run/maru.sock".into(),
            ..ok
        };
        assert!(matches!(unix.validate(), Ok(ServerUrl::Unix(_))));
    }

    #[test]
    fn stride_rounds_up_to_4k() {
        let c = MaruConfig {
            chunk_size_bytes: 5000,
            ..MaruConfig::default()
        };
        assert_eq!(c.page_stride(), 8192);
        let c = MaruConfig {
            chunk_size_bytes: 4096,
            ..MaruConfig::default()
        };
        assert_eq!(c.page_stride(), 4096);
    }
}
