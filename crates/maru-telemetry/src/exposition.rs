//! The Prometheus text exposition (format 0.0.4) of a daemon's state, encoded by
//! `prometheus-client`.
//!
//! A daemon already keeps what it exports (its tables, op counters and [`Histogram`]s), so
//! nothing is registered ahead of time: each scrape describes the current values to a
//! [`PromWriter`], which hands them to `prometheus-client` as one [`Collector`] and lets it
//! write names, labels, escaping, bucket bounds and number formats.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::{Histogram, OpTable};

/// Upper bounds (seconds) of the latency histogram buckets exported to Prometheus.
pub const LATENCY_BOUNDS_S: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025, 0.1,
    1.0,
];

/// The `Content-Type` of what [`PromWriter::finish`] returns.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// A metric family drawn from one row type: name, kind, help and the row's value.
pub type RowFamily<T> = (&'static str, &'static str, &'static str, fn(&T) -> f64);

/// A gauge [`RowFamily`]: name, help and the row's value.
pub const fn gauge<T>(
    name: &'static str,
    help: &'static str,
    value: fn(&T) -> f64,
) -> RowFamily<T> {
    (name, "gauge", help, value)
}

/// Collects metric families for one scrape, then encodes them.
///
/// Names are the exported ones: a counter is named with its `_total` suffix, as it appears
/// in the text (`prometheus-client` adds the suffix itself, so it is taken off here).
#[derive(Default)]
pub struct PromWriter {
    families: Vec<Family>,
}

#[derive(Debug)]
struct Family {
    /// Name without the suffix the encoder adds (`_total` for counters).
    name: String,
    kind: MetricType,
    help: String,
    samples: Vec<Sample>,
}

#[derive(Debug)]
struct Sample {
    labels: Vec<(String, String)>,
    value: Value,
}

#[derive(Debug)]
enum Value {
    Number(f64),
    Histogram {
        sum: f64,
        count: u64,
        /// (upper bound, observations in this bucket alone); the last bound is +Inf.
        buckets: Vec<(f64, u64)>,
    },
}

fn kind_of(kind: &str) -> MetricType {
    match kind {
        "counter" => MetricType::Counter,
        "gauge" => MetricType::Gauge,
        "histogram" => MetricType::Histogram,
        _ => MetricType::Unknown,
    }
}

fn base_name(name: &str, kind: MetricType) -> &str {
    match kind {
        MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    }
}

fn owned_labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

impl PromWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a metric family (`kind`: `counter`, `gauge` or `histogram`; anything else is
    /// exported as untyped). Call once per family, before its samples.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let kind = kind_of(kind);
        self.families.push(Family {
            name: base_name(name, kind).to_owned(),
            kind,
            help: help.to_owned(),
            samples: Vec::new(),
        });
        self
    }

    /// A family of one sample without labels: a value of the whole process.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// Families of one sample each without labels, from `(name, kind, help, value)` rows.
    pub fn singles(&mut self, rows: &[(&str, &str, &str, f64)]) -> &mut Self {
        for (name, kind, help, value) in rows {
            self.single(name, kind, help, *value);
        }
        self
    }

    /// The two families of a daemon's request table, labelled `op`: the counter `total`
    /// (every operation of `names`, zero when unseen) and the latency histogram `seconds`
    /// (operations seen at least once). Each is a `(name, help)` pair.
    pub fn ops<'n>(
        &mut self,
        table: &OpTable,
        names: impl IntoIterator<Item = &'n str>,
        total: (&str, &str),
        seconds: (&str, &str),
    ) -> &mut Self {
        let names: Vec<&str> = names.into_iter().collect();
        self.family(total.0, "counter", total.1);
        for &op in &names {
            let count = table.get(op).map_or(0, |h| h.count());
            self.sample(total.0, &[("op", op)], count as f64);
        }
        self.family(seconds.0, "histogram", seconds.1);
        for op in names {
            if let Some(h) = table.get(op).filter(|h| h.count() > 0) {
                self.histogram(seconds.0, &[("op", op)], h);
            }
        }
        self
    }

    /// A family with one sample per row of `rows` (a pool, a namespace, an instance),
    /// labelled by `labels(row)` and valued by `value(row)`.
    pub fn per_row<T, const N: usize>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        rows: &[T],
        labels: fn(&T) -> [(&'static str, &str); N],
        value: impl Fn(&T) -> f64,
    ) -> &mut Self {
        self.family(name, kind, help);
        for row in rows {
            self.sample(name, &labels(row), value(row));
        }
        self
    }

    /// One [`per_row`](Self::per_row) family for each `(name, kind, help, value)` of
    /// `families`, all over the same rows and labels.
    pub fn per_rows<T, const N: usize>(
        &mut self,
        rows: &[T],
        labels: fn(&T) -> [(&'static str, &str); N],
        families: &[RowFamily<T>],
    ) -> &mut Self {
        for (name, kind, help, value) in families {
            self.per_row(name, kind, help, rows, labels, value);
        }
        self
    }

    /// The family a sample named `name` belongs to; an untyped one if none was started.
    fn family_for(&mut self, name: &str) -> &mut Family {
        let found = self
            .families
            .iter()
            .rposition(|f| base_name(name, f.kind) == f.name);
        let i = match found {
            Some(i) => i,
            None => {
                self.families.push(Family {
                    name: name.to_owned(),
                    kind: MetricType::Unknown,
                    help: String::new(),
                    samples: Vec::new(),
                });
                self.families.len() - 1
            }
        };
        &mut self.families[i]
    }

    /// One sample of a counter, gauge or untyped family.
    pub fn sample(&mut self, name: &str, label_pairs: &[(&str, &str)], value: f64) -> &mut Self {
        self.family_for(name).samples.push(Sample {
            labels: owned_labels(label_pairs),
            value: Value::Number(value),
        });
        self
    }

    /// One sample of a histogram family (`_bucket`, `_sum`, `_count`) from a [`Histogram`],
    /// bucketed at [`LATENCY_BOUNDS_S`].
    pub fn histogram(
        &mut self,
        name: &str,
        label_pairs: &[(&str, &str)],
        h: &Histogram,
    ) -> &mut Self {
        // Recording goes on while this reads, so the total may trail the buckets by a few
        // observations; the +Inf bucket takes whichever is larger, keeping counts monotonic.
        let cumulative = h.cumulative_at(LATENCY_BOUNDS_S);
        let below_last = cumulative.last().copied().unwrap_or(0);
        let count = h.count().max(below_last);
        let mut buckets = Vec::with_capacity(LATENCY_BOUNDS_S.len() + 1);
        let mut previous = 0;
        for (bound, c) in LATENCY_BOUNDS_S.iter().zip(cumulative) {
            buckets.push((*bound, c.saturating_sub(previous)));
            previous = previous.max(c);
        }
        buckets.push((f64::INFINITY, count - previous));
        self.family_for(name).samples.push(Sample {
            labels: owned_labels(label_pairs),
            value: Value::Histogram {
                sum: h.sum().as_secs_f64(),
                count,
                buckets,
            },
        });
        self
    }

    /// The exposition text of every family, in the order they were started.
    pub fn finish(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Snapshot(self.families)));
        let mut out = String::new();
        if let Err(e) = prometheus_text::encode(&mut out, &registry) {
            // Writing into a String does not fail; an encoder error would be a bug, and a
            // partial scrape is more useful to an operator than none.
            tracing::warn!("metrics exposition incomplete: {e}");
        }
        out
    }
}

/// The families of one scrape, handed to `prometheus-client` as a collector.
#[derive(Debug)]
struct Snapshot(Vec<Family>);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let mut metric = encoder.encode_descriptor(&f.name, &f.help, None, f.kind)?;
            for s in &f.samples {
                if s.labels.is_empty() {
                    encode_value(&mut metric, f.kind, &s.value)?;
                } else {
                    encode_value(&mut metric.encode_family(&s.labels)?, f.kind, &s.value)?;
                }
            }
        }
        Ok(())
    }
}

/// A whole number that an integer type holds exactly, so it is written without a fraction
/// (`3`, not `3.0`), as every exporter writes counts.
fn as_integer(v: f64) -> Option<i64> {
    const EXACT: f64 = (1u64 << 53) as f64;
    (v.fract() == 0.0 && v.abs() < EXACT).then_some(v as i64)
}

fn encode_value(m: &mut MetricEncoder, kind: MetricType, v: &Value) -> Result<(), std::fmt::Error> {
    match (kind, v) {
        (
            _,
            Value::Histogram {
                sum,
                count,
                buckets,
            },
        ) => m.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None),
        (MetricType::Counter, Value::Number(v)) => match as_integer(*v) {
            Some(n) if n >= 0 => m.encode_counter::<NoLabelSet, u64, u64>(&(n as u64), None),
            _ => m.encode_counter::<NoLabelSet, f64, u64>(v, None),
        },
        (_, Value::Number(v)) => match as_integer(*v) {
            Some(n) => m.encode_gauge(&n),
            None => m.encode_gauge(v),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn families_samples_and_histograms_are_encoded() {
        let h = Histogram::new();
        h.record(Duration::from_micros(20));
        h.record(Duration::from_millis(3));
        let mut w = PromWriter::new();
        w.family("maru_keys", "gauge", "Registered keys")
            .sample("maru_keys", &[], 3.0);
        w.family("maru_ratio", "gauge", "A fraction")
            .sample("maru_ratio", &[], 0.5);
        w.family("maru_ops_total", "counter", "Requests answered")
            .sample("maru_ops_total", &[("op", "exists")], 7.0);
        w.family("maru_op_seconds", "histogram", "Latency")
            .histogram("maru_op_seconds", &[("op", "exists")], &h);
        let text = w.finish();
        for line in [
            "# HELP maru_keys Registered keys\n",
            "# TYPE maru_keys gauge\nmaru_keys 3\n",
            "maru_ratio 0.5\n",
            "# TYPE maru_ops_total counter\n",
            "maru_ops_total{op=\"exists\"} 7\n",
            "# TYPE maru_op_seconds histogram\n",
            "maru_op_seconds_bucket{op=\"exists\",le=\"1e-05\"} 0\n",
            "maru_op_seconds_bucket{op=\"exists\",le=\"2.5e-05\"} 1\n",
            "maru_op_seconds_bucket{op=\"exists\",le=\"0.001\"} 1\n",
            "maru_op_seconds_bucket{op=\"exists\",le=\"0.005\"} 2\n",
            "maru_op_seconds_bucket{op=\"exists\",le=\"+Inf\"} 2\n",
            "maru_op_seconds_count{op=\"exists\"} 2\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(!text.contains("_total_total"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut w = PromWriter::new();
        w.family("maru_pool_regions", "gauge", "Regions").sample(
            "maru_pool_regions",
            &[("pool", "a\"b\\c\nd")],
            1.0,
        );
        let text = w.finish();
        assert!(
            text.contains("maru_pool_regions{pool=\"a\\\"b\\\\c\\nd\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn a_sample_without_a_family_is_untyped() {
        let mut w = PromWriter::new();
        w.sample("maru_loose", &[], 2.0);
        let text = w.finish();
        assert!(text.contains("# TYPE maru_loose untyped\n"), "{text}");
        assert!(text.contains("\nmaru_loose 2\n"), "{text}");
    }
}
