//! Identity: how agents and services log in without a credentials file.
//!
//! A client connects with only a URL and an API key (or a JWT of the
//! platform's identity provider) as its NATS token. The server's
//! `default_sentinel` places it in the auth account, whose users go to the
//! auth callout the controller runs; the callout checks the key (or token),
//! finds the tenant from the verified record (never from anything the client
//! says), takes one of the tenant's `max_agents` connection slots, and answers
//! with a short-lived user JWT in the tenant's account.
//!
//! # Layout
//! - [`apikey`]: the key format, its offline checksum, and the keyed hash stored.
//! - [`callout`]: the auth callout's claims on the wire, xkey sealing, and the
//!   auth account and sentinel JWTs.
//! - [`platform_jwt`]: the platform identity provider's JWTs, verified against
//!   its JWKS and mapped to a tenant and an agent type.
//! - [`scopes`]: API key scopes and the permissions they grant.

pub mod apikey;
pub mod callout;
pub mod platform_jwt;
pub mod scopes;
