//! Data residency: a tenant's region and the JetStream placement that keeps
//! its streams and buckets on that region's servers.
//!
//! A cluster's servers carry tags in their configuration
//! (`server_tags: ["region:eu"]`). A stream created with placement tag
//! `region:<r>` has every replica on servers carrying that tag; when no such
//! servers can take it (the region is down or too small for the replica
//! count) JetStream refuses the stream instead of placing it elsewhere. So
//! residency needs only the tag on creation, plus a check that a stream found
//! already existing (created by someone else) carries the same tag
//! ([`Region::holds`]).
//!
//! The region is a slug like tenant ids (`eu`, `us-east-1`): lowercase
//! letters, digits and single inner hyphens, at most 64 characters.

use std::ops::RangeInclusive;

use async_nats::jetstream::stream::Placement;

use crate::error::Error;
use crate::ids::{validate_slug, IdErrorKind};

/// The prefix of a region's server tag: `region:<name>`.
pub const TAG_PREFIX: &str = "region:";

/// An invalid region name (the kinds of an invalid id).
pub type RegionError = Error<IdErrorKind>;

/// A validated region name (serialized as the plain name).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Region(String);

impl TryFrom<String> for Region {
    type Error = RegionError;
    fn try_from(name: String) -> Result<Self, Self::Error> {
        Region::new(&name)
    }
}

impl From<Region> for String {
    fn from(r: Region) -> String {
        r.0
    }
}

/// Where a tenant's streams and buckets go: the deployment's replica count
/// and the tenant's region. The control plane writes it into every bundle it
/// issues (`placement` in the bundle's JSON), so an agent's state store and
/// task streams are created replicated and in place without the agent knowing
/// the deployment; explicit options still win.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StorePlacement {
    /// Replicas of the streams and buckets an agent creates (1 to 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<usize>,
    /// The tenant's region, if it is bound to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Region>,
}

/// The replica counts JetStream accepts for a stream or bucket (1 to 5): the
/// one range every replica option of the bus and the runtime is checked
/// against.
pub const REPLICAS: RangeInclusive<usize> = 1..=5;

/// Checks a replica count against [`REPLICAS`]. The error reads
/// `"<n>: JetStream keeps 1 to 5 copies"`, for callers to prefix with the
/// option's name (`--replicas`, `replicas`). Every replica option of the
/// project is checked here, none clamped: a silent clamp creates something
/// other than asked (R5 for R7), and a zero fails late, at the server.
pub fn check_replicas(n: usize) -> Result<usize, String> {
    if REPLICAS.contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "{n}: JetStream keeps {} to {} copies",
            REPLICAS.start(),
            REPLICAS.end()
        ))
    }
}

impl StorePlacement {
    /// Nothing set (a bundle without `placement`).
    pub fn is_unset(&self) -> bool {
        self.replicas.is_none() && self.region.is_none()
    }

    /// Whether the replica count, if set, is 1 to 5.
    pub fn is_valid(&self) -> bool {
        self.replicas.is_none_or(|r| check_replicas(r).is_ok())
    }
}

impl Region {
    /// Validates `name` (the slug rule of tenant ids).
    pub fn new(name: &str) -> Result<Self, RegionError> {
        validate_slug(name).map_err(|kind| {
            let shown: String = name.chars().take(80).collect();
            Error::new(kind, format!("invalid region {shown:?}"))
        })?;
        Ok(Self(name.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The server tag of this region: `region:<name>`.
    pub fn tag(&self) -> String {
        format!("{TAG_PREFIX}{}", self.0)
    }

    /// The placement that keeps a stream on this region's servers.
    pub fn placement(&self) -> Placement {
        Placement {
            cluster: None,
            tags: vec![self.tag()],
        }
    }

    /// Whether a stream with `placement` is kept in this region (its
    /// placement carries this region's tag).
    pub fn holds(&self, placement: Option<&Placement>) -> bool {
        let tag = self.tag();
        placement.is_some_and(|p| p.tags.iter().any(|t| t.eq_ignore_ascii_case(&tag)))
    }

    /// The regions named by a server's tags (`region:<r>` tags only; tags
    /// that are not valid region names are ignored).
    pub fn of_tags<'a>(tags: impl IntoIterator<Item = &'a str>) -> Vec<Region> {
        tags.into_iter()
            .filter_map(|t| {
                t.get(..TAG_PREFIX.len())
                    .filter(|p| p.eq_ignore_ascii_case(TAG_PREFIX))
                    .and_then(|_| t.get(TAG_PREFIX.len()..))
            })
            .filter_map(|name| Region::new(&name.to_ascii_lowercase()).ok())
            .collect()
    }
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_counts_outside_one_to_five_are_refused_with_the_range() {
        for n in 1..=5 {
            assert_eq!(check_replicas(n), Ok(n));
        }
        for n in [0, 6, 7, usize::MAX] {
            let e = check_replicas(n).unwrap_err();
            assert_eq!(e, format!("{n}: JetStream keeps 1 to 5 copies"));
        }
    }

    #[test]
    fn names_follow_the_slug_rule() {
        assert!(Region::new("eu").is_ok());
        assert!(Region::new("us-east-1").is_ok());
        for bad in [
            "",
            "EU",
            "eu west",
            "-eu",
            "eu-",
            "a--b",
            "region:eu",
            "eu.x",
        ] {
            assert!(Region::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn placement_carries_the_tag_and_holds_checks_it() {
        let eu = Region::new("eu").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(eu.tag(), "region:eu");
        let p = eu.placement();
        assert_eq!(p.tags, vec!["region:eu".to_string()]);
        assert!(eu.holds(Some(&p)));
        // Server tags are matched case-insensitively by the server, so here too.
        let upper = Placement {
            cluster: None,
            tags: vec!["REGION:EU".into()],
        };
        assert!(eu.holds(Some(&upper)));
        let us = Region::new("us").unwrap_or_else(|e| panic!("{e}"));
        assert!(!eu.holds(Some(&us.placement())));
        assert!(!eu.holds(None));
        assert!(!eu.holds(Some(&Placement::default())));
    }

    #[test]
    fn placement_round_trips_and_validates_the_region() {
        let p: StorePlacement =
            serde_json::from_str(r#"{"replicas":3,"region":"eu"}"#).unwrap_or_default();
        assert_eq!(p.replicas, Some(3));
        assert_eq!(p.region.as_ref().map(Region::as_str), Some("eu"));
        assert_eq!(
            serde_json::to_string(&p).unwrap_or_default(),
            r#"{"replicas":3,"region":"eu"}"#
        );
        assert!(serde_json::from_str::<StorePlacement>(r#"{"region":"EU west"}"#).is_err());
        assert!(StorePlacement::default().is_unset());
        assert!(!StorePlacement {
            replicas: Some(7),
            region: None
        }
        .is_valid());
    }

    #[test]
    fn regions_of_server_tags() {
        let got = Region::of_tags(["region:eu", "az:1", "Region:US", "region:", "region:a b"]);
        let names: Vec<&str> = got.iter().map(Region::as_str).collect();
        assert_eq!(names, vec!["eu", "us"]);
    }
}
