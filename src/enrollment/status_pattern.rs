//! Status patterns: one HTTP status code, an inclusive range or a class, as enrollments
//! write them in `retry_on`, `reject_on` and `drop_on`.

use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One status code (`404`) or an inclusive range (`"500-599"`, or `"5xx"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusPattern {
    pub low: u16,
    pub high: u16,
}

impl StatusPattern {
    pub const fn code(code: u16) -> Self {
        Self {
            low: code,
            high: code,
        }
    }
    pub const fn range(low: u16, high: u16) -> Self {
        Self { low, high }
    }
    pub fn matches(&self, code: u16) -> bool {
        (self.low..=self.high).contains(&code)
    }
}

impl FromStr for StatusPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let valid = |c: u16| (100..=599).contains(&c);
        let bad =
            || format!("`{s}` is not a status code, a range like 500-599, or a class like 5xx");
        if let Some(class) = s.strip_suffix("xx").or_else(|| s.strip_suffix("XX")) {
            let digit: u16 = class.parse().map_err(|_| bad())?;
            if !(1..=5).contains(&digit) {
                return Err(bad());
            }
            return Ok(Self::range(digit * 100, digit * 100 + 99));
        }
        if let Some((a, b)) = s.split_once('-') {
            let low: u16 = a.trim().parse().map_err(|_| bad())?;
            let high: u16 = b.trim().parse().map_err(|_| bad())?;
            if !valid(low) || !valid(high) || low > high {
                return Err(bad());
            }
            return Ok(Self::range(low, high));
        }
        let code: u16 = s.parse().map_err(|_| bad())?;
        if !valid(code) {
            return Err(bad());
        }
        Ok(Self::code(code))
    }
}

impl utoipa::PartialSchema for StatusPattern {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Integer))
            .item(ObjectBuilder::new().schema_type(Type::String))
            .description(Some(
                "An HTTP status code (404 or \"404\"), an inclusive range (\"500-599\") or a class (\"5xx\")",
            ))
            .into()
    }
}

impl utoipa::ToSchema for StatusPattern {}

impl Serialize for StatusPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.low == self.high {
            s.serialize_u16(self.low)
        } else {
            s.serialize_str(&format!("{}-{}", self.low, self.high))
        }
    }
}

impl<'de> Deserialize<'de> for StatusPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Code(u16),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Code(c) if (100..=599).contains(&c) => Ok(Self::code(c)),
            Raw::Code(c) => Err(serde::de::Error::custom(format!(
                "{c} is not an HTTP status code"
            ))),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_patterns_parse() {
        assert_eq!("5xx".parse(), Ok(StatusPattern::range(500, 599)));
        assert_eq!("500-504".parse(), Ok(StatusPattern::range(500, 504)));
        assert_eq!("404".parse(), Ok(StatusPattern::code(404)));
        for bad in ["6xx", "99", "600", "504-500", "abc", ""] {
            assert!(bad.parse::<StatusPattern>().is_err(), "{bad}");
        }
    }
}
