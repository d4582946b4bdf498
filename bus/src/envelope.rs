//! The sealed envelope: a compact, versioned binary header in the message body,
//! followed by the AES-256-GCM ciphertext and tag. Specified byte by byte in
//! `docs/wire-format.md`; summary (integers big-endian):
//!
//! | offset    | size | field |
//! |-----------|------|-------|
//! | 0         | 1    | format version, `0x01` |
//! | 1         | 1    | flags, must be `0x00` |
//! | 2         | 4    | key version (key id) |
//! | 6         | 16   | message id: sender instance (8) + sequence (8) |
//! | 22        | 8    | timestamp, ms since the Unix epoch |
//! | 30        | 12   | nonce |
//! | 42        | 1    | tenant id length `T` (1..=63) |
//! | 43        | T    | tenant id |
//! | 43+T      | 1    | sender agent id length `S` (0 = none, ..=63) |
//! | 44+T      | S    | sender agent id |
//! | 44+T+S    | n+16 | ciphertext of the n-byte payload, then the 16-byte tag |
//!
//! The additional authenticated data is the whole header (bytes `0..44+T+S`), then
//! the full NATS subject and the reply subject, each preceded by its length as u16.
//! Moving a message to another subject, tenant or reply inbox, or changing any
//! header byte, makes it fail to open.
//!
//! Nonces: a [`Sealer`] draws one random 64-bit instance id `I` when created (the
//! only system call) and counts messages with a 64-bit sequence `s` from 1. The
//! message id is `I || s`; the 96-bit nonce is `(I * 2^32 + s) mod 2^96`. One
//! sealer never repeats a nonce (`s` is below 2^48, see [`MAX_SEQUENCE`]); two
//! sealers under one key can only collide if their instance ids are within
//! `s / 2^32 + 1` of each other: for `n` sealers of at most `2^32` messages each the
//! probability is below `n^2 / 2^63`, e.g. 2^-23 for a million sealers per key
//! version. Rotate the tenant key (a new version) long before 2^20 sealers.
//!
//! # Instance ids are never chosen by the caller
//!
//! Everything above rests on each sealer's instance id being drawn at random:
//! two sealers with the same instance id under one key issue the same nonces,
//! and AES-GCM with a repeated nonce leaks the XOR of the two plaintexts (and
//! lets the GHASH key be recovered, so messages can be forged). So the public
//! constructors ([`Sealer::new`], [`Sealer::with_cell`]) always draw one; there is
//! no way to pass an instance id in a normal build. Test vectors need fixed ids:
//! `Sealer::with_test_instance` exists only with the crate feature
//! `test-vectors` (never enable it in a deployment), and refuses, with
//! [`SealErrorKind::InstanceReused`], an id already issued in this process.
//!
//! # `fork()`, snapshots and restores
//!
//! A sealer is its instance id plus a counter in memory. Whatever copies that
//! memory copies the nonce state:
//! - **`fork()`**: the child starts with the parent's sealer, same instance id
//!   and same counter, so the first message either sends repeats the other's
//!   nonce. A sealer remembers the process id it was created in and refuses to
//!   seal in any other process ([`SealErrorKind::Forked`]): create a new sealer
//!   (a new namespace) in the child.
//! - **A restored VM snapshot or process checkpoint** (CRIU, a suspended VM
//!   resumed twice, a cloned VM): the process id is unchanged, so this cannot be
//!   detected from inside the process without platform support (Linux's
//!   `vmgenid` is not exposed to safe Rust). Do not snapshot a process that
//!   holds a sealer and resume it more than once; if it happened, rotate the
//!   tenant key (a new key version makes the repeated nonces harmless from then
//!   on, not retroactively).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use ring::aead::{Aad, Nonce, Tag, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::Error;
use crate::ids::{AgentId, TenantId, MAX_ID_LEN};
use crate::keys::{KeyError, KeyErrorKind, TenantKeySet};
use crate::verify::DropReason;

/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Fixed header bytes before the tenant id.
pub const FIXED_HEADER_LEN: usize = 43;
/// Length of the GCM tag.
pub const TAG_LEN: usize = 16;
/// The largest sequence a sealer issues (2^48): far beyond any process's life,
/// and it keeps the nonce ranges of distinct sealers apart (see module docs).
pub const MAX_SEQUENCE: u64 = 1 << 48;
/// The longest subject or reply that can be authenticated (u16 length prefix).
const MAX_AAD_FIELD: usize = u16::MAX as usize;

thread_local! {
    /// A reusable AAD buffer per thread: no allocation or zeroing per message.
    static AAD: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(512));
}

/// Runs `f` with the AAD `header || u16 len(subject) || subject || u16 len(reply)
/// || reply`, or returns `None` if the subject or reply is too long to encode.
fn with_aad<T>(header: &[u8], subject: &str, reply: &str, f: impl FnOnce(&[u8]) -> T) -> Option<T> {
    if subject.len() > MAX_AAD_FIELD || reply.len() > MAX_AAD_FIELD {
        return None;
    }
    let fill = |buf: &mut Vec<u8>| {
        buf.clear();
        buf.extend_from_slice(header);
        buf.extend_from_slice(&(subject.len() as u16).to_be_bytes());
        buf.extend_from_slice(subject.as_bytes());
        buf.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        buf.extend_from_slice(reply.as_bytes());
    };
    AAD.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            fill(&mut buf);
            Some(f(&buf))
        }
        // Re-entered on this thread (cannot happen today): use a fresh buffer.
        Err(_) => {
            let mut buf = Vec::new();
            fill(&mut buf);
            Some(f(&buf))
        }
    })
}

/// A 128-bit message id: the sender instance (high 8 bytes) and its sequence.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// The random id of the sealer that issued the message.
    pub fn instance(&self) -> u64 {
        u64::from_be_bytes(self.0[..8].try_into().unwrap_or([0; 8]))
    }

    /// The sealer's sequence number of the message.
    pub fn sequence(&self) -> u64 {
        u64::from_be_bytes(self.0[8..].try_into().unwrap_or([0; 8]))
    }

    /// The id as 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        }
        s
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Debug for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MessageId({})", self.to_hex())
    }
}

/// What went wrong sealing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SealErrorKind {
    /// The sealer issued [`MAX_SEQUENCE`] messages; create a new one.
    Exhausted,
    /// The subject plus reply do not fit the authenticated data bound.
    TooLong,
    /// The AEAD refused (payload over the GCM limit).
    Crypto,
    /// The sealer was created in another process: this is a `fork()` child that
    /// inherited the parent's sealer, whose nonces the parent keeps issuing.
    /// Create a new sealer (a new namespace) in this process.
    Forked,
    /// A fixed instance id (test vectors only) was already issued in this
    /// process: a second sealer with it would repeat the first one's nonces.
    InstanceReused,
}

crate::kind_display!(SealErrorKind {
    Exhausted => "sealer sequence exhausted",
    TooLong => "subject and reply too long to authenticate",
    Crypto => "AES-GCM seal failed",
    Forked => "sealer inherited across fork(): it would repeat the parent's nonces",
    InstanceReused => "sealer instance id already issued in this process",
});

/// A sealing error.
pub type SealError = Error<SealErrorKind>;

/// The authenticated stamp of an opened message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// The key version that sealed it.
    pub key_version: u32,
    /// The tenant it was sealed for.
    pub tenant: TenantId,
    /// Its message id.
    pub msg_id: MessageId,
    /// When it was sealed, ms since the Unix epoch (sender's clock).
    pub timestamp_ms: u64,
    /// The sending agent, if it identified itself.
    pub sender: Option<AgentId>,
}

/// The current time in ms since the Unix epoch (a vDSO read, no system call).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seals messages for one tenant; cheap to share (`Arc`), lock-free.
///
/// Not `Clone`: a copy would share the instance id and restart or fork the
/// counter, repeating nonces (see the [module docs](self)).
pub struct Sealer {
    keys: crate::keys::KeyCell,
    tenant: crate::ids::TenantId,
    sender: Option<AgentId>,
    instance: u64,
    seq: AtomicU64,
    /// The process the sealer was created in (see [`SealErrorKind::Forked`]).
    pid: u32,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("tenant", &self.tenant)
            .field("sender", &self.sender)
            .field("instance", &format_args!("{:016x}", self.instance))
            .finish()
    }
}

impl Sealer {
    /// A sealer with a fresh random instance id.
    pub fn new(keys: Arc<TenantKeySet>, sender: Option<AgentId>) -> Result<Self, KeyError> {
        Self::with_cell(crate::keys::key_cell(keys), sender)
    }

    /// A sealer with a fresh random instance id on a shared, replaceable key set
    /// (see [`crate::keys::KeyCell`]).
    pub fn with_cell(
        keys: crate::keys::KeyCell,
        sender: Option<AgentId>,
    ) -> Result<Self, KeyError> {
        Ok(Self::build(keys, sender, random_instance()?))
    }

    /// A sealer with a fixed instance id, for test vectors only (crate feature
    /// `test-vectors`; never enable it in a deployment). Refused with
    /// [`SealErrorKind::InstanceReused`] if this process already issued the id,
    /// so two sealers with it cannot coexist or follow one another in one
    /// process. Across processes nothing can check it: a fixed id is only safe
    /// with keys that protect nothing (the published test master secrets).
    #[cfg(feature = "test-vectors")]
    #[doc(hidden)]
    pub fn with_test_instance(
        keys: Arc<TenantKeySet>,
        sender: Option<AgentId>,
        instance: u64,
    ) -> Result<Self, SealError> {
        Self::with_fixed_instance(keys, sender, instance)
    }

    /// See [`Sealer::with_test_instance`]; also used by this crate's unit tests.
    #[cfg(any(test, feature = "test-vectors"))]
    pub(crate) fn with_fixed_instance(
        keys: Arc<TenantKeySet>,
        sender: Option<AgentId>,
        instance: u64,
    ) -> Result<Self, SealError> {
        // Every fixed id ever issued in this process, never removed: a sealer
        // dropped and made again with the same id would restart its counter at
        // 1 and repeat every nonce. Only test vectors come here (a handful of
        // ids), so the set stays small.
        static ISSUED: std::sync::Mutex<std::collections::BTreeSet<u64>> =
            std::sync::Mutex::new(std::collections::BTreeSet::new());
        let mut issued = ISSUED.lock().unwrap_or_else(|e| e.into_inner());
        if !issued.insert(instance) {
            return Err(Error::new(
                SealErrorKind::InstanceReused,
                format!("{instance:016x}"),
            ));
        }
        Ok(Self::build(crate::keys::key_cell(keys), sender, instance))
    }

    fn build(keys: crate::keys::KeyCell, sender: Option<AgentId>, instance: u64) -> Self {
        Self {
            tenant: keys.load().tenant().clone(),
            keys,
            sender,
            instance,
            seq: AtomicU64::new(0),
            pid: std::process::id(),
        }
    }

    /// The key set this sealer uses now.
    pub fn keys(&self) -> Arc<TenantKeySet> {
        self.keys.load_full()
    }

    /// The shared cell the key set lives in.
    pub fn key_cell(&self) -> &crate::keys::KeyCell {
        &self.keys
    }

    /// The random instance id (the high half of every message id it issues).
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// Seals `payload` for the full `subject` (and `reply`, if the message carries
    /// one), stamped now.
    pub fn seal(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: &[u8],
    ) -> Result<(MessageId, Bytes), SealError> {
        self.seal_at(subject, reply, payload, now_ms())
    }

    /// Seals with an explicit timestamp (tests, vectors).
    pub fn seal_at(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: &[u8],
        timestamp_ms: u64,
    ) -> Result<(MessageId, Bytes), SealError> {
        // A fork() child holds a byte-for-byte copy of this sealer; the parent
        // keeps counting from the same value, so the child's next nonce is the
        // parent's next nonce. Compare the process id on *every* seal, before a
        // sequence is taken: the child's first message is already a repeat, so
        // a check every N messages would let up to N - 1 repeats through, and a
        // cached copy of the pid (per thread or per sealer) is forked along with
        // the sealer. Safe Rust has no fork hook (`pthread_atfork` needs
        // `unsafe`, which this workspace forbids), so this is one getpid system
        // call per seal: measured at about 140 ns on the 2-vCPU VM of
        // BENCHMARKS.md (seal of 128 B: 197 ns before, 334 ns with it), tens of
        // ns on bare metal. Against the publish path around it (microseconds)
        // that is the price of never repeating a nonce after a fork.
        if std::process::id() != self.pid {
            return Err(Error::new(
                SealErrorKind::Forked,
                format!("created in process {}", self.pid),
            ));
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        if seq >= MAX_SEQUENCE {
            return Err(Error::new(SealErrorKind::Exhausted, "create a new sealer"));
        }
        let keys = self.keys.load();
        let key = keys.current();
        let tenant = self.tenant.as_str().as_bytes();
        let sender = self
            .sender
            .as_ref()
            .map(|s| s.as_str().as_bytes())
            .unwrap_or(&[]);
        let mut msg_id = [0u8; 16];
        msg_id[..8].copy_from_slice(&self.instance.to_be_bytes());
        msg_id[8..].copy_from_slice(&seq.to_be_bytes());
        let nonce_int = ((u128::from(self.instance)) << 32).wrapping_add(u128::from(seq));
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&nonce_int.to_be_bytes()[16 - NONCE_LEN..]);

        let header_len = FIXED_HEADER_LEN + tenant.len() + 1 + sender.len();
        let mut out = BytesMut::with_capacity(header_len + payload.len() + TAG_LEN);
        out.extend_from_slice(&[FORMAT_VERSION, 0]);
        out.extend_from_slice(&key.version().to_be_bytes());
        out.extend_from_slice(&msg_id);
        out.extend_from_slice(&timestamp_ms.to_be_bytes());
        out.extend_from_slice(&nonce);
        // Ids are validated to at most 63 bytes, so each length fits a byte.
        out.extend_from_slice(&[tenant.len() as u8]);
        out.extend_from_slice(tenant);
        out.extend_from_slice(&[sender.len() as u8]);
        out.extend_from_slice(sender);

        let aead = key
            .aead()
            .ok_or_else(|| Error::new(SealErrorKind::Crypto, "unusable key"))?;
        out.extend_from_slice(payload);
        let (head, body) = out.split_at_mut(header_len);
        let tag = with_aad(head, subject, reply.unwrap_or(""), |aad| {
            aead.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                body,
            )
        })
        .ok_or_else(|| Error::new(SealErrorKind::TooLong, subject.to_string()))?
        .map_err(|_| Error::new(SealErrorKind::Crypto, "payload too large for GCM"))?;
        out.extend_from_slice(tag.as_ref());
        Ok((MessageId(msg_id), out.freeze()))
    }
}

/// A random 64-bit instance id from the system's CSPRNG (one system call).
fn random_instance() -> Result<u64, KeyError> {
    let mut buf = [0u8; 8];
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| Error::new(KeyErrorKind::Random, "drawing a sealer instance id"))?;
    Ok(u64::from_be_bytes(buf))
}

/// A decoded (not yet authenticated) envelope.
#[derive(Debug)]
pub struct Header<'a> {
    /// The key version.
    pub key_version: u32,
    /// The message id.
    pub msg_id: MessageId,
    /// The timestamp, ms since the epoch.
    pub timestamp_ms: u64,
    /// The nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The tenant id bytes as sent (validated as a slug).
    pub tenant: &'a str,
    /// The sender id bytes as sent (validated as a slug), if any.
    pub sender: Option<&'a str>,
    /// Length of the header: the AAD prefix, and where the ciphertext starts.
    pub header_len: usize,
}

/// Parses the header of `body` without authenticating anything, checking that
/// both ids are valid slugs. Never panics.
pub fn decode_header(body: &[u8]) -> Result<Header<'_>, DropReason> {
    let header = decode_fields(body)?;
    crate::ids::validate_slug(header.tenant).map_err(|_| DropReason::Malformed)?;
    if let Some(s) = header.sender {
        crate::ids::validate_slug(s).map_err(|_| DropReason::Malformed)?;
    }
    Ok(header)
}

/// Parses the header's fields and lengths, leaving the slug rule of the ids to the
/// caller: the receive path compares the tenant byte for byte with its own (valid)
/// id and validates the sender when it becomes an [`AgentId`], so checking both
/// here again would be paid on every message for nothing.
fn decode_fields(body: &[u8]) -> Result<Header<'_>, DropReason> {
    if body.len() < FIXED_HEADER_LEN + 1 + 1 + TAG_LEN {
        return Err(DropReason::Malformed);
    }
    if body[0] != FORMAT_VERSION {
        return Err(DropReason::UnsupportedVersion);
    }
    if body[1] != 0 {
        return Err(DropReason::Malformed);
    }
    let u32_at = |at: usize| {
        body.get(at..at + 4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_be_bytes)
    };
    let u64_at = |at: usize| {
        body.get(at..at + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_be_bytes)
    };
    let key_version = u32_at(2).ok_or(DropReason::Malformed)?;
    let msg_id: [u8; 16] = body
        .get(6..22)
        .and_then(|s| s.try_into().ok())
        .ok_or(DropReason::Malformed)?;
    let timestamp_ms = u64_at(22).ok_or(DropReason::Malformed)?;
    let nonce: [u8; NONCE_LEN] = body
        .get(30..42)
        .and_then(|s| s.try_into().ok())
        .ok_or(DropReason::Malformed)?;
    let tenant_len = usize::from(body[42]);
    if tenant_len == 0 || tenant_len > MAX_ID_LEN {
        return Err(DropReason::Malformed);
    }
    let tenant_end = FIXED_HEADER_LEN + tenant_len;
    let tenant = body
        .get(FIXED_HEADER_LEN..tenant_end)
        .ok_or(DropReason::Malformed)?;
    let sender_len = usize::from(*body.get(tenant_end).ok_or(DropReason::Malformed)?);
    if sender_len > MAX_ID_LEN {
        return Err(DropReason::Malformed);
    }
    let sender_start = tenant_end + 1;
    let header_len = sender_start + sender_len;
    let sender = body
        .get(sender_start..header_len)
        .ok_or(DropReason::Malformed)?;
    if body.len() < header_len + TAG_LEN {
        return Err(DropReason::Malformed);
    }
    let tenant = std::str::from_utf8(tenant).map_err(|_| DropReason::Malformed)?;
    let sender = if sender_len == 0 {
        None
    } else {
        Some(std::str::from_utf8(sender).map_err(|_| DropReason::Malformed)?)
    };
    Ok(Header {
        key_version,
        msg_id: MessageId(msg_id),
        timestamp_ms,
        nonce,
        tenant,
        sender,
        header_len,
    })
}

/// Authenticates and decrypts `body` received on the full `subject` with `reply`,
/// for the tenant of `keys`. Checks, in order: format, tenant, key version, tag.
/// Returns the authenticated header (borrowing `body`) and the plaintext. The
/// sender id is not yet checked against the slug rule: callers make it an
/// [`AgentId`] (which checks) before exposing it.
/// Freshness and replay are the verifier's (see [`crate::verify`]).
pub(crate) fn open_parts<'a>(
    keys: &TenantKeySet,
    subject: &str,
    reply: Option<&str>,
    body: &'a [u8],
) -> Result<(Header<'a>, Bytes), DropReason> {
    let header = decode_fields(body)?;
    // Equal to our own (valid) id means a valid slug too; only a mismatch pays for
    // telling a malformed id from another tenant's.
    if header.tenant != keys.tenant().as_str() {
        return Err(match crate::ids::validate_slug(header.tenant) {
            Ok(()) => DropReason::WrongTenant,
            Err(_) => DropReason::Malformed,
        });
    }
    let key = keys.get(header.key_version).ok_or(DropReason::UnknownKey)?;
    let aead = key.aead().ok_or(DropReason::UnknownKey)?;
    let ct_end = body.len() - TAG_LEN;
    let tag: [u8; TAG_LEN] = body[ct_end..]
        .try_into()
        .map_err(|_| DropReason::Malformed)?;
    let mut plain = BytesMut::from(&body[header.header_len..ct_end]);
    with_aad(
        &body[..header.header_len],
        subject,
        reply.unwrap_or(""),
        |aad| {
            aead.open_in_place_separate_tag(
                Nonce::assume_unique_for_key(header.nonce),
                Aad::from(aad),
                Tag::from(tag),
                &mut plain,
                0..,
            )
            .map(|_| ())
        },
    )
    .ok_or(DropReason::OutsideNamespace)?
    .map_err(|_| DropReason::Authentication)?;
    Ok((header, plain.freeze()))
}

/// Authenticates and decrypts `body` (see the module docs for the checks), returning
/// the stamp as owned values and the plaintext.
pub fn open(
    keys: &TenantKeySet,
    subject: &str,
    reply: Option<&str>,
    body: &[u8],
) -> Result<(Stamp, Bytes), DropReason> {
    let (header, plain) = open_parts(keys, subject, reply, body)?;
    // The sender was validated as a slug by `decode_header`.
    let sender = match header.sender {
        Some(s) => Some(AgentId::new(s).map_err(|_| DropReason::Malformed)?),
        None => None,
    };
    Ok((
        Stamp {
            key_version: header.key_version,
            tenant: keys.tenant().clone(),
            msg_id: header.msg_id,
            timestamp_ms: header.timestamp_ms,
            sender,
        },
        plain,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::keys::MasterSecret;

    /// The master secret, tenant and instance of `docs/wire-format.md`'s vector.
    const INSTANCE: u64 = 0x0102_0304_0506_0708;
    const VECTOR_HEX: &str = "010000000001010203040506070800000000000000010000018bcfe568000102030405060708000000010461636d6507706c616e6e65723392ef3d3591c4ad4c390683d6fb4734011a6c6786";

    fn keys(tenant: &str) -> Arc<TenantKeySet> {
        let master: Vec<u8> = (0..32u8).collect();
        let tenant = TenantId::new(tenant).unwrap();
        Arc::new(
            MasterSecret::from_bytes(&master)
                .unwrap()
                .key_set(&tenant, [1], 1)
                .unwrap(),
        )
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sealing_reproduces_the_documented_vector() {
        let s = Sealer::with_fixed_instance(
            keys("acme"),
            Some(AgentId::new("planner").unwrap()),
            INSTANCE,
        )
        .unwrap();
        let (id, body) = s
            .seal_at(
                "tenant.acme.orders.created",
                None,
                b"hello",
                1_700_000_000_000,
            )
            .unwrap();
        assert_eq!(id.to_hex(), "01020304050607080000000000000001");
        assert_eq!(
            hex(&body),
            VECTOR_HEX,
            "envelope bytes changed: update docs/wire-format.md only if the format version changes"
        );
    }

    /// A fixed instance id is issued once per process: a second sealer with it,
    /// at the same time or after the first is gone, would start its counter at 1
    /// again and repeat every nonce (the XOR of two ciphertexts would be the XOR
    /// of their plaintexts).
    #[test]
    fn a_fixed_instance_id_is_issued_once_per_process() {
        const ID: u64 = 0x7e57_0000_0000_0001;
        let first = Sealer::with_fixed_instance(keys("acme"), None, ID).unwrap();
        let again = Sealer::with_fixed_instance(keys("acme"), None, ID);
        assert_eq!(
            again.map(|_| ()).unwrap_err().kind(),
            SealErrorKind::InstanceReused
        );
        drop(first);
        let after = Sealer::with_fixed_instance(keys("globex"), None, ID);
        assert_eq!(
            after.map(|_| ()).unwrap_err().kind(),
            SealErrorKind::InstanceReused
        );
    }

    /// Random instance ids: every sealer gets its own.
    #[test]
    fn public_constructors_draw_distinct_instance_ids() {
        let k = keys("acme");
        let ids: std::collections::BTreeSet<u64> = (0..64)
            .map(|_| Sealer::new(k.clone(), None).unwrap().instance())
            .collect();
        assert_eq!(ids.len(), 64);
    }

    /// A sealer copied into a `fork()` child: simulated by changing the process
    /// id it remembers (safe Rust cannot fork). The child must not seal, and
    /// must not consume a sequence either.
    #[test]
    fn a_sealer_refuses_to_seal_in_another_process() {
        let mut s = Sealer::new(keys("acme"), None).unwrap();
        s.pid = s.pid.wrapping_add(1);
        let err = s
            .seal("tenant.acme.orders.created", None, b"x")
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.kind(), SealErrorKind::Forked);
        s.pid = std::process::id();
        let (id, _) = s.seal("tenant.acme.orders.created", None, b"x").unwrap();
        assert_eq!(id.sequence(), 1);
    }
}
