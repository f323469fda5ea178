//! `maru top`: a live monitor. Rendering is a pure function of [`TopState`], so tests draw
//! frames on ratatui's test backend with known numbers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Args;
use maru_proto::stats::ServerStats;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, LineGauge, Paragraph, Row, Table};
use ratatui::Frame;

use crate::format::{bytes, duration_s};
use crate::stats::{StatsSource, DEFAULT_SERVER};

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Server to watch (tcp://host:port or unix:///path).
    #[arg(long, env = "MARU_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
}

/// What the monitor shows: the latest statistics and the operation rates derived from the
/// previous sample.
#[derive(Default)]
pub struct TopState {
    pub server: String,
    pub stats: Option<ServerStats>,
    pub error: Option<String>,
    /// Operations per second over the last refresh interval, by operation name.
    pub rates: BTreeMap<String, f64>,
    last: Option<(Instant, BTreeMap<String, u64>)>,
}

impl TopState {
    pub fn new(server: &str) -> Self {
        TopState {
            server: server.to_owned(),
            ..Default::default()
        }
    }

    /// Takes a new sample taken at `now`.
    pub fn update(&mut self, stats: ServerStats, now: Instant) {
        let counts: BTreeMap<String, u64> = stats
            .ops
            .iter()
            .map(|(k, v)| (k.clone(), v.count))
            .collect();
        if let Some((then, prev)) = &self.last {
            let dt = now.duration_since(*then).as_secs_f64().max(1e-3);
            self.rates = counts
                .iter()
                .map(|(k, c)| {
                    (
                        k.clone(),
                        c.saturating_sub(*prev.get(k).unwrap_or(&0)) as f64 / dt,
                    )
                })
                .collect();
        }
        self.last = Some((now, counts));
        self.stats = Some(stats);
        self.error = None;
    }

    pub fn fail(&mut self, error: String) {
        self.error = Some(error);
    }
}

/// Draws one frame. Fits an 80×24 terminal; larger ones get more rows.
pub fn render(f: &mut Frame, st: &TopState) {
    let area = f.area();
    let pools = st.stats.as_ref().map_or(1, |s| s.pools.len().max(1)) as u16;
    let [head, pool_area, body, foot] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(pools.min(4) + 2),
        Constraint::Min(6),
        Constraint::Length(1),
    ])
    .areas(area);

    let title = format!(" maru top · {} ", st.server);
    let head_text: Vec<Line> = match (&st.stats, &st.error) {
        (_, Some(err)) => vec![Line::styled(
            format!("server unreachable: {err}"),
            Style::new().fg(Color::Red),
        )],
        (Some(s), None) => vec![
            Line::from(format!(
                "up {} · keys {} · pinned {} · {} referenced · {} regions ({}) · {} clients",
                duration_s(s.uptime_s),
                s.keys,
                s.pinned_keys,
                bytes(s.bytes),
                s.regions,
                bytes(s.region_bytes),
                s.clients.iter().filter(|c| c.connected).count(),
            )),
            Line::from(format!(
                "{} {}/{} · hits {} · misses {} · evicted {} ({})",
                s.eviction.policy,
                s.eviction.high,
                s.eviction.low,
                s.namespaces.iter().map(|n| n.hits).sum::<u64>(),
                s.namespaces.iter().map(|n| n.misses).sum::<u64>(),
                s.eviction.evictions,
                bytes(s.eviction.evicted_bytes),
            )),
        ],
        (None, None) => vec![Line::from("connecting…")],
    };
    f.render_widget(
        Paragraph::new(head_text).block(Block::default().borders(Borders::ALL).title(title)),
        head,
    );

    let pool_block = Block::default().borders(Borders::ALL).title(" pools ");
    let inner = pool_block.inner(pool_area);
    f.render_widget(pool_block, pool_area);
    if let Some(s) = &st.stats {
        if let Some(err) = &s.rm_error {
            f.render_widget(Paragraph::new(format!("resource manager: {err}")), inner);
        }
        let rows = Layout::vertical(vec![Constraint::Length(1); s.pools.len().min(4)]).split(inner);
        for (p, r) in s.pools.iter().zip(rows.iter()) {
            let used = p.total_bytes.saturating_sub(p.free_bytes);
            let ratio = if p.total_bytes == 0 {
                0.0
            } else {
                used as f64 / p.total_bytes as f64
            };
            let name = p.path.rsplit('/').next().unwrap_or(&p.path);
            let label = format!(
                "{name} {}/{} {} regions",
                bytes(used),
                bytes(p.total_bytes),
                p.regions
            );
            f.render_widget(
                LineGauge::default()
                    .ratio(ratio.clamp(0.0, 1.0))
                    .label(label)
                    .filled_style(Style::new().fg(Color::Cyan)),
                *r,
            );
        }
    }

    let [clients_area, ops_area] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(body);
    render_clients(f, clients_area, st);
    render_ops(f, ops_area, st);

    f.render_widget(
        Paragraph::new("q quit · refresh 1 s").style(Style::new().add_modifier(Modifier::DIM)),
        foot,
    );
}

fn render_clients(f: &mut Frame, area: Rect, st: &TopState) {
    let rows = st.stats.iter().flat_map(|s| s.clients.iter()).map(|c| {
        let id: String = c.instance_id.chars().take(14).collect();
        let mark = if c.connected { "" } else { " (gone)" };
        vec![
            format!("{id}{mark}"),
            bytes(c.bytes),
            c.keys.to_string(),
            c.hits.to_string(),
            c.evictions.to_string(),
        ]
    });
    let columns = [
        ("client", Constraint::Min(10)),
        ("bytes", Constraint::Length(9)),
        ("keys", Constraint::Length(5)),
        ("hits", Constraint::Length(5)),
        ("evict", Constraint::Length(5)),
    ];
    boxed_table(f, area, " clients ", &columns, rows);
}

fn render_ops(f: &mut Frame, area: Rect, st: &TopState) {
    let rows = st
        .stats
        .iter()
        .flat_map(|s| s.ops.iter())
        .map(|(name, op)| {
            let rate = st.rates.get(name).copied().unwrap_or(0.0);
            vec![
                name.clone(),
                format!("{rate:.0}"),
                format!("{:.1}", op.p50_us),
                format!("{:.1}", op.p99_us),
            ]
        });
    let columns = [
        ("op", Constraint::Min(12)),
        ("ops/s", Constraint::Length(8)),
        ("p50µs", Constraint::Length(7)),
        ("p99µs", Constraint::Length(7)),
    ];
    boxed_table(f, area, " operations ", &columns, rows);
}

/// A bordered table with a bold header: each column's name and width.
fn boxed_table(
    f: &mut Frame,
    area: Rect,
    title: &str,
    columns: &[(&str, Constraint)],
    rows: impl Iterator<Item = Vec<String>>,
) {
    let header = Row::new(columns.iter().map(|&(name, _)| name))
        .style(Style::new().add_modifier(Modifier::BOLD));
    let table = Table::new(rows.map(Row::new), columns.iter().map(|&(_, w)| w))
        .header(header)
        .block(Block::default().borders(Borders::ALL).title(title));
    f.render_widget(table, area);
}

pub fn run(args: TopArgs) -> anyhow::Result<()> {
    let mut source = StatsSource::new(&args.server)?;
    let mut state = TopState::new(&source.url().to_string());
    let interval = Duration::from_millis(args.interval_ms.max(100));
    let mut terminal = ratatui::init();
    let result = (|| -> anyhow::Result<()> {
        loop {
            match source.fetch() {
                Ok(s) => state.update(s, Instant::now()),
                Err(e) => state.fail(format!("{e:#}")),
            }
            terminal.draw(|f| render(f, &state))?;
            let deadline = Instant::now() + interval;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if !event::poll(left)? {
                    break;
                }
                if let Event::Key(k) = event::read()? {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if k.kind == KeyEventKind::Press
                        && (k.code == KeyCode::Char('q') || k.code == KeyCode::Esc || ctrl_c)
                    {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use maru_proto::stats::{ClientStats, EvictionStats, NamespaceStats, OpStats, PoolStats};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn sample(exists_count: u64) -> ServerStats {
        ServerStats {
            version: "0.1.0".into(),
            uptime_s: 65.0,
            keys: 1234,
            bytes: 5 << 20,
            pinned_keys: 7,
            pins_expired: 0,
            pages_parked: 0,
            pages_lane_kept: 0,
            regions: 2,
            region_bytes: 64 << 20,
            clients: vec![ClientStats {
                instance_id: "producer-a".into(),
                connected: true,
                connections: 1,
                regions: 2,
                bytes: 64 << 20,
                keys: 1234,
                hits: 4321,
                evictions: 17,
                ..ClientStats::default()
            }],
            pools: vec![PoolStats {
                path: "/dev/shm/maru/maru-5555.pool".into(),
                kind: "shm".into(),
                total_bytes: 256 << 20,
                free_bytes: 192 << 20,
                align: 2 << 20,
                page_size: 4096,
                regions: 2,
                largest_free_extent: 192 << 20,
                problem: None,
                ..PoolStats::default()
            }],
            rm_error: None,
            ops: [(
                "exists".to_string(),
                OpStats {
                    count: exists_count,
                    errors: 0,
                    p50_us: 12.5,
                    p99_us: 40.0,
                },
            )]
            .into_iter()
            .collect(),
            eviction: EvictionStats {
                policy: "sieve".into(),
                high: 0.9,
                low: 0.8,
                evictions: 17,
                evicted_bytes: 17 << 20,
                ..EvictionStats::default()
            },
            namespaces: vec![NamespaceStats {
                hits: 4321,
                misses: 99,
                ..NamespaceStats::default()
            }],
        }
    }

    fn draw(st: &TopState) -> String {
        let mut term = Terminal::new(TestBackend::new(80, 24)).unwrap();
        term.draw(|f| render(f, st)).unwrap();
        let buf = term.backend().buffer().clone();
        let mut text = String::new();
        for y in 0..buf.area.height {
            for x in 0..buf.area.width {
                text.push_str(buf[(x, y)].symbol());
            }
            text.push('\n');
        }
        text
    }

    #[test]
    fn frame_shows_known_numbers_in_80x24() {
        let mut st = TopState::new("tcp://127.0.0.1:5555");
        let t0 = Instant::now();
        st.update(sample(1000), t0);
        st.update(sample(3000), t0 + Duration::from_secs(2));
        assert_eq!(st.rates["exists"], 1000.0);
        let text = draw(&st);
        for needle in [
            "maru top",
            "keys 1234",
            "pinned 7",
            "maru-5555.pool",
            "64.0 MiB/256.0 MiB",
            "producer-a",
            "sieve 0.9/0.8",
            "hits 4321",
            "misses 99",
            "evicted 17 (17.0 MiB)",
            "exists",
            "1000",
            "12.5",
            "40.0",
            "q quit",
        ] {
            assert!(
                text.contains(needle),
                "{needle:?} missing from frame:\n{text}"
            );
        }
    }

    #[test]
    fn unreachable_server_is_shown_not_fatal() {
        let mut st = TopState::new("tcp://127.0.0.1:1");
        st.fail("connection refused".into());
        let text = draw(&st);
        assert!(
            text.contains("server unreachable: connection refused"),
            "{text}"
        );
    }
}
