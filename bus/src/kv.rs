//! [`TenantKv`]: a tenant-scoped, sealed key-value store on the tenant's `STATE`
//! bucket (`ns.kv("sessions")`).
//!
//! # Where the data lives
//!
//! Every tenant has its own NATS account, and in it one JetStream KV bucket named
//! [`STATE_BUCKET`] (stream `KV_STATE`). Its name is the same in every account:
//! the account, not the name, keeps tenants apart, and the control plane's agent
//! allow-list (`agentbus_control::accounts::agent_publish_allow`) lets an agent
//! create, read, write and watch exactly that bucket of its own account. Because
//! agents may create it, [`TenantNamespace::kv`] opens the bucket or, if it does
//! not exist yet, creates it (file storage, history 1, [`KvOptions::replicas`]
//! replicas: pass the deployment's setting, e.g. the runtime's
//! `Registry::replicas`; 1 if unknown).
//!
//! Many named *stores* share the bucket. A store's entries are the bucket keys
//! `<store>.<key>`:
//! - a store name is a slug (the tenant-id rule of [`crate::ids`]: `a-z`, `0-9`,
//!   `-`, 1 to 63 bytes), so it never contains the separator `.`; the first token
//!   of a bucket key therefore always names the store, and store `a` key `b.c`
//!   (`a.b.c`) can never be store `a.b` key `c` (which cannot be named);
//! - a key is a concrete relative subject ([`crate::subject`]: `.`-separated
//!   tokens, none empty, no wildcards, at most 256 bytes and 16 tokens, not
//!   starting with `$` or `_INBOX`) whose tokens hold only the characters NATS
//!   KV keys allow (`A-Z a-z 0-9 - _ / =`).
//!
//! # Sealing
//!
//! A value is sealed with the tenant's current key by the namespace's
//! [`Sealer`](crate::envelope::Sealer) (the envelope of `docs/wire-format.md`),
//! and stored as `0x01 || u64 expires-at-ms || envelope`. The envelope's
//! authenticated data names the bucket, the store and the key (its "subject" is
//! `$KV.<bucket>.<store>.<key>`) and the expiry (its "reply" is
//! `exp=<ms>`), so a value copied to another key, store, bucket or tenant, or
//! with its expiry changed, fails to open: [`KvErrorKind::Tampered`]. The
//! envelope records the key version; opening uses the namespace's key set *at
//! that moment* ([`TenantNamespace::keys`]), so after a rotation old values stay
//! readable while their version is held, and are refused with
//! [`KvErrorKind::KeyVersion`] once it is dropped (write them again to re-seal
//! them under the current version).
//!
//! # Expiry
//!
//! [`KvOptions::ttl`] is a per-value expiry, checked on read: every write of the
//! store records `now + ttl` inside the sealed value; [`TenantKv::get`] reports
//! an expired value as [`KvErrorKind::NotFound`], [`TenantKv::keys`] leaves it
//! out, [`TenantKv::watch`] skips it and [`TenantKv::create`] may replace it.
//! The bucket is shared by every store and agents cannot change it, so a
//! per-store `max_age` is not available; expired values stay in the bucket
//! (unreadable) until overwritten or deleted.
//!
//! # Bounds
//!
//! Values are at most [`KvOptions::max_value_len`] bytes (refused with
//! [`KvErrorKind::TooLarge`] before sealing); [`TenantKv::keys`] returns at most
//! [`KvOptions::max_keys`] keys and waits at most [`KvOptions::timeout`] for each
//! entry; every server call is bounded by the JetStream request timeout. Stored
//! bytes are parsed without panicking: anything that does not open is a typed
//! error, also in a watch, which carries on after it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};

use crate::envelope::{now_ms, open};
use crate::error::Error;
use crate::ids::AgentId;
use crate::namespace::TenantNamespace;
use crate::verify::DropReason;

/// The tenant state bucket's name (in each tenant's own account). Equal to
/// `agentbus_control::accounts::STATE_BUCKET`, which the agent allow-list names.
pub const STATE_BUCKET: &str = "STATE";
/// The first byte of every stored value: this crate's value format.
pub const VALUE_FORMAT: u8 = 1;
/// Bytes before the envelope: format (1) and expiry (8).
pub const VALUE_PREFIX_LEN: usize = 9;
/// The default [`KvOptions::max_value_len`]: 256 KiB.
pub const DEFAULT_MAX_VALUE_LEN: usize = 256 * 1024;
/// The largest [`KvOptions::max_value_len`]: 8 MiB (a NATS message's limit).
pub const MAX_VALUE_LEN: usize = 8 * 1024 * 1024;
/// The default [`KvOptions::max_keys`].
pub const DEFAULT_MAX_KEYS: usize = 10_000;
/// The largest [`KvOptions::max_keys`].
pub const MAX_KEYS: usize = 1_000_000;
/// The longest key, in bytes (a relative subject's limit).
pub const MAX_KEY_LEN: usize = crate::subject::MAX_SUBJECT_LEN;

/// What went wrong with the state store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KvErrorKind {
    /// The store name is not a slug.
    InvalidStore,
    /// The key is not a valid key (see the [module docs](self)).
    InvalidKey,
    /// An option is out of range, or the bucket name is not valid.
    InvalidOptions,
    /// The value is longer than [`KvOptions::max_value_len`].
    TooLarge,
    /// No value: never written, deleted, or expired.
    NotFound,
    /// `create`: the key already holds a value.
    Exists,
    /// `update` / `delete_if`: the key's revision is not the one given.
    WrongRevision,
    /// The stored value does not open for this bucket, store and key: altered,
    /// copied from elsewhere, of another tenant, or not a sealed value at all.
    Tampered,
    /// The value was sealed with a key version the namespace no longer holds.
    KeyVersion,
    /// Sealing failed (see [`crate::envelope::SealErrorKind`]).
    Seal,
    /// The bucket could not be opened or created, or the server did not answer
    /// (also: no server of the store's region can hold it now).
    Unavailable,
    /// The bucket exists but is not kept in the store's region (created by
    /// someone else without, or with another, placement): refused, not used.
    OutsideRegion,
}

crate::kind_display!(KvErrorKind {
    InvalidStore => "invalid store name",
    InvalidKey => "invalid key",
    InvalidOptions => "invalid state store options",
    TooLarge => "value too large",
    NotFound => "no such key",
    Exists => "key already exists",
    WrongRevision => "wrong revision",
    Tampered => "stored value does not open for this key (tampered or moved)",
    KeyVersion => "value sealed with a key version no longer held",
    Seal => "sealing failed",
    Unavailable => "state store unavailable",
    OutsideRegion => "bucket kept outside the tenant's region",
});

/// A state store error.
pub type KvError = Error<KvErrorKind>;

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct KvOptions {
    bucket: String,
    replicas: Option<usize>,
    ttl: Option<Duration>,
    max_value_len: usize,
    max_keys: usize,
    timeout: Duration,
    region: Option<crate::region::Region>,
}

impl Default for KvOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl KvOptions {
    /// The defaults: bucket [`STATE_BUCKET`], 1 replica, no expiry, values up to
    /// [`DEFAULT_MAX_VALUE_LEN`], [`DEFAULT_MAX_KEYS`] keys, 5 s per entry read.
    pub fn new() -> Self {
        Self {
            bucket: STATE_BUCKET.to_string(),
            replicas: None,
            ttl: None,
            max_value_len: DEFAULT_MAX_VALUE_LEN,
            max_keys: DEFAULT_MAX_KEYS,
            timeout: Duration::from_secs(5),
            region: None,
        }
    }

    /// Keeps the bucket in `region` (data residency, see
    /// [`crate::region`]; default: the bundle's
    /// [`placement`](crate::TenantNamespace::placement)): created with that
    /// region's placement tag, and an existing bucket without it is refused
    /// ([`KvErrorKind::OutsideRegion`]).
    /// When none of the region's servers can hold it, opening fails
    /// ([`KvErrorKind::Unavailable`]); it is never placed elsewhere.
    pub fn region(mut self, region: crate::region::Region) -> Self {
        self.region = Some(region);
        self
    }

    /// Another bucket than [`STATE_BUCKET`]. With per-tenant accounts (operator
    /// mode) the default is right; the allow-list permits no other bucket. On a
    /// server where tenants share an account (tests, development), give each
    /// tenant its own bucket, or they share one (sealing still keeps them from
    /// reading each other's values, but not from overwriting them).
    pub fn bucket(mut self, bucket: impl Into<String>) -> Self {
        self.bucket = bucket.into();
        self
    }

    /// Replicas of the bucket if this call creates it (1 to 5; an existing
    /// bucket is used as it is). Default: the bundle's
    /// [`placement`](crate::TenantNamespace::placement), else 1.
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// Every value written through this store expires `ttl` after its write
    /// (per-value expiry checked on read, see the [module docs](self)).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The longest value accepted for writing (1 to [`MAX_VALUE_LEN`]).
    pub fn max_value_len(mut self, len: usize) -> Self {
        self.max_value_len = len;
        self
    }

    /// The most keys [`TenantKv::keys`] returns (1 to [`MAX_KEYS`]).
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// How long [`TenantKv::keys`] waits for each entry (at least 1 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn check(&self) -> Result<(), KvError> {
        let bucket_ok = !self.bucket.is_empty()
            && self.bucket.len() <= 64
            && self
                .bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let bad = if !bucket_ok {
            Some(format!("bucket {:?}", truncate(&self.bucket)))
        } else if self
            .replicas
            .is_some_and(|r| crate::region::check_replicas(r).is_err())
        {
            Some(format!("replicas {:?} (1 to 5)", self.replicas))
        } else if !(1..=MAX_VALUE_LEN).contains(&self.max_value_len) {
            Some(format!("max_value_len {}", self.max_value_len))
        } else if !(1..=MAX_KEYS).contains(&self.max_keys) {
            Some(format!("max_keys {}", self.max_keys))
        } else if self.timeout.is_zero() {
            Some("timeout 0".to_string())
        } else if self
            .ttl
            .is_some_and(|t| t.is_zero() || t.as_millis() > u128::from(u32::MAX) * 1000)
        {
            Some("ttl must be positive and below 136 years".to_string())
        } else {
            None
        };
        match bad {
            Some(detail) => Err(Error::new(KvErrorKind::InvalidOptions, detail)),
            None => Ok(()),
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Checks a store name: a slug, so it holds no `.` (see the [module docs](self)).
pub fn validate_store(store: &str) -> Result<(), KvError> {
    crate::ids::validate_slug(store).map_err(|kind| {
        Error::new(
            KvErrorKind::InvalidStore,
            format!("{:?}: {kind}", truncate(store)),
        )
    })
}

/// Checks a key: a concrete relative subject whose tokens hold only `A-Z a-z
/// 0-9 - _ / =`.
pub fn validate_key(key: &str) -> Result<(), KvError> {
    crate::subject::Subject::new(key)
        .map_err(|e| Error::with_source(KvErrorKind::InvalidKey, "", e))?;
    if let Some(bad) = key
        .bytes()
        .find(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/' | b'=')))
    {
        return Err(Error::new(
            KvErrorKind::InvalidKey,
            format!(
                "{:?}: character {:?} is not allowed in a key",
                truncate(key),
                char::from(bad)
            ),
        ));
    }
    Ok(())
}

/// A value read from the store, opened and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    /// The key (relative to the store).
    pub key: String,
    /// The plaintext value.
    pub value: Bytes,
    /// The bucket's revision of this value (for [`TenantKv::update`]).
    pub revision: u64,
    /// The key version that sealed it.
    pub key_version: u32,
    /// When it was sealed, ms since the Unix epoch (writer's clock).
    pub sealed_at_ms: u64,
    /// The agent that wrote it, if it identified itself.
    pub writer: Option<AgentId>,
    /// When it expires, ms since the Unix epoch, if it does.
    pub expires_at_ms: Option<u64>,
}

/// A change seen by [`TenantKv::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvChange {
    /// A value was written (opened and verified).
    Put(KvEntry),
    /// The key was deleted or purged.
    Delete {
        /// The key (relative to the store).
        key: String,
        /// The revision of the delete marker.
        revision: u64,
    },
}

/// One named store of the tenant's state bucket. Cheap to clone.
#[derive(Clone)]
pub struct TenantKv {
    inner: Arc<KvInner>,
}

struct KvInner {
    ns: TenantNamespace,
    store: String,
    /// `<store>.`
    prefix: String,
    kv: kv::Store,
    options: KvOptions,
}

impl std::fmt::Debug for TenantKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantKv")
            .field("tenant", self.inner.ns.tenant())
            .field("bucket", &self.inner.options.bucket)
            .field("store", &self.inner.store)
            .finish()
    }
}

impl TenantNamespace {
    /// The tenant's state store `store` on its `STATE` bucket, with default
    /// options (the bucket is created if absent; see [`crate::kv`]).
    pub async fn kv(&self, store: &str) -> Result<TenantKv, KvError> {
        TenantKv::open(self, store, KvOptions::new()).await
    }

    /// [`kv`](Self::kv) with `options`.
    pub async fn kv_with(&self, store: &str, options: KvOptions) -> Result<TenantKv, KvError> {
        TenantKv::open(self, store, options).await
    }
}

fn unavailable(
    what: impl Into<std::borrow::Cow<'static, str>>,
    e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
) -> KvError {
    Error::with_source(KvErrorKind::Unavailable, what, e)
}

impl TenantKv {
    /// Opens (or creates) the bucket and returns store `store` of it.
    pub async fn open(
        ns: &TenantNamespace,
        store: &str,
        options: KvOptions,
    ) -> Result<Self, KvError> {
        validate_store(store)?;
        options.check()?;
        let mut options = options;
        let placement = ns.placement();
        let replicas = options.replicas.or(placement.replicas).unwrap_or(1);
        if options.region.is_none() {
            options.region = placement.region.clone();
        }
        let js = jetstream::new(ns.nats().clone());
        let bucket = options.bucket.clone();
        let config = kv::Config {
            bucket: bucket.clone(),
            description: format!("agentbus state of tenant {}", ns.tenant()),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            placement: options.region.as_ref().map(|r| r.placement()),
            ..Default::default()
        };
        let (kv, _) = crate::open::bucket(&js, config).await.map_err(|e| {
            let region = options
                .region
                .as_ref()
                .map(|r| format!(" in region {r} (servers tagged {})", r.tag()))
                .unwrap_or_default();
            unavailable(
                format!("bucket {bucket} of tenant {}{region}", ns.tenant()),
                e,
            )
        })?;
        if let Some(region) = &options.region {
            // The lookup (or the create) just answered with the bucket's
            // configuration.
            if !region.holds(kv.stream.cached_info().config.placement.as_ref()) {
                return Err(Error::new(
                    KvErrorKind::OutsideRegion,
                    format!(
                        "bucket {bucket} of tenant {} is not placed in region {region}",
                        ns.tenant()
                    ),
                ));
            }
        }
        Ok(Self {
            inner: Arc::new(KvInner {
                ns: ns.clone(),
                store: store.to_string(),
                prefix: format!("{store}."),
                kv,
                options,
            }),
        })
    }

    /// The store's name.
    pub fn store(&self) -> &str {
        &self.inner.store
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.inner.options.bucket
    }

    /// The bucket key of `key`: `<store>.<key>` (validated).
    pub fn bucket_key(&self, key: &str) -> Result<String, KvError> {
        validate_key(key)?;
        Ok(format!("{}{key}", self.inner.prefix))
    }

    /// What the envelope authenticates as its subject: `$KV.<bucket>.<store>.<key>`.
    fn aad_subject(&self, bucket_key: &str) -> String {
        format!("$KV.{}.{bucket_key}", self.inner.options.bucket)
    }

    fn seal(&self, bucket_key: &str, value: &[u8]) -> Result<(Bytes, Option<u64>), KvError> {
        if value.len() > self.inner.options.max_value_len {
            return Err(Error::new(
                KvErrorKind::TooLarge,
                format!(
                    "{} bytes, at most {}",
                    value.len(),
                    self.inner.options.max_value_len
                ),
            ));
        }
        let expires =
            self.inner.options.ttl.map(|ttl| {
                now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
            });
        let exp = expires.unwrap_or(0);
        let (_, body) = self
            .inner
            .ns
            .sealer()
            .seal(
                &self.aad_subject(bucket_key),
                Some(&format!("exp={exp}")),
                value,
            )
            .map_err(|e| Error::with_source(KvErrorKind::Seal, "", e))?;
        let mut out = BytesMut::with_capacity(VALUE_PREFIX_LEN + body.len());
        out.extend_from_slice(&[VALUE_FORMAT]);
        out.extend_from_slice(&exp.to_be_bytes());
        out.extend_from_slice(&body);
        Ok((out.freeze(), expires))
    }

    /// Opens a stored value of `key` (relative) at `revision`. Expired values
    /// are `NotFound`.
    fn open_value(&self, key: &str, revision: u64, stored: &[u8]) -> Result<KvEntry, KvError> {
        let entry = self.open_any(key, revision, stored)?;
        match entry.expires_at_ms {
            Some(at) if at <= now_ms() => {
                Err(Error::new(KvErrorKind::NotFound, format!("{key}: expired")))
            }
            _ => Ok(entry),
        }
    }

    fn open_any(&self, key: &str, revision: u64, stored: &[u8]) -> Result<KvEntry, KvError> {
        let tampered = |why: &str| {
            Error::new(
                KvErrorKind::Tampered,
                format!("{}/{key} revision {revision}: {why}", self.inner.store),
            )
        };
        let (format, rest) = stored.split_first().ok_or_else(|| tampered("empty"))?;
        if *format != VALUE_FORMAT {
            return Err(tampered("unknown value format"));
        }
        let exp_bytes: [u8; 8] = rest
            .get(..8)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| tampered("truncated"))?;
        let exp = u64::from_be_bytes(exp_bytes);
        let body = rest.get(8..).ok_or_else(|| tampered("truncated"))?;
        let subject = self.aad_subject(&format!("{}{key}", self.inner.prefix));
        let keys = self.inner.ns.keys();
        let (stamp, plain) = open(&keys, &subject, Some(&format!("exp={exp}")), body).map_err(
            |reason| match reason {
                DropReason::UnknownKey => Error::new(
                    KvErrorKind::KeyVersion,
                    format!(
                        "{}/{key} revision {revision}: versions held {:?}",
                        self.inner.store,
                        keys.versions().collect::<Vec<_>>()
                    ),
                ),
                other => tampered(&other.to_string()),
            },
        )?;
        Ok(KvEntry {
            key: key.to_string(),
            value: plain,
            revision,
            key_version: stamp.key_version,
            sealed_at_ms: stamp.timestamp_ms,
            writer: stamp.sender,
            expires_at_ms: (exp != 0).then_some(exp),
        })
    }

    /// The current value of `key`, opened and verified.
    pub async fn get(&self, key: &str) -> Result<KvEntry, KvError> {
        let bucket_key = self.bucket_key(key)?;
        let entry = self
            .inner
            .kv
            .entry(bucket_key)
            .await
            .map_err(|e| unavailable(format!("get {key}"), e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                self.open_value(key, e.revision, &e.value)
            }
            _ => Err(Error::new(KvErrorKind::NotFound, key.to_string())),
        }
    }

    /// Writes `value` under `key`; returns the new revision.
    pub async fn put(&self, key: &str, value: impl AsRef<[u8]>) -> Result<u64, KvError> {
        let bucket_key = self.bucket_key(key)?;
        let (stored, _) = self.seal(&bucket_key, value.as_ref())?;
        crate::settle::while_unrouted(|| self.inner.kv.put(bucket_key.as_str(), stored.clone()))
            .await
            .map_err(|e| unavailable(format!("put {key}"), e))
    }

    /// Writes `value` under `key` only if it holds no value (never written,
    /// deleted or expired); [`KvErrorKind::Exists`] otherwise.
    pub async fn create(&self, key: &str, value: impl AsRef<[u8]>) -> Result<u64, KvError> {
        let bucket_key = self.bucket_key(key)?;
        let (stored, _) = self.seal(&bucket_key, value.as_ref())?;
        let created = crate::settle::while_unrouted(|| {
            self.inner.kv.create(bucket_key.as_str(), stored.clone())
        })
        .await;
        match created {
            Ok(revision) => Ok(revision),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                // An expired value counts as absent: replace exactly it (CAS).
                match self.get(key).await {
                    Err(g) if g.kind() == KvErrorKind::NotFound => {
                        let current = self
                            .inner
                            .kv
                            .entry(bucket_key.as_str())
                            .await
                            .map_err(|e| unavailable(format!("create {key}"), e))?;
                        let Some(current) = current else {
                            return Err(Error::new(KvErrorKind::Exists, key.to_string()));
                        };
                        self.inner
                            .kv
                            .update(bucket_key.as_str(), stored, current.revision)
                            .await
                            .map_err(|u| match u.kind() {
                                kv::UpdateErrorKind::WrongLastRevision => {
                                    Error::new(KvErrorKind::Exists, key.to_string())
                                }
                                _ => unavailable(format!("create {key}"), u),
                            })
                    }
                    _ => Err(Error::with_source(KvErrorKind::Exists, key.to_string(), e)),
                }
            }
            Err(e) => Err(unavailable(format!("create {key}"), e)),
        }
    }

    /// Writes `value` under `key` only if the key's latest revision is
    /// `revision` (compare-and-set); [`KvErrorKind::WrongRevision`] otherwise.
    pub async fn update(
        &self,
        key: &str,
        value: impl AsRef<[u8]>,
        revision: u64,
    ) -> Result<u64, KvError> {
        let bucket_key = self.bucket_key(key)?;
        let (stored, _) = self.seal(&bucket_key, value.as_ref())?;
        crate::settle::while_unrouted(|| {
            self.inner
                .kv
                .update(bucket_key.as_str(), stored.clone(), revision)
        })
        .await
        .map_err(|e| match e.kind() {
            kv::UpdateErrorKind::WrongLastRevision => Error::with_source(
                KvErrorKind::WrongRevision,
                format!("{key}: not at revision {revision}"),
                e,
            ),
            _ => unavailable(format!("update {key}"), e),
        })
    }

    /// Deletes `key` (a delete marker; idempotent).
    pub async fn delete(&self, key: &str) -> Result<(), KvError> {
        let bucket_key = self.bucket_key(key)?;
        crate::settle::while_unrouted(|| self.inner.kv.delete(bucket_key.as_str()))
            .await
            .map_err(|e| unavailable(format!("delete {key}"), e))
    }

    /// Deletes `key` only if its latest revision is `revision`.
    pub async fn delete_if(&self, key: &str, revision: u64) -> Result<(), KvError> {
        let bucket_key = self.bucket_key(key)?;
        crate::settle::while_unrouted(|| {
            self.inner
                .kv
                .delete_expect_revision(bucket_key.as_str(), Some(revision))
        })
        .await
        .map_err(|e| match e.kind() {
            kv::UpdateErrorKind::WrongLastRevision => Error::with_source(
                KvErrorKind::WrongRevision,
                format!("{key}: not at revision {revision}"),
                e,
            ),
            _ => unavailable(format!("delete {key}"), e),
        })
    }

    /// This store's keys holding an unexpired value, at most
    /// [`KvOptions::max_keys`] (more: [`KvErrorKind::TooLarge`]). Keys of other
    /// stores are not read. Values are not opened (a key whose value was
    /// tampered with is listed; `get` reports it).
    pub async fn keys(&self) -> Result<Vec<String>, KvError> {
        let options = &self.inner.options;
        let consumer = self
            .inner
            .kv
            .stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.inner.ns.nats().new_inbox(),
                description: Some("agentbus state store keys".to_string()),
                filter_subject: format!("$KV.{}.{}>", options.bucket, self.inner.prefix),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                replay_policy: consumer::ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("keys", e))?;
        let mut keys = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(keys);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable("keys", e))?;
        let subject_prefix = format!("$KV.{}.{}", options.bucket, self.inner.prefix);
        let now = now_ms();
        loop {
            let next = tokio::time::timeout(options.timeout, messages.next())
                .await
                .map_err(|_| Error::new(KvErrorKind::Unavailable, "keys: timed out"))?;
            let message = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(unavailable("keys", e)),
                None => return Err(Error::new(KvErrorKind::Unavailable, "keys: consumer ended")),
            };
            let pending = message
                .info()
                .map(|i| i.pending)
                .map_err(|e| unavailable("keys: message metadata", e))?;
            let is_put = message
                .headers
                .as_ref()
                .map(|h| h.get("KV-Operation").is_none() && h.get("Nats-Marker-Reason").is_none())
                .unwrap_or(true);
            let expired = message
                .payload
                .get(1..VALUE_PREFIX_LEN)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_be_bytes)
                .is_some_and(|exp| exp != 0 && exp <= now);
            if is_put && !expired {
                if let Some(key) = message.subject.as_str().strip_prefix(&subject_prefix) {
                    if keys.len() >= options.max_keys {
                        return Err(Error::new(
                            KvErrorKind::TooLarge,
                            format!("more than {} keys", options.max_keys),
                        ));
                    }
                    keys.push(key.to_string());
                }
            }
            if pending == 0 {
                return Ok(keys);
            }
        }
    }

    /// A stream of this store's changes from now on: each written value opened
    /// and verified (expired ones skipped), each delete, and, for a value that
    /// does not open, its typed error ([`KvErrorKind::Tampered`],
    /// [`KvErrorKind::KeyVersion`]) after which the stream carries on.
    pub async fn watch(&self) -> Result<KvWatch, KvError> {
        let inner = self
            .inner
            .kv
            .watch(format!("{}>", self.inner.prefix))
            .await
            .map_err(|e| unavailable("watch", e))?;
        Ok(KvWatch {
            store: self.clone(),
            inner,
        })
    }
}

/// The stream of [`TenantKv::watch`].
pub struct KvWatch {
    store: TenantKv,
    inner: kv::Watch,
}

impl std::fmt::Debug for KvWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvWatch")
            .field("store", &self.store)
            .finish()
    }
}

impl Stream for KvWatch {
    type Item = Result<KvChange, KvError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let entry = match self.inner.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Some(Err(unavailable("watch", e))))
                }
                Poll::Ready(Some(Ok(entry))) => entry,
            };
            let Some(key) = entry.key.strip_prefix(self.store.inner.prefix.as_str()) else {
                continue;
            };
            let change = match entry.operation {
                kv::Operation::Put => {
                    match self.store.open_value(key, entry.revision, &entry.value) {
                        Ok(e) => Ok(KvChange::Put(e)),
                        Err(e) if e.kind() == KvErrorKind::NotFound => continue,
                        Err(e) => Err(e),
                    }
                }
                kv::Operation::Delete | kv::Operation::Purge => Ok(KvChange::Delete {
                    key: key.to_string(),
                    revision: entry.revision,
                }),
            };
            return Poll::Ready(Some(change));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn store_names_are_slugs_without_separator() {
        for ok in ["sessions", "a", "user-prefs", "s0"] {
            validate_store(ok).unwrap();
        }
        for bad in ["", "a.b", "A", "a b", "*", ">", "a-", &"x".repeat(64)] {
            assert_eq!(
                validate_store(bad).unwrap_err().kind(),
                KvErrorKind::InvalidStore,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn keys_are_tokens_without_wildcards() {
        for ok in ["k", "b.c", "user/42", "a=b", "A_Z-09.x"] {
            validate_key(ok).unwrap();
        }
        for bad in [
            "", ".a", "a.", "a..b", "*", "a.>", "a*", "$x", "_INBOX.a", "a b", "é", "a#b", "a:b",
        ] {
            assert_eq!(
                validate_key(bad).unwrap_err().kind(),
                KvErrorKind::InvalidKey,
                "{bad:?}"
            );
        }
        assert!(validate_key(&"k".repeat(MAX_KEY_LEN)).is_ok());
        assert!(validate_key(&"k".repeat(MAX_KEY_LEN + 1)).is_err());
    }

    #[test]
    fn options_are_checked() {
        assert!(KvOptions::new().check().is_ok());
        for bad in [
            KvOptions::new().bucket("a.b"),
            KvOptions::new().bucket(""),
            KvOptions::new().replicas(0),
            KvOptions::new().replicas(6),
            KvOptions::new().max_value_len(0),
            KvOptions::new().max_value_len(MAX_VALUE_LEN + 1),
            KvOptions::new().max_keys(0),
            KvOptions::new().timeout(Duration::ZERO),
            KvOptions::new().ttl(Duration::ZERO),
        ] {
            assert_eq!(
                bad.check().unwrap_err().kind(),
                KvErrorKind::InvalidOptions,
                "{bad:?}"
            );
        }
    }
}
