//! Byte sizes written as Kubernetes quantities (`64Ki`, `1Mi`, `2G`, `1048576`).

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// The pattern the CRD schema uses for the string form.
pub const QUANTITY_PATTERN: &str = r"^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?$";

/// A size in bytes, written as a whole Kubernetes quantity: a number with an optional binary
/// (`Ki`, `Mi`, `Gi`, `Ti`) or decimal (`k`, `M`, `G`, `T`) suffix, or a plain integer.
/// Serializes back in the form it was written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ByteSize {
    repr: Repr,
    bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Repr {
    Int,
    Text(String),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a size: {1} (write it like 512, 64Ki, 1Mi or 2Gi)")]
pub struct ByteSizeError(pub String, pub &'static str);

impl ByteSize {
    pub fn from_bytes(bytes: u64) -> Self {
        Self { repr: Repr::Int, bytes }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |why| ByteSizeError(text.to_owned(), why);
        let digits = text.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err(if text.starts_with('-') {
                "it is negative"
            } else {
                "it must start with a whole number"
            }));
        }
        let number: u64 = text[..digits].parse().map_err(|_| err("it is too large"))?;
        let multiplier: u64 = match &text[digits..] {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            s if s.starts_with('.') => return Err(err("fractions are not allowed")),
            _ => return Err(err("suffixes are Ki, Mi, Gi, Ti, k, M, G and T")),
        };
        let bytes = number.checked_mul(multiplier).ok_or_else(|| err("it is too large"))?;
        Ok(Self { repr: Repr::Text(text.to_owned()), bytes })
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            Repr::Int => write!(f, "{}", self.bytes),
            Repr::Text(t) => f.write_str(t),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.repr {
            Repr::Int => s.serialize_u64(self.bytes),
            Repr::Text(t) => s.serialize_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 1048576, 64Ki or 1Mi")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize::from_bytes(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize::from_bytes)
                    .map_err(|_| E::custom(format!("{v} is not a size: it is negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // Integer or string, as Kubernetes' own resource.Quantity.
        json_schema!({
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quantities() {
        for (text, bytes) in [
            ("512", 512),
            ("1Ki", 1024),
            ("64Ki", 65_536),
            ("1Mi", 1_048_576),
            ("2Gi", 2_147_483_648),
            ("1k", 1_000),
            ("5M", 5_000_000),
        ] {
            let q: ByteSize = text.parse().unwrap();
            assert_eq!(q.bytes(), bytes, "{text}");
            assert_eq!(q.to_string(), text);
        }
    }

    #[test]
    fn refuses_bad_quantities() {
        for (text, why) in [
            ("", "it must start with a whole number"),
            ("-1Ki", "it is negative"),
            ("1.5Mi", "fractions are not allowed"),
            ("1MB", "suffixes are Ki, Mi, Gi, Ti, k, M, G and T"),
            ("99999999999Ti", "it is too large"),
        ] {
            assert_eq!(text.parse::<ByteSize>().unwrap_err().1, why, "{text}");
        }
    }

    #[test]
    fn keeps_the_written_form() {
        let from_int: ByteSize = serde_json::from_str("2048").unwrap();
        assert_eq!(serde_json::to_string(&from_int).unwrap(), "2048");
        let from_str: ByteSize = serde_json::from_str("\"2Ki\"").unwrap();
        assert_eq!(serde_json::to_string(&from_str).unwrap(), "\"2Ki\"");
        assert_eq!(from_int.bytes(), from_str.bytes());
    }
}
