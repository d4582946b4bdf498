//! Waiting out a new account's JetStream settling across a cluster.
//!
//! The control plane answers `tenant create` only after every server's
//! resolver holds the new account's JWT, but each server enables JetStream for
//! the account a moment later, on its own. Until the JetStream meta leader has
//! done so, creating a stream or bucket for the account is refused with
//! "account not found" (10035) or "JetStream not enabled for account"
//! (10039), though nothing is wrong and a retry a few hundred milliseconds
//! later succeeds (nats-server issue #2874 describes the same race). A
//! stream placed on a server that has not yet made the account's JetStream
//! directory fails there with "could not create storage directory", which
//! the server reports to the client only as "error creating store for
//! stream" (10049) and then removes the assignment, so a retry is again
//! safe (seen on 2.15 with an R1 stream placed by tag right after the
//! tenant's creation).
//!
//! [`while_settling`] retries an operation that fails with exactly those
//! errors, for at most [`SETTLE_LIMIT`]; every other error, and the same
//! errors after the limit (an account that really lacks JetStream, a store
//! that really cannot be written), is returned at once.
//!
//! A new stream has a second, shorter race: its subjects reach the other
//! servers of the cluster over the routes, so the first publish through
//! another server may find no responder. [`while_unrouted`] retries exactly
//! that, for at most [`ROUTE_LIMIT`].
//!
//! A stream or consumer whose leader was lost answers nothing until a new
//! one is elected (a few seconds on a cluster), and a request sent before
//! that is never answered, even after the election: one lookup waited out
//! async-nats' whole request timeout (10 s) and then failed.
//! [`while_unanswered`] sends an idempotent request (a lookup) again every
//! [`ASK_AGAIN_AFTER`] while no answer has come, keeping the earlier copies
//! in flight, for at most [`ASK_LIMIT`], so it is answered about as soon as
//! the election ends.

use std::error::Error as StdError;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use async_nats::jetstream;
use async_nats::jetstream::context::CreateStreamErrorKind;
use async_nats::jetstream::ErrorCode;

/// How long a new account's JetStream may take to settle before its errors
/// are taken as final.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// The sentence a server answers in place of any failure to create a
/// stream's store on the server it placed the stream on.
const STORE_FAILED: &str = "error creating store for stream";

/// Whether `error` (or any error in its source chain) is a JetStream API
/// error saying the account is not (yet) known to JetStream, or that the
/// stream's store could not be created (which includes the account's
/// directory not yet existing on the server the stream was placed on).
pub fn is_settling(error: &(dyn StdError + 'static)) -> bool {
    api_error(error).is_some_and(|api| settling_api(&api))
}

/// The first JetStream API error (the server's answer) in `error`'s source
/// chain, however async-nats carries it: as the error itself, or inside a
/// stream create's, a stream (or bucket) lookup's or a consumer lookup's
/// error kind.
pub(crate) fn api_error(error: &(dyn StdError + 'static)) -> Option<jetstream::Error> {
    use jetstream::context::{
        ConsumerInfoError, ConsumerInfoErrorKind, CreateStreamError, GetStreamError,
        GetStreamErrorKind,
    };
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(api) = e.downcast_ref::<jetstream::Error>() {
            return Some(api.clone());
        }
        if let Some(c) = e.downcast_ref::<CreateStreamError>() {
            if let CreateStreamErrorKind::JetStream(api) = c.kind() {
                return Some(api);
            }
        }
        if let Some(g) = e.downcast_ref::<GetStreamError>() {
            if let GetStreamErrorKind::JetStream(api) = g.kind() {
                return Some(api);
            }
        }
        if let Some(c) = e.downcast_ref::<ConsumerInfoError>() {
            if let ConsumerInfoErrorKind::JetStream(api) = c.kind() {
                return Some(api);
            }
        }
        next = e.source();
    }
    None
}

/// The first error of type `T` in `error`'s source chain.
pub(crate) fn in_chain<'a, T: StdError + 'static>(
    error: &'a (dyn StdError + 'static),
) -> Option<&'a T> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        next = e.source();
    }
    None
}

fn settling_api(api: &jetstream::Error) -> bool {
    let code = api.error_code();
    code == ErrorCode::NO_ACCOUNT
        || code == ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
        // 10049 is also every other "stream create failed"; only the store
        // sentence is a placement race.
        || (code == ErrorCode::STREAM_CREATE && api.to_string().starts_with(STORE_FAILED))
}

/// Runs `op` until it succeeds, fails with an error that is not
/// [`is_settling`], or [`SETTLE_LIMIT`] has passed; returns its last result.
pub async fn while_settling<T, E, F, Fut>(op: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: StdError + 'static,
{
    let backoff = Backoff {
        limit: SETTLE_LIMIT,
        first: Duration::from_millis(50),
        most: Duration::from_millis(500),
    };
    retry_while(is_settling, backoff, "JetStream account still settling", op).await
}

/// How a retry loop waits: doubling pauses from `first` to `most`, and no
/// retry that would end past `limit` after the first try.
struct Backoff {
    limit: Duration,
    first: Duration,
    most: Duration,
}

/// Runs `op` until it succeeds, fails with an error `retryable` does not
/// accept, or `backoff` gives up; returns its last result.
async fn retry_while<T, E, F, Fut>(
    retryable: fn(&(dyn StdError + 'static)) -> bool,
    backoff: Backoff,
    why: &str,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: StdError + 'static,
{
    let deadline = Instant::now() + backoff.limit;
    let mut pause = backoff.first;
    loop {
        match op().await {
            Err(e) if retryable(&e) && Instant::now() + pause < deadline => {
                tracing::debug!(error = %e, "{why}; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(backoff.most);
            }
            other => return other,
        }
    }
}

/// How long a new stream's subjects may take to reach the server a client
/// is connected to before "no responders" is taken as final.
pub const ROUTE_LIMIT: Duration = Duration::from_secs(3);

/// Whether `error` (or any error in its source chain) is a JetStream publish
/// that no stream answered ("no responders"). Right after a stream is created
/// on a cluster, the server holding it has subscribed to its subjects, but
/// the other servers learn that interest over the routes a moment later: a
/// client connected to one of them gets "no responders" for a publish that a
/// retry delivers. Nothing was stored, so a retry is safe.
pub fn is_unrouted(error: &(dyn StdError + 'static)) -> bool {
    use jetstream::context::{PublishError, PublishErrorKind};
    in_chain::<PublishError>(error).is_some_and(|p| p.kind() == PublishErrorKind::StreamNotFound)
}

/// Runs `op` until it succeeds, fails with an error that is not
/// [`is_unrouted`], or [`ROUTE_LIMIT`] has passed; returns its last result
/// (a stream that really does not exist still fails, after the limit).
pub async fn while_unrouted<T, E, F, Fut>(op: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: StdError + 'static,
{
    let backoff = Backoff {
        limit: ROUTE_LIMIT,
        first: Duration::from_millis(20),
        most: Duration::from_millis(250),
    };
    retry_while(is_unrouted, backoff, "no stream answered yet", op).await
}

/// How often [`while_unanswered`] sends its request again while no answer
/// has come.
pub const ASK_AGAIN_AFTER: Duration = Duration::from_secs(1);
/// How long [`while_unanswered`] waits for an answer in all. A stream's
/// followers elect a new leader 4 to 9 s after the old one stops (nats-server
/// 2.15's election timeouts), so a request sent just after the election ends
/// is still within the limit.
pub const ASK_LIMIT: Duration = Duration::from_secs(12);

/// The error of [`while_unanswered`]: the request's own, or no answer to any
/// of the requests sent.
#[derive(Debug)]
pub enum AskError<E> {
    /// The request failed: the server's answer, or a failure to send it.
    Failed(E),
    /// No answer came within [`ASK_LIMIT`] (a stream or consumer without a
    /// leader, a server that does not answer).
    Unanswered,
}

impl<E: std::fmt::Display> std::fmt::Display for AskError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AskError::Failed(e) => write!(f, "{e}"),
            AskError::Unanswered => write!(
                f,
                "no answer within {} s (asked every {} s)",
                ASK_LIMIT.as_secs(),
                ASK_AGAIN_AFTER.as_secs()
            ),
        }
    }
}

impl<E: StdError + 'static> StdError for AskError<E> {
    // The request's error is the source, so the checks that walk a source
    // chain (`is_settling`, `open::is_not_found`) find the server's answer.
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            AskError::Failed(e) => Some(e),
            AskError::Unanswered => None,
        }
    }
}

impl<E> AskError<E> {
    /// The request's own error, if the server answered (or sending failed).
    pub fn failed(&self) -> Option<&E> {
        match self {
            AskError::Failed(e) => Some(e),
            AskError::Unanswered => None,
        }
    }
}

/// Runs `op`, one idempotent JetStream API request (a lookup: asking twice
/// changes nothing), until one copy of it is answered: while no answer has
/// come, a new copy is sent every [`ASK_AGAIN_AFTER`], and the earlier ones
/// stay in flight (a slow answer to the first still counts; a copy sent
/// after an election ends is answered by the new leader), for at most
/// [`ASK_LIMIT`]. A copy that times out on its own is dropped. Errors that
/// say a new account's JetStream is still settling ([`is_settling`]) send
/// the next copy after [`while_settling`]'s backoff instead. The first other
/// answer, success or error, is returned; the copies still in flight are
/// dropped.
///
/// Only for requests that are safe to repeat: a stream create sent twice
/// while the first is still being applied can be refused, so creates go
/// through [`while_settling`] with the caller's timeout.
pub async fn while_unanswered<T, E, F, Fut>(mut op: F) -> Result<T, AskError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: StdError + 'static,
{
    use futures::stream::{FuturesUnordered, StreamExt as _};
    let deadline = Instant::now() + ASK_LIMIT;
    let mut copies = FuturesUnordered::new();
    copies.push(op());
    let mut next_copy = Instant::now() + ASK_AGAIN_AFTER;
    let mut pause = Duration::from_millis(50);
    loop {
        tokio::select! {
            Some(answer) = copies.next() => match answer {
                Ok(t) => return Ok(t),
                Err(e) if timed_out(&e) => {
                    tracing::debug!(error = %e, "JetStream request unanswered");
                }
                Err(e) if is_settling(&e) && Instant::now() + pause < deadline => {
                    tracing::debug!(error = %e, "JetStream account still settling; retrying");
                    next_copy = next_copy.min(Instant::now() + pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(AskError::Failed(e)),
            },
            () = tokio::time::sleep_until(next_copy.min(deadline)) => {
                if Instant::now() >= deadline {
                    return Err(AskError::Unanswered);
                }
                tracing::debug!("JetStream request unanswered; asking again");
                copies.push(op());
                next_copy = Instant::now() + ASK_AGAIN_AFTER;
            }
        }
    }
}

/// Whether `error` (or any error in its source chain) is a JetStream request
/// that timed out: no answer, as opposed to an answer saying no (or "no
/// responders", which says JetStream is not there at all and is final).
pub fn timed_out(error: &(dyn StdError + 'static)) -> bool {
    use jetstream::context::{
        ConsumerInfoError, ConsumerInfoErrorKind, RequestError, RequestErrorKind,
    };
    in_chain::<RequestError>(error).is_some_and(|r| r.kind() == RequestErrorKind::TimedOut)
        || in_chain::<ConsumerInfoError>(error)
            .is_some_and(|c| c.kind() == ConsumerInfoErrorKind::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::context::CreateStreamError;
    use async_nats::jetstream::context::{CreateKeyValueError, CreateKeyValueErrorKind};

    fn api(code: u64) -> jetstream::Error {
        api_said(code, "x")
    }

    fn api_said(code: u64, description: &str) -> jetstream::Error {
        serde_json::from_str(&format!(
            r#"{{"code":503,"err_code":{code},"description":"{description}"}}"#
        ))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn bucket_create(code: u64) -> CreateKeyValueError {
        CreateKeyValueError::with_source(
            CreateKeyValueErrorKind::BucketCreate,
            CreateStreamError::new(CreateStreamErrorKind::JetStream(api(code))),
        )
    }

    #[test]
    fn only_the_account_codes_and_a_store_failure_are_settling_wherever_they_sit_in_the_chain() {
        assert!(is_settling(&api(10035)));
        assert!(is_settling(&api(10039)));
        assert!(is_settling(&bucket_create(10035)));
        assert!(is_settling(&bucket_create(10039)));
        let store = api_said(10049, STORE_FAILED);
        assert!(is_settling(&store));
        assert!(is_settling(&CreateStreamError::new(
            CreateStreamErrorKind::JetStream(store)
        )));
        // Any other "stream create failed" (10049 carries the cause) is final.
        assert!(!is_settling(&api_said(10049, "subjects overlap")));
        assert!(!is_settling(&api(10049)));
        // Insufficient resources, no suitable peers (a region that is down),
        // JetStream disabled on the server: final.
        for code in [10023, 10005, 10076] {
            assert!(!is_settling(&bucket_create(code)), "{code}");
        }
        assert!(!is_settling(&CreateStreamError::new(
            CreateStreamErrorKind::TimedOut
        )));
        // A bucket lookup as async-nats reports it: KeyValueError(GetBucket)
        // <- GetStreamError(JetStream(api)). A new account's is settling; a
        // missing bucket or a timed-out lookup is not.
        use async_nats::jetstream::context::{
            GetStreamError, GetStreamErrorKind, KeyValueError, KeyValueErrorKind,
        };
        let lookup = |kind| {
            KeyValueError::with_source(KeyValueErrorKind::GetBucket, GetStreamError::new(kind))
        };
        assert!(is_settling(&lookup(GetStreamErrorKind::JetStream(api(
            10035
        )))));
        assert!(is_settling(&lookup(GetStreamErrorKind::JetStream(api(
            10039
        )))));
        assert!(!is_settling(&lookup(GetStreamErrorKind::JetStream(api(
            10059
        )))));
        assert!(!is_settling(&lookup(GetStreamErrorKind::Request)));
    }

    #[tokio::test(start_paused = true)]
    async fn settling_errors_are_retried_until_success_others_are_returned_at_once() {
        let mut calls = 0;
        let out: Result<u32, CreateKeyValueError> = while_settling(|| {
            calls += 1;
            let n = calls;
            async move {
                if n < 4 {
                    Err(bucket_create(10039))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(out.ok(), Some(4));

        let mut calls = 0;
        let out: Result<u32, CreateKeyValueError> = while_settling(|| {
            calls += 1;
            async { Err(bucket_create(10023)) }
        })
        .await;
        assert!(out.is_err());
        assert_eq!(calls, 1, "a final error is not retried");
    }

    fn no_responders() -> jetstream::context::PublishError {
        jetstream::context::PublishError::new(jetstream::context::PublishErrorKind::StreamNotFound)
    }

    #[test]
    fn only_a_publish_nobody_answered_is_unrouted() {
        assert!(is_unrouted(&no_responders()));
        let wrapped = crate::error::Error::with_source(
            crate::kv::KvErrorKind::Unavailable,
            "put k",
            no_responders(),
        );
        assert!(is_unrouted(&wrapped), "found in the source chain");
        assert!(!is_unrouted(&jetstream::context::PublishError::new(
            jetstream::context::PublishErrorKind::TimedOut
        )));
        assert!(!is_unrouted(&api(10059)));
    }

    #[tokio::test(start_paused = true)]
    async fn unrouted_publishes_are_retried_then_returned_after_the_limit() {
        let mut calls = 0;
        let out: Result<u32, jetstream::context::PublishError> = while_unrouted(|| {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(no_responders())
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(out.ok(), Some(3));
        let start = tokio::time::Instant::now();
        let out: Result<(), jetstream::context::PublishError> =
            while_unrouted(|| async { Err(no_responders()) }).await;
        assert!(out.is_err());
        assert!(start.elapsed() <= ROUTE_LIMIT, "{:?}", start.elapsed());
        assert!(start.elapsed() >= ROUTE_LIMIT / 2, "{:?}", start.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn an_account_that_never_settles_fails_after_the_limit() {
        let start = tokio::time::Instant::now();
        let out: Result<(), CreateKeyValueError> =
            while_settling(|| async { Err(bucket_create(10035)) }).await;
        assert!(out.is_err());
        assert!(start.elapsed() <= SETTLE_LIMIT, "{:?}", start.elapsed());
        assert!(start.elapsed() >= SETTLE_LIMIT - Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_request_is_sent_again_until_answered() {
        use jetstream::context::{GetStreamError, GetStreamErrorKind};
        // Two copies get no answer at all (sent to a leaderless stream), the
        // third is answered: the result comes 2 x ASK_AGAIN_AFTER later.
        let start = Instant::now();
        let mut calls = 0;
        let out: Result<u32, AskError<GetStreamError>> = while_unanswered(|| {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    std::future::pending::<()>().await;
                }
                Ok(n)
            }
        })
        .await;
        assert_eq!(out.ok(), Some(3));
        assert_eq!(start.elapsed(), ASK_AGAIN_AFTER * 2);

        // A slow answer to the first copy still counts: it is not cancelled
        // when the second is sent.
        let start = Instant::now();
        let mut calls = 0;
        let out: Result<u32, AskError<GetStreamError>> = while_unanswered(|| {
            calls += 1;
            let n = calls;
            async move {
                if n == 1 {
                    tokio::time::sleep(ASK_AGAIN_AFTER * 3 / 2).await;
                    Ok(n)
                } else {
                    std::future::pending().await
                }
            }
        })
        .await;
        assert_eq!(out.ok(), Some(1));
        assert_eq!(start.elapsed(), ASK_AGAIN_AFTER * 3 / 2);
        assert_eq!(calls, 2);

        // An answer saying no is final at once.
        let mut calls = 0;
        let out: Result<(), AskError<GetStreamError>> = while_unanswered(|| {
            calls += 1;
            async {
                Err(GetStreamError::new(GetStreamErrorKind::JetStream(api(
                    10059,
                ))))
            }
        })
        .await;
        assert!(matches!(out, Err(AskError::Failed(_))));
        assert_eq!(calls, 1);

        // A new account's settling errors are retried, then answered.
        let mut calls = 0;
        let out: Result<u32, AskError<GetStreamError>> = while_unanswered(|| {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(GetStreamError::new(GetStreamErrorKind::JetStream(api(
                        10039,
                    ))))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(out.ok(), Some(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_never_answered_fails_at_the_limit() {
        let start = Instant::now();
        let mut calls = 0u32;
        let out: Result<(), AskError<std::io::Error>> = while_unanswered(|| {
            calls += 1;
            std::future::pending()
        })
        .await;
        assert!(matches!(out, Err(AskError::Unanswered)));
        assert_eq!(start.elapsed(), ASK_LIMIT);
        let sent = (ASK_LIMIT.as_millis() / ASK_AGAIN_AFTER.as_millis()) as u32;
        assert_eq!(
            calls, sent,
            "sent every {ASK_AGAIN_AFTER:?} for {ASK_LIMIT:?}"
        );
        assert!(out
            .unwrap_err()
            .to_string()
            .contains("no answer within 12 s"));
    }
}
