//! Signed checkpoints in the C2SP signed-note format (`tlog-checkpoint`,
//! `signed-note`), signed with Ed25519.
//!
//! ```text
//! agentbus/<platform account>/audit/acme      origin: names the log
//! 42                                          tree size, decimal
//! qy3p1aP0...=                                root hash, standard base64
//! agentbus-time 1700000000000                 extension line: signing time, Unix ms
//!                                             blank line
//! — agentbus/<platform account>/audit AbCd...  signature: key name, base64(key id ‖ sig)
//! ```
//!
//! The key id is the first four bytes of `SHA-256(name ‖ "\n" ‖ 0x01 ‖ public
//! key)` (0x01: the Ed25519 signature type); the signature covers the note text,
//! every body line with its final newline. A verifier key is written
//! `<name>+<key id, 8 hex digits>+<base64(0x01 ‖ public key)>`.

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use sha2::{Digest as _, Sha256};

use super::merkle::Hash;

/// The signature-line prefix: an em dash and a space.
pub const SIG_PREFIX: &str = "\u{2014} ";
/// The extension line carrying the signing time.
pub const TIME_EXTENSION: &str = "agentbus-time";
const ED25519_TYPE: u8 = 1;

/// A malformed note, an unknown key or a bad signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteError(pub String);

impl std::fmt::Display for NoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NoteError {}

fn err(message: impl Into<String>) -> NoteError {
    NoteError(message.into())
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn key_id(name: &str, public: &[u8]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ED25519_TYPE]);
    h.update(public);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(char::is_whitespace) && !name.contains('+')
}

/// A checkpoint: a log's size and root at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's origin line.
    pub origin: String,
    /// Tree size.
    pub size: u64,
    /// Root hash.
    pub root: Hash,
    /// When it was signed, Unix ms.
    pub time_ms: u64,
}

impl Checkpoint {
    /// The note text (body), each line ending in a newline.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n{TIME_EXTENSION} {}\n",
            self.origin,
            self.size,
            b64().encode(self.root),
            self.time_ms
        )
    }

    fn parse_body(body: &str) -> Result<Self, NoteError> {
        let mut lines = body
            .strip_suffix('\n')
            .ok_or_else(|| err("note text does not end in a newline"))?
            .split('\n');
        let origin = lines.next().unwrap_or_default().to_string();
        if origin.is_empty() {
            return Err(err("checkpoint has no origin"));
        }
        let size = lines
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| err("checkpoint size is not a decimal number"))?;
        let root: Hash = lines
            .next()
            .and_then(|s| b64().decode(s).ok())
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| err("checkpoint root is not 32 bytes of base64"))?;
        let mut time_ms = 0;
        for ext in lines {
            if let Some(t) = ext
                .strip_prefix(TIME_EXTENSION)
                .and_then(|r| r.strip_prefix(' '))
            {
                time_ms = t.parse().map_err(|_| err("bad agentbus-time extension"))?;
            }
        }
        Ok(Self {
            origin,
            size,
            root,
            time_ms,
        })
    }
}

/// Signs checkpoints with one Ed25519 key.
pub struct Signer {
    name: String,
    key: Ed25519KeyPair,
    id: [u8; 4],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("name", &self.name).finish()
    }
}

impl Signer {
    /// A signer named `name` from a 32-byte Ed25519 seed.
    pub fn from_seed(name: &str, seed: &[u8]) -> Result<Self, NoteError> {
        if !valid_name(name) {
            return Err(err(format!("invalid key name {name:?}")));
        }
        let key = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| err("an Ed25519 seed is 32 bytes"))?;
        let id = key_id(name, key.public_key().as_ref());
        Ok(Self {
            name: name.to_string(),
            key,
            id,
        })
    }

    /// The verifier key text (`name+keyid+base64(0x01 ‖ public key)`).
    pub fn verifier_key(&self) -> String {
        let mut typed = vec![ED25519_TYPE];
        typed.extend_from_slice(self.key.public_key().as_ref());
        format!(
            "{}+{}+{}",
            self.name,
            super::merkle::hex(&self.id),
            b64().encode(typed)
        )
    }

    /// The signed note of `checkpoint`.
    pub fn sign(&self, checkpoint: &Checkpoint) -> String {
        let body = checkpoint.body();
        let sig = self.key.sign(body.as_bytes());
        let mut blob = self.id.to_vec();
        blob.extend_from_slice(sig.as_ref());
        format!("{body}\n{SIG_PREFIX}{} {}\n", self.name, b64().encode(blob))
    }
}

/// Verifies notes signed by one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verifier {
    name: String,
    id: [u8; 4],
    public: Vec<u8>,
}

impl std::str::FromStr for Verifier {
    type Err = NoteError;
    fn from_str(text: &str) -> Result<Self, NoteError> {
        let mut parts = text.trim().splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(err("a verifier key is NAME+KEYID+KEY"));
        };
        let typed = b64()
            .decode(key)
            .map_err(|_| err("verifier key is not base64"))?;
        if typed.len() != 33 || typed[0] != ED25519_TYPE {
            return Err(err("verifier key is not an Ed25519 key"));
        }
        let public = typed[1..].to_vec();
        let want = key_id(name, &public);
        if !valid_name(name) || super::merkle::hex(&want) != id {
            return Err(err("verifier key id does not match its name and key"));
        }
        Ok(Self {
            name: name.to_string(),
            id: want,
            public,
        })
    }
}

impl Verifier {
    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks `note` carries a valid signature by this key and parses its
    /// checkpoint. Signatures by other keys are ignored; none by this key, or a
    /// bad one, is an error.
    pub fn verify(&self, note: &str) -> Result<Checkpoint, NoteError> {
        let split = note
            .rfind("\n\n")
            .ok_or_else(|| err("note has no signature block"))?;
        let (body, sigs) = (&note[..split + 1], &note[split + 2..]);
        let mut ours = 0;
        for line in sigs.lines() {
            let rest = line
                .strip_prefix(SIG_PREFIX)
                .ok_or_else(|| err("malformed signature line"))?;
            let (name, blob) = rest
                .split_once(' ')
                .ok_or_else(|| err("malformed signature line"))?;
            let blob = b64()
                .decode(blob)
                .map_err(|_| err("signature is not base64"))?;
            if name != self.name || blob.len() < 4 || blob[..4] != self.id {
                continue;
            }
            ours += 1;
            UnparsedPublicKey::new(&ED25519, &self.public)
                .verify(body.as_bytes(), &blob[4..])
                .map_err(|_| err(format!("signature by {} does not verify", self.name)))?;
        }
        if ours == 0 {
            return Err(err(format!(
                "no signature by key {}+{} (forged, or signed by another key)",
                self.name,
                super::merkle::hex(&self.id)
            )));
        }
        Checkpoint::parse_body(body)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cp() -> Checkpoint {
        Checkpoint {
            origin: "agentbus/APLAT/audit/acme".into(),
            size: 42,
            root: [7u8; 32],
            time_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn signs_and_verifies_in_the_signed_note_format() {
        let s = Signer::from_seed("agentbus/APLAT/audit", &[1u8; 32]).unwrap();
        let note = s.sign(&cp());
        let lines: Vec<&str> = note.lines().collect();
        assert_eq!(lines[0], "agentbus/APLAT/audit/acme");
        assert_eq!(lines[1], "42");
        assert_eq!(lines[2], b64().encode([7u8; 32]));
        assert_eq!(lines[4], "");
        assert!(lines[5].starts_with("\u{2014} agentbus/APLAT/audit "));
        let v: Verifier = s.verifier_key().parse().unwrap();
        assert_eq!(v.verify(&note).unwrap(), cp());
        // Another key with the same name: refused.
        let other = Signer::from_seed("agentbus/APLAT/audit", &[2u8; 32]).unwrap();
        let forged = other.sign(&cp());
        assert!(v.verify(&forged).unwrap_err().0.contains("no signature"));
        // A changed body: refused.
        let tampered = note.replacen("\n42\n", "\n43\n", 1);
        assert!(v
            .verify(&tampered)
            .unwrap_err()
            .0
            .contains("does not verify"));
        // A wrong key id in the verifier key: refused.
        let vk = s.verifier_key().replacen('+', "+0", 1);
        assert!(vk.parse::<Verifier>().is_err());
    }

    #[test]
    fn ed25519_matches_rfc_8032_test_1() {
        // RFC 8032 §7.1 TEST 1: the seed, its public key and the signature of "".
        let seed = data_encoding::HEXLOWER
            .decode(b"9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
            .unwrap();
        let key = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        assert_eq!(
            super::super::merkle::hex(key.public_key().as_ref()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        assert!(super::super::merkle::hex(key.sign(b"").as_ref())
            .starts_with("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"));
    }
}
