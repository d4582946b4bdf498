//! Subjects relative to a tenant's namespace.
//!
//! A [`Subject`] names one concrete subject (publish, request); a [`SubjectPattern`]
//! may also hold the wildcards `*` (one token) and `>` (the rest, last token only)
//! and is used to subscribe. Both are relative: the full NATS subject is always
//! `tenant.<id>.<relative>`, and [`scope`] is the one function that builds it.
//!
//! Rules for a relative subject (each broken rule has its own [`SubjectErrorKind`]):
//! - 1 to [`MAX_SUBJECT_LEN`] bytes and at most [`MAX_TOKENS`] tokens;
//! - tokens separated by single dots: no empty token, so no leading, trailing or
//!   double dot;
//! - token characters are printable ASCII (`!` to `~`) other than `.`: no
//!   whitespace, no control characters, no non-ASCII (Unicode look-alikes);
//! - `*` and `>` only as whole tokens, only in patterns, and `>` only last;
//! - the first token must not start with `$` (server-internal subjects such as
//!   `$SYS`, `$JS`, `$KV`) or `_INBOX` (reply inboxes, which the library owns).

use std::fmt;
use std::sync::Arc;

use crate::error::Error;
use crate::ids::TenantId;

/// The longest relative subject, in bytes.
pub const MAX_SUBJECT_LEN: usize = 256;
/// The most tokens in a relative subject.
pub const MAX_TOKENS: usize = 16;
/// The first token of every scoped subject.
pub const TENANT_PREFIX: &str = "tenant";
/// The token (after `tenant.<id>.`) under which the library keeps reply inboxes.
pub const INBOX_TOKEN: &str = "_INBOX";

/// Which subject rule was broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SubjectErrorKind {
    /// The subject is empty.
    Empty,
    /// The subject is longer than [`MAX_SUBJECT_LEN`] bytes.
    TooLong,
    /// The subject has more than [`MAX_TOKENS`] tokens.
    TooManyTokens,
    /// A token is empty (leading, trailing or double dot).
    EmptyToken,
    /// A character is whitespace, a control character or not ASCII.
    InvalidChar,
    /// `*` or `>` inside a token, or a wildcard in a concrete subject.
    Wildcard,
    /// `>` before the last token.
    TailWildcardNotLast,
    /// The first token starts with `$` or `_INBOX`.
    Reserved,
    /// A full subject is not under `tenant.<id>.`.
    OutsideNamespace,
}

crate::kind_display!(SubjectErrorKind {
    Empty => "subject is empty",
    TooLong => "subject is longer than 256 bytes",
    TooManyTokens => "subject has more than 16 tokens",
    EmptyToken => "subject has an empty token (leading, trailing or double dot)",
    InvalidChar => "subject holds whitespace, a control or a non-ASCII character",
    Wildcard => "wildcards '*' and '>' are allowed only as whole tokens of subscribe patterns",
    TailWildcardNotLast => "'>' must be the last token",
    Reserved => "subjects starting with '$' or '_INBOX' are reserved",
    OutsideNamespace => "subject is outside the tenant's namespace",
});

/// An invalid subject.
pub type SubjectError = Error<SubjectErrorKind>;

fn check(s: &str, allow_wildcards: bool) -> Result<(), SubjectErrorKind> {
    if s.is_empty() {
        return Err(SubjectErrorKind::Empty);
    }
    if s.len() > MAX_SUBJECT_LEN {
        return Err(SubjectErrorKind::TooLong);
    }
    let mut count = 0usize;
    let mut tokens = s.split('.').peekable();
    while let Some(token) = tokens.next() {
        count += 1;
        if count > MAX_TOKENS {
            return Err(SubjectErrorKind::TooManyTokens);
        }
        if token.is_empty() {
            return Err(SubjectErrorKind::EmptyToken);
        }
        if let Some(_bad) = token.bytes().find(|b| !(0x21..=0x7e).contains(b)) {
            return Err(SubjectErrorKind::InvalidChar);
        }
        match token {
            "*" | ">" if !allow_wildcards => return Err(SubjectErrorKind::Wildcard),
            ">" if tokens.peek().is_some() => return Err(SubjectErrorKind::TailWildcardNotLast),
            "*" | ">" => {}
            t if t.contains(['*', '>']) => return Err(SubjectErrorKind::Wildcard),
            _ => {}
        }
        if count == 1 && (token.starts_with('$') || token.starts_with(INBOX_TOKEN)) {
            return Err(SubjectErrorKind::Reserved);
        }
    }
    Ok(())
}

fn describe(s: &str, kind: SubjectErrorKind) -> SubjectError {
    let shown: String = s.chars().take(80).collect();
    Error::new(kind, format!("{shown:?}"))
}

/// A validated concrete subject, relative to a tenant namespace.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject(Arc<str>);

impl Subject {
    /// Validates a concrete relative subject (no wildcards).
    pub fn new(s: &str) -> Result<Self, SubjectError> {
        check(s, false).map_err(|k| describe(s, k))?;
        Ok(Self(Arc::from(s)))
    }

    /// The relative subject as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated subscribe pattern (may hold `*` and a final `>`), relative to a
/// tenant namespace.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubjectPattern(Arc<str>);

impl SubjectPattern {
    /// Validates a relative subscribe pattern.
    pub fn new(s: &str) -> Result<Self, SubjectError> {
        check(s, true).map_err(|k| describe(s, k))?;
        Ok(Self(Arc::from(s)))
    }

    /// The relative pattern as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the concrete `subject` matches this pattern.
    pub fn matches(&self, subject: &Subject) -> bool {
        let mut pattern = self.0.split('.');
        let mut tokens = subject.0.split('.');
        loop {
            match (pattern.next(), tokens.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(p), Some(t)) if p == t => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl From<Subject> for SubjectPattern {
    fn from(s: Subject) -> Self {
        // Every concrete subject is a valid pattern.
        Self(s.0)
    }
}

macro_rules! text_impls {
    ($ty:ident) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($ty), &*self.0)
            }
        }
        impl std::str::FromStr for $ty {
            type Err = SubjectError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }
        impl TryFrom<&str> for $ty {
            type Error = SubjectError;
            fn try_from(s: &str) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }
        impl TryFrom<String> for $ty {
            type Error = SubjectError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::new(&s)
            }
        }
        impl TryFrom<&String> for $ty {
            type Error = SubjectError;
            fn try_from(s: &String) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }
    };
}
text_impls!(Subject);
text_impls!(SubjectPattern);

/// Anything that can name a concrete relative subject: `&str`, `String`, or an
/// already validated [`Subject`]. Text is validated on conversion.
pub trait IntoSubject {
    /// Validates (if needed) and converts.
    fn into_subject(self) -> Result<Subject, SubjectError>;
}

/// Anything that can name a relative subscribe pattern: `&str`, `String`,
/// [`SubjectPattern`] or [`Subject`].
pub trait IntoPattern {
    /// Validates (if needed) and converts.
    fn into_pattern(self) -> Result<SubjectPattern, SubjectError>;
}

macro_rules! into_impls {
    ($($t:ty),*) => {$(
        impl IntoSubject for $t {
            fn into_subject(self) -> Result<Subject, SubjectError> {
                Subject::new(self.as_ref())
            }
        }
        impl IntoPattern for $t {
            fn into_pattern(self) -> Result<SubjectPattern, SubjectError> {
                SubjectPattern::new(self.as_ref())
            }
        }
    )*};
}
into_impls!(&str, String, &String);

impl IntoSubject for Subject {
    fn into_subject(self) -> Result<Subject, SubjectError> {
        Ok(self)
    }
}
impl IntoSubject for &Subject {
    fn into_subject(self) -> Result<Subject, SubjectError> {
        Ok(self.clone())
    }
}
impl IntoPattern for SubjectPattern {
    fn into_pattern(self) -> Result<SubjectPattern, SubjectError> {
        Ok(self)
    }
}
impl IntoPattern for &SubjectPattern {
    fn into_pattern(self) -> Result<SubjectPattern, SubjectError> {
        Ok(self.clone())
    }
}
impl IntoPattern for Subject {
    fn into_pattern(self) -> Result<SubjectPattern, SubjectError> {
        Ok(self.into())
    }
}
impl IntoPattern for &Subject {
    fn into_pattern(self) -> Result<SubjectPattern, SubjectError> {
        Ok(self.clone().into())
    }
}

/// `tenant.<id>.` — the prefix of every subject of `tenant`.
pub fn namespace_prefix(tenant: &TenantId) -> String {
    format!("{TENANT_PREFIX}.{tenant}.")
}

/// The full NATS subject of a relative subject or pattern: `tenant.<id>.<relative>`.
///
/// This is the only place a scoped subject is assembled. Both parts are validated
/// types, so the result always lies inside the tenant's namespace.
pub fn scope(tenant: &TenantId, relative: &str) -> String {
    let mut s =
        String::with_capacity(TENANT_PREFIX.len() + tenant.as_str().len() + relative.len() + 2);
    s.push_str(TENANT_PREFIX);
    s.push('.');
    s.push_str(tenant.as_str());
    s.push('.');
    s.push_str(relative);
    s
}

/// The relative subject of a full subject received in `tenant`'s namespace, or
/// [`SubjectErrorKind::OutsideNamespace`] if it lies elsewhere (or is invalid).
pub fn unscope(tenant: &TenantId, full: &str) -> Result<Subject, SubjectError> {
    let rest = full
        .strip_prefix(TENANT_PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|r| r.strip_prefix(tenant.as_str()))
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(|| describe(full, SubjectErrorKind::OutsideNamespace))?;
    Subject::new(rest).map_err(|e| describe(full, e.kind()))
}

/// The full prefix of the tenant's reply inboxes: `tenant.<id>._INBOX`.
pub fn inbox_prefix(tenant: &TenantId) -> String {
    scope(tenant, INBOX_TOKEN)
}

/// Whether `full` is a reply inbox inside `tenant`'s namespace
/// (`tenant.<id>._INBOX.<token>...`).
pub fn is_tenant_inbox(tenant: &TenantId, full: &str) -> bool {
    full.strip_prefix(TENANT_PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|r| r.strip_prefix(tenant.as_str()))
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|r| r.strip_prefix(INBOX_TOKEN))
        .and_then(|r| r.strip_prefix('.'))
        .is_some_and(|rest| {
            !rest.is_empty()
                && rest.len() <= MAX_SUBJECT_LEN
                && rest.split('.').all(|t| {
                    !t.is_empty()
                        && t.bytes()
                            .all(|b| (0x21..=0x7e).contains(&b) && b != b'*' && b != b'>')
                })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_and_unscope() {
        let t = TenantId::new("acme").unwrap();
        let s = Subject::new("orders.created").unwrap();
        let full = scope(&t, s.as_str());
        assert_eq!(full, "tenant.acme.orders.created");
        assert_eq!(unscope(&t, &full).unwrap(), s);
        let other = TenantId::new("acme-2").unwrap();
        assert_eq!(
            unscope(&other, &full).unwrap_err().kind(),
            SubjectErrorKind::OutsideNamespace
        );
        assert_eq!(
            unscope(&t, "tenant.acmex.orders").unwrap_err().kind(),
            SubjectErrorKind::OutsideNamespace
        );
    }

    #[test]
    fn pattern_rules() {
        assert!(SubjectPattern::new("a.*.c").is_ok());
        assert!(SubjectPattern::new("a.>").is_ok());
        assert!(SubjectPattern::new(">").is_ok());
        assert_eq!(
            SubjectPattern::new("a.>.c").unwrap_err().kind(),
            SubjectErrorKind::TailWildcardNotLast
        );
        assert_eq!(
            SubjectPattern::new("a*").unwrap_err().kind(),
            SubjectErrorKind::Wildcard
        );
        assert_eq!(
            Subject::new("a.*").unwrap_err().kind(),
            SubjectErrorKind::Wildcard
        );
        let p = SubjectPattern::new("a.*.c").unwrap();
        assert!(p.matches(&Subject::new("a.b.c").unwrap()));
        assert!(!p.matches(&Subject::new("a.b.c.d").unwrap()));
        let tail = SubjectPattern::new("a.>").unwrap();
        assert!(tail.matches(&Subject::new("a.b.c").unwrap()));
        assert!(!tail.matches(&Subject::new("a").unwrap()));
    }

    #[test]
    fn inbox_recognition() {
        let t = TenantId::new("acme").unwrap();
        assert!(is_tenant_inbox(&t, "tenant.acme._INBOX.abc.1"));
        assert!(!is_tenant_inbox(&t, "tenant.acme._INBOX"));
        assert!(!is_tenant_inbox(&t, "tenant.acme._INBOX."));
        assert!(!is_tenant_inbox(&t, "tenant.other._INBOX.abc"));
        assert!(!is_tenant_inbox(&t, "_INBOX.abc"));
        assert!(!is_tenant_inbox(&t, "tenant.acme._INBOX.a.*"));
    }
}
