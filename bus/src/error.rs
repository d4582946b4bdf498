//! Typed errors, shaped like async-nats: one generic [`Error<K>`] carrying a small
//! `Copy` kind enum per operation, a human-readable detail and an optional source.
//!
//! Callers branch on [`Error::kind`]; the display text is for people and may change.

use std::borrow::Cow;
use std::fmt;

/// An error of kind `K`, with a detail message and an optional underlying cause.
pub struct Error<K> {
    kind: K,
    detail: Cow<'static, str>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl<K: Copy + fmt::Debug + fmt::Display> Error<K> {
    /// An error of `kind` with a detail message.
    pub fn new(kind: K, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            source: None,
        }
    }

    /// An error of `kind` caused by `source`.
    pub fn with_source(
        kind: K,
        detail: impl Into<Cow<'static, str>>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            kind,
            detail: detail.into(),
            source: Some(source.into()),
        }
    }

    /// What went wrong, as a value to match on.
    pub fn kind(&self) -> K {
        self.kind
    }

    /// The human-readable detail (without the kind).
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl<K: fmt::Display> fmt::Display for Error<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.detail.is_empty() {
            write!(f, "{}", self.kind)?;
        } else {
            write!(f, "{}: {}", self.kind, self.detail)?;
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl<K: fmt::Debug> fmt::Debug for Error<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("detail", &self.detail)
            .field("source", &self.source)
            .finish()
    }
}

impl<K: fmt::Debug + fmt::Display> std::error::Error for Error<K> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Implements `Display` for a kind enum from a table of `Variant => "text"`.
#[macro_export]
#[doc(hidden)]
macro_rules! kind_display {
    ($ty:ty { $($variant:ident => $text:expr),+ $(,)? }) => {
        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(match self { $(Self::$variant => $text),+ })
            }
        }
    };
}
