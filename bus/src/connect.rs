//! Server URL lists.
//!
//! A NATS deployment is addressed by one URL or a comma-separated list of them
//! (`nats://10.0.0.1:4222,nats://10.0.0.2:4222`), as credential bundles, the
//! control plane and the CLI carry it. async-nats parses a single string as one
//! address, so a list must be split first: [`server_addrs`] does that, once, for
//! every caller, and reports the first invalid entry with a typed error.
//!
//! ```
//! let addrs = tenant_bus::connect::server_addrs("nats://127.0.0.1:4222, 127.0.0.1:4223")?;
//! assert_eq!(addrs.len(), 2);
//! // async_nats::ConnectOptions::new().connect(addrs).await?;
//! # Ok::<(), tenant_bus::connect::ServerAddrError>(())
//! ```
//!
//! Each entry is trimmed; an entry without a scheme is taken as `nats://`, and one
//! without a port as port 4222 (async-nats' rules). Schemes other than `nats`,
//! `tls`, `ws` and `wss`, empty entries and entries without a host are refused.

use crate::error::Error;

pub use async_nats::ServerAddr;

/// What is wrong with a server URL list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ServerAddrErrorKind {
    /// The list holds no URL at all.
    Empty,
    /// One entry is empty (`a,,b` or a trailing comma).
    EmptyEntry,
    /// One entry is not a valid NATS server URL.
    Invalid,
}

crate::kind_display!(ServerAddrErrorKind {
    Empty => "no NATS server URL given",
    EmptyEntry => "empty entry in the NATS server URL list",
    Invalid => "invalid NATS server URL",
});

/// A server URL list error.
pub type ServerAddrError = Error<ServerAddrErrorKind>;

/// Splits a comma-separated list of NATS server URLs into addresses, in order.
///
/// Errors name the offending entry (by position, 1-based, and text) so a person
/// can fix it.
pub fn server_addrs(list: &str) -> Result<Vec<ServerAddr>, ServerAddrError> {
    if list.trim().is_empty() {
        return Err(Error::new(ServerAddrErrorKind::Empty, ""));
    }
    let mut addrs = Vec::new();
    for (i, raw) in list.split(',').enumerate() {
        let entry = raw.trim();
        if entry.is_empty() {
            return Err(Error::new(
                ServerAddrErrorKind::EmptyEntry,
                format!("entry {} of {list:?}", i + 1),
            ));
        }
        let addr: ServerAddr = entry.parse().map_err(|e| {
            Error::with_source(
                ServerAddrErrorKind::Invalid,
                format!("entry {} ({entry:?})", i + 1),
                e,
            )
        })?;
        if addr.host().is_empty() {
            return Err(Error::new(
                ServerAddrErrorKind::Invalid,
                format!("entry {} ({entry:?}) has no host", i + 1),
            ));
        }
        addrs.push(addr);
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_lists() {
        let one = server_addrs("nats://127.0.0.1:4222").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].port(), 4222);

        let two = server_addrs("nats://a.example:1, tls://b.example:2").unwrap();
        assert_eq!(two.len(), 2);
        assert_eq!(two[0].host(), "a.example");
        assert_eq!(two[0].port(), 1);
        assert_eq!(two[1].host(), "b.example");
        assert_eq!(two[1].port(), 2);

        // async-nats' defaults: nats:// and port 4222.
        let bare = server_addrs("127.0.0.1,localhost:4333").unwrap();
        assert_eq!(bare[0].port(), 4222);
        assert_eq!(bare[1].port(), 4333);
        assert_eq!(bare[1].host(), "localhost");
    }

    #[test]
    fn credentials_in_urls_are_kept() {
        let a = server_addrs("nats://u:p@127.0.0.1:4222").unwrap();
        assert!(a[0].has_user_pass());
    }

    #[test]
    fn errors_are_typed() {
        for (input, kind) in [
            ("", ServerAddrErrorKind::Empty),
            ("  ", ServerAddrErrorKind::Empty),
            ("nats://a:1,,nats://b:2", ServerAddrErrorKind::EmptyEntry),
            ("nats://a:1,", ServerAddrErrorKind::EmptyEntry),
            ("nats://a:99999", ServerAddrErrorKind::Invalid),
            ("nats://a:1,http://b:2", ServerAddrErrorKind::Invalid),
            ("nats://a:port", ServerAddrErrorKind::Invalid),
            ("nats://:4222", ServerAddrErrorKind::Invalid),
        ] {
            let err = server_addrs(input).unwrap_err();
            assert_eq!(err.kind(), kind, "{input:?}: {err}");
        }
        let err = server_addrs("nats://a:1,nats://b:x").unwrap_err();
        assert!(err.to_string().contains("entry 2"), "{err}");
        assert!(err.to_string().contains("nats://b:x"), "{err}");
    }
}
