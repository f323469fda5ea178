//! The real daemons as child processes: how to start a `maru-resource-manager` or a
//! `maru-server` ([`RmSpec`], [`ServerSpec`]), and a started one ([`Daemon`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use maru_proto::ServerUrl;

use crate::process::{binary, die_with_parent, spawn_ready, terminate};

/// How long a daemon may take to write its ready file.
pub const READY_WITHIN: Duration = Duration::from_secs(20);
/// How long a daemon may take to stop after SIGTERM.
pub const STOP_WITHIN: Duration = Duration::from_secs(15);

/// A daemon process, started with `--ready-file` and considered up once that file parses.
/// Dropping it kills it (a test that panics leaves nothing running).
pub struct Daemon {
    pub name: String,
    child: Child,
    /// The ready file's JSON (bound addresses, pid, ...).
    pub ready: serde_json::Value,
    /// Where the daemon's stderr goes.
    pub stderr: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` (stdout discarded, stderr to `dir/<name>.<n>.stderr`, killed with the
    /// test runner) with `--ready-file` and waits for the file. `Err` carries the daemon's
    /// stderr when it exits before being ready.
    pub fn spawn(mut cmd: Command, dir: &Path, name: &str) -> Result<Daemon, String> {
        die_with_parent(&mut cmd);
        cmd.stdout(Stdio::null());
        let started = spawn_ready(cmd, dir, name, READY_WITHIN)?;
        Ok(Daemon {
            name: name.to_owned(),
            child: started.child,
            ready: started.ready,
            stderr: started.stderr,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `host:port` of the TCP listener, from the ready file.
    pub fn tcp(&self) -> String {
        self.ready["tcp"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no tcp address in {}", self.name, self.ready))
            .to_owned()
    }

    pub fn url(&self) -> ServerUrl {
        ServerUrl::Tcp(self.tcp())
    }

    /// Still running (not exited, not killed)?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How it ended, if it did.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL: a crash; nothing is flushed, checkpointed or said goodbye to.
    pub fn kill(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (bounded) for the exit; panics when it does not stop.
    pub fn terminate(&mut self) -> ExitStatus {
        terminate(&mut self.child, STOP_WITHIN).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How to start a resource manager.
#[derive(Debug, Clone)]
pub struct RmSpec {
    /// 0 binds an ephemeral port (the ready file says which); a fixed port lets a restart
    /// come back on the same address.
    pub port: u16,
    pub state_dir: PathBuf,
    /// `--pool` values.
    pub pools: Vec<String>,
    pub log_level: String,
    pub extra: Vec<String>,
}

impl RmSpec {
    /// An ephemeral port, the state in `dir/state`, warnings and errors logged.
    pub fn new(dir: &Path, pools: Vec<String>) -> RmSpec {
        RmSpec {
            port: 0,
            state_dir: dir.join("state"),
            pools,
            log_level: "warn".into(),
            extra: Vec::new(),
        }
    }

    /// Where the resource manager's Unix socket is (its default place, in the state
    /// directory).
    pub fn unix_socket(&self) -> PathBuf {
        self.state_dir.join("rm.sock")
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(binary("maru-resource-manager"));
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--log-level")
            .arg(&self.log_level)
            .env_remove("MARU_LOG");
        for p in &self.pools {
            cmd.arg("--pool").arg(p);
        }
        cmd.args(&self.extra);
        cmd
    }

    /// Starts it in `dir` as the daemon `rm`.
    pub fn spawn(&self, dir: &Path) -> Result<Daemon, String> {
        Daemon::spawn(self.command(), dir, "rm")
    }
}

/// How to start a metadata server.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// 0 binds an ephemeral port, as for [`RmSpec::port`].
    pub port: u16,
    pub unix: Option<PathBuf>,
    pub rm_address: String,
    pub extra: Vec<String>,
}

impl ServerSpec {
    /// An ephemeral port, no Unix socket, the resource manager at `rm_address`.
    pub fn new(rm_address: impl Into<String>) -> ServerSpec {
        ServerSpec {
            port: 0,
            unix: None,
            rm_address: rm_address.into(),
            extra: Vec::new(),
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(binary("maru-server"));
        cmd.args(["--log-level", "warn", "--port"])
            .arg(self.port.to_string())
            .arg("--rm-address")
            .arg(&self.rm_address)
            .env_remove("MARU_LOG");
        if let Some(u) = &self.unix {
            cmd.arg("--unix").arg(u);
        }
        cmd.args(&self.extra);
        cmd
    }

    /// The spec with its key index at `path`, unless `extra` already says where (or
    /// `--no-index`): the server's default, in the user's state directory, would outlast
    /// the test.
    pub fn with_index_at(mut self, path: &Path) -> ServerSpec {
        if !self
            .extra
            .iter()
            .any(|a| a == "--index" || a == "--no-index")
        {
            let at = ["--index".to_owned(), path.display().to_string()];
            self.extra.splice(0..0, at);
        }
        self
    }

    /// Starts it in `dir` as the daemon `name`, its key index in `dir` too.
    pub fn spawn(&self, dir: &Path, name: &str) -> Result<Daemon, String> {
        let spec = self
            .clone()
            .with_index_at(&dir.join(format!("{name}.index")));
        Daemon::spawn(spec.command(), dir, name)
    }
}
