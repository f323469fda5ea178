use std::fmt;
use std::path::PathBuf;

/// Where a daemon listens: `tcp://host:port` or `unix:///absolute/path`.
/// A bare `host:port` is taken as TCP.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServerUrl {
    Tcp(String),
    Unix(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("invalid server url {0:?}: expected tcp://host:port or unix:///path")]
    Invalid(String),
}

impl ServerUrl {
    pub fn parse(s: &str) -> Result<ServerUrl, UrlError> {
        let bad = || UrlError::Invalid(s.to_owned());
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(ServerUrl::Unix(PathBuf::from(path)));
        }
        let addr = s.strip_prefix("tcp://").unwrap_or(s);
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() || addr.contains('/') {
            return Err(bad());
        }
        Ok(ServerUrl::Tcp(addr.to_owned()))
    }
}

impl std::str::FromStr for ServerUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServerUrl::parse(s)
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerUrl::Tcp(a) => write!(f, "tcp://{a}"),
            ServerUrl::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_transports_and_rejects_junk() {
        assert_eq!(
            ServerUrl::parse("tcp://localhost:5555").unwrap(),
            ServerUrl::Tcp("localhost:5555".into())
        );
        assert_eq!(
            ServerUrl::parse("127.0.0.1:1").unwrap(),
            ServerUrl::Tcp("127.0.0.1:1".into())
        );
        assert_eq!(
            ServerUrl::parse("unix:///tmp/m.sock").unwrap(),
            ServerUrl::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            ServerUrl::parse("tcp://[::1]:9").unwrap().to_string(),
            "tcp://[::1]:9"
        );
        for bad in [
            "",
            "tcp://",
            "tcp://host",
            "tcp://host:99999",
            "unix://",
            "http://x:1/y",
        ] {
            assert!(ServerUrl::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
