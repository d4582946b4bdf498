//! The plaintexts sealed inside task results and dead letters.
//!
//! - A result (sealed on `tenant.<id>.tasks.results.<task id hex>`, and stored
//!   sealed in the done bucket): byte 0 is `0` (completed; the rest is the output)
//!   or `1` (dead-lettered; then the delivery count as u32 big-endian and the
//!   UTF-8 reason).
//! - A dead letter (sealed on `tenant.<id>.tasks.dead.<type>`): JSON
//!   [`DeadLetter`], the original payload in base64.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskOutcome {
    /// The handler succeeded with this output.
    Completed(Bytes),
    /// The task was dead-lettered.
    DeadLettered {
        /// Why (the handler's last failure, or expiry).
        reason: String,
        /// Deliveries made.
        deliveries: u32,
    },
}

impl TaskOutcome {
    /// The output, if completed.
    pub fn output(&self) -> Option<&Bytes> {
        match self {
            Self::Completed(b) => Some(b),
            Self::DeadLettered { .. } => None,
        }
    }

    pub(crate) fn encode(&self) -> Bytes {
        match self {
            Self::Completed(out) => {
                let mut b = BytesMut::with_capacity(1 + out.len());
                b.put_u8(0);
                b.extend_from_slice(out);
                b.freeze()
            }
            Self::DeadLettered { reason, deliveries } => {
                let mut b = BytesMut::with_capacity(5 + reason.len());
                b.put_u8(1);
                b.put_u32(*deliveries);
                b.extend_from_slice(reason.as_bytes());
                b.freeze()
            }
        }
    }

    pub(crate) fn decode(mut plain: Bytes) -> Option<Self> {
        let tag = *plain.first()?;
        match tag {
            0 => Some(Self::Completed(plain.split_off(1))),
            1 => {
                let n: [u8; 4] = plain.get(1..5)?.try_into().ok()?;
                let reason = std::str::from_utf8(plain.get(5..)?).ok()?.to_string();
                Some(Self::DeadLettered {
                    reason,
                    deliveries: u32::from_be_bytes(n),
                })
            }
            _ => None,
        }
    }
}

/// A task that will not be retried, with why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// The task's message id (hex).
    pub task_id: String,
    /// Its type.
    pub task_type: String,
    /// Why it was given up.
    pub reason: String,
    /// Deliveries made.
    pub deliveries: u32,
    /// When it was dispatched, ms since the Unix epoch.
    pub dispatched_at_ms: u64,
    /// The dispatching agent, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// The original payload, base64.
    #[serde(rename = "payload_b64")]
    payload_b64: String,
}

impl DeadLetter {
    pub(crate) fn new(
        task_id: String,
        task_type: String,
        reason: String,
        deliveries: u32,
        dispatched_at_ms: u64,
        sender: Option<String>,
        payload: &[u8],
    ) -> Self {
        Self {
            task_id,
            task_type,
            reason,
            deliveries,
            dispatched_at_ms,
            sender,
            payload_b64: B64.encode(payload),
        }
    }

    /// The original task payload.
    pub fn payload(&self) -> Option<Bytes> {
        B64.decode(&self.payload_b64).ok().map(Bytes::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_round_trip() {
        for o in [
            TaskOutcome::Completed(Bytes::from_static(b"ok")),
            TaskOutcome::Completed(Bytes::new()),
            TaskOutcome::DeadLettered {
                reason: "boom".into(),
                deliveries: 3,
            },
        ] {
            assert_eq!(TaskOutcome::decode(o.encode()), Some(o));
        }
        assert_eq!(TaskOutcome::decode(Bytes::new()), None);
        assert_eq!(TaskOutcome::decode(Bytes::from_static(&[1, 0])), None);
        assert_eq!(TaskOutcome::decode(Bytes::from_static(&[9])), None);
    }
}
