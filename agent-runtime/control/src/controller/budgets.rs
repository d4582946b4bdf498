//! Budgets in the controller: the admin API (`budget.<tenant>.set|list|delete`),
//! the charge every usage report makes against the tenant's budgets on its
//! unit, and the alerts. The design and its bounds are in [`crate::budget`].

use std::sync::Arc;

use serde_json::Value;
use tenant_bus::{AgentId, TenantId};

use super::auth::Caller;
use super::police::system_caller;
use super::Controller;
use crate::api::{self, ApiError, ErrorCode};
use crate::books::Books;
use crate::budget::{self, Action, BudgetAlert, BudgetRef, BudgetSpec, BudgetView, Threshold};
use crate::registry::{Status, TenantRecord};

type Result<T> = std::result::Result<T, ApiError>;

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidInput, message)
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
}

/// One budget a report was charged against (taken back if the report fails
/// later).
#[derive(Debug, Clone)]
pub(super) struct Charge {
    /// The books holding the counter.
    books: Arc<Books>,
    spec: BudgetSpec,
    period: String,
    subject: String,
    delta: i64,
    /// The counter's total with this charge.
    total: i128,
}

/// A `revoke` budget refused a charge: the tenant is suspended once the
/// refusal has been answered (suspending first would close the reporting
/// agent's connection before its answer arrived).
#[derive(Debug, Clone)]
pub(super) struct PendingRevoke {
    record: TenantRecord,
    spec: BudgetSpec,
    period: String,
}

/// A refused or failed charge.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) error: ApiError,
    pub(super) revoke: Option<PendingRevoke>,
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            revoke: None,
        }
    }
}

/// The sender of alerts.
const ALERT_SENDER: &str = "agentbus-controller";

impl Controller {
    /// `agentbus.admin.v1.budget.<tenant>.<verb>`.
    pub(super) async fn budget_api(
        &self,
        _caller: &Caller,
        tenant: &TenantId,
        verb: &str,
        body: &[u8],
    ) -> Result<Value> {
        match verb {
            "set" => {
                let spec: BudgetSpec = serde_json::from_slice(body)
                    .map_err(|e| bad(format!("invalid budget: {e}")))?;
                spec.validate().map_err(|e| bad(e.to_string()))?;
                self.tenant(tenant).await?;
                let _guard = self.locks.lock(tenant.as_str()).await;
                let books = self.books(tenant).await?;
                let existing = books.budgets(tenant).await?;
                if !existing.iter().any(|b| b.name == spec.name)
                    && existing.len() >= budget::MAX_BUDGETS
                {
                    return Err(ApiError::new(
                        ErrorCode::Refused,
                        format!("at most {} budgets per tenant", budget::MAX_BUDGETS),
                    ));
                }
                books.put_budget(tenant, &spec).await?;
                to_json(&self.budget_view(tenant, spec).await?)
            }
            "list" => {
                self.tenant(tenant).await?;
                let mut out = Vec::new();
                for spec in self.books(tenant).await?.budgets(tenant).await? {
                    out.push(self.budget_view(tenant, spec).await?);
                }
                to_json(&out)
            }
            "delete" => {
                let r: BudgetRef = serde_json::from_slice(body)
                    .map_err(|e| bad(format!("invalid request: {e}")))?;
                if !budget::valid_name(&r.name) {
                    return Err(bad(format!("budget name {:?} is not valid", r.name)));
                }
                self.tenant(tenant).await?;
                if !self
                    .books(tenant)
                    .await?
                    .delete_budget(tenant, &r.name)
                    .await?
                {
                    return Err(ApiError::new(
                        ErrorCode::NotFound,
                        format!("budget {tenant}/{}", r.name),
                    ));
                }
                to_json(&serde_json::json!({ "tenant": tenant, "name": r.name, "deleted": true }))
            }
            other => Err(bad(format!("unknown budget verb {other:?}"))),
        }
    }

    /// A budget with the current period's spending.
    pub(super) async fn budget_view(
        &self,
        tenant: &TenantId,
        spec: BudgetSpec,
    ) -> Result<BudgetView> {
        let now = tenant_bus::envelope::now_ms();
        let (period, _, end) = budget::period_of(spec.period, now);
        let books = self.books(tenant).await?;
        let total = books
            .budget_total(&books.counter_subject(tenant.as_str(), &spec.name, &period))
            .await?;
        let spent = u64::try_from(total.max(0)).unwrap_or(u64::MAX);
        Ok(BudgetView {
            tenant: tenant.to_string(),
            remaining: spec.hard.saturating_sub(spent),
            spec,
            period_id: period,
            period_end: crate::usage::rfc3339(end),
            spent,
        })
    }

    /// Charges `amount` of `unit` against every budget of the tenant on that
    /// unit, all or nothing: if one refuses, the charges already made are
    /// taken back and the report is refused with
    /// [`ErrorCode::BudgetExceeded`]. An outage is [`ErrorCode::Unavailable`]
    /// (the charge is then not made).
    pub(super) async fn charge_budgets(
        &self,
        record: &TenantRecord,
        unit: &str,
        amount: u64,
        now: u64,
    ) -> std::result::Result<Vec<Charge>, Refusal> {
        let Some((books, specs, delta)) = self.budgets_on(record, unit, amount).await? else {
            return Ok(Vec::new());
        };
        let mut done: Vec<Charge> = Vec::new();
        for spec in specs {
            let (period, _, end) = budget::period_of(spec.period, now);
            let charge = match self
                .charge(&books, record, spec.clone(), period.clone(), delta)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    self.uncharge(&done).await;
                    return Err(e.into());
                }
            };
            let total = charge.total;
            done.push(charge);
            if total <= i128::from(spec.hard) {
                continue;
            }
            // Over the cap: what the action says.
            let retry_at = match spec.action {
                Action::Warn => None,
                Action::Throttle => match self
                    .throttle_slot(&books, record, &spec, &period, now)
                    .await
                {
                    Ok(slot) => slot,
                    Err(e) => {
                        self.uncharge(&done).await;
                        return Err(e.into());
                    }
                },
                Action::Block | Action::Revoke => Some(end),
            };
            let Some(retry_at) = retry_at else { continue };
            self.uncharge(&done).await;
            let before = total - i128::from(delta);
            self.budget_alert(&books, record, &spec, &period, Threshold::Hard, before, now)
                .await;
            let revoke = (spec.action == Action::Revoke).then(|| PendingRevoke {
                record: record.clone(),
                spec: spec.clone(),
                period: period.clone(),
            });
            metrics::counter!("agentbus_budget_refusals_total", "action" => spec.action.to_string())
                .increment(1);
            let error = ApiError::new(
                ErrorCode::BudgetExceeded,
                format!(
                    "budget {} ({}): {} of {} {} spent in {period}; this charge of {amount} does not fit; retry after {}",
                    spec.name,
                    spec.action,
                    before.max(0),
                    spec.hard,
                    spec.unit,
                    crate::usage::rfc3339(retry_at)
                ),
            );
            return Err(Refusal { error, revoke });
        }
        Ok(done)
    }

    /// Charges runtime-metered units ([`crate::meter`]: tasks run, tool
    /// calls), which are reported after the work was done, so nothing is
    /// refused: every budget of the tenant on `unit` counts `amount`, the
    /// alerts follow once the units are in the ledger
    /// ([`Self::budget_alerts_after`]), and a `revoke` budget now over its cap
    /// asks for the tenant's suspension (returned, to run after the batch is
    /// counted). `warn`, `throttle` and `block` only alert: there is no later
    /// charge of these units to refuse. An outage takes back the charges
    /// already made and is [`ErrorCode::Unavailable`] (the batch is sent
    /// again).
    pub(super) async fn charge_after_the_fact(
        &self,
        record: &TenantRecord,
        unit: &str,
        amount: u64,
        now: u64,
    ) -> Result<(Vec<Charge>, Option<PendingRevoke>)> {
        let Some((books, specs, delta)) = self.budgets_on(record, unit, amount).await? else {
            return Ok((Vec::new(), None));
        };
        let mut done: Vec<Charge> = Vec::new();
        let mut revoke = None;
        for spec in specs {
            let (period, _, _) = budget::period_of(spec.period, now);
            let charge = match self.charge(&books, record, spec, period, delta).await {
                Ok(c) => c,
                Err(e) => {
                    self.uncharge(&done).await;
                    return Err(e);
                }
            };
            if charge.total > i128::from(charge.spec.hard)
                && charge.spec.action == Action::Revoke
                && revoke.is_none()
            {
                revoke = Some(PendingRevoke {
                    record: record.clone(),
                    spec: charge.spec.clone(),
                    period: charge.period.clone(),
                });
            }
            done.push(charge);
        }
        Ok((done, revoke))
    }

    /// The tenant's books, its budgets on `unit` and `amount` as a counter
    /// increment; `None` when there is nothing to charge (no amount, or no
    /// budget on the unit).
    async fn budgets_on(
        &self,
        record: &TenantRecord,
        unit: &str,
        amount: u64,
    ) -> Result<Option<(Arc<Books>, Vec<BudgetSpec>, i64)>> {
        if amount == 0 {
            return Ok(None);
        }
        let books = self.books(&record.id).await?;
        let specs: Vec<BudgetSpec> = books
            .budgets(&record.id)
            .await?
            .into_iter()
            .filter(|b| b.unit == unit)
            .collect();
        if specs.is_empty() {
            return Ok(None);
        }
        let delta = i64::try_from(amount)
            .map_err(|_| bad(format!("amount {amount} is too large to charge")))?;
        Ok(Some((books, specs, delta)))
    }

    /// Adds `delta` to `spec`'s counter for `period`: the charge, with the
    /// counter's total including it.
    async fn charge(
        &self,
        books: &Arc<Books>,
        record: &TenantRecord,
        spec: BudgetSpec,
        period: String,
        delta: i64,
    ) -> Result<Charge> {
        let subject = books.counter_subject(record.id.as_str(), &spec.name, &period);
        let total = books.budget_incr(&subject, delta).await?;
        Ok(Charge {
            books: books.clone(),
            spec,
            period,
            subject,
            delta,
            total,
        })
    }

    /// Takes charges back (the report was refused or could not be counted).
    /// A failure leaves the counter too high, never too low (see
    /// [`crate::budget`]).
    pub(super) async fn uncharge(&self, charges: &[Charge]) {
        for c in charges {
            if let Err(e) = c.books.budget_incr(&c.subject, -c.delta).await {
                tracing::warn!(subject = %c.subject, error = %e, "budget charge not taken back: the total stays high by it");
            }
        }
    }

    /// After a report was counted: the alerts its charges earned.
    pub(super) async fn budget_alerts_after(&self, record: &TenantRecord, charges: &[Charge]) {
        let now = tenant_bus::envelope::now_ms();
        for c in charges {
            if let Some(soft) = c.spec.soft {
                if c.total >= i128::from(soft) {
                    self.budget_alert(
                        &c.books,
                        record,
                        &c.spec,
                        &c.period,
                        Threshold::Soft,
                        c.total,
                        now,
                    )
                    .await;
                }
            }
            if c.total >= i128::from(c.spec.hard) {
                self.budget_alert(
                    &c.books,
                    record,
                    &c.spec,
                    &c.period,
                    Threshold::Hard,
                    c.total,
                    now,
                )
                .await;
            }
        }
    }

    /// Under `throttle`, over the cap: `None` if this charge takes the
    /// period's next slot (one per interval, cluster-wide by compare-and-set),
    /// else when the next slot opens.
    async fn throttle_slot(
        &self,
        books: &Books,
        record: &TenantRecord,
        spec: &BudgetSpec,
        period: &str,
        now: u64,
    ) -> Result<Option<u64>> {
        let key = budget::throttle_key(record.id.as_str(), &spec.name, period);
        let interval = spec.throttle_interval_ms;
        // Bounded: each lost race means another charge took the slot.
        for _ in 0..crate::store::CAS_ATTEMPTS {
            match books.budget_mark(&key).await? {
                None => {
                    if books.claim_budget_mark(&key, now).await? {
                        return Ok(None);
                    }
                }
                Some((last, revision)) => {
                    let next = last.saturating_add(interval);
                    if now < next {
                        return Ok(Some(next));
                    }
                    if books.move_budget_mark(&key, now, revision).await? {
                        return Ok(None);
                    }
                }
            }
        }
        Ok(Some(now.saturating_add(interval)))
    }

    /// Publishes a threshold's alert once per period: the create-only claim
    /// decides which charge does it.
    #[allow(clippy::too_many_arguments)] // each is one fact of the alert
    async fn budget_alert(
        &self,
        books: &Books,
        record: &TenantRecord,
        spec: &BudgetSpec,
        period: &str,
        threshold: Threshold,
        spent: i128,
        now: u64,
    ) {
        let key = budget::alert_key(record.id.as_str(), &spec.name, period, threshold);
        match books.claim_budget_mark(&key, now).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(tenant = %record.id, budget = %spec.name, error = %e, "budget alert claim failed; not alerting");
                return;
            }
        }
        let alert = BudgetAlert {
            kind: "budget.threshold".to_string(),
            tenant: record.id.to_string(),
            budget: spec.name.clone(),
            unit: spec.unit.clone(),
            period: period.to_string(),
            threshold,
            limit: match threshold {
                Threshold::Soft => spec.soft.unwrap_or(spec.hard),
                Threshold::Hard => spec.hard,
            },
            spent: u64::try_from(spent.max(0)).unwrap_or(u64::MAX),
            action: spec.action,
            at_ms: now,
        };
        if let Err(e) = self.publish_budget_alert(record, &alert).await {
            tracing::warn!(tenant = %record.id, budget = %spec.name, error = %e.message, "budget alert not published");
        }
        let reason = format!(
            "budget {} reached its {} threshold {} {} in {period} (spent {}; action {})",
            alert.budget, threshold, alert.limit, alert.unit, alert.spent, alert.action
        );
        self.audit_system(&record.id, "budget.threshold", &reason)
            .await;
        metrics::counter!("agentbus_budget_alerts_total", "threshold" => threshold.to_string())
            .increment(1);
    }

    /// Seals the alert with the tenant's key for `tenant.<id>.events.budget`
    /// and publishes it on the platform's export, which the tenant's account
    /// imports onto that subject.
    async fn publish_budget_alert(&self, record: &TenantRecord, alert: &BudgetAlert) -> Result<()> {
        let internal =
            |e: &dyn std::fmt::Display| ApiError::new(ErrorCode::Internal, e.to_string());
        let keys = self.key_set(record, alert.at_ms).await?;
        let sender = AgentId::new(ALERT_SENDER).map_err(|e| internal(&e))?;
        let sealer = tenant_bus::envelope::Sealer::new(Arc::new(keys), Some(sender))
            .map_err(|e| internal(&e))?;
        let body = serde_json::to_vec(alert).map_err(|e| internal(&e))?;
        let local = format!("tenant.{}.{}", record.id, budget::ALERT_SUBJECT);
        let (_, sealed) = sealer.seal(&local, None, &body).map_err(|e| internal(&e))?;
        self.client
            .publish(api::events_subject(&record.account, "budget"), sealed)
            .await
            .map_err(|e| crate::store::unavailable("publishing a budget alert", e))?;
        self.client
            .flush()
            .await
            .map_err(|e| crate::store::unavailable("publishing a budget alert", e))
    }

    /// `revoke`: the tenant is suspended (its connections close; an admin
    /// activates it again).
    pub(super) async fn budget_revoke(&self, pending: PendingRevoke) {
        let PendingRevoke {
            record,
            spec,
            period,
        } = pending;
        let record = &record;
        if record.status == Status::Suspended {
            return;
        }
        let _guard = self.locks.lock(record.id.as_str()).await;
        match self
            .set_status(&system_caller("budget"), &record.id, Status::Suspended)
            .await
        {
            Ok(_) => {
                let reason = format!(
                    "budget {} (revoke) exhausted in {period}: tenant suspended",
                    spec.name
                );
                self.audit_system(&record.id, "budget.revoke", &reason)
                    .await;
            }
            Err(e) if e.code == ErrorCode::Refused => {} // already suspended
            Err(e) => {
                tracing::warn!(tenant = %record.id, budget = %spec.name, error = %e.message, "budget revoke: suspending failed")
            }
        }
    }

    /// Removes a deleted tenant's budgets and counters.
    pub(super) async fn purge_budgets(&self, tenant: &TenantId) -> Result<()> {
        let books = self.books(tenant).await?;
        for spec in books.budgets(tenant).await? {
            books.delete_budget(tenant, &spec.name).await?;
        }
        books.purge_budget_counters(tenant).await
    }

    /// Where `tenant`'s books live (see [`crate::books`]).
    pub(super) async fn books(&self, tenant: &TenantId) -> Result<Arc<Books>> {
        self.store.books.of(tenant).await
    }
}
