//! The key-encryption key (KEK) and sealed secrets.
//!
//! Secrets of the control plane (the operator seed, account identity and signing
//! seeds, per-tenant key roots) live in the JetStream KV bucket
//! [`SECRETS_BUCKET`](crate::store::SECRETS_BUCKET), sealed with AES-256-GCM under a
//! KEK that exists only on controller hosts: the file `<state>/kek` (0600) or the
//! environment variable [`KEK_ENV`] (base64). Anyone who can read the bucket but
//! not the KEK learns nothing.
//!
//! A sealed value is `0x01 ‖ nonce (12) ‖ ciphertext ‖ tag (16)`; the AAD is
//! `agentbus-secret/v1/` followed by the record's name, so a sealed value moved to
//! another key (swapping tenant A's account seed into tenant B's slot) fails to open.

use std::path::Path;

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use tenant_bus::error::Error;

use crate::error::{ControlError, ControlErrorKind};

/// The environment variable that may hold the KEK (base64 of 32 bytes).
pub const KEK_ENV: &str = "AGENTBUS_KEK";
/// The format byte of a sealed value.
const FORMAT: u8 = 1;
/// The AAD prefix; the record name follows.
const AAD_PREFIX: &str = "agentbus-secret/v1/";

/// The key-encryption key. `Debug` never prints it.
pub struct Kek {
    key: LessSafeKey,
    raw: [u8; 32],
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

fn crypto(detail: &'static str) -> ControlError {
    Error::new(ControlErrorKind::Crypto, detail)
}

impl Kek {
    /// A fresh random KEK.
    pub fn generate() -> Result<Self, ControlError> {
        let mut raw = [0u8; 32];
        SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| crypto("no randomness for the KEK"))?;
        Self::from_bytes(&raw)
    }

    /// A KEK from its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ControlError> {
        let raw: [u8; 32] = bytes.try_into().map_err(|_| {
            Error::new(
                ControlErrorKind::InvalidState,
                format!("the KEK must be 32 bytes, not {}", bytes.len()),
            )
        })?;
        let key = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| crypto("AES key"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            raw,
        })
    }

    /// A KEK from base64 text (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<Self, ControlError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| {
                Error::with_source(ControlErrorKind::InvalidState, "KEK is not base64", e)
            })?;
        Self::from_bytes(&bytes)
    }

    /// The KEK as base64 (what the file and [`KEK_ENV`] hold).
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.raw)
    }

    /// Loads the KEK: [`KEK_ENV`] if set, else the file at `path`, which must not
    /// be readable by group or others.
    pub fn load(path: &Path) -> Result<Self, ControlError> {
        if let Ok(text) = std::env::var(KEK_ENV) {
            return Self::from_base64(&text);
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let meta =
                std::fs::metadata(path).map_err(|e| crate::error::io_err("reading", path, e))?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(Error::new(
                    ControlErrorKind::InvalidState,
                    format!(
                        "{} is readable by others (chmod 600 it): the KEK unlocks every secret",
                        path.display()
                    ),
                ));
            }
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| crate::error::io_err("reading", path, e))?;
        Self::from_base64(&text)
    }

    /// Seals `plaintext` as the record `name`.
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> Result<Vec<u8>, ControlError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| crypto("no randomness for a nonce"))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + 16);
        out.push(FORMAT);
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        let aad = format!("{AAD_PREFIX}{name}");
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut body,
            )
            .map_err(|_| crypto("sealing a secret"))?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens a value sealed as the record `name`; a wrong KEK, a wrong name or any
    /// altered byte is [`ControlErrorKind::Crypto`].
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, ControlError> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != FORMAT {
            return Err(crypto("sealed secret is malformed"));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[1..1 + NONCE_LEN]);
        let mut body = sealed[1 + NONCE_LEN..].to_vec();
        let aad = format!("{AAD_PREFIX}{name}");
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut body,
            )
            .map_err(|_| {
                Error::new(
                    ControlErrorKind::Crypto,
                    format!("secret {name:?} does not open under this KEK (wrong KEK, moved or altered)"),
                )
            })?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_under_its_name_only() {
        let kek = Kek::generate().unwrap();
        let sealed = kek.seal("tenant.acme.account", b"SAAB").unwrap();
        assert_eq!(kek.open("tenant.acme.account", &sealed).unwrap(), b"SAAB");
        // Swapped into another record's slot: refused.
        assert_eq!(
            kek.open("tenant.globex.account", &sealed)
                .unwrap_err()
                .kind(),
            ControlErrorKind::Crypto
        );
        // Any flipped bit: refused.
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(kek.open("tenant.acme.account", &bad).is_err(), "byte {i}");
        }
        // Another KEK: refused.
        let other = Kek::generate().unwrap();
        assert!(other.open("tenant.acme.account", &sealed).is_err());
        // Round trip through base64.
        let again = Kek::from_base64(&kek.to_base64()).unwrap();
        assert_eq!(again.open("tenant.acme.account", &sealed).unwrap(), b"SAAB");
        assert!(Kek::from_base64("AAAA").is_err());
    }
}
