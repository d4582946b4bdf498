//! Validated identifiers: [`TenantId`] and [`AgentId`].
//!
//! Both are lowercase slugs (`^[a-z0-9]+(?:-[a-z0-9]+)*$`, 1 to 63 bytes). The rule
//! keeps every character that NATS, key-value keys, file names and JWT names treat
//! specially (`.`, `*`, `>`, `:`, whitespace, Unicode look-alikes) out of ids, so an
//! id can never collide with or escape into another tenant's subjects or keys.
//! Construction through [`TenantId::new`] / [`AgentId::new`] (or `FromStr` / serde)
//! is the only way to get one.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::Error;

/// The longest id, in bytes (a DNS label's limit).
pub const MAX_ID_LEN: usize = 63;

/// Which rule an id broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IdErrorKind {
    /// The id is empty.
    Empty,
    /// The id is longer than [`MAX_ID_LEN`] bytes.
    TooLong,
    /// The id holds a character outside `a-z`, `0-9` and `-`.
    InvalidChar,
    /// The id starts with `-`.
    LeadingHyphen,
    /// The id ends with `-`.
    TrailingHyphen,
    /// The id holds `--`.
    DoubleHyphen,
}

crate::kind_display!(IdErrorKind {
    Empty => "id is empty",
    TooLong => "id is longer than 63 bytes",
    InvalidChar => "id may hold only lowercase a-z, 0-9 and '-'",
    LeadingHyphen => "id must not start with '-'",
    TrailingHyphen => "id must not end with '-'",
    DoubleHyphen => "id must not hold '--'",
});

/// An invalid tenant or agent id.
pub type IdError = Error<IdErrorKind>;

/// Checks the slug rule, naming the first rule that fails.
pub fn validate_slug(s: &str) -> Result<(), IdErrorKind> {
    let bytes = s.as_bytes();
    if bytes.is_empty() {
        return Err(IdErrorKind::Empty);
    }
    if bytes.len() > MAX_ID_LEN {
        return Err(IdErrorKind::TooLong);
    }
    if let Some(_bad) = bytes
        .iter()
        .find(|b| !(b.is_ascii_lowercase() || b.is_ascii_digit() || **b == b'-'))
    {
        return Err(IdErrorKind::InvalidChar);
    }
    if bytes[0] == b'-' {
        return Err(IdErrorKind::LeadingHyphen);
    }
    if bytes[bytes.len() - 1] == b'-' {
        return Err(IdErrorKind::TrailingHyphen);
    }
    if s.contains("--") {
        return Err(IdErrorKind::DoubleHyphen);
    }
    Ok(())
}

fn describe(what: &str, s: &str, kind: IdErrorKind) -> IdError {
    // Debug-escape the input so control characters in it cannot forge log lines.
    let shown: String = s.chars().take(80).collect();
    Error::new(kind, format!("invalid {what} {shown:?}"))
}

macro_rules! slug_id {
    ($(#[$meta:meta])* $name:ident, $what:expr) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `s` and returns the id, or the rule it broke.
            pub fn new(s: &str) -> Result<Self, IdError> {
                validate_slug(s).map_err(|kind| describe($what, s, kind))?;
                Ok(Self(Arc::from(s)))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

slug_id!(
    /// A tenant (customer organisation) id: a validated lowercase slug.
    TenantId,
    "tenant id"
);

slug_id!(
    /// An agent id, unique inside its tenant: a validated lowercase slug.
    AgentId,
    "agent id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_slugs() {
        for ok in ["a", "acme", "acme-corp", "a1-b2-c3", "0", &"x".repeat(63)] {
            assert!(TenantId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn names_the_rule() {
        let cases = [
            ("", IdErrorKind::Empty),
            (&"x".repeat(64) as &str, IdErrorKind::TooLong),
            ("A", IdErrorKind::InvalidChar),
            ("a.b", IdErrorKind::InvalidChar),
            ("-a", IdErrorKind::LeadingHyphen),
            ("a-", IdErrorKind::TrailingHyphen),
            ("a--b", IdErrorKind::DoubleHyphen),
        ];
        for (s, kind) in cases {
            assert_eq!(TenantId::new(s).unwrap_err().kind(), kind, "{s:?}");
        }
    }

    #[test]
    fn serde_validates() {
        assert!(serde_json::from_str::<TenantId>("\"Bad\"").is_err());
        let t: TenantId = serde_json::from_str("\"acme\"").unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"acme\"");
    }
}
