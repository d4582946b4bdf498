//! Budgets: a cap on a reported unit per tenant per UTC day or month, enforced
//! atomically across every controller and server of a cluster.
//!
//! # What a budget is
//! A [`BudgetSpec`] names a unit agents report with
//! [`crate::keys::report_usage`] (e.g. `llm.cost_usd_micros`, `tool.calls`), a
//! [`Period`], a hard cap, an optional soft threshold and an [`Action`] taken
//! once the hard cap is reached. Amounts are integers in the unit's own base
//! (report money in micro-dollars: `$0.50` is `500000`), so sums are exact.
//!
//! # How it is enforced (docs/bounds.md)
//! A report is a *charge*: the agent asks before it spends. The controller
//! adds the amount to a JetStream counter (a stream with
//! `allow_msg_counter`; one subject per tenant, budget and period) with a
//! `Nats-Incr` header. The stream leader applies increments one at a time and
//! answers each with the new total, so every charge sees a distinct total. A
//! charge whose total passes the hard cap is taken back (a negative
//! increment) and refused (`block`, `revoke`, and `throttle` outside its
//! trickle). Hence:
//! - **never over the cap:** the total always includes every admitted charge
//!   (plus charges about to be taken back), and a charge is admitted only if
//!   the total with it is at most the cap; 20 concurrent charges of 500000
//!   against a cap of 1000000 admit exactly 2, however many controllers serve
//!   them;
//! - **a spurious refusal is possible:** while an over-cap charge has not yet
//!   been taken back, a smaller charge that would fit may be refused (it can
//!   be retried);
//! - **a crash between increment and take-back** leaves the total too high by
//!   that charge until the period ends: the error is on the refusing side,
//!   never the admitting side.
//!
//! # Runtime-metered units
//! Units a runtime host meters ([`crate::meter`]: `tasks.run`,
//! `tasks.completed`, `tasks.failed`, `tools.calls`, `tool.<name>`) are
//! reported after the work was done, in batches every flush interval. Their
//! batch charges the budgets on those units *after the fact*: the counter
//! always advances (nothing is refused: there is no later charge of these
//! units to refuse), the thresholds alert as below, and a `revoke` budget
//! over its cap suspends the tenant. So such a budget is policed, with the
//! meter's flush interval as the delay and the last batch as the overshoot;
//! `warn`, `throttle` and `block` on them only alert. A batch sent again is
//! claimed per host, sequence and tenant and counted once.
//!
//! # Alerts
//! The first charge of a period that reaches the soft threshold, and the first
//! that reaches (or is refused at) the hard cap, claim an alert record with a
//! create-only write; the winner, and only it, publishes a sealed
//! [`BudgetAlert`] on the tenant's own `tenant.<id>.events.budget` and appends
//! a `budget.threshold` audit event. A controller that crashes between the
//! claim and the publish loses that alert (at most once, never twice).
//!
//! # Where
//! Specs, counters and marks are in the shared buckets and stream below, or,
//! for a tenant created with a region, in that region's (see
//! [`crate::books`]; a counter's subject is
//! [`Books::counter_subject`](crate::books::Books::counter_subject)).

use serde::{Deserialize, Serialize};

/// The bucket of budget specs (`spec.<tenant>.<name>`).
pub const BUDGETS_BUCKET: &str = "agentbus-budgets";
/// The bucket of alert claims and throttle slots, per period (kept as long as
/// the counters).
pub const MARKS_BUCKET: &str = "agentbus-budget-marks";
/// The counter stream (JetStream counters, `allow_msg_counter`).
pub const COUNTER_STREAM: &str = "agentbus-budget-counters";
/// The shared counter stream's subjects: `agentbus.budget.<tenant>.<budget>.<period>`.
pub const COUNTER_PREFIX: &str = "agentbus.budget";
/// Counters are kept this long (two months: a monthly total stays readable
/// for its whole period and the next).
pub const COUNTER_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(62 * 86_400);
/// Budgets per tenant.
pub const MAX_BUDGETS: usize = 16;
/// The longest budget name.
pub const MAX_NAME_LEN: usize = 32;
/// The subject (relative to the tenant) alerts are published on.
pub const ALERT_SUBJECT: &str = "events.budget";
/// The default spacing of admitted charges over the cap under `throttle`.
pub const DEFAULT_THROTTLE_INTERVAL_MS: u64 = 60_000;

/// The length of a budget's period (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// A UTC day.
    Day,
    /// A UTC calendar month.
    Month,
}

tenant_bus::kind_display!(Period {
    Day => "day",
    Month => "month",
});

impl std::str::FromStr for Period {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "day" => Ok(Period::Day),
            "month" => Ok(Period::Month),
            other => Err(format!("unknown period {other:?} (day or month)")),
        }
    }
}

/// What happens to charges once the hard cap is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Alert only: every charge is admitted.
    Warn,
    /// Admit one charge per `throttle_interval_ms` over the cap (cluster-wide);
    /// refuse the rest with the time to wait.
    Throttle,
    /// Refuse every charge over the cap until the period ends.
    Block,
    /// Refuse as `block`, and suspend the tenant: its account's connections
    /// are closed and refused until an admin activates it.
    Revoke,
}

tenant_bus::kind_display!(Action {
    Warn => "warn",
    Throttle => "throttle",
    Block => "block",
    Revoke => "revoke",
});

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "warn" => Ok(Action::Warn),
            "throttle" => Ok(Action::Throttle),
            "block" => Ok(Action::Block),
            "revoke" => Ok(Action::Revoke),
            other => Err(format!(
                "unknown action {other:?} (warn, throttle, block or revoke)"
            )),
        }
    }
}

/// A budget, KV `spec.<tenant>.<name>` in [`BUDGETS_BUCKET`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetSpec {
    /// The budget's name: 1 to 32 lowercase letters, digits, `_` or `-`.
    pub name: String,
    /// The unit it caps (as reported).
    pub unit: String,
    /// Day or month.
    pub period: Period,
    /// The cap, in the unit's base.
    pub hard: u64,
    /// A threshold that only alerts (below `hard`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft: Option<u64>,
    /// What happens at the cap.
    pub action: Action,
    /// Under `throttle`: the spacing of admitted charges over the cap.
    #[serde(default = "default_throttle")]
    pub throttle_interval_ms: u64,
}

fn default_throttle() -> u64 {
    DEFAULT_THROTTLE_INTERVAL_MS
}

/// Why a budget spec is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidBudget(pub String);

impl std::fmt::Display for InvalidBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidBudget {}

/// Checks a budget name (a subject token and a KV key part).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

impl BudgetSpec {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), InvalidBudget> {
        let bad = |m: String| Err(InvalidBudget(m));
        if !valid_name(&self.name) {
            return bad(format!(
                "budget name {:?}: 1 to {MAX_NAME_LEN} lowercase letters, digits, '_' or '-'",
                self.name
            ));
        }
        if !crate::usage::valid_unit(&self.unit) {
            return bad(format!(
                "unit {:?}: 1 to 64 lowercase letters, digits, '.', '_' or '-'",
                self.unit
            ));
        }
        // Counter totals are kept in i64 arithmetic by the server's big ints,
        // but our comparisons are u64: keep caps far from the edge.
        if self.hard == 0 || self.hard > i64::MAX as u64 / 2 {
            return bad(format!(
                "hard cap {}: from 1 to {}",
                self.hard,
                i64::MAX / 2
            ));
        }
        if let Some(soft) = self.soft {
            if soft == 0 || soft >= self.hard {
                return bad(format!(
                    "soft threshold {soft}: above 0 and below the hard cap {}",
                    self.hard
                ));
            }
        }
        if self.action == Action::Throttle
            && !(1_000..=86_400_000).contains(&self.throttle_interval_ms)
        {
            return bad(format!(
                "throttle interval {} ms: from 1 s to 24 h",
                self.throttle_interval_ms
            ));
        }
        Ok(())
    }
}

/// The KV key of a tenant's budget spec.
pub fn spec_key(tenant: &str, name: &str) -> String {
    format!("spec.{tenant}.{name}")
}

/// The KV key prefix of a tenant's budget specs (for listing).
pub fn spec_prefix(tenant: &str) -> String {
    format!("spec.{tenant}.")
}

/// The KV key of an alert claim (in [`MARKS_BUCKET`]).
pub fn alert_key(tenant: &str, name: &str, period: &str, threshold: Threshold) -> String {
    format!("alert.{tenant}.{name}.{period}.{threshold}")
}

/// The KV key of a throttled budget's last admission over the cap (in
/// [`MARKS_BUCKET`]).
pub fn throttle_key(tenant: &str, name: &str, period: &str) -> String {
    format!("throttle.{tenant}.{name}.{period}")
}

/// A period's id (`d20261201`, `m202612`), its start and its end (Unix ms,
/// end exclusive), for the instant `now_ms`.
pub fn period_of(period: Period, now_ms: u64) -> (String, u64, u64) {
    let day_ms = 86_400_000u64;
    let day = now_ms / day_ms;
    let date = i64::try_from(day)
        .ok()
        .and_then(|d| {
            time::Date::from_julian_day(unix_epoch_julian() + i32::try_from(d).ok()?).ok()
        })
        .unwrap_or(time::Date::MIN);
    match period {
        Period::Day => (
            format!(
                "d{:04}{:02}{:02}",
                date.year(),
                u8::from(date.month()),
                date.day()
            ),
            day * day_ms,
            (day + 1) * day_ms,
        ),
        Period::Month => {
            let first = day - u64::from(date.day() - 1);
            let days = u64::from(date.month().length(date.year()));
            (
                format!("m{:04}{:02}", date.year(), u8::from(date.month())),
                first * day_ms,
                (first + days) * day_ms,
            )
        }
    }
}

fn unix_epoch_julian() -> i32 {
    // 1970-01-01 is Julian day 2440588.
    2_440_588
}

/// A threshold of a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Threshold {
    /// The soft threshold (alert only).
    Soft,
    /// The hard cap.
    Hard,
}

tenant_bus::kind_display!(Threshold {
    Soft => "soft",
    Hard => "hard",
});

/// The event on `tenant.<id>.events.budget` (sealed with the tenant's key,
/// sender `agentbus-controller`), once per threshold per period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetAlert {
    /// `budget.threshold`.
    pub kind: String,
    /// The tenant.
    pub tenant: String,
    /// The budget's name.
    pub budget: String,
    /// Its unit.
    pub unit: String,
    /// The period id (`d20261201`, `m202612`).
    pub period: String,
    /// Which threshold.
    pub threshold: Threshold,
    /// The threshold's value.
    pub limit: u64,
    /// The total when it was reached (may exceed `limit` by the last charge
    /// under `warn`).
    pub spent: u64,
    /// What happens now.
    pub action: Action,
    /// When (Unix ms).
    pub at_ms: u64,
}

/// A budget with this period's total (`agentbus budget list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetView {
    /// The tenant.
    pub tenant: String,
    /// The spec.
    #[serde(flatten)]
    pub spec: BudgetSpec,
    /// The current period id.
    pub period_id: String,
    /// The current period's end, RFC 3339.
    pub period_end: String,
    /// Spent in the current period.
    pub spent: u64,
    /// What is left under the hard cap.
    pub remaining: u64,
}

/// `agentbus.admin.v1.budget.<tenant>.delete` and `.get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetRef {
    /// The budget's name.
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BudgetSpec {
        BudgetSpec {
            name: "llm-cost".into(),
            unit: "llm.cost_usd_micros".into(),
            period: Period::Day,
            hard: 1_000_000,
            soft: Some(800_000),
            action: Action::Block,
            throttle_interval_ms: DEFAULT_THROTTLE_INTERVAL_MS,
        }
    }

    #[test]
    fn specs_are_validated() {
        assert!(spec().validate().is_ok());
        for bad in [
            BudgetSpec {
                name: "Bad".into(),
                ..spec()
            },
            BudgetSpec {
                name: "".into(),
                ..spec()
            },
            BudgetSpec {
                name: "a.b".into(),
                ..spec()
            },
            BudgetSpec {
                unit: "LLM".into(),
                ..spec()
            },
            BudgetSpec { hard: 0, ..spec() },
            BudgetSpec {
                hard: u64::MAX,
                ..spec()
            },
            BudgetSpec {
                soft: Some(1_000_000),
                ..spec()
            },
            BudgetSpec {
                soft: Some(0),
                ..spec()
            },
            BudgetSpec {
                action: Action::Throttle,
                throttle_interval_ms: 10,
                ..spec()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn periods_are_utc_days_and_months() {
        // 2026-12-01T10:00:00Z
        let t = 1_796_119_200_000u64;
        let (id, start, end) = period_of(Period::Day, t);
        assert_eq!(id, "d20261201");
        assert_eq!(crate::usage::rfc3339(start), "2026-12-01T00:00:00Z");
        assert_eq!(crate::usage::rfc3339(end), "2026-12-02T00:00:00Z");
        let (id, start, end) = period_of(Period::Month, t);
        assert_eq!(id, "m202612");
        assert_eq!(crate::usage::rfc3339(start), "2026-12-01T00:00:00Z");
        assert_eq!(crate::usage::rfc3339(end), "2027-01-01T00:00:00Z");
        // February of a leap year.
        let feb = crate::usage::parse_rfc3339("2028-02-29T23:59:59Z").unwrap_or(0);
        let (id, _, end) = period_of(Period::Month, feb);
        assert_eq!(id, "m202802");
        assert_eq!(crate::usage::rfc3339(end), "2028-03-01T00:00:00Z");
    }

    #[test]
    fn words_parse() {
        assert_eq!("throttle".parse::<Action>(), Ok(Action::Throttle));
        assert!("stop".parse::<Action>().is_err());
        assert_eq!("month".parse::<Period>(), Ok(Period::Month));
        assert!("week".parse::<Period>().is_err());
    }
}
