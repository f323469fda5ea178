//! Maru's operator commands and the `maru` command line they make.
//!
//! - [`up`]: `maru up`, a resource manager and a metadata server in one process on a shm pool
//!   it creates;
//! - [`stats`]: `maru stats`, what a running server holds, as tables or JSON;
//! - [`top`]: `maru top`, a live full-screen monitor;
//! - [`cli`]: their argument parsing, and [`cli::main`], which runs a `maru` command line
//!   made of these subcommands plus the ones a front end adds. The Rust `maru` binary
//!   (maru-cli) adds `bench`; the Python package's console scripts (maru-py) run the same
//!   code inside the Python process.
//!
//! It owns these commands, their output and the number formatting they share ([`mod@format`]).
//! It starts the daemons only through their libraries (`maru_resource_manager::start`,
//! `maru_server::start`) and reads a server only over the wire, as any operator tool would;
//! it holds no benchmark and no Python binding, so the Python extension can depend on it
//! without carrying either, and no daemon or client crate may depend on it.

pub mod cli;
pub mod format;
pub mod stats;
pub mod top;
pub mod up;

pub use cli::{main, Command};
