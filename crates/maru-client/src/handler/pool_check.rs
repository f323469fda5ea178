//! Device identity on the client: before a region is mapped, the file or device it comes
//! from (this host's path of the pool, see `MaruConfig::pool_path`) must carry the header of
//! the pool the region was granted from. A host that names the wrong device gets
//! [`ErrorKind::WrongPool`] and maps nothing, instead of reading another pool's bytes as its
//! keys or writing its chunks into them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use maru_proto::RegionInfo;
use std::os::fd::OwnedFd;

use maru_shm::pool::header::{self, uuid_text, HeaderError, HeaderPlace, PoolHeader};
use maru_shm::PoolError;

use crate::error::{Error, ErrorKind, Result};

/// This host's path of the pool, and the header places already shown to carry a UUID.
pub(super) struct PoolCheck {
    pool_path: Option<PathBuf>,
    /// Header place → the UUID found there. A pool's header is read once per session; a
    /// header that did not match is read again next time (the operator may fix the path).
    verified: Mutex<HashMap<PathBuf, [u8; 16]>>,
}

fn wrong_pool(op: &'static str, message: String) -> Error {
    Error::new(ErrorKind::WrongPool, op, message)
}

impl PoolCheck {
    pub fn new(pool_path: Option<PathBuf>) -> Self {
        PoolCheck {
            pool_path,
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// The file this host maps `info`'s region from, once its pool is shown to be the one
    /// the grant names. A grant without a pool UUID (a daemon that names none) is mapped
    /// unchecked.
    pub fn region_file(&self, info: &RegionInfo, op: &'static str) -> Result<PathBuf> {
        let (file, place) = header::locate(&info.handle.pool, &info.access, self.pool_path());
        self.verify(info, op, &place, || place.read())?;
        Ok(file)
    }

    /// Checks the pool of a region passed as descriptor `fd` (of the server's path of the
    /// pool): a shm pool's header is read through the descriptor, an FS_DAX pool's sidecar
    /// from its path. A pool file replaced under the server's path (a new identity) is
    /// refused as [`Self::region_file`] refuses another pool's file.
    pub fn check_descriptor(
        &self,
        info: &RegionInfo,
        fd: &OwnedFd,
        op: &'static str,
    ) -> Result<()> {
        let (_, place) = header::locate(&info.handle.pool, &info.access, None);
        self.verify(info, op, &place, || place.read_through(fd))
    }

    fn verify(
        &self,
        info: &RegionInfo,
        op: &'static str,
        place: &HeaderPlace,
        read: impl FnOnce() -> std::result::Result<
            std::result::Result<PoolHeader, HeaderError>,
            PoolError,
        >,
    ) -> Result<()> {
        let want = info.access.pool_uuid;
        if want == [0; 16] {
            return Ok(());
        }
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.get(place.path()) == Some(&want) {
            return Ok(());
        }
        let hint = match &self.pool_path {
            Some(p) => format!(
                "this host's pool_path is {}; point pool_path (or MARU_POOL_PATH) at this \
                 host's path of that pool",
                p.display()
            ),
            None => "if this host names the pool's device differently, set pool_path (or \
                     MARU_POOL_PATH) to its path here"
                .to_owned(),
        };
        let found = read().map_err(|e| {
            Error::new(
                ErrorKind::Map,
                op,
                format!(
                    "cannot read the pool header of {} to map region {}: {e} ({hint})",
                    place.path().display(),
                    info.handle.region_id
                ),
            )
        })?;
        match found {
            Ok(h) if h.uuid == want => {
                verified.insert(place.path().to_owned(), want);
                Ok(())
            }
            Ok(h) => Err(wrong_pool(
                op,
                format!(
                    "pool file {} is pool UUID {}, the resource manager's pool is {} (region \
                     {} not mapped; {hint})",
                    place.path().display(),
                    h.uuid_text(),
                    uuid_text(&want),
                    info.handle.region_id
                ),
            )),
            Err(e) => Err(wrong_pool(
                op,
                format!(
                    "pool file {} is not the resource manager's pool {}: {e} (region {} not \
                     mapped; {hint})",
                    place.path().display(),
                    uuid_text(&want),
                    info.handle.region_id
                ),
            )),
        }
    }

    fn pool_path(&self) -> Option<&Path> {
        self.pool_path.as_deref()
    }
}
