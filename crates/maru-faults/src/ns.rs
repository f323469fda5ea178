//! A private mount namespace held open by a sleeping process, so a test can give a daemon a
//! size-limited tmpfs (disk full) or a read-only bind mount (read-only state directory)
//! without touching the host's mounts. Needs root and `unshare`/`nsenter` (util-linux);
//! [`MountNs::new`] says why not when they are unusable, and tests then skip with that
//! message.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait_until;

pub struct MountNs {
    holder: Child,
}

fn ns_of(pid: &str) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
}

impl MountNs {
    pub fn new() -> Result<MountNs, String> {
        let mut cmd = Command::new("unshare");
        maru_testkit::process::die_with_parent(&mut cmd);
        let mut holder = cmd
            .args(["-m", "--propagation", "private", "sleep", "3600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run unshare: {e}"))?;
        let pid = holder.id().to_string();
        let ours = ns_of("self");
        let mut failed = false;
        let entered = wait_until(Duration::from_secs(5), || {
            if let Ok(Some(_)) = holder.try_wait() {
                failed = true;
                return true;
            }
            ns_of(&pid).is_some_and(|ns| Some(ns) != ours)
        });
        if failed || !entered {
            let _ = holder.kill();
            let out = holder.wait_with_output().map_err(|e| e.to_string())?;
            return Err(format!(
                "unshare -m failed (needs root / CAP_SYS_ADMIN): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let ns = MountNs { holder };
        ns.run(&["true"])
            .map_err(|e| format!("nsenter unusable: {e}"))?;
        Ok(ns)
    }

    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// Runs a command inside the namespace; its stdout, or its stderr as the error.
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("nsenter")
            .arg("-t")
            .arg(self.pid().to_string())
            .args(["-m", "--"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run nsenter: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{args:?}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// `cmd` run inside the namespace: the same program, arguments and environment, started
    /// through `nsenter`.
    pub fn command(&self, cmd: &Command) -> Command {
        let mut inside = Command::new("nsenter");
        inside
            .arg("-t")
            .arg(self.pid().to_string())
            .args(["-m", "--"])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(v) => inside.env(key, v),
                None => inside.env_remove(key),
            };
        }
        inside
    }

    /// Mounts a tmpfs of `bytes` on `dir` (inside the namespace only).
    pub fn mount_tmpfs(&self, dir: &Path, bytes: u64) -> Result<(), String> {
        let d = dir.to_string_lossy();
        self.run(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={bytes},mode=0700"),
            "tmpfs",
            &d,
        ])
        .map(drop)
    }

    /// Makes `dir` read-only inside the namespace (a read-only bind mount over itself). Files
    /// already open keep the access they were opened with: that is how a remount behaves for
    /// a process that holds them.
    pub fn make_read_only(&self, dir: &Path) -> Result<(), String> {
        let d = dir.to_string_lossy();
        self.run(&["mount", "--bind", &d, &d])?;
        self.run(&["mount", "-o", "remount,bind,ro", &d]).map(drop)
    }

    pub fn unmount(&self, dir: &Path) -> Result<(), String> {
        self.run(&["umount", &dir.to_string_lossy()]).map(drop)
    }

    /// `path` as seen from inside the namespace, reachable from outside.
    pub fn path(&self, path: &Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.pid())).join(rel)
    }
}

impl Drop for MountNs {
    fn drop(&mut self) {
        // The namespace (and any tmpfs in it) goes away with its last process.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
