//! The live table a run prints as it goes: a header per section, one line per row, and the
//! compact numbers they use.

use std::io::Write;

use crate::plan::{GIB, KIB, MIB};
use crate::stats::Row;

/// Where the table goes (standard error when the JSON report goes to standard output).
pub type Out = Box<dyn Write>;

/// A section title and the column header under it.
pub fn section(out: &mut Out, title: &str) {
    let _ = writeln!(out, "\n== {title}");
    let _ = writeln!(
        out,
        "{:<20} {:<6} {:<5} {:>6} {:>5} {:>4} {:>10} {:>10} {:>12} {:>7} {:>10} {:>6}  note",
        "op",
        "api",
        "trans",
        "chunk",
        "batch",
        "cli",
        "p50 us",
        "p99 us",
        "ops/s",
        "GB/s",
        "floor us",
        "ratio"
    );
    let _ = out.flush();
}

/// A closing section of its own lines (none when `items` is empty): the title, then
/// `line(item)` for each item.
pub fn listing<T>(out: &mut Out, title: &str, items: &[T], line: impl Fn(&T) -> String) {
    if items.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n== {title}");
    for item in items {
        let _ = writeln!(out, "{}", line(item));
    }
}

pub fn row(out: &mut Out, r: &Row) {
    let who = if r.processes {
        format!("{}p", r.clients)
    } else {
        r.clients.to_string()
    };
    let op = if r.contended {
        format!("{}*", r.op)
    } else {
        r.op.clone()
    };
    let _ = writeln!(
        out,
        "{:<20} {:<6} {:<5} {:>6} {:>5} {:>4} {:>10.2} {:>10.2} {:>12.0} {:>7} {:>10} {:>6}  {}",
        op,
        r.api,
        r.transport,
        size(r.chunk_bytes),
        r.batch,
        who,
        r.p50_us,
        r.p99_us,
        r.ops_per_s,
        opt(r.gbps, 2),
        opt(r.floor_us, 2),
        opt(r.ratio, 2),
        r.note.as_deref().unwrap_or(""),
    );
    let _ = out.flush();
}

/// A byte count as the table shows it: `4K`, `1M`, `1G`, `64B`, `-` for none.
pub fn size(n: u64) -> String {
    match n {
        0 => "-".into(),
        n if n >= GIB && n % GIB == 0 => format!("{}G", n / GIB),
        n if n >= MIB && n % MIB == 0 => format!("{}M", n / MIB),
        n if n >= KIB && n % KIB == 0 => format!("{}K", n / KIB),
        n => format!("{n}B"),
    }
}

/// An optional number with `prec` decimals, `-` for none.
pub fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|v| format!("{v:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_compact() {
        assert_eq!(size(4096), "4K");
        assert_eq!(size(GIB), "1G");
        assert_eq!(size(64), "64B");
        assert_eq!(size(0), "-");
        assert_eq!(opt(None, 2), "-");
        assert_eq!(opt(Some(1.234), 2), "1.23");
    }
}
