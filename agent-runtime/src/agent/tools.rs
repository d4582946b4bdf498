//! Tools: a per-tenant registry of tool implementations, per-tool rate limits, and
//! the per-task call budget.
//!
//! Whether a tenant may use a tool, and how often, is the tenant's configuration
//! in the registry ([`ToolSettings`](crate::registry::ToolSettings): an enabled
//! flag and an optional rate limit); what the tool *does* is code registered here,
//! per tenant, with [`ToolRegistry::register`]. [`Agent::call_tool`](super::Agent::call_tool)
//! checks, in order: the tenant is active, the agent holds `tool:<name>`, the tool
//! is enabled for the tenant and implemented, the task's [`ToolBudget`] has a call
//! left (`max_tool_calls_per_task`), the tool's rate window has room; then runs it.
//!
//! Budgets and rate windows are taken atomically (a `fetch_update` / one lock held
//! across check and increment), so N concurrent calls against a cap of M admit
//! exactly min(N, M): no check-then-act.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tenant_bus::ids::validate_slug;
use tenant_bus::TenantId;

use crate::registry::RateLimit;

/// The boxed future a tool returns.
pub type ToolFuture = Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send + 'static>>;

/// A tool implementation: input bytes in, output bytes (or a failure text) out.
pub trait Tool: Send + Sync + 'static {
    /// Runs the tool.
    fn call(&self, input: Bytes) -> ToolFuture;
}

impl<F, Fut> Tool for F
where
    F: Fn(Bytes) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Bytes, String>> + Send + 'static,
{
    fn call(&self, input: Bytes) -> ToolFuture {
        Box::pin(self(input))
    }
}

/// Why a tool call was refused (before running) by the tool layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ToolRefusal {
    Unknown,
    RateLimited,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start_ms: u64,
    count: u32,
}

/// One tenant's tool implementations and rate windows.
pub struct ToolRegistry {
    tenant: TenantId,
    tools: RwLock<HashMap<String, Arc<dyn Tool>>>,
    windows: Mutex<HashMap<String, Window>>,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .tools
            .read()
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("ToolRegistry")
            .field("tenant", &self.tenant)
            .field("tools", &names)
            .finish()
    }
}

impl ToolRegistry {
    /// An empty registry for `tenant`.
    pub fn new(tenant: TenantId) -> Self {
        Self {
            tenant,
            tools: RwLock::new(HashMap::new()),
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// The tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// Registers (or replaces) the implementation of `name` (a slug).
    pub fn register(&self, name: &str, tool: impl Tool) -> Result<(), tenant_bus::ids::IdError> {
        validate_slug(name).map_err(|k| tenant_bus::Error::new(k, format!("tool {name:?}")))?;
        if let Ok(mut tools) = self.tools.write() {
            tools.insert(name.to_string(), Arc::new(tool));
        }
        Ok(())
    }

    /// Removes the implementation of `name`.
    pub fn unregister(&self, name: &str) {
        if let Ok(mut tools) = self.tools.write() {
            tools.remove(name);
        }
    }

    /// Whether `name` is implemented.
    pub fn contains(&self, name: &str) -> bool {
        self.tools
            .read()
            .map(|t| t.contains_key(name))
            .unwrap_or(false)
    }

    pub(crate) fn implementation(&self, name: &str) -> Result<Arc<dyn Tool>, ToolRefusal> {
        self.tools
            .read()
            .ok()
            .and_then(|t| t.get(name).cloned())
            .ok_or(ToolRefusal::Unknown)
    }

    /// Takes one call from `name`'s rate window (fixed windows of `per_ms`).
    pub(crate) fn take_rate(
        &self,
        name: &str,
        limit: RateLimit,
        now_ms: u64,
    ) -> Result<(), ToolRefusal> {
        let Ok(mut windows) = self.windows.lock() else {
            return Err(ToolRefusal::RateLimited);
        };
        let per = limit.per_ms.max(1);
        let start = now_ms - now_ms % per;
        let w = windows.entry(name.to_string()).or_insert(Window {
            start_ms: start,
            count: 0,
        });
        if w.start_ms != start {
            *w = Window {
                start_ms: start,
                count: 0,
            };
        }
        if w.count >= limit.calls {
            return Err(ToolRefusal::RateLimited);
        }
        w.count += 1;
        Ok(())
    }
}

/// The tool calls left to one task: at most `max_tool_calls_per_task`.
#[derive(Debug)]
pub struct ToolBudget {
    max: u64,
    used: AtomicU64,
}

impl ToolBudget {
    /// A budget of `max` calls.
    pub fn new(max: u64) -> Self {
        Self {
            max,
            used: AtomicU64::new(0),
        }
    }

    /// Takes one call, atomically; `false` if none is left.
    pub fn take(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u < self.max).then_some(u + 1)
            })
            .is_ok()
    }

    /// Calls taken so far.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The cap.
    pub fn max(&self) -> u64 {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_exact_under_contention() {
        let budget = Arc::new(ToolBudget::new(3));
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let b = budget.clone();
                std::thread::spawn(move || b.take())
            })
            .collect();
        let ok = handles
            .into_iter()
            .filter(|_| true)
            .map(|h| h.join().unwrap())
            .filter(|x| *x)
            .count();
        assert_eq!(ok, 3);
        assert_eq!(budget.used(), 3);
    }

    #[test]
    fn rate_window() {
        let r = ToolRegistry::new(TenantId::new("a").unwrap());
        let limit = RateLimit {
            calls: 2,
            per_ms: 1000,
        };
        assert!(r.take_rate("s", limit, 1000).is_ok());
        assert!(r.take_rate("s", limit, 1500).is_ok());
        assert_eq!(r.take_rate("s", limit, 1999), Err(ToolRefusal::RateLimited));
        assert!(r.take_rate("s", limit, 2000).is_ok());
    }
}
