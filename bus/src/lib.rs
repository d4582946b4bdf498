//! tenant-bus: tenant-scoped, sealed messaging on NATS.
//!
//! A [`TenantNamespace`] confines an agent to subjects under `tenant.<id>.`; every
//! message it sends is stamped (tenant, message id, timestamp, sender) and sealed
//! with AES-256-GCM under the tenant's key, the stamp and the full subject
//! authenticated; every message it delivers passed verification (tenant, subject,
//! key, tag, freshness, replay).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use futures::StreamExt;
//! use tenant_bus::{CredentialBundle, TenantNamespace};
//!
//! let bundle = CredentialBundle::from_file("agent.json")?;
//! let ns = TenantNamespace::connect(&bundle).await?;
//! let mut sub = ns.subscribe("orders.>").await?;
//! ns.publish("orders.created", b"{\"id\": 1}").await?;
//! if let Some(msg) = sub.next().await {
//!     println!("{} from {:?}: {:?}", msg.subject, msg.sender, msg.payload);
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`error`]: the generic typed error, `Error<Kind>`.
//! - [`ids`]: validated [`TenantId`] and [`AgentId`].
//! - [`subject`]: relative subjects and patterns; [`subject::scope`] builds every
//!   full subject.
//! - [`keys`]: the platform master secret, per-tenant key derivation, key sets.
//! - [`bundle`]: the per-agent credential bundle.
//! - [`connect`]: server URL lists (`nats://a:4222,nats://b:4222`).
//! - [`envelope`]: the binary wire format, sealing and opening (nonces, ids).
//! - [`verify`]: verification on receive, drop reasons and counters.
//! - [`replay`]: bounded anti-replay windows per sender instance.
//! - [`message`]: [`TenantMessage`] and its opaque reply inbox.
//! - [`options`]: [`NamespaceOptions`], the connection builder.
//! - [`region`]: data residency: a tenant's [`region::Region`] and the
//!   JetStream placement that keeps its streams on that region's servers.
//! - [`namespace`]: [`TenantNamespace`] (publish, subscribe, request, respond).
//! - [`subscription`]: the verified message stream, bounded in messages and bytes.
//! - [`budget`]: [`ByteBudget`], the receive byte bound shared by subscriptions.
//! - [`events`]: slow-consumer and permission-violation events.
//! - [`admission`]: the hook through which a scheduler admits each message.
//! - [`kv`]: [`TenantKv`], the tenant's sealed key-value state store
//!   (`ns.kv("sessions")`) on its `STATE` bucket.
//! - [`settle`]: retrying stream and bucket creation while a new account's
//!   JetStream settles across a cluster, and lookups a leaderless stream
//!   left unanswered.
//! - [`open`]: opening a bucket, stream or consumer, creating it only when
//!   the server says it does not exist (an outage is reported as one, not as
//!   a failed create).

pub mod admission;
pub mod budget;
pub mod bundle;
pub mod connect;
pub mod envelope;
pub mod error;
pub mod events;
pub mod ids;
pub mod keys;
pub mod kv;
pub mod message;
pub mod namespace;
pub mod open;
pub mod options;
pub mod region;
pub mod replay;
pub mod settle;
pub mod subject;
pub mod subscription;
pub mod verify;

pub use budget::ByteBudget;
pub use bundle::CredentialBundle;
pub use envelope::MessageId;
pub use error::Error;
pub use events::BusEvent;
pub use ids::{AgentId, TenantId};
pub use keys::{MasterSecret, TenantKeySet};
pub use kv::{KvChange, KvEntry, KvError, KvErrorKind, KvOptions, TenantKv};
pub use message::{ReplyTo, TenantMessage};
pub use namespace::{
    ConnectError, ConnectErrorKind, PublishError, PublishErrorKind, RequestError, RequestErrorKind,
    SubscribeError, SubscribeErrorKind, TenantNamespace,
};
pub use options::NamespaceOptions;
pub use subject::{Subject, SubjectPattern};
pub use subscription::Subscription;
pub use verify::{Counters, DropReason};
