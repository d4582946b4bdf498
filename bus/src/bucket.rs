//! Opening a key-value bucket that may not exist yet.
//!
//! "Get the bucket, and create it if that failed" takes every failure of the
//! get for absence. On a cluster that loses the node leading the bucket's
//! stream, the get fails by timing out (the stream answers nothing until a
//! new leader is elected), and the create that follows waits out another
//! request or is refused as "stream name already in use with a different
//! configuration" (10058): a new runtime instance took 10 s to start and
//! then named the wrong cause. [`open_or_create`] creates only when the
//! server says the bucket's stream does not exist (10059), and reports any
//! other failure of the lookup as what it is.
//!
//! A lookup that gets no answer is sent again every [`LOOKUP_TRY`] for at
//! most [`LOOKUP_LIMIT`]: a request sent while the stream has no leader is
//! never answered, so a new one finds the new leader as soon as it is
//! elected. The lookup and the create are retried while a new account's
//! JetStream settles ([`crate::settle::while_settling`]). When the create
//! fails, the bucket is looked up once more: another process may have
//! created it in between (concurrent creators of one bucket are normal:
//! every agent of a tenant opens its state store and task buckets).

use std::error::Error as StdError;
use std::time::Duration;

use async_nats::jetstream::{self, kv, ErrorCode};
use tokio::time::Instant;

use crate::error::Error;
use crate::settle::{api_error, in_chain, while_settling};

/// Which step of [`open_or_create`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BucketErrorKind {
    /// Looking the bucket up failed for another reason than its absence (no
    /// answer, no leader, a stream of that name that is not a bucket).
    Open,
    /// The bucket did not exist and creating it failed (and it still cannot
    /// be opened).
    Create,
}

crate::kind_display!(BucketErrorKind {
    Open => "cannot open the bucket",
    Create => "cannot create the bucket",
});

/// An [`open_or_create`] error; the source is async-nats' error.
pub type BucketError = Error<BucketErrorKind>;

/// Whether `error` (or any error in its source chain) is the server saying a
/// stream does not exist (JetStream API error 10059), as async-nats reports
/// it for a stream or bucket lookup.
pub fn is_not_found(error: &(dyn StdError + 'static)) -> bool {
    api_error(error).is_some_and(|api| api.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// Opens bucket `config.bucket`, creating it with `config` only if the server
/// says it does not exist. Returns the store and whether this call created it
/// (an existing bucket keeps its own configuration: check what matters).
pub async fn open_or_create(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<(kv::Store, bool), BucketError> {
    // Boxed: the lookups, the create and its retries make a large future,
    // and callers open several buckets in one `async fn` (the control plane's
    // store); inline, that overflowed a 2 MiB thread stack in a debug build.
    Box::pin(open_or_create_inner(js, config)).await
}

async fn open_or_create_inner(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<(kv::Store, bool), BucketError> {
    let name = config.bucket.clone();
    if exists(js, &name)
        .await
        .map_err(|e| Error::with_source(BucketErrorKind::Open, name.clone(), e))?
    {
        // Opened with the caller's context, whose timeout the store keeps.
        return js
            .get_key_value(name.as_str())
            .await
            .map(|kv| (kv, false))
            .map_err(|e| Error::with_source(BucketErrorKind::Open, name, e));
    }
    match while_settling(|| js.create_key_value(config.clone())).await {
        Ok(kv) => Ok((kv, true)),
        // Created by someone else meanwhile: open theirs.
        Err(create) => match js.get_key_value(name.as_str()).await {
            Ok(kv) => Ok((kv, false)),
            Err(_) => Err(Error::with_source(BucketErrorKind::Create, name, create)),
        },
    }
}

/// How long one lookup of a bucket waits for an answer before it is sent
/// again. A stream whose leader was lost answers nothing until a new one is
/// elected (a few seconds on a cluster), and a request sent before that is
/// never answered: a short wait and a new request open the bucket about as
/// soon as the election ends, where one request waited out async-nats' 10 s.
pub const LOOKUP_TRY: Duration = Duration::from_secs(2);
/// How long the lookups of one open may take in all before the bucket is
/// reported unavailable (async-nats' own request timeout).
pub const LOOKUP_LIMIT: Duration = Duration::from_secs(10);

/// Whether bucket `name` exists: its stream is looked up, asked again every
/// [`LOOKUP_TRY`] while no answer comes, for at most [`LOOKUP_LIMIT`], and
/// while a new account's JetStream settles.
async fn exists(
    js: &jetstream::Context,
    name: &str,
) -> Result<bool, jetstream::context::GetStreamError> {
    let mut quick = js.clone();
    quick.set_timeout(LOOKUP_TRY);
    let stream = format!("KV_{name}");
    let deadline = Instant::now() + LOOKUP_LIMIT;
    loop {
        match while_settling(|| quick.get_stream(stream.as_str())).await {
            Ok(_) => return Ok(true),
            Err(e) if is_not_found(&e) => return Ok(false),
            Err(e) if timed_out(&e) && Instant::now() < deadline => {
                tracing::debug!(bucket = name, error = %e, "bucket lookup unanswered; asking again");
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether `error` (or any error in its source chain) is a JetStream request
/// that timed out: no answer, as opposed to an answer saying no (or "no
/// responders", which says JetStream is not there at all and is final).
fn timed_out(error: &(dyn StdError + 'static)) -> bool {
    use jetstream::context::{RequestError, RequestErrorKind};
    in_chain::<RequestError>(error).is_some_and(|r| r.kind() == RequestErrorKind::TimedOut)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn api(code: u64) -> jetstream::Error {
        serde_json::from_value(serde_json::json!({
            "code": 404, "err_code": code, "description": "stream not found"
        }))
        .unwrap()
    }

    #[test]
    fn only_stream_not_found_is_absence() {
        assert!(is_not_found(&api(10059)));
        assert!(!is_not_found(&api(10058)));
        assert!(!is_not_found(&api(10039)));
        // As async-nats reports a bucket lookup: KeyValueError(GetBucket) <-
        // GetStreamError(JetStream(api)).
        let get = jetstream::context::GetStreamError::new(
            jetstream::context::GetStreamErrorKind::JetStream(api(10059)),
        );
        let kv_err = jetstream::context::KeyValueError::with_source(
            jetstream::context::KeyValueErrorKind::GetBucket,
            get,
        );
        assert!(is_not_found(&kv_err));
        // A lookup that timed out is not absence.
        let timed_out = jetstream::context::KeyValueError::with_source(
            jetstream::context::KeyValueErrorKind::GetBucket,
            jetstream::context::GetStreamError::new(
                jetstream::context::GetStreamErrorKind::Request,
            ),
        );
        assert!(!is_not_found(&timed_out));
        assert!(!is_not_found(&std::io::Error::other("x")));
    }

    #[test]
    fn only_an_unanswered_lookup_is_asked_again() {
        use jetstream::context::{
            GetStreamError, GetStreamErrorKind, RequestError, RequestErrorKind,
        };
        let request = |kind| {
            GetStreamError::with_source(GetStreamErrorKind::Request, RequestError::new(kind))
        };
        assert!(super::timed_out(&request(RequestErrorKind::TimedOut)));
        assert!(!super::timed_out(&request(RequestErrorKind::NoResponders)));
        assert!(!super::timed_out(&GetStreamError::new(
            GetStreamErrorKind::JetStream(api(10059))
        )));
    }
}
