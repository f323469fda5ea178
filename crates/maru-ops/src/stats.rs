//! `maru stats`: one look at a running server.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use maru_proto::stats::ServerStats;
use maru_proto::{Request, Response, ServerUrl};
use maru_transport::BlockingConn;

use crate::format::{bytes, duration_s, table, table_line, Align};

use Align::{Left as L, Right as R};

/// Columns of the tables `render_text` draws: width and alignment.
const POOLS: &[(usize, Align)] = &[(44, L), (8, L), (10, R), (10, R), (8, R)];
const NAMESPACES: &[(usize, Align)] = &[
    (14, L),
    (10, R),
    (8, R),
    (10, R),
    (6, R),
    (10, R),
    (10, R),
    (8, R),
    (10, R),
];
const CLIENTS: &[(usize, Align)] = &[
    (24, L),
    (7, R),
    (10, R),
    (9, R),
    (8, R),
    (10, R),
    (6, R),
    (10, R),
    (8, R),
    (10, R),
];
const OPS: &[(usize, Align)] = &[(18, L), (12, R), (8, R), (10, R), (10, R)];

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

/// The cells a namespace's row and a client's row share: KEYS, HELD, PINS, HITS.
fn key_cells(keys: u64, held: u64, pins: u64, hits: u64) -> [String; 4] {
    [
        keys.to_string(),
        bytes(held),
        pins.to_string(),
        hits.to_string(),
    ]
}

/// The last two cells of a namespace's row and a client's row: EVICTED, EVICTED B.
fn eviction_cells(evictions: u64, evicted_bytes: u64) -> [String; 2] {
    [evictions.to_string(), bytes(evicted_bytes)]
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
    let e = &s.eviction;
    let _ = writeln!(
        out,
        "eviction {} · high {:.2} low {:.2} of {} · keys hold {} · {} evicted ({})",
        e.policy,
        e.high,
        e.low,
        if e.pool_bytes == 0 {
            "the pool (size unknown)".to_owned()
        } else {
            bytes(e.pool_bytes)
        },
        bytes(e.key_bytes),
        e.evictions,
        bytes(e.evicted_bytes)
    );
    let _ = writeln!(out);
    if let Some(err) = &s.rm_error {
        let _ = writeln!(out, "pools: unavailable ({err})");
    } else {
        table_line(
            &mut out,
            POOLS,
            &["POOL", "KIND", "TOTAL", "FREE", "REGIONS"],
        );
        for p in &s.pools {
            let cells = [
                p.path.clone(),
                p.kind.clone(),
                bytes(p.total_bytes),
                bytes(p.free_bytes),
                p.regions.to_string(),
            ];
            table_line(&mut out, POOLS, &cells);
            if !p.uuid.is_empty() {
                let _ = writeln!(
                    out,
                    "  uuid {}, header {} (not in TOTAL)",
                    p.uuid,
                    bytes(p.reserved_bytes)
                );
            }
            if let Some(problem) = &p.problem {
                let _ = writeln!(out, "  UNHEALTHY: {problem}");
            }
        }
    }
    let _ = writeln!(out);
    table(
        &mut out,
        NAMESPACES,
        &[
            "NAMESPACE",
            "QUOTA",
            "KEYS",
            "HELD",
            "PINS",
            "HITS",
            "MISSES",
            "EVICTED",
            "EVICTED B",
        ],
        s.namespaces.iter().map(|n| {
            let name = if n.namespace.is_empty() {
                "(default)"
            } else {
                &n.namespace
            };
            let mut row = vec![
                name.to_owned(),
                n.quota.map_or_else(|| "-".to_owned(), bytes),
            ];
            row.extend(key_cells(n.keys, n.bytes, n.pins, n.hits));
            row.push(n.misses.to_string());
            row.extend(eviction_cells(n.evictions, n.evicted_bytes));
            row
        }),
    );
    out.push('\n');
    table(
        &mut out,
        CLIENTS,
        &[
            "CLIENT",
            "REGIONS",
            "BYTES",
            "CONNECTED",
            "KEYS",
            "HELD",
            "PINS",
            "HITS",
            "EVICTED",
            "EVICTED B",
        ],
        s.clients.iter().map(|c| {
            let mut row = vec![
                c.instance_id.clone(),
                c.regions.to_string(),
                bytes(c.bytes),
                (if c.connected { "yes" } else { "no" }).to_owned(),
            ];
            row.extend(key_cells(c.keys, c.key_bytes, c.pins, c.hits));
            row.extend(eviction_cells(c.evictions, c.evicted_bytes));
            row
        }),
    );
    out.push('\n');
    table(
        &mut out,
        OPS,
        &["OP", "COUNT", "ERRORS", "P50 µs", "P99 µs"],
        s.ops.iter().map(|(name, op)| {
            [
                name.clone(),
                op.count.to_string(),
                op.errors.to_string(),
                format!("{:.1}", op.p50_us),
                format!("{:.1}", op.p99_us),
            ]
        }),
    );
    out
}
