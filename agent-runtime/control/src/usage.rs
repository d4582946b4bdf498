//! Server-verified usage: what each tenant's clients published and received,
//! as the NATS servers counted it, per tenant per hour.
//!
//! # Where the numbers come from
//! Every server keeps per-account counters of the messages and bytes parsed
//! from the account's connections (`received` in the server's account
//! statistics: what the tenant published) and delivered to them (`sent`:
//! what it received). They are per server and in memory. The controller asks
//! every server on `$SYS.REQ.ACCOUNT.PING.STATZ` every
//! [`crate::ControllerConfig::usage_every`] and adds each server's increase
//! since its last answer to the current hour.
//!
//! # The ledger, and why it is one record
//! A tenant's usage lives in one KV record (`<tenant>` in [`USAGE_BUCKET`],
//! or its region's `agentbus-usage-<region>`: [`crate::books`]) holding both the per-server cursors (the counters last seen) and the
//! recent hours' totals, updated with compare-and-set. A delta and its cursor
//! therefore move together: two controllers polling at once, or a crash half
//! way, never count an increase twice or lose it. Hours older than
//! [`LEDGER_HOURS`] move to their own records (`<tenant>.h.<hour>`, written
//! idempotently before they leave the ledger).
//!
//! # Accuracy (stated in docs/bounds.md)
//! - A server that restarts starts its counters at zero: a counter below its
//!   cursor counts in full from zero, so what was published between the last
//!   poll and the restart is lost (at most one poll interval of traffic).
//! - An increase is attributed to the hour in which it was observed, so the
//!   edge of an hour is accurate to one poll interval.
//! - A server that did not answer a poll counts on its next answer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tenant_bus::TenantId;

/// The shared bucket.
pub const USAGE_BUCKET: &str = "agentbus-usage";
/// Idempotency keys of reported units (`report_usage`).
pub const REPORTS_BUCKET: &str = "agentbus-usage-reports";
/// How long an idempotency key is remembered.
pub const REPORT_DEDUPE_WINDOW: std::time::Duration = std::time::Duration::from_secs(86_400);
/// The longest unit name.
pub const MAX_UNIT_LEN: usize = 64;
/// Distinct units per tenant per hour.
pub const MAX_UNITS: usize = 32;

/// A report of a custom unit by an agent (`agentbus.usage.v1.<account>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// The tenant (checked against the account).
    pub tenant: String,
    /// The unit: lowercase letters, digits, `.`, `_`, `-` (e.g. `llm.tokens`).
    pub unit: String,
    /// How much.
    pub amount: u64,
    /// Counted once within 24 h per tenant and key.
    pub idempotency_key: String,
}

/// The answer to a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReportAnswer {
    /// `false` when the idempotency key was seen before (not counted again).
    pub counted: bool,
}

/// Checks a unit name.
pub fn valid_unit(unit: &str) -> bool {
    !unit.is_empty()
        && unit.len() <= MAX_UNIT_LEN
        && unit.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// Hours kept in the ledger record itself.
pub const LEDGER_HOURS: u64 = 48;
/// Milliseconds per hour.
pub const HOUR_MS: u64 = 3_600_000;

/// One server's counters for one account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Messages the account's clients published (server `received.msgs`).
    pub msgs_in: u64,
    /// Their bytes.
    pub bytes_in: u64,
    /// Messages delivered to the account's clients (server `sent.msgs`).
    pub msgs_out: u64,
    /// Their bytes.
    pub bytes_out: u64,
}

impl Counters {
    /// The increase from `cursor` to `self`; a counter below its cursor (the
    /// server restarted) counts in full from zero.
    pub fn since(&self, cursor: &Counters) -> Counters {
        let d = |now: u64, then: u64| if now >= then { now - then } else { now };
        Counters {
            msgs_in: d(self.msgs_in, cursor.msgs_in),
            bytes_in: d(self.bytes_in, cursor.bytes_in),
            msgs_out: d(self.msgs_out, cursor.msgs_out),
            bytes_out: d(self.bytes_out, cursor.bytes_out),
        }
    }

    /// Adds `other`, saturating.
    pub fn add(&mut self, other: &Counters) {
        self.msgs_in = self.msgs_in.saturating_add(other.msgs_in);
        self.bytes_in = self.bytes_in.saturating_add(other.bytes_in);
        self.msgs_out = self.msgs_out.saturating_add(other.msgs_out);
        self.bytes_out = self.bytes_out.saturating_add(other.bytes_out);
    }

    /// Whether everything is zero.
    pub fn is_zero(&self) -> bool {
        *self == Counters::default()
    }
}

/// A tenant's ledger record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// The counters last seen, per server id.
    #[serde(default)]
    pub cursors: BTreeMap<String, Counters>,
    /// Totals per hour (start of the hour, Unix ms), the recent ones.
    #[serde(default)]
    pub hours: BTreeMap<u64, Counters>,
    /// Reported units per hour: unit -> amount.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub units: BTreeMap<u64, BTreeMap<String, u64>>,
}

impl Ledger {
    /// Applies one server's answer seen at `now_ms`: adds the increase since
    /// the server's cursor to the current hour and moves the cursor. Returns
    /// the increase.
    pub fn observe(&mut self, server: &str, counters: Counters, now_ms: u64) -> Counters {
        let cursor = self.cursors.get(server).copied().unwrap_or_default();
        let delta = counters.since(&cursor);
        self.cursors.insert(server.to_string(), counters);
        if !delta.is_zero() {
            self.hours.entry(hour_of(now_ms)).or_default().add(&delta);
        }
        delta
    }

    /// Adds a reported `amount` of `unit` at `now_ms`; `false` when the hour
    /// already has [`MAX_UNITS`] other units.
    pub fn add_unit(&mut self, unit: &str, amount: u64, now_ms: u64) -> bool {
        let hour = self.units.entry(hour_of(now_ms)).or_default();
        if !hour.contains_key(unit) && hour.len() >= MAX_UNITS {
            return false;
        }
        let v = hour.entry(unit.to_string()).or_default();
        *v = v.saturating_add(amount);
        true
    }

    /// The hours that should leave the ledger as of `now_ms` (older than
    /// [`LEDGER_HOURS`]).
    pub fn expired_hours(&self, now_ms: u64) -> Vec<ArchivedHour> {
        let keep_from = hour_of(now_ms).saturating_sub(LEDGER_HOURS * HOUR_MS);
        let mut hours: std::collections::BTreeSet<u64> =
            self.hours.range(..keep_from).map(|(h, _)| *h).collect();
        hours.extend(self.units.range(..keep_from).map(|(h, _)| *h));
        hours
            .into_iter()
            .map(|h| ArchivedHour {
                hour_ms: h,
                counters: self.hours.get(&h).copied().unwrap_or_default(),
                units: self.units.get(&h).cloned().unwrap_or_default(),
            })
            .collect()
    }

    /// Removes an hour (after it was archived).
    pub fn remove_hour(&mut self, hour_ms: u64) {
        self.hours.remove(&hour_ms);
        self.units.remove(&hour_ms);
    }
}

/// A closed hour in its own record (`<tenant>.h.<hour>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedHour {
    /// The hour's start, Unix ms.
    pub hour_ms: u64,
    /// The servers' counters.
    pub counters: Counters,
    /// Reported units.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub units: BTreeMap<String, u64>,
}

/// The start of the hour containing `ms`.
pub fn hour_of(ms: u64) -> u64 {
    ms - ms % HOUR_MS
}

/// The KV key of an archived hour.
pub fn archive_key(tenant: &TenantId, hour_ms: u64) -> String {
    format!("{tenant}.h.{hour_ms}")
}

/// How rows are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One row per hour.
    #[default]
    Hour,
    /// One row per UTC day.
    Day,
}

/// `usage.<tenant>.get`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UsageRequest {
    /// From (inclusive), Unix ms.
    pub from_ms: u64,
    /// To (exclusive), Unix ms.
    pub to_ms: u64,
    /// Rows per hour or per day.
    #[serde(default)]
    pub by: Granularity,
}

/// One row of `agentbus usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    /// The tenant.
    pub tenant: String,
    /// The period's start, RFC 3339 UTC (`2026-12-01T08:00:00Z`).
    pub period_start: String,
    /// The period's start, Unix ms.
    pub period_start_ms: u64,
    /// The period's end (exclusive), RFC 3339 UTC.
    pub period_end: String,
    /// Messages the tenant's clients published, as the servers counted them.
    pub msgs_in: u64,
    /// Their bytes.
    pub bytes_in: u64,
    /// Messages delivered to the tenant's clients.
    pub msgs_out: u64,
    /// Their bytes.
    pub bytes_out: u64,
    /// Units the tenant's agents reported (`report_usage`), unit -> amount.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub units: BTreeMap<String, u64>,
}

/// RFC 3339 UTC of Unix ms (seconds precision).
pub fn rfc3339(ms: u64) -> String {
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// Parses RFC 3339 into Unix ms.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp()).ok()?.checked_mul(1000)
}

/// Groups hourly totals in `[from_ms, to_ms)` into rows.
pub fn rows(
    tenant: &TenantId,
    hours: &BTreeMap<u64, Counters>,
    units: &BTreeMap<u64, BTreeMap<String, u64>>,
    from_ms: u64,
    to_ms: u64,
    by: Granularity,
) -> Vec<UsageRow> {
    let span = match by {
        Granularity::Hour => HOUR_MS,
        Granularity::Day => 24 * HOUR_MS,
    };
    let mut grouped: BTreeMap<u64, (Counters, BTreeMap<String, u64>)> = BTreeMap::new();
    for (hour, c) in hours.range(hour_of(from_ms)..to_ms) {
        grouped.entry(hour - hour % span).or_default().0.add(c);
    }
    for (hour, u) in units.range(hour_of(from_ms)..to_ms) {
        let row = &mut grouped.entry(hour - hour % span).or_default().1;
        for (unit, amount) in u {
            let v = row.entry(unit.clone()).or_default();
            *v = v.saturating_add(*amount);
        }
    }
    grouped
        .into_iter()
        .map(|(start, (c, units))| UsageRow {
            tenant: tenant.to_string(),
            period_start: rfc3339(start),
            period_start_ms: start,
            period_end: rfc3339(start + span),
            msgs_in: c.msgs_in,
            bytes_in: c.bytes_in,
            msgs_out: c.msgs_out,
            bytes_out: c.bytes_out,
            units,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(m: u64, b: u64) -> Counters {
        Counters {
            msgs_in: m,
            bytes_in: b,
            ..Default::default()
        }
    }

    #[test]
    fn deltas_per_server_and_restart() {
        let mut l = Ledger::default();
        let t0 = 10 * HOUR_MS + 5;
        assert_eq!(l.observe("s1", c(10, 100), t0), c(10, 100));
        assert_eq!(l.observe("s2", c(5, 50), t0), c(5, 50));
        // Same counters again: nothing new.
        assert!(l.observe("s1", c(10, 100), t0 + 1).is_zero());
        // s1 grows.
        assert_eq!(l.observe("s1", c(12, 130), t0 + 2), c(2, 30));
        // s2 restarted: counts from zero.
        assert_eq!(l.observe("s2", c(3, 30), t0 + 3), c(3, 30));
        assert_eq!(l.hours[&(10 * HOUR_MS)], c(20, 210));
        // Next hour.
        l.observe("s1", c(13, 140), 11 * HOUR_MS);
        assert_eq!(l.hours[&(11 * HOUR_MS)], c(1, 10));
    }

    #[test]
    fn old_hours_leave_the_ledger() {
        let mut l = Ledger::default();
        l.hours.insert(0, c(1, 1));
        l.hours.insert(100 * HOUR_MS, c(1, 1));
        let gone = l.expired_hours(100 * HOUR_MS + 1);
        assert_eq!(gone.len(), 1);
        assert_eq!((gone[0].hour_ms, gone[0].counters), (0, c(1, 1)));
    }

    #[test]
    fn rows_group_by_hour_and_day() {
        let t = TenantId::new("acme").unwrap();
        let mut h = BTreeMap::new();
        h.insert(0, c(1, 10));
        h.insert(HOUR_MS, c(2, 20));
        h.insert(25 * HOUR_MS, c(4, 40));
        let none = BTreeMap::new();
        let hourly = rows(&t, &h, &none, 0, 48 * HOUR_MS, Granularity::Hour);
        assert_eq!(hourly.len(), 3);
        assert_eq!(hourly[0].period_start, "1970-01-01T00:00:00Z");
        assert_eq!(hourly[1].msgs_in, 2);
        let daily = rows(&t, &h, &none, 0, 48 * HOUR_MS, Granularity::Day);
        assert_eq!(daily.len(), 2);
        assert_eq!(daily[0].msgs_in, 3);
        assert_eq!(daily[1].period_start, "1970-01-02T00:00:00Z");
        assert_eq!(daily[1].period_end, "1970-01-03T00:00:00Z");
        // The range excludes `to`.
        assert_eq!(rows(&t, &h, &none, 0, HOUR_MS, Granularity::Hour).len(), 1);
        // Units group with the counters.
        let mut u = BTreeMap::new();
        u.insert(HOUR_MS, BTreeMap::from([("llm.tokens".to_string(), 7u64)]));
        u.insert(
            2 * HOUR_MS,
            BTreeMap::from([("llm.tokens".to_string(), 5u64)]),
        );
        let daily = rows(&t, &h, &u, 0, 48 * HOUR_MS, Granularity::Day);
        assert_eq!(daily[0].units["llm.tokens"], 12);
        assert!(valid_unit("llm.tokens") && !valid_unit("LLM") && !valid_unit(""));
        assert_eq!(parse_rfc3339("1970-01-02T00:00:00Z"), Some(24 * HOUR_MS));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
