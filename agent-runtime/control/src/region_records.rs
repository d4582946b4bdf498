//! Create-only records of where something lives: a key (an audit log, a
//! tenant's books) names a region, or the shared place (an empty value).
//!
//! Written once with `kv.create` (the first writer wins, across every
//! controller instance), never changed or deleted, so each instance caches
//! what it has read. Used by the audit log homes ([`crate::audit::home`])
//! and the books' homes ([`crate::books`]), in the homes bucket.

use std::collections::HashMap;

use async_nats::jetstream::kv;
use tenant_bus::region::Region;

use crate::api::{ApiError, ErrorCode};
use crate::store::unavailable;

/// The records of one kind in one bucket, with this instance's cache.
pub(crate) struct RegionRecords {
    kv: kv::Store,
    /// What a record is, for messages ("an audit log home").
    what: &'static str,
    /// Records cached at most (then forgotten and read again).
    max_cached: usize,
    known: std::sync::Mutex<HashMap<String, Option<Region>>>,
}

/// A record's value: a region, or empty for the shared place.
fn region_of(value: &[u8], what: &str) -> Result<Option<Region>, ApiError> {
    let text = std::str::from_utf8(value)
        .map_err(|_| ApiError::new(ErrorCode::Internal, format!("{what} is not UTF-8")))?;
    if text.is_empty() {
        return Ok(None);
    }
    Region::new(text)
        .map(Some)
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("{what}: {e}")))
}

impl RegionRecords {
    pub(crate) fn new(kv: kv::Store, what: &'static str, max_cached: usize) -> Self {
        Self {
            kv,
            what,
            max_cached,
            known: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn remember(&self, key: &str, region: Option<&Region>) {
        if let Ok(mut known) = self.known.lock() {
            if known.len() >= self.max_cached {
                known.clear();
            }
            known.insert(key.to_string(), region.cloned());
        }
    }

    /// The record of `key`, if any: `Some(None)` for the shared place.
    pub(crate) async fn recorded(&self, key: &str) -> Result<Option<Option<Region>>, ApiError> {
        if let Some(r) = self.known.lock().ok().and_then(|k| k.get(key).cloned()) {
            return Ok(Some(r));
        }
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| unavailable(&format!("reading {}", self.what), e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let region = region_of(&e.value, self.what)?;
                self.remember(key, region.as_ref());
                Ok(Some(region))
            }
            _ => Ok(None),
        }
    }

    /// Writes `key`'s record unless it has one; the record it has
    /// afterwards (another writer's, if it came first).
    pub(crate) async fn claim(
        &self,
        key: &str,
        region: Option<&Region>,
    ) -> Result<Option<Region>, ApiError> {
        let value = region.map(|r| r.to_string()).unwrap_or_default();
        match self.kv.create(key, value.into_bytes().into()).await {
            Ok(_) => {
                self.remember(key, region);
                Ok(region.cloned())
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                match self.recorded(key).await? {
                    Some(r) => Ok(r),
                    None => Err(ApiError::new(
                        ErrorCode::Unavailable,
                        format!("{} of {key} exists but cannot be read", self.what),
                    )),
                }
            }
            Err(e) => Err(unavailable(&format!("writing {}", self.what), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back_as_a_region_or_the_shared_place() {
        let eu = Region::new("eu").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(region_of(b"eu", "x").ok(), Some(Some(eu)));
        assert_eq!(region_of(b"", "x").ok(), Some(None));
        assert!(region_of(b"not a region!", "x").is_err());
        assert!(region_of(&[0xff], "x").is_err());
    }
}
