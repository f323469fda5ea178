//! How the server manages capacity: the watermarks, the policy and the per-namespace quotas
//! (`--evict-high`, `--evict-low`, `--evict-policy`, `--quota NAME=SIZE`), checked once at
//! start so a bad value is an error there, never a surprise later.

use std::collections::BTreeMap;

use super::{DEFAULT_POLICY, POLICY_NAMES};

/// Default of [`EvictionConfig::high`].
pub const EVICT_HIGH: f64 = 0.90;
/// Default of [`EvictionConfig::low`].
pub const EVICT_LOW: f64 = 0.80;

#[derive(Debug, Clone, PartialEq)]
pub struct EvictionConfig {
    /// When the bytes held by keys pass this fraction of the pool (or of a namespace's
    /// quota), the evictor starts.
    pub high: f64,
    /// The evictor stops once they are below this fraction.
    pub low: f64,
    /// One of [`POLICY_NAMES`].
    pub policy: String,
    /// Byte quotas by namespace (the empty name is the default namespace).
    pub quotas: BTreeMap<String, u64>,
}

impl Default for EvictionConfig {
    fn default() -> Self {
        EvictionConfig {
            high: EVICT_HIGH,
            low: EVICT_LOW,
            policy: DEFAULT_POLICY.to_owned(),
            quotas: BTreeMap::new(),
        }
    }
}

/// Why a capacity setting is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--evict-high {0} must be a fraction in (0, 1]")]
    High(String),
    #[error("--evict-low {0} must be a fraction in [0, 1)")]
    Low(String),
    #[error("--evict-low {low} must be below --evict-high {high}")]
    Order { low: String, high: String },
    #[error("unknown eviction policy {0:?} (known: {known})", known = POLICY_NAMES.join(", "))]
    Policy(String),
    #[error("--quota {0:?}: expected NAME=SIZE (SIZE like 512M or 8G; NAME may be empty)")]
    QuotaForm(String),
    #[error("--quota {given:?}: {why}")]
    QuotaSize { given: String, why: String },
    #[error("--quota for namespace {0:?} is given twice")]
    QuotaTwice(String),
}

impl EvictionConfig {
    /// Checks the watermarks and the policy name.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.high > 0.0 && self.high <= 1.0) {
            return Err(ConfigError::High(self.high.to_string()));
        }
        if !(self.low >= 0.0 && self.low < 1.0) {
            return Err(ConfigError::Low(self.low.to_string()));
        }
        if self.low >= self.high {
            return Err(ConfigError::Order {
                low: self.low.to_string(),
                high: self.high.to_string(),
            });
        }
        if !POLICY_NAMES.contains(&self.policy.as_str()) {
            return Err(ConfigError::Policy(self.policy.clone()));
        }
        Ok(())
    }

    /// Adds the quotas given as `NAME=SIZE`, refusing a namespace named twice.
    pub fn add_quotas<S: AsRef<str>>(&mut self, specs: &[S]) -> Result<(), ConfigError> {
        for spec in specs {
            let (name, size) = parse_quota(spec.as_ref())?;
            if self.quotas.insert(name.clone(), size).is_some() {
                return Err(ConfigError::QuotaTwice(name));
            }
        }
        Ok(())
    }
}

/// `NAME=SIZE` → (name, bytes). Sizes are integers with an optional K, M, G or T unit
/// (powers of 1024, `B`/`iB` suffixes allowed); a quota of zero is refused (it would evict
/// every key the namespace registers).
pub fn parse_quota(spec: &str) -> Result<(String, u64), ConfigError> {
    let Some((name, size)) = spec.split_once('=') else {
        return Err(ConfigError::QuotaForm(spec.to_owned()));
    };
    let bad = |why: &str| ConfigError::QuotaSize {
        given: spec.to_owned(),
        why: why.to_owned(),
    };
    let t = size.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(bad(
            "the size must start with a whole number of bytes or units",
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| bad("the size does not fit 64 bits"))?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad("unknown unit (use K, M, G or T)")),
    };
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| bad("the size does not fit 64 bits"))?;
    if bytes == 0 {
        return Err(bad("a quota must be larger than zero"));
    }
    Ok((name.trim().to_owned(), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_parse_and_bad_ones_say_why() {
        assert_eq!(parse_quota("a=512M").unwrap(), ("a".into(), 512 << 20));
        assert_eq!(parse_quota("=8GiB").unwrap(), (String::new(), 8 << 30));
        assert_eq!(parse_quota("t1=4096").unwrap(), ("t1".into(), 4096));
        let msg = |s: &str| parse_quota(s).unwrap_err().to_string();
        assert_eq!(
            msg("a"),
            "--quota \"a\": expected NAME=SIZE (SIZE like 512M or 8G; NAME may be empty)"
        );
        assert_eq!(
            msg("a=8X"),
            "--quota \"a=8X\": unknown unit (use K, M, G or T)"
        );
        assert_eq!(
            msg("a=0"),
            "--quota \"a=0\": a quota must be larger than zero"
        );
        assert_eq!(
            msg("a=G"),
            "--quota \"a=G\": the size must start with a whole number of bytes or units"
        );
        assert_eq!(
            msg("a=99999999999T"),
            "--quota \"a=99999999999T\": the size does not fit 64 bits"
        );
        let mut c = EvictionConfig::default();
        c.add_quotas(&["a=1G", "b=2G"]).unwrap();
        assert_eq!(
            c.add_quotas(&["a=3G"]).unwrap_err(),
            ConfigError::QuotaTwice("a".into())
        );
    }

    #[test]
    fn watermarks_and_policy_are_checked() {
        assert_eq!(EvictionConfig::default().validate(), Ok(()));
        let with = |high, low, policy: &str| EvictionConfig {
            high,
            low,
            policy: policy.into(),
            quotas: BTreeMap::new(),
        };
        assert!(matches!(
            with(1.5, 0.8, "sieve").validate(),
            Err(ConfigError::High(_))
        ));
        assert!(matches!(
            with(0.9, -0.1, "sieve").validate(),
            Err(ConfigError::Low(_))
        ));
        assert_eq!(
            with(0.8, 0.9, "sieve").validate().unwrap_err().to_string(),
            "--evict-low 0.9 must be below --evict-high 0.8"
        );
        assert!(matches!(
            with(f64::NAN, 0.8, "sieve").validate(),
            Err(ConfigError::High(_))
        ));
        assert_eq!(
            with(0.9, 0.8, "arc").validate().unwrap_err().to_string(),
            "unknown eviction policy \"arc\" (known: sieve, clock, lru)"
        );
    }
}
