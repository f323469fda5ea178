//! The `maru` command as a library, so the Python package's console scripts run the same code
//! as the Rust binaries.

/// Runs the command line `args` (`args[0]` is the program name; a name ending in
/// `maru-server` or `maru-resource-manager` runs that daemon) and returns the exit code.
pub fn run(args: Vec<String>) -> i32 {
    let _ = args;
    eprintln!("maru: not built yet");
    2
}
