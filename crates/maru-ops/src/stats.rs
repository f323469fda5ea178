//! `maru stats`: one look at a running server.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use maru_proto::stats::ServerStats;
use maru_proto::{Request, Response, ServerUrl};
use maru_transport::BlockingConn;

use crate::format::{bytes, duration_s};

/// Where operator tools look for a server unless told otherwise.
pub const DEFAULT_SERVER: &str = "tcp://127.0.0.1:5555";

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Server to ask (tcp://host:port or unix:///path).
    #[arg(long, env = "MARU_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Print the statistics document as JSON.
    #[arg(long)]
    pub json: bool,
}

/// An operator connection to a metadata server (admin role: reads only, owns nothing).
pub struct StatsSource {
    url: ServerUrl,
    conn: Option<BlockingConn>,
}

impl StatsSource {
    pub fn new(server: &str) -> anyhow::Result<StatsSource> {
        Ok(StatsSource {
            url: ServerUrl::parse(server)?,
            conn: None,
        })
    }

    pub fn url(&self) -> &ServerUrl {
        &self.url
    }

    /// Fetches the server's statistics, reconnecting if the last connection broke.
    pub fn fetch(&mut self) -> anyhow::Result<ServerStats> {
        if self.conn.is_none() {
            let conn = BlockingConn::connect_admin(&self.url, Duration::from_secs(3))
                .with_context(|| format!("no Maru server at {}", self.url))?;
            self.conn = Some(conn);
        }
        let Some(conn) = self.conn.as_mut() else {
            bail!("not connected")
        };
        let reply = match conn.call(&Request::Stats) {
            Ok(r) => r,
            Err(e) => {
                self.conn = None;
                return Err(e).context("stats request failed");
            }
        };
        match reply {
            Response::Stats(json) => {
                serde_json::from_str(&json).context("server sent malformed stats")
            }
            other => bail!("unexpected reply to stats: {other:?}"),
        }
    }
}

pub fn run(args: StatsArgs) -> anyhow::Result<()> {
    let stats = StatsSource::new(&args.server)?.fetch()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        print!("{}", render_text(&stats));
    }
    Ok(())
}

/// The human-readable report.
pub fn render_text(s: &ServerStats) -> String {
    let mut out = String::new();
    let connected = s.clients.iter().filter(|c| c.connected).count();
    let _ = writeln!(
        out,
        "maru server {} · up {} · {} clients connected",
        s.version,
        duration_s(s.uptime_s),
        connected
    );
    let _ = writeln!(
        out,
        "keys {} (pinned {}) · {} referenced · {} regions ({})",
        s.keys,
        s.pinned_keys,
        bytes(s.bytes),
        s.regions,
        bytes(s.region_bytes)
    );
    let _ = writeln!(out);
    if let Some(err) = &s.rm_error {
        let _ = writeln!(out, "pools: unavailable ({err})");
    } else {
        let _ = writeln!(
            out,
            "{:<44} {:<8} {:>10} {:>10} {:>8}",
            "POOL", "KIND", "TOTAL", "FREE", "REGIONS"
        );
        for p in &s.pools {
            let _ = writeln!(
                out,
                "{:<44} {:<8} {:>10} {:>10} {:>8}",
                p.path,
                p.kind,
                bytes(p.total_bytes),
                bytes(p.free_bytes),
                p.regions
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<38} {:>8} {:>10} {:>10}",
        "CLIENT", "REGIONS", "BYTES", "CONNECTED"
    );
    for c in &s.clients {
        let _ = writeln!(
            out,
            "{:<38} {:>8} {:>10} {:>10}",
            c.instance_id,
            c.regions,
            bytes(c.bytes),
            if c.connected { "yes" } else { "no" }
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<18} {:>12} {:>8} {:>10} {:>10}",
        "OP", "COUNT", "ERRORS", "P50 µs", "P99 µs"
    );
    for (name, op) in &s.ops {
        let _ = writeln!(
            out,
            "{:<18} {:>12} {:>8} {:>10.1} {:>10.1}",
            name, op.count, op.errors, op.p50_us, op.p99_us
        );
    }
    out
}
