//! Several "hosts" on one machine, for multi-host tests: each host is a network namespace
//! joined to a bridge in the root namespace by a veth pair (its switch port), and the root
//! namespace is the daemons' host. The pool file is the emulated CXL device behind a switch:
//! every host reaches the same file, each under a path of its own (a hard link per host, as
//! each host names the device its own way).
//!
//! [`Hosts::new`] needs root (`ip netns`, veth, bridges); when it cannot build the topology it
//! says why, and tests print that reason and skip. Dropping a [`Hosts`] deletes what it made,
//! on panic too; namespaces and links left by a test runner that was killed outright (their
//! names carry its pid) are deleted by the next [`Hosts::new`].

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace this module makes: `maru-h-<pid>-<n>-<host>`.
const NS_PREFIX: &str = "maru-h-";
/// Prefix of the bridge (`mhb<pid>_<n>`) and of the root ends of veth pairs
/// (`mhv<pid>_<n><host>`); interface names are at most 15 bytes.
const LINK_PREFIXES: [&str; 2] = ["mhb", "mhv"];

/// Topologies made by this process so far (names and subnets stay unique within it).
static SEQ: AtomicU32 = AtomicU32::new(0);

/// One host: a network namespace with one interface on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name (`b`, `c`, ...), used in its paths.
    pub name: String,
    /// The network namespace (`ip netns exec <netns>`).
    pub netns: String,
    /// Its address on the bridge.
    pub addr: Ipv4Addr,
    /// The root end of its veth pair: its switch port.
    port: String,
}

/// The daemons' host (the root namespace, on the bridge's address) and `n` client hosts.
#[derive(Debug)]
pub struct Hosts {
    bridge: String,
    /// The daemons' address on the bridge.
    pub daemon_addr: Ipv4Addr,
    pub hosts: Vec<Host>,
}

/// Runs `ip` with `args`; its stderr as the error.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip_output(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn pid_alive(pid: &str) -> bool {
    Path::new("/proc").join(pid).exists()
}

/// Deletes namespaces and links of test runners that no longer exist.
fn sweep_stale() {
    for line in ip_output(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if let Some(rest) = name.strip_prefix(NS_PREFIX) {
            let pid = rest.split('-').next().unwrap_or("");
            if !pid.is_empty() && !pid_alive(pid) {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
    for line in ip_output(&["-o", "link", "show"]).lines() {
        // "7: mhb1234_0: <...>" or "8: mhv1234_0b@if2: <...>"
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        for prefix in LINK_PREFIXES {
            if let Some(rest) = name.strip_prefix(prefix) {
                let pid = rest.split('_').next().unwrap_or("");
                if !pid.is_empty() && !pid_alive(pid) {
                    let _ = ip(&["link", "del", name]);
                }
            }
        }
    }
}

/// Why multi-host tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("multi-host tests need root (network namespaces, veth, bridges)".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("multi-host tests need iproute2's `ip`".into()),
    }
}

impl Hosts {
    /// Builds the bridge and `n` client hosts (at most 20). `Err` says why it cannot (the
    /// caller skips); whatever was made before a failure is deleted.
    pub fn new(n: usize) -> Result<Hosts, String> {
        if let Some(why) = unavailable() {
            return Err(why);
        }
        assert!((1..=20).contains(&n), "1..=20 hosts");
        sweep_stale();
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let bridge = format!("mhb{pid}_{seq}");
        // A /24 per topology, picked from the pid and the sequence so that concurrent test
        // processes do not collide, avoiding any subnet already routed here.
        let routes = ip_output(&["-4", "route", "show"]);
        let mut subnet = None;
        for attempt in 0..64u32 {
            let k = (pid.wrapping_mul(8) + seq + attempt * 7919) % (128 * 256);
            let (a, b) = (64 + (k >> 8) as u8, (k & 0xff) as u8);
            let prefix = format!("10.{a}.{b}.");
            if !routes.contains(&prefix) {
                subnet = Some((a, b));
                break;
            }
        }
        let (a, b) = subnet.ok_or("no free 10.x.y.0/24 subnet")?;
        let mut hosts = Hosts {
            bridge: bridge.clone(),
            daemon_addr: Ipv4Addr::new(10, a, b, 1),
            hosts: Vec::new(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"])
            .map_err(|e| format!("cannot create a bridge (needs root / CAP_NET_ADMIN): {e}"))?;
        ip(&["addr", "add", &format!("10.{a}.{b}.1/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..n {
            let name = ((b'b' + i as u8) as char).to_string();
            let host = Host {
                netns: format!("{NS_PREFIX}{pid}-{seq}-{name}"),
                addr: Ipv4Addr::new(10, a, b, 10 + i as u8),
                port: format!("mhv{pid}_{seq}{name}"),
                name,
            };
            ip(&["netns", "add", &host.netns])
                .map_err(|e| format!("cannot create a network namespace: {e}"))?;
            hosts.hosts.push(host.clone());
            ip(&[
                "link",
                "add",
                &host.port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &host.netns,
            ])?;
            ip(&["link", "set", &host.port, "master", &bridge])?;
            ip(&["link", "set", &host.port, "up"])?;
            let inside = |args: &[&str]| {
                let mut all = vec!["netns", "exec", &host.netns, "ip"];
                all.extend_from_slice(args);
                ip(&all)
            };
            inside(&["addr", "add", &format!("{}/24", host.addr), "dev", "eth0"])?;
            inside(&["link", "set", "eth0", "up"])?;
            inside(&["link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// What runs a program on `host`: `ip netns exec <netns>`, to which the program and its
    /// arguments are appended. `ip` execs the program, so the child's pid is the program's.
    pub fn launcher(&self, host: &Host) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &host.netns]);
        cmd
    }

    /// `program` run on `host` (see [`Hosts::launcher`]).
    pub fn command_on(&self, host: &Host, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = self.launcher(host);
        cmd.arg(program);
        cmd
    }

    /// Pulls the host's cable: its switch port goes down (its own interface loses carrier).
    pub fn cut(&self, host: &Host) {
        ip(&["link", "set", &host.port, "down"]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Plugs the cable back in.
    pub fn restore(&self, host: &Host) {
        ip(&["link", "set", &host.port, "up"]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Gives `host` its own path for the pool file `pool`: `dir/hosts/<name>/<device>`, a
    /// hard link to it, as a host names the switch's device its own way. A hard link (not a
    /// symlink) is a name of its own for the same memory: the host's processes map it under
    /// that name, and their `/proc/PID/maps` show it. `dir` must be on the pool's file system.
    pub fn device_path(&self, host: &Host, dir: &Path, pool: &Path, device: &str) -> PathBuf {
        let d = dir.join("hosts").join(&host.name);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        let link = d.join(device);
        if !link.exists() {
            std::fs::hard_link(pool, &link).unwrap_or_else(|e| panic!("{}: {e}", link.display()));
        }
        link
    }

    /// Pids of processes running inside `host`'s network namespace.
    pub fn pids(&self, host: &Host) -> Vec<u32> {
        ip_output(&["netns", "pids", &host.netns])
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// The host "reboots": every process in it is SIGKILLed at once (nothing says goodbye).
    pub fn kill_all(&self, host: &Host) -> usize {
        let pids = self.pids(host);
        for pid in &pids {
            // SAFETY: kill(2) has no memory-safety preconditions. The pids were listed as
            // members of a namespace only this test's processes enter.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
        }
        pids.len()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in &self.hosts {
            // A namespace lives on while a process is in it: kill those first.
            self.kill_all(h);
            let _ = ip(&["netns", "del", &h.netns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_reach_the_daemons_host_and_leave_nothing_behind() {
        let hosts = match Hosts::new(2) {
            Ok(h) => h,
            Err(why) => {
                println!("skipped: {why}");
                return;
            }
        };
        let l = std::net::TcpListener::bind((hosts.daemon_addr, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let b = hosts.host("b").clone();
        // A TCP connect from inside host b, with bash's /dev/tcp (no extra tools needed).
        let script = format!("exec 3<>/dev/tcp/{}/{port}", hosts.daemon_addr);
        let st = hosts
            .command_on(&b, "bash")
            .args(["-c", &script])
            .status()
            .unwrap();
        assert!(st.success());
        let (_, from) = l.accept().unwrap();
        assert_eq!(from.ip(), std::net::IpAddr::V4(b.addr));
        let names = (hosts.bridge.clone(), b.netns.clone());
        drop(hosts);
        assert!(!ip_output(&["netns", "list"]).contains(&names.1));
        assert!(!ip_output(&["-o", "link", "show"]).contains(&names.0));
    }
}
