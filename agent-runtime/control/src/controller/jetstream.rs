//! Honest JetStream reservations. A tenant account's JetStream limits
//! (`js_max_memory`, `js_max_storage`) are reservations: each server that
//! loads the account sets that much aside, and refuses JetStream to an account
//! once its reservations would pass the server's `max_memory_store` /
//! `max_file_store`. Servers load accounts lazily (at the first connection),
//! so without a check a tenant is created "successfully" and its agents fail
//! later with "JetStream resource does not exist".
//!
//! So the controller keeps the sum itself, from its own records: creating a
//! tenant, or raising its JetStream limits (a tier change or an override),
//! is refused unless the sum over every tenant, with the change, fits the
//! smallest server's JetStream limits as the servers report them
//! (`$SYS.REQ.SERVER.PING.JSZ`). A tenant may instead be created without
//! JetStream (`no_jetstream`: every JetStream limit 0), which says so.
//!
//! Exact per controller instance (one lock around check and write); two
//! instances creating tenants at the same moment can each pass the check and
//! over-commit by one tenant's reservation, which `agentbus status` then
//! shows (reserved above available) and the server enforces at load.

use std::time::Duration;

use serde_json::Value;
use tenant_bus::region::Region;
use tenant_bus::TenantId;

use super::Controller;
use crate::api::{ApiError, ErrorCode, JetStreamCapacity, ServerJetStream};
use crate::tiers::Quotas;

/// How long the servers get to answer the JSZ ping.
const JSZ_WINDOW: Duration = Duration::from_millis(500);
/// How long the servers' limits are reused.
const LIMITS_TTL: Duration = Duration::from_secs(30);

fn mib(v: u64) -> String {
    format!("{:.1} MiB", v as f64 / (1024.0 * 1024.0))
}

impl Controller {
    /// Every server's JetStream limits and what the tenants' records reserve.
    /// The servers' limits are cached for [`LIMITS_TTL`] (they change only
    /// with a server's config); the tenants' sum is read fresh each time.
    pub(super) async fn jetstream_capacity(
        &self,
        except: Option<&TenantId>,
    ) -> Result<JetStreamCapacity, ApiError> {
        let cached = self
            .js_limits
            .lock()
            .ok()
            .and_then(|c| c.clone())
            .filter(|(at, _)| at.elapsed() < LIMITS_TTL);
        let servers = match cached {
            Some((_, servers)) => servers,
            None => {
                let servers = self.ping_jsz().await?;
                if !servers.is_empty() {
                    if let Ok(mut c) = self.js_limits.lock() {
                        *c = Some((std::time::Instant::now(), servers.clone()));
                    }
                }
                servers
            }
        };
        self.with_tenant_sums(servers, except).await
    }

    /// Asks every server for its JetStream limits; stops early once as many
    /// answered as last time (plus a short wait for one more).
    async fn ping_jsz(&self) -> Result<Vec<ServerJetStream>, ApiError> {
        let answers = self
            .ping_servers(
                "$SYS.REQ.SERVER.PING.JSZ",
                "{}".to_string(),
                JSZ_WINDOW,
                Some(&self.js_servers_seen),
                "JetStream limits",
            )
            .await?;
        let mut servers = Vec::new();
        for answer in answers {
            let v = &answer.value;
            let n = |p: &str| v.pointer(p).and_then(Value::as_i64).unwrap_or(0);
            let Some(name) = v.pointer("/server/name").and_then(Value::as_str) else {
                continue;
            };
            if v.pointer("/data/config").is_none() {
                continue; // JetStream off on that server
            }
            servers.push(ServerJetStream {
                server: name.to_string(),
                max_memory: n("/data/config/max_memory"),
                max_storage: n("/data/config/max_storage"),
                server_reserved_memory: n("/data/reserved_memory"),
                server_reserved_storage: n("/data/reserved_storage"),
                tags: super::ping::server_tags(v).map(str::to_string).collect(),
            });
        }
        servers.sort_by(|a, b| a.server.cmp(&b.server));
        Ok(servers)
    }

    async fn with_tenant_sums(
        &self,
        servers: Vec<ServerJetStream>,
        except: Option<&TenantId>,
    ) -> Result<JetStreamCapacity, ApiError> {
        let (mut memory, mut storage) = (0u64, 0u64);
        for r in self
            .store
            .registry
            .list()
            .await
            .map_err(crate::store::registry_error)?
        {
            if r.deleting || Some(&r.id) == except {
                continue;
            }
            let q = r.quotas();
            memory = memory.saturating_add(q.js_max_memory);
            storage = storage.saturating_add(q.js_max_storage);
        }
        Ok(JetStreamCapacity {
            tenants_memory: memory,
            tenants_storage: storage,
            servers,
        })
    }

    /// Refuses `quotas` for tenant `id` (new, or replacing its current ones)
    /// unless every tenant's reservations together fit every server.
    pub(super) async fn check_jetstream_reservation(
        &self,
        id: &TenantId,
        quotas: &Quotas,
    ) -> Result<(), ApiError> {
        if quotas.js_max_memory == 0 && quotas.js_max_storage == 0 {
            return Ok(());
        }
        let cap = self.jetstream_capacity(Some(id)).await?;
        if cap.servers.is_empty() {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "no server reported its JetStream limits; retry, or create the tenant without JetStream",
            ));
        }
        let memory = cap.tenants_memory.saturating_add(quotas.js_max_memory);
        let storage = cap.tenants_storage.saturating_add(quotas.js_max_storage);
        for s in &cap.servers {
            let max_m = u64::try_from(s.max_memory).unwrap_or(0);
            let max_s = u64::try_from(s.max_storage).unwrap_or(0);
            if memory > max_m || storage > max_s {
                return Err(ApiError::new(
                    ErrorCode::Refused,
                    format!(
                        "JetStream reservation does not fit: tenant {id} needs {} memory and {} storage; with every other tenant's that is {} and {}, but server {} allows {} and {} (max_memory_store, max_file_store). Raise the servers' limits, choose a smaller tier or override, or create the tenant without JetStream",
                        mib(quotas.js_max_memory),
                        mib(quotas.js_max_storage),
                        mib(memory),
                        mib(storage),
                        s.server,
                        mib(max_m),
                        mib(max_s)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Refuses `region` unless at least as many JetStream servers tagged
    /// `region:<name>` answer as the deployment keeps replicas (its streams
    /// could not be placed otherwise). When fewer servers answered than the
    /// deployment lists, a missing region may be a region that is down: that
    /// is reported as unavailable, not as bad input.
    pub(super) async fn check_region(&self, region: &Region) -> Result<(), ApiError> {
        let cap = self.jetstream_capacity(None).await?;
        let in_region = cap
            .servers
            .iter()
            .filter(|s| Region::of_tags(s.tags.iter().map(String::as_str)).contains(region))
            .count();
        if in_region >= self.config.replicas {
            return Ok(());
        }
        let mut known: Vec<String> = cap
            .servers
            .iter()
            .flat_map(|s| Region::of_tags(s.tags.iter().map(String::as_str)))
            .map(|r| r.to_string())
            .collect();
        known.sort();
        known.dedup();
        let listed = self
            .urls
            .split(',')
            .filter(|u| !u.trim().is_empty())
            .count();
        let code = if cap.servers.len() < listed {
            ErrorCode::Unavailable
        } else {
            ErrorCode::InvalidInput
        };
        Err(ApiError::new(
            code,
            format!(
                "region {region}: {in_region} JetStream server(s) tagged {} answered, the deployment keeps {} replica(s); regions answering: {}; {} of {} listed servers answered",
                region.tag(),
                self.config.replicas,
                if known.is_empty() { "none".to_string() } else { known.join(", ") },
                cap.servers.len(),
                listed
            ),
        ))
    }
}
