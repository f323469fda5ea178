//! Shared memory for Maru: the pool kinds a resource manager carves regions from, the
//! mappings clients read and write through, and the names of every OS object the project
//! creates.
//!
//! Owns: pools (`pool/{shm,fs_dax,dev_dax}.rs` behind the [`Pool`] trait: create, size,
//! prepare and release a region's memory), [`Mapping`] (map, populate, privatize, unmap),
//! page sizes, and [`naming`]. All unsafe mapping code of the project lives here; the system
//! calls go through `rustix`, and each `unsafe` block says why it holds.
//!
//! May not touch: who owns a region, keys, tokens or the wire protocol (it reads only the
//! `Access` description `maru-proto` defines), and it never reads or writes a KV chunk's
//! bytes on anyone's behalf: callers copy through a [`Mapping`] themselves.

mod huge_pages;
mod mapping;
pub mod naming;
pub mod pool;
mod stream_copy;

pub use huge_pages::HugePageMount;
pub use mapping::{fs_page_size, system_page_size, MapMode, Mapping, ShmError, HUGE_PAGE_SIZE};
pub use pool::{discover, parse_size, Pool, PoolError, PoolKind, PoolSpec, SpecError};
#[cfg(target_arch = "x86_64")]
pub use stream_copy::copy_from_shared;
pub use stream_copy::{copy_to_shared, STREAM_COPY_MIN};
