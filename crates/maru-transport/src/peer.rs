//! Who a process is, as a [`maru_proto::Hello`] states it and the resource manager's reaper
//! checks it: hostname, pid, and the pid's start time (which tells a reused pid apart).

/// This process's identity for a [`maru_proto::Hello`]: hostname, pid and start time.
pub fn local_identity() -> (String, u32, u64) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    let pid = std::process::id();
    (host, pid, process_start_time(pid).unwrap_or(0))
}

/// Start time of `pid` in clock ticks since boot (`/proc/PID/stat` field 22), `None` when the
/// process does not exist. Pid reuse gives the same pid a different start time.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: skip past it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_readable_and_missing_pid_is_none() {
        let (_, pid, start) = local_identity();
        assert!(start > 0);
        assert_eq!(process_start_time(pid), Some(start));
        assert_eq!(process_start_time(u32::MAX), None);
    }
}
