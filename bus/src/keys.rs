//! Per-tenant AES-256-GCM keys.
//!
//! The control plane alone holds the platform [`MasterSecret`]. It derives each
//! tenant's keys with HKDF-SHA256 and hands an agent only its own tenant's
//! [`TenantKeySet`]: the current key version plus the previous versions still being
//! accepted during a rotation. An agent never sees the master secret nor another
//! tenant's key; the key set is bound to its tenant and refuses to seal or open for
//! any other.
//!
//! Derivation: `key(tenant, v) = HKDF-SHA256(salt = "agentbus/tenant-key/v1",
//! ikm = master, info = len(tenant) || tenant || v as u32 big-endian)`, 32 bytes.
//! The length prefix keeps `(tenant, version)` pairs from ever sharing an info string.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::aead::{LessSafeKey, UnboundKey, AES_256_GCM};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::Error;
use crate::ids::TenantId;

/// The HKDF salt of the tenant-key derivation; changing it changes every key.
const TENANT_KEY_SALT: &[u8] = b"agentbus/tenant-key/v1";
/// Length of an AES-256 key.
pub const KEY_LEN: usize = 32;
/// The shortest master secret accepted.
pub const MIN_MASTER_LEN: usize = 32;

/// What went wrong with a key or key set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyErrorKind {
    /// Key material has the wrong length or encoding.
    InvalidMaterial,
    /// The key set names no key for the requested version.
    UnknownVersion,
    /// The key set is empty, or its current version is not in it.
    InvalidKeySet,
    /// The key set belongs to another tenant than the one asked for.
    WrongTenant,
    /// The system random source failed.
    Random,
}

crate::kind_display!(KeyErrorKind {
    InvalidMaterial => "invalid key material",
    UnknownVersion => "unknown key version",
    InvalidKeySet => "invalid key set",
    WrongTenant => "key set belongs to another tenant",
    Random => "random source failed",
});

/// A key error.
pub type KeyError = Error<KeyErrorKind>;

/// The platform master secret, from which every tenant key is derived.
///
/// Only the control plane holds it. `Debug` never prints it.
#[derive(Clone)]
pub struct MasterSecret(Vec<u8>);

impl MasterSecret {
    /// A fresh random 32-byte secret.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = vec![0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| Error::new(KeyErrorKind::Random, "generating the master secret"))?;
        Ok(Self(bytes))
    }

    /// A secret from raw bytes (at least [`MIN_MASTER_LEN`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() < MIN_MASTER_LEN {
            return Err(Error::new(
                KeyErrorKind::InvalidMaterial,
                format!("master secret must be at least {MIN_MASTER_LEN} bytes"),
            ));
        }
        Ok(Self(bytes.to_vec()))
    }

    /// A secret from standard base64.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = B64.decode(text.trim()).map_err(|e| {
            Error::with_source(KeyErrorKind::InvalidMaterial, "master secret base64", e)
        })?;
        Self::from_bytes(&bytes)
    }

    /// The secret as standard base64 (for the control plane's state file only).
    pub fn to_base64(&self) -> String {
        B64.encode(&self.0)
    }

    /// Derives version `version` of `tenant`'s key.
    pub fn derive(&self, tenant: &TenantId, version: u32) -> Result<TenantKey, KeyError> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, TENANT_KEY_SALT).extract(&self.0);
        let id = tenant.as_str().as_bytes();
        // Ids are at most 63 bytes, so the length fits one byte.
        let len = [id.len() as u8];
        let ver = version.to_be_bytes();
        let info: [&[u8]; 3] = [&len, id, &ver];
        let okm = prk
            .expand(&info, Len32)
            .map_err(|_| Error::new(KeyErrorKind::InvalidMaterial, "hkdf expand"))?;
        let mut bytes = [0u8; KEY_LEN];
        okm.fill(&mut bytes)
            .map_err(|_| Error::new(KeyErrorKind::InvalidMaterial, "hkdf fill"))?;
        TenantKey::from_bytes(version, &bytes)
    }

    /// The key set holding `versions` of `tenant`'s key, with `current` used to seal.
    pub fn key_set(
        &self,
        tenant: &TenantId,
        versions: impl IntoIterator<Item = u32>,
        current: u32,
    ) -> Result<TenantKeySet, KeyError> {
        let keys = versions
            .into_iter()
            .map(|v| self.derive(tenant, v))
            .collect::<Result<Vec<_>, _>>()?;
        TenantKeySet::new(tenant.clone(), current, keys)
    }
}

impl fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterSecret(<redacted>)")
    }
}

/// HKDF output length marker for 32 raw bytes.
struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        KEY_LEN
    }
}

/// One version of a tenant's AES-256-GCM key. `Debug` never prints the key.
///
/// The expanded AES key schedule and GHASH table (about 0.5 KiB) are built on
/// first use, so a key set held for an idle tenant costs only its 32 raw bytes.
pub struct TenantKey {
    version: u32,
    bytes: [u8; KEY_LEN],
    // Boxed so an unused key does not reserve the schedule's ~0.5 KiB inline.
    aead: std::sync::OnceLock<Option<Box<LessSafeKey>>>,
}

impl TenantKey {
    /// A key from its 32 raw bytes.
    pub fn from_bytes(version: u32, bytes: &[u8]) -> Result<Self, KeyError> {
        let raw: [u8; KEY_LEN] = bytes.try_into().map_err(|_| {
            Error::new(
                KeyErrorKind::InvalidMaterial,
                format!("a key is {KEY_LEN} bytes, got {}", bytes.len()),
            )
        })?;
        Ok(Self {
            version,
            bytes: raw,
            aead: std::sync::OnceLock::new(),
        })
    }

    /// The key version (its key id on the wire).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The AEAD key, built on first use (crate-internal: sealing goes through the
    /// envelope module). `None` cannot happen for a 32-byte key; it is handled
    /// rather than assumed.
    pub(crate) fn aead(&self) -> Option<&LessSafeKey> {
        self.aead
            .get_or_init(|| {
                UnboundKey::new(&AES_256_GCM, &self.bytes)
                    .ok()
                    .map(|k| Box::new(LessSafeKey::new(k)))
            })
            .as_deref()
    }
}

impl fmt::Debug for TenantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantKey(v{}, <redacted>)", self.version)
    }
}

/// The keys one tenant's agents hold: the current version (used to seal) and the
/// previous versions still accepted on receive during a rotation.
#[derive(Clone)]
pub struct TenantKeySet {
    tenant: TenantId,
    current: u32,
    // Kept beside the map so sealing needs no lookup and no fallible path.
    current_key: Arc<TenantKey>,
    keys: BTreeMap<u32, Arc<TenantKey>>,
}

impl TenantKeySet {
    /// A key set for `tenant`; `current` must be among `keys`.
    pub fn new(
        tenant: TenantId,
        current: u32,
        keys: impl IntoIterator<Item = TenantKey>,
    ) -> Result<Self, KeyError> {
        let keys: BTreeMap<u32, Arc<TenantKey>> =
            keys.into_iter().map(|k| (k.version, Arc::new(k))).collect();
        let Some(current_key) = keys.get(&current).cloned() else {
            return Err(Error::new(
                KeyErrorKind::InvalidKeySet,
                format!("current version {current} is not in the key set"),
            ));
        };
        Ok(Self {
            tenant,
            current,
            current_key,
            keys,
        })
    }

    /// The tenant these keys belong to.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The key that seals new messages.
    pub fn current(&self) -> &Arc<TenantKey> {
        &self.current_key
    }

    /// The current version number.
    pub fn current_version(&self) -> u32 {
        self.current
    }

    /// The key of `version`, if the set still holds it.
    pub fn get(&self, version: u32) -> Option<&Arc<TenantKey>> {
        self.keys.get(&version)
    }

    /// The versions held, ascending.
    pub fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.keys().copied()
    }

    /// Checks that this set belongs to `tenant`.
    pub fn ensure_tenant(&self, tenant: &TenantId) -> Result<(), KeyError> {
        if &self.tenant == tenant {
            Ok(())
        } else {
            Err(Error::new(
                KeyErrorKind::WrongTenant,
                format!("key set of {} used for {}", self.tenant, tenant),
            ))
        }
    }

    /// A copy without `version` (ending acceptance of an old key); the current
    /// version cannot be removed.
    pub fn without(&self, version: u32) -> Result<Self, KeyError> {
        if version == self.current {
            return Err(Error::new(
                KeyErrorKind::InvalidKeySet,
                "the current key version cannot be removed",
            ));
        }
        let mut next = self.clone();
        if next.keys.remove(&version).is_none() {
            return Err(Error::new(
                KeyErrorKind::UnknownVersion,
                format!("key version {version} is not in the set"),
            ));
        }
        Ok(next)
    }
}

impl fmt::Debug for TenantKeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantKeySet")
            .field("tenant", &self.tenant)
            .field("current", &self.current)
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The JSON form: `{"tenant": "acme", "current": 2, "keys": [{"version": 1, "key":
/// "<base64>"}, ...]}`.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeySetJson {
    tenant: TenantId,
    current: u32,
    keys: Vec<KeyJson>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct KeyJson {
    version: u32,
    key: String,
}

impl serde::Serialize for TenantKeySet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        KeySetJson {
            tenant: self.tenant.clone(),
            current: self.current,
            keys: self
                .keys
                .values()
                .map(|k| KeyJson {
                    version: k.version,
                    key: B64.encode(k.bytes),
                })
                .collect(),
        }
        .serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for TenantKeySet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let json = KeySetJson::deserialize(d)?;
        let keys = json
            .keys
            .iter()
            .map(|k| {
                let bytes = B64.decode(&k.key).map_err(D::Error::custom)?;
                TenantKey::from_bytes(k.version, &bytes).map_err(D::Error::custom)
            })
            .collect::<Result<Vec<_>, _>>()?;
        TenantKeySet::new(json.tenant, json.current, keys).map_err(D::Error::custom)
    }
}

/// A tenant's key set that can be replaced while in use (a rotation reaching a
/// running agent): readers take a snapshot without a lock
/// ([`arc_swap::ArcSwap`], a few nanoseconds), writers swap in a new set whole.
pub type KeyCell = std::sync::Arc<arc_swap::ArcSwap<TenantKeySet>>;

/// A new [`KeyCell`] holding `keys`.
pub fn key_cell(keys: Arc<TenantKeySet>) -> KeyCell {
    std::sync::Arc::new(arc_swap::ArcSwap::new(keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    #[test]
    fn derivation_is_deterministic_and_separated() {
        let m = MasterSecret::from_bytes(&[7u8; 32]).unwrap();
        let a1 = m.derive(&t("a"), 1).unwrap();
        assert_eq!(a1.bytes, m.derive(&t("a"), 1).unwrap().bytes);
        assert_ne!(a1.bytes, m.derive(&t("a"), 2).unwrap().bytes);
        assert_ne!(a1.bytes, m.derive(&t("b"), 1).unwrap().bytes);
        let other = MasterSecret::from_bytes(&[8u8; 32]).unwrap();
        assert_ne!(a1.bytes, other.derive(&t("a"), 1).unwrap().bytes);
    }

    #[test]
    fn short_master_refused() {
        let e = MasterSecret::from_bytes(&[1u8; 31]).unwrap_err();
        assert_eq!(e.kind(), KeyErrorKind::InvalidMaterial);
    }

    #[test]
    fn key_set_json_round_trip_and_redaction() {
        let m = MasterSecret::generate().unwrap();
        let set = m.key_set(&t("acme"), [1, 2], 2).unwrap();
        let json = serde_json::to_string(&set).unwrap();
        let back: TenantKeySet = serde_json::from_str(&json).unwrap();
        assert_eq!(back.current_version(), 2);
        assert_eq!(back.versions().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(back.get(1).unwrap().bytes, set.get(1).unwrap().bytes);
        assert!(!format!("{set:?}").contains(&B64.encode(set.get(1).unwrap().bytes)));
        assert!(!format!("{m:?}").contains(&m.to_base64()));
    }

    #[test]
    fn current_must_be_present_and_not_removable() {
        let m = MasterSecret::generate().unwrap();
        let e = m.key_set(&t("acme"), [1], 2).unwrap_err();
        assert_eq!(e.kind(), KeyErrorKind::InvalidKeySet);
        let set = m.key_set(&t("acme"), [1, 2], 2).unwrap();
        assert_eq!(
            set.without(2).unwrap_err().kind(),
            KeyErrorKind::InvalidKeySet
        );
        assert_eq!(
            set.without(9).unwrap_err().kind(),
            KeyErrorKind::UnknownVersion
        );
        assert!(set.without(1).unwrap().get(1).is_none());
    }
}
