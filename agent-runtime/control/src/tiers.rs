//! Tiers and quotas: the one table of per-tenant defaults.
//!
//! | field                   | free   | pro     | enterprise | enforced by |
//! |-------------------------|--------|---------|------------|-------------|
//! | `max_connections`       | 10     | 100     | 1,000      | NATS server (account) |
//! | `max_subscriptions`     | 100    | 1,000   | 10,000     | NATS server (per connection) |
//! | `max_payload`           | 64 KiB | 1 MiB   | 8 MiB      | NATS server (per connection) |
//! | `js_max_memory`         | 16 MiB | 256 MiB | 2 GiB      | NATS server (JetStream) |
//! | `js_max_storage`        | 64 MiB | 1 GiB   | 16 GiB     | NATS server (JetStream) |
//! | `js_max_streams`        | 4      | 16      | 64         | NATS server (JetStream) |
//! | `js_max_consumers`      | 16     | 128     | 1,024      | NATS server (JetStream) |
//! | `max_agents`            | 5      | 50      | 500        | runtime (cluster-wide leases) |
//! | `max_concurrent_tasks`  | 4      | 32      | 256        | runtime scheduler |
//! | `messages_per_window`   | 1,000  | 50,000  | 1,000,000  | runtime scheduler |
//! | `bytes_per_window`      | 8 MiB  | 512 MiB | 8 GiB      | runtime scheduler |
//! | `window_ms`             | 1,000  | 1,000   | 1,000      | runtime scheduler |
//! | `max_message_bytes`     | 64 KiB | 1 MiB   | 8 MiB      | runtime scheduler |
//! | `max_tool_calls_per_task` | 8    | 32      | 128        | runtime tools |
//! | `weight`                | 1      | 4       | 16         | fair queueing share |
//! | `audit_retention_days`  | 30     | 90      | 365        | controller (audit log pruning) |
//!
//! Every field can be overridden per tenant (`agentbus tenant update ID --set
//! max_agents=20`); [`Quotas::set`] validates the key and value.

use std::fmt;
use std::str::FromStr;

use tenant_bus::error::Error;

/// A service tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Small defaults for trials.
    Free,
    /// Paying teams.
    Pro,
    /// Large organisations.
    Enterprise,
}

/// What went wrong parsing a tier or a quota override.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QuotaErrorKind {
    /// Not one of `free`, `pro`, `enterprise`.
    UnknownTier,
    /// Not a quota field name.
    UnknownField,
    /// The value is not a valid number for that field.
    InvalidValue,
}

tenant_bus::kind_display!(QuotaErrorKind {
    UnknownTier => "unknown tier (expected free, pro or enterprise)",
    UnknownField => "unknown quota field",
    InvalidValue => "invalid quota value",
});

/// A quota error.
pub type QuotaError = Error<QuotaErrorKind>;

impl FromStr for Tier {
    type Err = QuotaError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "free" => Ok(Tier::Free),
            "pro" => Ok(Tier::Pro),
            "enterprise" => Ok(Tier::Enterprise),
            other => Err(Error::new(
                QuotaErrorKind::UnknownTier,
                format!("{other:?}"),
            )),
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Free => "free",
            Tier::Pro => "pro",
            Tier::Enterprise => "enterprise",
        })
    }
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

macro_rules! quotas {
    ($( $(#[$doc:meta])* $field:ident : $ty:ty = [$free:expr, $pro:expr, $ent:expr] ),+ $(,)?) => {
        /// A tenant's effective quotas: its tier's defaults with its overrides applied.
        #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct Quotas {
            $( $(#[$doc])* pub $field: $ty, )+
        }

        impl Quotas {
            /// The defaults of `tier` (the table in the module docs).
            pub fn for_tier(tier: Tier) -> Self {
                match tier {
                    Tier::Free => Self { $( $field: $free, )+ },
                    Tier::Pro => Self { $( $field: $pro, )+ },
                    Tier::Enterprise => Self { $( $field: $ent, )+ },
                }
            }

            /// Every field name, in table order.
            pub const FIELDS: &'static [&'static str] = &[$( stringify!($field), )+];

            /// Overrides one field from text (`key=value` of `tenant update --set`).
            pub fn set(&mut self, key: &str, value: &str) -> Result<(), QuotaError> {
                match key {
                    $( stringify!($field) => {
                        let v = parse_quota_number(value).ok_or_else(|| {
                            Error::new(
                                QuotaErrorKind::InvalidValue,
                                format!("{key}={value:?}: expected digits, optionally grouped with single underscores (1_000)"),
                            )
                        })?;
                        check_field(key, v)?;
                        self.$field = v;
                        Ok(())
                    } )+
                    other => Err(Error::new(
                        QuotaErrorKind::UnknownField,
                        format!("{other:?} (known: {})", Self::FIELDS.join(", ")),
                    )),
                }
            }

            /// One field's value as text, if `key` names a field.
            pub fn get(&self, key: &str) -> Option<String> {
                match key {
                    $( stringify!($field) => Some(self.$field.to_string()), )+
                    _ => None,
                }
            }
        }
    };
}

/// The longest rate window: well under the rate ledger's default key expiry
/// (10 minutes), so a window's counter never expires while the window is open.
pub const MAX_WINDOW_MS: u64 = 300_000;

/// The longest audit retention, days (100 years).
pub const MAX_AUDIT_RETENTION_DAYS: u64 = 36_500;

/// A quota number: ASCII digits, optionally grouped by single underscores
/// between digits (`1_000`). No sign, no leading, trailing or doubled
/// underscore, no whitespace inside.
fn parse_quota_number(text: &str) -> Option<u64> {
    let t = text.trim();
    if t.is_empty() || t.starts_with('_') || t.ends_with('_') || t.contains("__") {
        return None;
    }
    if !t.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
        return None;
    }
    t.replace('_', "").parse().ok()
}

/// Bounds of single fields beyond "a number".
fn check_field(key: &str, v: u64) -> Result<(), QuotaError> {
    let bad = |why: String| Err(Error::new(QuotaErrorKind::InvalidValue, why));
    match key {
        "window_ms" if v == 0 || v > MAX_WINDOW_MS => {
            bad(format!("window_ms={v}: must be 1 to {MAX_WINDOW_MS}"))
        }
        "weight" if v == 0 => bad("weight=0: must be at least 1".to_string()),
        "audit_retention_days" if v == 0 || v > MAX_AUDIT_RETENTION_DAYS => bad(format!(
            "audit_retention_days={v}: must be 1 to {MAX_AUDIT_RETENTION_DAYS}"
        )),
        _ => Ok(()),
    }
}

quotas! {
    /// Connections per account, cluster-wide (NATS account limit).
    max_connections: u64 = [10, 100, 1_000],
    /// Subscriptions per connection (NATS account limit).
    max_subscriptions: u64 = [100, 1_000, 10_000],
    /// Largest message payload in bytes (NATS account limit).
    max_payload: u64 = [64 * KIB, MIB, 8 * MIB],
    /// JetStream memory storage in bytes.
    js_max_memory: u64 = [16 * MIB, 256 * MIB, 2 * GIB],
    /// JetStream file storage in bytes.
    js_max_storage: u64 = [64 * MIB, GIB, 16 * GIB],
    /// JetStream streams.
    js_max_streams: u64 = [4, 16, 64],
    /// JetStream consumers.
    js_max_consumers: u64 = [16, 128, 1_024],
    /// Concurrently running agents, cluster-wide.
    max_agents: u64 = [5, 50, 500],
    /// Concurrently running tasks.
    max_concurrent_tasks: u64 = [4, 32, 256],
    /// Messages admitted per window, cluster-wide.
    messages_per_window: u64 = [1_000, 50_000, 1_000_000],
    /// Payload bytes admitted per window, cluster-wide.
    bytes_per_window: u64 = [8 * MIB, 512 * MIB, 8 * GIB],
    /// The rate window in milliseconds.
    window_ms: u64 = [1_000, 1_000, 1_000],
    /// Largest message the runtime admits, in bytes.
    max_message_bytes: u64 = [64 * KIB, MIB, 8 * MIB],
    /// Tool calls allowed per task.
    max_tool_calls_per_task: u64 = [8, 32, 128],
    /// Weight in fair queueing over shared workers.
    weight: u64 = [1, 4, 16],
    /// Days the tenant's audit log keeps entries (older ones are pruned, with
    /// a signed checkpoint kept so that the rest still verifies).
    audit_retention_days: u64 = [30, 90, 365],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_grow() {
        let f = Quotas::for_tier(Tier::Free);
        let p = Quotas::for_tier(Tier::Pro);
        assert!(f.max_agents < p.max_agents);
        assert_eq!("pro".parse::<Tier>().unwrap(), Tier::Pro);
        assert_eq!(
            "gold".parse::<Tier>().unwrap_err().kind(),
            QuotaErrorKind::UnknownTier
        );
    }

    #[test]
    fn overrides_validate() {
        let mut q = Quotas::for_tier(Tier::Free);
        q.set("max_agents", "20").unwrap();
        assert_eq!(q.max_agents, 20);
        q.set("messages_per_window", "1_000_000").unwrap();
        assert_eq!(q.get("messages_per_window").unwrap(), "1000000");
        assert_eq!(
            q.set("nope", "1").unwrap_err().kind(),
            QuotaErrorKind::UnknownField
        );
        assert_eq!(
            q.set("max_agents", "-1").unwrap_err().kind(),
            QuotaErrorKind::InvalidValue
        );
        assert_eq!(q.max_agents, 20, "a failed set changes nothing");
    }

    #[test]
    fn numbers_are_strict_and_windows_bounded() {
        let mut q = Quotas::for_tier(Tier::Free);
        for bad in [
            "+5", "1_000_", "_1", "1__0", "1 0", "0x10", "", " ", "1e3", "-0",
        ] {
            assert_eq!(
                q.set("max_agents", bad).unwrap_err().kind(),
                QuotaErrorKind::InvalidValue,
                "{bad:?}"
            );
        }
        for bad in ["0", "3600000", "300001"] {
            assert!(q.set("window_ms", bad).is_err(), "window_ms={bad}");
        }
        assert!(q.set("weight", "0").is_err());
        assert!(q.set("audit_retention_days", "0").is_err());
        assert!(q.set("audit_retention_days", "36501").is_err());
        q.set("audit_retention_days", "7").unwrap();
        assert_eq!(q.audit_retention_days, 7);
        q.set("window_ms", "300_000").unwrap();
        assert_eq!(q.window_ms, MAX_WINDOW_MS);
        q.set("max_agents", " 12 ").unwrap();
        assert_eq!(q.max_agents, 12);
    }
}
