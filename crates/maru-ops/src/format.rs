//! Human-readable numbers for tables and start-up output.

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn duration_s(s: f64) -> String {
    let s = s as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Where a cell sits in its column: text to the left, numbers to the right.
#[derive(Debug, Clone, Copy)]
pub enum Align {
    Left,
    Right,
}

/// Writes one line of a text table: every cell padded to its column's `(width, align)`,
/// one space between columns.
pub fn table_line<S: AsRef<str>>(out: &mut String, columns: &[(usize, Align)], cells: &[S]) {
    for (i, ((width, align), cell)) in columns.iter().zip(cells).enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let cell = cell.as_ref();
        match align {
            Align::Left => out.push_str(&format!("{cell:<width$}")),
            Align::Right => out.push_str(&format!("{cell:>width$}")),
        }
    }
    out.push('\n');
}

/// A text table: the line of column names, then one line per row.
pub fn table<R: AsRef<[String]>>(
    out: &mut String,
    columns: &[(usize, Align)],
    names: &[&str],
    rows: impl IntoIterator<Item = R>,
) {
    table_line(out, columns, names);
    for row in rows {
        table_line(out, columns, row.as_ref());
    }
}

/// Parses sizes like `512M`, `8G`, `1.5GiB`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: u64 = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("invalid size unit in {s:?} (use K, M, G or T)")),
    };
    Ok((v * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert!(parse_size("8X").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(bytes(12), "12 B");
        assert_eq!(duration_s(3725.0), "1h02m");
    }
}
