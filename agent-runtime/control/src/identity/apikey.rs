//! API keys: their text format, offline checksum, and the keyed hash that is
//! all the control plane stores.
//!
//! # Format
//! ```text
//! abk_ 3F9xk2LmQp7Z N8cT0vWq2yHs5JdKe1RbXa uK7wQ2
//! │    │            │                      └ CRC32 of everything before it, 6 base62
//! │    │            └ secret: 22 base62 characters from the OS CSPRNG (131 bits)
//! │    └ key id: 12 base62 characters (public: lists, audit, revocation)
//! └ prefix (not a base62 character, so a double click selects the whole key)
//! ```
//! (without the spaces: 44 characters). The prefix lets secret scanners find
//! leaked keys; the checksum lets [`parse`] reject a mistyped or made-up key
//! before any lookup, as GitHub's token format does.
//!
//! # Storage
//! Only `HMAC-SHA-256(pepper, key)` is stored ([`hash`]), with the key id as the
//! lookup selector. NIST SP 800-63B asks for a one-way function for look-up
//! secrets of at least 112 bits; a slow password hash adds latency and nothing
//! else at 131 bits. The pepper is a controller secret (sealed under the KEK),
//! so a copy of the keys bucket alone does not allow testing guesses offline.
//! [`verify`] compares in constant time (`ring::hmac::verify`).

use ring::hmac;
use ring::rand::SecureRandom as _;

/// Every key starts with this.
pub const PREFIX: &str = "abk_";
/// Characters of the key id.
pub const ID_LEN: usize = 12;
/// Characters of the secret (62^22 > 2^130).
pub const SECRET_LEN: usize = 22;
/// Characters of the checksum (62^6 > 2^32).
pub const CHECKSUM_LEN: usize = 6;
/// The length of a key.
pub const KEY_LEN: usize = PREFIX.len() + ID_LEN + SECRET_LEN + CHECKSUM_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a text is not an API key (decided offline, before any lookup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyFormatError {
    /// It does not start with [`PREFIX`].
    Prefix,
    /// Not [`KEY_LEN`] characters.
    Length,
    /// A character outside base62.
    Charset,
    /// The checksum does not match (mistyped, truncated or made up).
    Checksum,
}

impl KeyFormatError {
    /// A short stable reason for logs and audit events.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Prefix => "key_prefix",
            Self::Length => "key_length",
            Self::Charset => "key_charset",
            Self::Checksum => "key_checksum",
        }
    }
}

impl std::fmt::Display for KeyFormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Prefix => "not an API key (wrong prefix)",
            Self::Length => "not an API key (wrong length)",
            Self::Charset => "not an API key (invalid character)",
            Self::Checksum => "not an API key (checksum mismatch)",
        })
    }
}

impl std::error::Error for KeyFormatError {}

/// A newly generated key: shown once, never stored.
#[derive(Clone, PartialEq, Eq)]
pub struct NewKey {
    /// The key id.
    pub id: String,
    /// The whole key text.
    pub key: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn base62(rng: &ring::rand::SystemRandom, n: usize) -> Result<String, ring::error::Unspecified> {
    // Rejection sampling: bytes >= 248 (= 4 * 62) are redrawn, so every
    // character is uniform.
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        rng.fill(&mut buf)?;
        for b in buf {
            if b < 248 && out.len() < n {
                out.push(BASE62[usize::from(b % 62)] as char);
            }
        }
    }
    Ok(out)
}

fn checksum(body: &str) -> String {
    let mut v = crc32(body.as_bytes());
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(v % 62) as usize];
        v /= 62;
    }
    out.iter().map(|&b| b as char).collect()
}

/// CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// Generates a key from the OS CSPRNG.
pub fn generate() -> Result<NewKey, ring::error::Unspecified> {
    let rng = ring::rand::SystemRandom::new();
    let id = base62(&rng, ID_LEN)?;
    let secret = base62(&rng, SECRET_LEN)?;
    let body = format!("{PREFIX}{id}{secret}");
    let key = format!("{body}{}", checksum(&body));
    Ok(NewKey { id, key })
}

/// Checks a key's shape and checksum offline; returns its key id.
pub fn parse(text: &str) -> Result<&str, KeyFormatError> {
    let rest = text.strip_prefix(PREFIX).ok_or(KeyFormatError::Prefix)?;
    if text.len() != KEY_LEN {
        return Err(KeyFormatError::Length);
    }
    if !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(KeyFormatError::Charset);
    }
    let (body, sum) = text.split_at(KEY_LEN - CHECKSUM_LEN);
    if checksum(body) != sum {
        return Err(KeyFormatError::Checksum);
    }
    Ok(&rest[..ID_LEN])
}

/// Whether `text` is shaped like a key id.
pub fn is_key_id(text: &str) -> bool {
    text.len() == ID_LEN && text.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `HMAC-SHA-256(pepper, key)`, lowercase hex (what the record stores).
pub fn hash(pepper: &[u8], key: &str) -> String {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, pepper), key.as_bytes());
    data_encoding::HEXLOWER.encode(tag.as_ref())
}

/// Whether `key` hashes to `stored` (hex), compared in constant time.
pub fn verify(pepper: &[u8], key: &str, stored: &str) -> bool {
    let Ok(tag) = data_encoding::HEXLOWER.decode(stored.as_bytes()) else {
        return false;
    };
    hmac::verify(
        &hmac::Key::new(hmac::HMAC_SHA256, pepper),
        key.as_bytes(),
        &tag,
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        // The CRC-32/ISO-HDLC check value.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn generated_keys_parse_and_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.key.len(), KEY_LEN);
        assert_ne!(a.key, b.key);
        assert_ne!(a.id, b.id);
        assert_eq!(parse(&a.key).unwrap(), a.id);
        assert!(is_key_id(&a.id));
        assert!(!format!("{a:?}").contains(&a.key[PREFIX.len() + ID_LEN..]));
    }

    #[test]
    fn every_single_character_change_is_refused_offline() {
        let k = generate().unwrap().key;
        for i in PREFIX.len()..KEY_LEN {
            let mut bytes = k.clone().into_bytes();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let t = String::from_utf8(bytes).unwrap();
            assert_eq!(parse(&t), Err(KeyFormatError::Checksum), "position {i}");
        }
        assert_eq!(parse(&k[..KEY_LEN - 1]), Err(KeyFormatError::Length));
        assert_eq!(parse(&format!("{k}0")), Err(KeyFormatError::Length));
        assert_eq!(
            parse(&k.replacen("abk_", "abc_", 1)),
            Err(KeyFormatError::Prefix)
        );
        let mut bad = k.clone().into_bytes();
        bad[10] = b'-';
        assert_eq!(
            parse(&String::from_utf8(bad).unwrap()),
            Err(KeyFormatError::Charset)
        );
        assert_eq!(parse(""), Err(KeyFormatError::Prefix));
    }

    #[test]
    fn hash_verifies_only_the_key_and_the_pepper() {
        let k = generate().unwrap().key;
        let h = hash(b"pepper", &k);
        assert_eq!(h.len(), 64);
        assert!(verify(b"pepper", &k, &h));
        assert!(!verify(b"other", &k, &h));
        assert!(!verify(b"pepper", &generate().unwrap().key, &h));
        assert!(!verify(b"pepper", &k, "zz"));
    }

    #[test]
    fn characters_are_roughly_uniform() {
        let rng = ring::rand::SystemRandom::new();
        let s = base62(&rng, 62 * 200).unwrap();
        let mut counts = [0u32; 62];
        for b in s.bytes() {
            let i = BASE62.iter().position(|&c| c == b).unwrap();
            counts[i] += 1;
        }
        // Expected 200 each; a biased mapping (b % 62 over 0..256) would give
        // the first 8 characters about 25% more.
        assert!(
            counts.iter().all(|&c| (120..=290).contains(&c)),
            "{counts:?}"
        );
    }
}
