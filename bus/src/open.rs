//! Opening a bucket, stream or consumer that may not exist yet.
//!
//! "Get it, and create it if that failed" takes every failure of the get
//! for absence. On a cluster that loses the node leading a bucket's stream,
//! the get fails by timing out (the stream answers nothing until a new
//! leader is elected), and the create that follows waits out another
//! request or is refused as "stream name already in use with a different
//! configuration" (10058): a new runtime instance took 10 s to start and
//! then named the wrong cause. [`bucket()`], [`stream()`] and [`consumer()`]
//! create only when the server says the thing does not exist (stream not
//! found, 10059; consumer not found, 10014), and report any other failure
//! of the lookup as what it is ([`OpenErrorKind::Open`]).
//!
//! The lookup is sent again while it gets no answer
//! ([`crate::settle::while_unanswered`]: every 1 s, for at most 12 s): a
//! request sent while the stream or consumer has no leader is never
//! answered, so a new one finds the new leader as soon as it is elected.
//! The lookup and the create are retried while a new account's JetStream
//! settles. When the create fails, the lookup is made once more: another
//! process may have created it in between (concurrent creators are normal:
//! every agent of a tenant opens its state store and task stream).
//!
//! The handles returned keep the caller's context (and its request
//! timeout); each open costs one lookup when the thing exists.

use std::error::Error as StdError;

use async_nats::jetstream::consumer::{Consumer, FromConsumer, IntoConsumerConfig};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, kv, stream, ErrorCode};

use crate::error::Error;
use crate::settle::{api_error, in_chain, while_settling, while_unanswered};

/// Which step of an open failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OpenErrorKind {
    /// Looking it up failed for another reason than its absence (no answer,
    /// no leader, a stream of that name that is not a bucket).
    Open,
    /// It did not exist and creating it failed (and it still cannot be
    /// looked up).
    Create,
}

crate::kind_display!(OpenErrorKind {
    Open => "cannot open",
    Create => "cannot create",
});

/// An error of [`bucket()`], [`stream()`] or [`consumer()`]; the source is
/// async-nats' error (or [`crate::settle::AskError::Unanswered`]).
pub type OpenError = Error<OpenErrorKind>;

/// Whether `error` (or any error in its source chain) is the server saying a
/// stream does not exist (JetStream API error 10059), as async-nats reports
/// it for a stream or bucket lookup.
pub fn is_not_found(error: &(dyn StdError + 'static)) -> bool {
    api_error(error).is_some_and(|api| api.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// Whether `error` (or any error in its source chain) is the server saying a
/// consumer does not exist (10014), as async-nats reports a consumer lookup.
fn is_consumer_not_found(error: &(dyn StdError + 'static)) -> bool {
    use jetstream::context::ConsumerInfoError;
    in_chain::<ConsumerInfoError>(error)
        .is_some_and(|c| c.kind() == ConsumerInfoErrorKind::NotFound)
        || api_error(error).is_some_and(|api| api.error_code() == ErrorCode::CONSUMER_NOT_FOUND)
}

/// Opens bucket `config.bucket`, creating it with `config` only if the server
/// says it does not exist. Returns the store and whether this call created it
/// (an existing bucket keeps its own configuration: check what matters).
pub async fn bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<(kv::Store, bool), OpenError> {
    // Boxed: the lookups, the create and its retries make a large future,
    // and callers open several buckets in one `async fn` (the control plane's
    // store); inline, that overflowed a 2 MiB thread stack in a debug build.
    Box::pin(async move {
        let name = config.bucket.clone();
        let what = || format!("bucket {name}");
        match while_unanswered(|| js.get_key_value(name.as_str())).await {
            Ok(kv) => return Ok((kv, false)),
            Err(e) if !is_not_found(&e) => {
                return Err(Error::with_source(OpenErrorKind::Open, what(), e))
            }
            Err(_) => {}
        }
        match while_settling(|| js.create_key_value(config.clone())).await {
            Ok(kv) => Ok((kv, true)),
            // Created by someone else meanwhile: open theirs.
            Err(create) => match js.get_key_value(name.as_str()).await {
                Ok(kv) => Ok((kv, false)),
                Err(_) => Err(Error::with_source(OpenErrorKind::Create, what(), create)),
            },
        }
    })
    .await
}

/// Opens stream `config.name`, creating it with `config` only if the server
/// says it does not exist. Returns the stream and whether this call created
/// it (an existing stream keeps its own configuration: check what matters).
pub async fn stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<(stream::Stream, bool), OpenError> {
    Box::pin(async move {
        let name = config.name.clone();
        let what = || format!("stream {name}");
        match while_unanswered(|| js.get_stream(name.as_str())).await {
            Ok(s) => return Ok((s, false)),
            Err(e) if !is_not_found(&e) => {
                return Err(Error::with_source(OpenErrorKind::Open, what(), e))
            }
            Err(_) => {}
        }
        match while_settling(|| js.create_stream(config.clone())).await {
            Ok(s) => Ok((s, true)),
            Err(create) => match js.get_stream(name.as_str()).await {
                Ok(s) => Ok((s, false)),
                Err(_) => Err(Error::with_source(OpenErrorKind::Create, what(), create)),
            },
        }
    })
    .await
}

/// Opens consumer `name` of stream `stream` (the handle keeps `js`, the
/// context the stream was opened with), creating it with `config` only if
/// the server says it does not exist. An existing consumer keeps its own
/// configuration, as with async-nats' `get_or_create_consumer`.
pub async fn consumer<C>(
    js: &jetstream::Context,
    stream: &stream::Stream,
    name: &str,
    config: C,
) -> Result<Consumer<C>, OpenError>
where
    C: IntoConsumerConfig + FromConsumer + Clone,
{
    let what = || format!("consumer {name}");
    match while_unanswered(|| stream.consumer_info(name)).await {
        Ok(info) => {
            let own = C::try_from_consumer_config(info.config.clone()).map_err(|e| {
                Error::new(
                    OpenErrorKind::Open,
                    format!("{}: of another kind: {e}", what()),
                )
            })?;
            return Ok(Consumer::new(own, info, js.clone()));
        }
        Err(e) if !is_consumer_not_found(&e) => {
            return Err(Error::with_source(OpenErrorKind::Open, what(), e))
        }
        Err(_) => {}
    }
    match while_settling(|| stream.create_consumer(config.clone())).await {
        Ok(c) => Ok(c),
        Err(create) => match stream.get_consumer::<C>(name).await {
            Ok(c) => Ok(c),
            Err(_) => Err(Error::with_source(OpenErrorKind::Create, what(), create)),
        },
    }
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
        use crate::settle::timed_out;
        use jetstream::context::{
            ConsumerInfoError, GetStreamError, GetStreamErrorKind, RequestError, RequestErrorKind,
        };
        let request = |kind| {
            GetStreamError::with_source(GetStreamErrorKind::Request, RequestError::new(kind))
        };
        assert!(timed_out(&request(RequestErrorKind::TimedOut)));
        assert!(!timed_out(&request(RequestErrorKind::NoResponders)));
        assert!(!timed_out(&GetStreamError::new(
            GetStreamErrorKind::JetStream(api(10059))
        )));
        assert!(timed_out(&ConsumerInfoError::new(
            ConsumerInfoErrorKind::TimedOut
        )));
        assert!(!timed_out(&ConsumerInfoError::new(
            ConsumerInfoErrorKind::NoResponders
        )));
    }

    #[test]
    fn absence_is_read_through_the_resend_wrapper() {
        use crate::settle::AskError;
        use jetstream::context::{ConsumerInfoError, GetStreamError, GetStreamErrorKind};
        let gone = AskError::Failed(GetStreamError::new(GetStreamErrorKind::JetStream(api(
            10059,
        ))));
        assert!(is_not_found(&gone));
        assert!(!is_not_found(&AskError::<GetStreamError>::Unanswered));
        let no_consumer = AskError::Failed(ConsumerInfoError::new(ConsumerInfoErrorKind::NotFound));
        assert!(is_consumer_not_found(&no_consumer));
        assert!(!is_consumer_not_found(&AskError::Failed(
            ConsumerInfoError::new(ConsumerInfoErrorKind::TimedOut)
        )));
        assert!(
            !is_consumer_not_found(&gone),
            "a missing stream is not a missing consumer"
        );
    }
}
