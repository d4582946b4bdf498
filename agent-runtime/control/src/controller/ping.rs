//! Asking every server at once: a `$SYS` ping whose answers arrive on one
//! inbox, collected for a window. Usage polls, `tenant stats` and the
//! JetStream reservation check all read the servers this way.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::Value;

use super::Controller;
use crate::api::{ApiError, ErrorCode};

/// After as many servers answered as last time, how long to wait for more.
const STRAGGLER_WAIT: Duration = Duration::from_millis(30);

/// One server's answer and when it arrived (Unix ms).
pub(super) struct Answer {
    pub(super) at_ms: u64,
    pub(super) value: Value,
}

impl Controller {
    /// Publishes `body` on `subject` (a `$SYS` ping) and collects the JSON
    /// answers for up to `window`. With `seen`, it stops early once as many
    /// servers answered as last time (plus [`STRAGGLER_WAIT`] for one more)
    /// and records how many answered this time.
    pub(super) async fn ping_servers(
        &self,
        subject: &'static str,
        body: String,
        window: Duration,
        seen: Option<&AtomicUsize>,
        what: &str,
    ) -> Result<Vec<Answer>, ApiError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            ApiError::new(ErrorCode::Unavailable, format!("{what}: {e}"))
        };
        let inbox = self.sys.new_inbox();
        let mut replies = self
            .sys
            .subscribe(inbox.clone())
            .await
            .map_err(|e| unavailable(&e))?;
        self.sys
            .publish_with_reply(subject, inbox, body.into())
            .await
            .map_err(|e| unavailable(&e))?;
        let expected = seen.map_or(0, |s| s.load(Ordering::Relaxed));
        let mut answers = Vec::new();
        let mut deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, replies.next()).await {
            let Ok(value) = serde_json::from_slice::<Value>(&msg.payload) else {
                continue;
            };
            answers.push(Answer {
                at_ms: tenant_bus::envelope::now_ms(),
                value,
            });
            if expected > 0 && answers.len() >= expected {
                deadline = deadline.min(tokio::time::Instant::now() + STRAGGLER_WAIT);
            }
        }
        if let Some(s) = seen {
            s.store(answers.len(), Ordering::Relaxed);
        }
        let _ = replies.unsubscribe().await;
        Ok(answers)
    }
}

/// The tags a server's `$SYS` answer carries (`server.tags`: its
/// `server_tags`), as the JSZ pings of the reservation check and of
/// `tenant stats` both read them.
pub(super) fn server_tags(answer: &Value) -> impl Iterator<Item = &str> {
    answer
        .pointer("/server/tags")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}
