//! Where a region is mapped from: a descriptor the server passes over the Unix socket
//! (SCM_RIGHTS), read-only for reading and read-write only for the session's own regions,
//! so that this process needs no permission on the pool file; else this host's path of the
//! pool, opened here (TCP, another host, a DEV_DAX device, an older setting).
//!
//! `MARU_REGION_FDS` chooses: `auto` (the default: a descriptor when the server offers one,
//! else the path; the path when `pool_path` / `MARU_POOL_PATH` names one, since the
//! operator chose it), `never` (always the path), `always` (a descriptor or an error).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use maru_proto::{ErrorCode, RegionInfo};
use maru_shm::{MapMode, Mapping, ShmError};

use super::connected::Connected;
use crate::error::{Error, ErrorKind, Result};
use crate::wait::WaitHook;

/// The environment variable that chooses how regions are mapped (see the module).
pub const REGION_FDS_ENV: &str = "MARU_REGION_FDS";

/// How regions are mapped: see the module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FdMode {
    Auto,
    Never,
    Always,
}

impl FdMode {
    /// From `MARU_REGION_FDS` (unset or empty: `auto`); another value is `InvalidArgument`.
    pub fn from_env() -> Result<FdMode> {
        let v = std::env::var(REGION_FDS_ENV).unwrap_or_default();
        match v.as_str() {
            "" | "auto" => Ok(FdMode::Auto),
            "never" => Ok(FdMode::Never),
            "always" => Ok(FdMode::Always),
            other => Err(Error::invalid(
                "connect",
                format!("invalid {REGION_FDS_ENV}={other:?}: use auto, never or always"),
            )),
        }
    }

    /// `auto` maps by path when this host's path of the pool is configured.
    pub fn given_pool_path(self, configured: bool) -> FdMode {
        match self {
            FdMode::Auto if configured => FdMode::Never,
            other => other,
        }
    }
}

/// The descriptor state of a session: its mode, and whether the server said it has none
/// to give (a DEV_DAX pool), so that later maps do not ask again.
pub(super) struct RegionFds {
    pub mode: FdMode,
    refused: AtomicBool,
}

impl RegionFds {
    pub fn new(mode: FdMode) -> Self {
        RegionFds {
            mode,
            refused: AtomicBool::new(false),
        }
    }
}

/// What a region is mapped from.
pub(super) enum Source {
    /// A descriptor from the server, and the region's offset in its file.
    Fd(OwnedFd, u64),
    /// A file this process opens.
    Path(PathBuf),
}

impl Source {
    /// Maps `info`'s region from this source.
    pub fn map(
        self,
        info: &RegionInfo,
        mode: MapMode,
        populate: bool,
    ) -> Result<Mapping, ShmError> {
        let len = info.access.len;
        match self {
            Source::Fd(fd, offset) => Mapping::map_fd(
                fd,
                Path::new(&info.access.path),
                offset,
                len,
                mode,
                populate,
            ),
            Source::Path(p) => Mapping::map(&p, info.access.offset, len, mode, populate),
        }
    }
}

impl Source {
    /// Maps `info`'s region read-write and populated, for this session's own use, inside
    /// `hook`'s blocking section (the populate costs ~0.7 ms per MiB). `None` when the hook
    /// did not run the mapping.
    pub fn map_owned(
        self,
        info: &RegionInfo,
        hook: &dyn WaitHook,
    ) -> Option<Result<Mapping, ShmError>> {
        let mut out = None;
        let mut source = Some(self);
        hook.block(&mut || {
            if let Some(s) = source.take() {
                out = Some(s.map(info, MapMode::ReadWrite, true));
            }
        });
        out
    }
}

impl Connected {
    /// Where to map `info`'s region from (writable: for this session's own region). A
    /// descriptor's pool header is checked like a path's: the file under the server's path
    /// may have been replaced by a pool of another identity.
    pub fn region_source(
        &self,
        info: &RegionInfo,
        writable: bool,
        op: &'static str,
        hook: &dyn WaitHook,
    ) -> Result<Source> {
        let fds = &self.fds;
        let id = info.handle.region_id;
        if fds.mode != FdMode::Never && !fds.refused.load(Ordering::Relaxed) {
            match self.conns.descriptor(id, writable, hook) {
                Some(Ok((fd, offset, len))) if len == info.access.len => {
                    self.pools.check_descriptor(info, &fd, op)?;
                    return Ok(Source::Fd(fd, offset));
                }
                Some(Ok((_, _, len))) => {
                    return Err(Error::protocol(
                        op,
                        format!(
                            "the descriptor of region {id} covers {len} bytes, the region {}",
                            info.access.len
                        ),
                    ))
                }
                Some(Err(e)) => {
                    self.lose_if_gone(&e);
                    if fds.mode == FdMode::Always {
                        return Err(e);
                    }
                    if matches!(
                        e.kind(),
                        ErrorKind::Remote(ErrorCode::Unavailable | ErrorCode::UnknownMessage)
                    ) {
                        fds.refused.store(true, Ordering::Relaxed);
                    }
                    tracing::debug!("region {id}: no descriptor ({e}); mapping by path");
                }
                None if fds.mode == FdMode::Always => {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "{REGION_FDS_ENV}=always needs a unix:// server: descriptors \
                             travel only over the Unix socket"
                        ),
                    ))
                }
                None => {}
            }
        }
        self.pools.region_file(info, op).map(Source::Path)
    }
}

#[cfg(test)]
mod tests {
    use super::FdMode;

    #[test]
    fn auto_maps_by_path_when_this_hosts_path_is_configured() {
        assert_eq!(FdMode::Auto.given_pool_path(true), FdMode::Never);
        assert_eq!(FdMode::Auto.given_pool_path(false), FdMode::Auto);
        assert_eq!(FdMode::Always.given_pool_path(true), FdMode::Always);
    }
}
