//! The pool header at the resource manager: formatted into a pool that has none, checked in
//! a pool that has one, its extent taken out of the allocator. Runs once per pool after the
//! allocation table is recovered, because whether a pool may be formatted depends on it.
//!
//! The rules, strictest first:
//! - a header that is ours but damaged (checksum, field, newer layout) refuses the start,
//!   whatever the pool holds: formatting it would give a device that hosts may still map
//!   under its old identity a new one behind their backs;
//! - a blank pool (zeroes where the header goes: never formatted, or a shm file that was
//!   removed or truncated, whose memory is gone) is formatted, provided no region lies in the
//!   header's extent; its regions stay allocated (their bytes were lost with the memory);
//! - a pool with something else where the header goes (another device, or a pool of a build
//!   without headers) is formatted only while the resource manager has no region in it; with
//!   regions it refuses (it may be the wrong device, or they may sit where the header goes);
//! - a header whose kind, alignment, page size or reserved extent differ from the pool's is
//!   reformatted (a new UUID) while the pool is empty, and refuses the start otherwise; a
//!   different size alone (a shm pool opened with another size) keeps the UUID and records
//!   the new size.

use maru_shm::pool::header::{HeaderError, PoolHeader};

use crate::manager::PoolSlot;
use crate::RmError;

fn refuse(slot: &PoolSlot, reason: String) -> RmError {
    RmError::PoolHeader {
        path: slot.name.clone(),
        reason,
    }
}

/// Makes sure `slot`'s pool carries a valid header (see the module's rules), records its
/// UUID in the slot and sets its extent aside.
pub(crate) fn settle(slot: &mut PoolSlot) -> Result<(), RmError> {
    let g = slot.pool.geometry().clone();
    let reserved = slot.pool.reserved();
    let place = slot.pool.header_place();
    let fresh = PoolHeader::new(g.kind, g.total_size, g.align, g.page_size, reserved);
    let read = place
        .read()
        .map_err(|e| refuse(slot, format!("cannot read its header: {e}")))?;
    let empty = slot.regions == 0;
    let existing = read.clone().ok();
    let header = match read {
        Ok(h) => {
            let same_layout = h.kind == g.kind
                && h.align == g.align
                && h.page_size == g.page_size
                && h.reserved == reserved;
            if same_layout && h.total_size == g.total_size {
                h
            } else if same_layout {
                tracing::info!(
                    "pool {} (UUID {}) resized from {} to {} bytes",
                    slot.name,
                    h.uuid_text(),
                    h.total_size,
                    g.total_size
                );
                PoolHeader {
                    total_size: g.total_size,
                    ..h
                }
            } else if empty {
                tracing::warn!(
                    "pool {} was formatted as {:?} (align {}, page {}, reserved {}); it is \
                     {:?} (align {}, page {}, reserved {}) now and empty: formatting it again",
                    slot.name,
                    h.kind,
                    h.align,
                    h.page_size,
                    h.reserved,
                    g.kind,
                    g.align,
                    g.page_size,
                    reserved
                );
                fresh
            } else {
                return Err(refuse(
                    slot,
                    format!(
                        "its header (UUID {}) records another layout (align {}, page {}, \
                         reserved {}) than the pool has now (align {}, page {}, reserved {}) \
                         and {} regions live in it; open it as it was formatted",
                        h.uuid_text(),
                        h.align,
                        h.page_size,
                        h.reserved,
                        g.align,
                        g.page_size,
                        reserved,
                        slot.regions
                    ),
                ));
            }
        }
        Err(HeaderError::Blank) => {
            if !empty {
                tracing::warn!(
                    "pool {} has no header but {} regions: its memory was lost (the file was \
                     removed or truncated); formatting it anew, the regions stay allocated",
                    slot.name,
                    slot.regions
                );
            }
            fresh
        }
        Err(e @ HeaderError::Foreign) => {
            if !empty {
                return Err(refuse(
                    slot,
                    format!(
                        "{e}, but {} regions of the state directory live in it (a pool made \
                         before pool headers: free its regions, or start with a new state \
                         directory and a fresh pool)",
                        slot.regions
                    ),
                ));
            }
            fresh
        }
        Err(e) => {
            return Err(refuse(
                slot,
                format!(
                    "{e}: refusing to use a pool whose identity cannot be read (erase {} to \
                     format the pool anew: every host then has to map it again)",
                    match &place {
                        maru_shm::pool::HeaderPlace::InPool { path, .. } =>
                            format!("the first 4096 bytes of {}", path.display()),
                        maru_shm::pool::HeaderPlace::Sidecar { path } => path.display().to_string(),
                    }
                ),
            ))
        }
    };
    slot.extents.set_aside_start(reserved).map_err(|e| {
        refuse(
            slot,
            format!("its first {reserved} bytes hold the header but a region is there: {e}"),
        )
    })?;
    if existing != Some(header) {
        place
            .write(&header)
            .map_err(|e| refuse(slot, format!("cannot write its header: {e}")))?;
        tracing::info!("pool {} formatted: UUID {}", slot.name, header.uuid_text());
    }
    slot.uuid = header.uuid;
    Ok(())
}
