//! Shared memory for Maru: the pool kinds a resource manager carves regions from, and the
//! mappings clients read and write through. All `unsafe` mapping code of the project lives in
//! this crate.

mod mapping;
pub mod naming;
pub mod pool;

pub use mapping::{fs_page_size, system_page_size, MapMode, Mapping, ShmError, HUGE_PAGE_SIZE};
pub use pool::{discover, parse_size, Pool, PoolError, PoolKind, PoolSpec, SpecError};
