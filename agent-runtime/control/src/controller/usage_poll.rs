//! Usage metering in the controller: polling the servers' account statistics
//! into each tenant's ledger ([`crate::usage`]), and the
//! `agentbus.admin.v1.usage.<tenant>.get` endpoint.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;
use tenant_bus::TenantId;

use super::Controller;
use crate::api::{ApiError, ErrorCode};
use crate::usage::{self, Counters, UsageRequest};

/// How long a poll collects the servers' answers.
pub(super) const POLL_WINDOW: Duration = Duration::from_millis(750);
/// Tenants with their own label in the usage metrics (the rest: `_other`).
pub(super) const METRIC_TENANTS: usize = 200;

/// The metrics' own cursors (per tenant and server) and labelled tenants.
#[derive(Debug, Default)]
pub(crate) struct MetricCursors {
    cursors: HashMap<(String, String), Counters>,
    tenants: std::collections::HashSet<String>,
}

/// One server's answer: when it arrived (Unix ms) and account -> counters.
#[derive(Debug, Default)]
pub(crate) struct ServerStats {
    pub(crate) at_ms: u64,
    pub(crate) accounts: HashMap<String, Counters>,
}

/// server id -> its answer.
pub(crate) type Stats = BTreeMap<String, ServerStats>;

/// Compare-and-set attempts per tenant per poll.
const CAS_ATTEMPTS: usize = 16;

/// One account's counters in a server's account statistics.
pub(super) fn counters_of(stat: &Value) -> Counters {
    let n = |path: &str| stat.pointer(path).and_then(Value::as_u64).unwrap_or(0);
    Counters {
        msgs_in: n("/received/msgs"),
        bytes_in: n("/received/bytes"),
        msgs_out: n("/sent/msgs"),
        bytes_out: n("/sent/bytes"),
    }
}

impl Controller {
    /// Asks every server for the tenants' account statistics: server id ->
    /// account -> counters, and the tenants by account.
    async fn collect_stats(
        &self,
    ) -> Result<(Stats, HashMap<String, crate::registry::TenantRecord>), ApiError> {
        let tenants = self
            .store
            .registry
            .list()
            .await
            .map_err(crate::store::registry_error)?;
        let by_account: HashMap<String, crate::registry::TenantRecord> = tenants
            .into_iter()
            .filter(|r| !r.account.is_empty() && !r.deleting)
            .map(|r| (r.account.clone(), r))
            .collect();
        let mut seen: Stats = BTreeMap::new();
        if by_account.is_empty() {
            return Ok((seen, by_account));
        }
        // Every server answers for the accounts it has loaded; `include_unused`
        // keeps an account whose clients just left.
        let accounts: Vec<&String> = by_account.keys().collect();
        let body = serde_json::json!({ "accounts": accounts, "include_unused": true }).to_string();
        let answers = self
            .ping_servers(
                "$SYS.REQ.ACCOUNT.PING.STATZ",
                body,
                POLL_WINDOW,
                Some(&self.servers_answering),
                "account statistics",
            )
            .await?;
        for answer in answers {
            let v = &answer.value;
            let Some(server) = v
                .pointer("/data/server_id")
                .or_else(|| v.pointer("/server/id"))
                .and_then(Value::as_str)
            else {
                continue;
            };
            let stats = seen.entry(server.to_string()).or_default();
            stats.at_ms = answer.at_ms;
            for stat in v
                .pointer("/data/account_statz")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(acc) = stat.get("acc").and_then(Value::as_str) {
                    stats.accounts.insert(acc.to_string(), counters_of(stat));
                }
            }
        }
        Ok((seen, by_account))
    }

    /// One usage poll: asks every server and adds each server's increase to
    /// the tenants' ledgers. Returns how many tenants were updated.
    pub async fn poll_usage(&self) -> Result<usize, ApiError> {
        let (seen, by_account) = self.collect_stats().await?;
        Ok(self.record_usage(&seen, &by_account).await)
    }

    async fn record_usage(
        &self,
        seen: &Stats,
        by_account: &HashMap<String, crate::registry::TenantRecord>,
    ) -> usize {
        // Per tenant: every server's counters, applied in one CAS.
        let mut per_tenant: HashMap<&TenantId, Vec<(&String, Counters)>> = HashMap::new();
        for (server, stats) in seen {
            for (acc, c) in &stats.accounts {
                if let Some(t) = by_account.get(acc) {
                    per_tenant.entry(&t.id).or_default().push((server, *c));
                }
            }
        }
        let now = tenant_bus::envelope::now_ms();
        let mut updated = 0;
        for (tenant, observations) in per_tenant {
            self.export_usage(tenant, &observations);
            match self.apply_usage(tenant, &observations, now).await {
                Ok(true) => updated += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(%tenant, error = %e, "usage: ledger update failed"),
            }
        }
        updated
    }

    /// Usage counters for Prometheus: per tenant for the first
    /// [`METRIC_TENANTS`] tenants this process sees, `_other` for the rest (a
    /// bounded label set).
    fn export_usage(&self, tenant: &TenantId, observations: &[(&String, Counters)]) {
        let Ok(mut memory) = self.metric_cursors.lock() else {
            return;
        };
        let mut delta = Counters::default();
        for (server, c) in observations {
            let key = (tenant.to_string(), (*server).clone());
            // A first sight counts in full, as in the ledger: the counters
            // count since the server loaded the account.
            let prev = memory.cursors.get(&key).copied().unwrap_or_default();
            delta.add(&c.since(&prev));
            memory.cursors.insert(key, *c);
        }
        let label = if memory.tenants.contains(tenant.as_str()) {
            tenant.to_string()
        } else if memory.tenants.len() < METRIC_TENANTS {
            memory.tenants.insert(tenant.to_string());
            tenant.to_string()
        } else {
            "_other".to_string()
        };
        metrics::counter!("agentbus_usage_msgs_in_total", "tenant" => label.clone())
            .increment(delta.msgs_in);
        metrics::counter!("agentbus_usage_bytes_in_total", "tenant" => label.clone())
            .increment(delta.bytes_in);
        metrics::counter!("agentbus_usage_msgs_out_total", "tenant" => label.clone())
            .increment(delta.msgs_out);
        metrics::counter!("agentbus_usage_bytes_out_total", "tenant" => label)
            .increment(delta.bytes_out);
    }

    async fn apply_usage(
        &self,
        tenant: &TenantId,
        observations: &[(&String, Counters)],
        now: u64,
    ) -> Result<bool, ApiError> {
        let books = self.books(tenant).await?;
        for _ in 0..CAS_ATTEMPTS {
            let (mut ledger, rev) = match books.usage_ledger(tenant).await? {
                Some((l, r)) => (l, Some(r)),
                None => (usage::Ledger::default(), None),
            };
            let before = ledger.clone();
            for (server, c) in observations {
                ledger.observe(server, *c, now);
            }
            // Closed hours leave the ledger only after their archive is written.
            for hour in ledger.expired_hours(now) {
                books.archive_usage_hour(tenant, &hour).await?;
                ledger.remove_hour(hour.hour_ms);
            }
            if ledger == before {
                return Ok(false);
            }
            if books.write_usage_ledger(tenant, &ledger, rev).await? {
                return Ok(true);
            }
        }
        Err(ApiError::new(
            ErrorCode::Conflict,
            "usage ledger kept changing",
        ))
    }

    /// Reads the servers' counters every `police_every` (policing) and
    /// records usage every `usage_every`, until `shutdown`.
    pub(crate) async fn run_usage(self: std::sync::Arc<Self>, shutdown: super::shutdown::Shutdown) {
        let mut tick = tokio::time::interval(self.config.police_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_usage: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.wait() => {
                    self.release_police_lease().await;
                    return;
                }
                _ = tick.tick() => {}
            }
            let (seen, tenants) = match self.collect_stats().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the servers' counters failed");
                    continue;
                }
            };
            let now = tenant_bus::envelope::now_ms();
            self.police(&seen, &tenants, now).await;
            if last_usage.is_none_or(|t| t.elapsed() >= self.config.usage_every) {
                self.record_usage(&seen, &tenants).await;
                last_usage = Some(tokio::time::Instant::now());
            }
        }
    }

    /// `usage.<tenant>.get`.
    pub(super) async fn usage_rows(
        &self,
        tenant: &TenantId,
        req: UsageRequest,
    ) -> Result<Vec<usage::UsageRow>, ApiError> {
        if req.to_ms <= req.from_ms {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                "the range is empty (from must be before to)",
            ));
        }
        self.tenant(tenant).await?;
        let mut hours: BTreeMap<u64, Counters> = BTreeMap::new();
        let mut units: BTreeMap<u64, BTreeMap<String, u64>> = BTreeMap::new();
        let books = self.books(tenant).await?;
        if let Some((ledger, _)) = books.usage_ledger(tenant).await? {
            hours.extend(ledger.hours);
            units.extend(ledger.units);
        }
        let oldest_live = hours
            .keys()
            .chain(units.keys())
            .min()
            .copied()
            .unwrap_or(u64::MAX);
        if req.from_ms < oldest_live {
            for archived in books.archived_usage(tenant).await? {
                // The ledger wins for an hour in both (archived, then not yet
                // removed from the ledger).
                if !hours.contains_key(&archived.hour_ms) && !units.contains_key(&archived.hour_ms)
                {
                    hours.insert(archived.hour_ms, archived.counters);
                    if !archived.units.is_empty() {
                        units.insert(archived.hour_ms, archived.units);
                    }
                }
            }
        }
        Ok(usage::rows(
            tenant,
            &hours,
            &units,
            req.from_ms,
            req.to_ms,
            req.by,
        ))
    }

    /// `agentbus.runtime.v1.usage`: a runtime host's metered units (see
    /// [`crate::meter`]). Each tenant of a batch is claimed once
    /// (`rt.<host>.<seq>.<tenant>`, 24 h) before its units are added, so a
    /// batch sent again is never counted twice.
    pub(super) async fn runtime_usage(&self, body: &[u8]) -> Result<Value, ApiError> {
        let bad = |m: String| ApiError::new(ErrorCode::InvalidInput, m);
        let batch: crate::meter::RuntimeUsage =
            serde_json::from_slice(body).map_err(|e| bad(format!("invalid batch: {e}")))?;
        let host_ok = !batch.host.is_empty()
            && batch.host.len() <= 64
            && batch
                .host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !host_ok {
            return Err(bad(format!("host {:?} is not a token", batch.host)));
        }
        let mut answer = crate::meter::RuntimeUsageAnswer::default();
        let now = tenant_bus::envelope::now_ms();
        for (tenant, units) in batch.tenants {
            let Ok(id) = TenantId::new(&tenant) else {
                answer.skipped += 1;
                continue;
            };
            let Ok(record) = self.tenant(&id).await else {
                answer.skipped += 1;
                continue;
            };
            let claim = format!("rt.{}.{}.{id}", batch.host, batch.seq);
            if !self.store.claim_report(&claim).await? {
                answer.duplicates += 1;
                continue;
            }
            // The tenant's budgets on these units count them first (after
            // the fact: nothing is refused); taken back if the ledger cannot
            // be written, as the claim is.
            let mut charges = Vec::new();
            let mut revoke = None;
            for (unit, amount) in &units {
                if !usage::valid_unit(unit) {
                    continue;
                }
                match self
                    .charge_after_the_fact(&record, unit, *amount, now)
                    .await
                {
                    Ok((c, r)) => {
                        charges.extend(c);
                        revoke = revoke.or(r);
                    }
                    Err(e) => {
                        self.uncharge(&charges).await;
                        self.store.unclaim_report(&claim).await;
                        return Err(ApiError::new(ErrorCode::Unavailable, e.message));
                    }
                }
            }
            let mut skipped = 0;
            let added = async {
                let books = self.books(&id).await?;
                for _ in 0..CAS_ATTEMPTS {
                    let (mut ledger, rev) = match books.usage_ledger(&id).await? {
                        Some((l, r)) => (l, Some(r)),
                        None => (usage::Ledger::default(), None),
                    };
                    skipped = 0;
                    for (unit, amount) in &units {
                        if !usage::valid_unit(unit) || !ledger.add_unit(unit, *amount, now) {
                            skipped += 1;
                        }
                    }
                    if books.write_usage_ledger(&id, &ledger, rev).await? {
                        return Ok(());
                    }
                }
                Err(ApiError::new(
                    ErrorCode::Conflict,
                    "usage ledger kept changing",
                ))
            }
            .await;
            if let Err(e) = added {
                // Not added: the batch comes again and this tenant with it.
                self.uncharge(&charges).await;
                self.store.unclaim_report(&claim).await;
                return Err(ApiError::new(ErrorCode::Unavailable, e.message));
            }
            self.budget_alerts_after(&record, &charges).await;
            if let Some(pending) = revoke {
                self.budget_revoke(pending).await;
            }
            answer.added += 1;
            answer.skipped += skipped;
        }
        serde_json::to_value(answer).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
    }

    /// `agentbus.usage.v1.<account>`: an agent reports a custom unit. The
    /// server binds the subject's account to the reporting connection's
    /// account; the record must name it too. Counted once per idempotency key
    /// within 24 h.
    pub(super) async fn usage_report(
        &self,
        subject: &str,
        body: &[u8],
    ) -> (
        Result<Value, ApiError>,
        Option<super::budgets::PendingRevoke>,
    ) {
        let mut revoke = None;
        let result = self.usage_report_inner(subject, body, &mut revoke).await;
        (result, revoke)
    }

    async fn usage_report_inner(
        &self,
        subject: &str,
        body: &[u8],
        revoke: &mut Option<super::budgets::PendingRevoke>,
    ) -> Result<Value, ApiError> {
        let bad = |m: &str| ApiError::new(ErrorCode::InvalidInput, m.to_string());
        let account = subject
            .strip_prefix(crate::api::USAGE_REPORT_PREFIX)
            .and_then(|r| r.strip_prefix('.'))
            .ok_or_else(|| bad("bad usage subject"))?;
        let report: usage::UsageReport = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(ErrorCode::InvalidInput, format!("invalid report: {e}")))?;
        if !usage::valid_unit(&report.unit) {
            return Err(bad(
                "unit: 1 to 64 lowercase letters, digits, '.', '_' or '-'",
            ));
        }
        if report.idempotency_key.is_empty() || report.idempotency_key.len() > 256 {
            return Err(bad("idempotency_key: 1 to 256 bytes"));
        }
        let tenant = TenantId::new(&report.tenant)
            .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?;
        let record = self.tenant(&tenant).await?;
        if record.account != account {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "this account is not that tenant's",
            ));
        }
        // The key is hashed: any bytes, a fixed-size KV key.
        let digest = ring::digest::digest(&ring::digest::SHA256, report.idempotency_key.as_bytes());
        let claim = format!(
            "{tenant}.{}",
            data_encoding::HEXLOWER.encode(&digest.as_ref()[..16])
        );
        if !self.store.claim_report(&claim).await? {
            return serde_json::to_value(usage::UsageReportAnswer { counted: false })
                .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()));
        }
        let now = tenant_bus::envelope::now_ms();
        // Budgets on this unit first: a refused charge is not counted.
        let charges = match self
            .charge_budgets(&record, &report.unit, report.amount, now)
            .await
        {
            Ok(c) => c,
            Err(refusal) => {
                self.store.unclaim_report(&claim).await;
                *revoke = refusal.revoke;
                return Err(refusal.error);
            }
        };
        let added = async {
            let books = self.books(&tenant).await?;
            for _ in 0..CAS_ATTEMPTS {
                let (mut ledger, rev) = match books.usage_ledger(&tenant).await? {
                    Some((l, r)) => (l, Some(r)),
                    None => (usage::Ledger::default(), None),
                };
                if !ledger.add_unit(&report.unit, report.amount, now) {
                    return Err(ApiError::new(
                        ErrorCode::Refused,
                        format!("at most {} units per tenant per hour", usage::MAX_UNITS),
                    ));
                }
                if books.write_usage_ledger(&tenant, &ledger, rev).await? {
                    return Ok(());
                }
            }
            Err(ApiError::new(
                ErrorCode::Conflict,
                "usage ledger kept changing",
            ))
        }
        .await;
        if let Err(e) = added {
            // Not counted: the same key may be sent again.
            self.uncharge(&charges).await;
            self.store.unclaim_report(&claim).await;
            return Err(e);
        }
        self.budget_alerts_after(&record, &charges).await;
        serde_json::to_value(usage::UsageReportAnswer { counted: true })
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
    }
}
