//! Verified messages as the application sees them.

use std::time::SystemTime;

use bytes::Bytes;

use crate::envelope::MessageId;
use crate::ids::{AgentId, TenantId};
use crate::subject::Subject;

/// Where to send a response: a reply inbox inside the tenant's namespace.
///
/// Opaque on purpose: it can only come from a verified received message (its reply
/// subject was bound into the seal and checked to be `tenant.<id>._INBOX.…`), and
/// only [`TenantNamespace::respond`](crate::TenantNamespace::respond) uses it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ReplyTo(String);

impl ReplyTo {
    pub(crate) fn new(full: &str) -> Self {
        Self(full.to_string())
    }

    /// The full inbox subject.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ReplyTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReplyTo({:?})", self.0)
    }
}

/// A message that passed verification.
#[derive(Debug, Clone)]
pub struct TenantMessage {
    /// The subject, relative to the namespace.
    pub subject: Subject,
    /// The tenant it was sealed for (always the receiver's own).
    pub tenant: TenantId,
    /// The 128-bit message id.
    pub msg_id: MessageId,
    /// When the sender sealed it.
    pub timestamp: SystemTime,
    /// The sending agent, if it identified itself.
    pub sender: Option<AgentId>,
    /// The key version that sealed it.
    pub key_version: u32,
    /// The decrypted payload.
    pub payload: Bytes,
    /// Where a response goes, for requests.
    pub reply: Option<ReplyTo>,
}

impl TenantMessage {
    /// Decodes the payload as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}
