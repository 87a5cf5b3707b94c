//! Go-style durations (`250ms`, `1m30s`, `30d`), parsed once and serialized back unchanged.

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// The pattern the CRD schema uses, so the API server rejects what [`Duration::from_str`] would.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$";

/// A non-negative duration written the way Go's `time.ParseDuration` writes them, plus `d` for
/// days (24h). Units: `ms`, `s`, `m`, `h`, `d`; components may repeat in any order (`1h30m`)
/// and carry a fraction (`1.5s`). Precision is one millisecond.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Duration {
    text: String,
    millis: u64,
}

/// Why a duration string was refused; the message is shown to users as is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration: {1} (write it like 250ms, 1m30s, 2h or 30d)")]
pub struct DurationError(pub String, pub &'static str);

impl Duration {
    pub fn from_millis(millis: u64) -> Self {
        Self { text: format_millis(millis), millis }
    }

    pub fn as_millis(&self) -> u64 {
        self.millis
    }

    pub fn as_std(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.millis)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// The shortest text that parses back to `millis`, used for durations we make ourselves.
fn format_millis(millis: u64) -> String {
    const UNITS: [(u64, &str); 5] =
        [(86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1_000, "s"), (1, "ms")];
    if millis == 0 {
        return "0s".to_owned();
    }
    let mut rest = millis;
    let mut out = String::new();
    for (size, unit) in UNITS {
        if rest >= size {
            out.push_str(&(rest / size).to_string());
            out.push_str(unit);
            rest %= size;
        }
    }
    out
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |why| DurationError(text.to_owned(), why);
        if text.is_empty() {
            return Err(err("it is empty"));
        }
        let bytes = text.as_bytes();
        let mut i = 0;
        // Micro-milliseconds keep fractions like 1.5ms exact until the final rounding check.
        let mut total_micro: u128 = 0;
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if i == start {
                return Err(err(if bytes[i] == b'-' {
                    "it is negative"
                } else {
                    "each part must start with a number"
                }));
            }
            let whole: u128 = text[start..i].parse().map_err(|_| err("a number is too large"))?;
            let mut frac_num: u128 = 0;
            let mut frac_den: u128 = 1;
            if i < bytes.len() && bytes[i] == b'.' {
                i += 1;
                let fstart = i;
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    if frac_den < 1_000_000_000 {
                        frac_num = frac_num * 10 + u128::from(bytes[i] - b'0');
                        frac_den *= 10;
                    }
                    i += 1;
                }
                if i == fstart {
                    return Err(err("a decimal point must be followed by digits"));
                }
            }
            let ustart = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            let unit_ms: u128 = match &text[ustart..i] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                "" if bytes.get(i) == Some(&b' ') => {
                    return Err(err("write the unit right after the number, without a space (5m, 10s)"));
                }
                "" => return Err(err("a number has no unit: add one of ms, s, m, h and d (10s, 5m)")),
                "ns" | "us" | "µs" => return Err(err("the smallest unit is ms")),
                _ => return Err(err("units are ms, s, m, h and d")),
            };
            let part = whole
                .checked_mul(unit_ms * 1000)
                .and_then(|w| w.checked_add(frac_num * unit_ms * 1000 / frac_den))
                .ok_or_else(|| err("it is too large"))?;
            total_micro = total_micro.checked_add(part).ok_or_else(|| err("it is too large"))?;
        }
        if !total_micro.is_multiple_of(1000) {
            return Err(err("the precision is one millisecond"));
        }
        let millis = u64::try_from(total_micro / 1000).map_err(|_| err("it is too large"))?;
        Ok(Self { text: text.to_owned(), millis })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Cow::<str>::deserialize(d)?;
        text.parse().map_err(de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_durations() {
        for (text, ms) in [
            ("250ms", 250),
            ("1s", 1_000),
            ("1m30s", 90_000),
            ("1.5s", 1_500),
            ("2h", 7_200_000),
            ("30d", 2_592_000_000),
            ("1h0m0.5s", 3_600_500),
            ("0s", 0),
        ] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.as_millis(), ms, "{text}");
            assert_eq!(d.to_string(), text, "serializes back unchanged");
        }
    }

    #[test]
    fn refuses_what_go_would_not_write() {
        for (text, why) in [
            ("", "it is empty"),
            ("10", "a number has no unit: add one of ms, s, m, h and d (10s, 5m)"),
            ("-5s", "it is negative"),
            ("5 s", "write the unit right after the number, without a space (5m, 10s)"),
            ("5 minutes", "write the unit right after the number, without a space (5m, 10s)"),
            ("5minutes", "units are ms, s, m, h and d"),
            ("1w", "units are ms, s, m, h and d"),
            ("100us", "the smallest unit is ms"),
            ("1.5ms", "the precision is one millisecond"),
            ("1.s", "a decimal point must be followed by digits"),
            ("s", "each part must start with a number"),
            ("99999999999999999999999d", "it is too large"),
        ] {
            let err = text.parse::<Duration>().unwrap_err();
            assert_eq!(err.1, why, "{text}");
        }
    }

    #[test]
    fn pattern_agrees_with_parser() {
        let re = regex::Regex::new(DURATION_PATTERN).unwrap();
        for text in ["250ms", "1m30s", "30d", "1.5s"] {
            assert!(re.is_match(text) && text.parse::<Duration>().is_ok(), "{text}");
        }
        for text in ["", "10", "-5s", "1w", "5 s"] {
            assert!(!re.is_match(text) && text.parse::<Duration>().is_err(), "{text}");
        }
    }

    #[test]
    fn formats_millis_compactly() {
        assert_eq!(Duration::from_millis(90_000).as_str(), "1m30s");
        assert_eq!(Duration::from_millis(86_400_250).as_str(), "1d250ms");
        assert_eq!(Duration::from_millis(0).as_str(), "0s");
    }
}
