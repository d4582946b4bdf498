//! Permissions: `resource:action` grants with `*` globs, always evaluated inside the
//! agent's own tenant.
//!
//! A grant is two globs separated by one `:` — `reports:*` (any action on reports),
//! `tool:search` (the tool `search`), `*:read` (read anything). `*` matches any
//! run of characters (including none) inside its half; there is no other
//! metacharacter. Both halves are 1 to 128 characters from `a-z 0-9 - _ . / *`.
//!
//! A check takes a [`Resource`], which carries the tenant it belongs to. A
//! [`PermissionSet`] is bound to one tenant, and a resource of any other tenant is
//! refused ([`PermissionErrorKind::CrossTenant`]) *before* any grant is looked at:
//! no grant, not even `*:*`, ever reaches another tenant's resources. (In the
//! platforms this project grew from, `reports:*` matched every tenant's reports.)

use std::fmt;
use std::str::FromStr;

use tenant_bus::error::Error;
use tenant_bus::TenantId;

/// The longest half of a grant, in bytes.
pub const MAX_GLOB_LEN: usize = 128;

/// Why a permission was refused or could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PermissionErrorKind {
    /// The grant text is not `resource:action` with valid globs.
    Invalid,
    /// The resource belongs to another tenant.
    CrossTenant,
    /// No grant matches.
    Denied,
}

tenant_bus::kind_display!(PermissionErrorKind {
    Invalid => "invalid permission",
    CrossTenant => "resource belongs to another tenant",
    Denied => "permission denied",
});

/// A permission error.
pub type PermissionError = Error<PermissionErrorKind>;

fn glob_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_GLOB_LEN
        && s.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'-' | b'_' | b'.' | b'/' | b'*')
        })
}

/// Whether `text` matches `glob` (`*` = any run of characters). Linear-time
/// greedy matching with backtracking to the last star; never panics.
fn glob_match(glob: &str, text: &str) -> bool {
    let (g, t) = (glob.as_bytes(), text.as_bytes());
    let (mut gi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if gi < g.len() && g[gi] == b'*' {
            star = Some((gi, ti));
            gi += 1;
        } else if gi < g.len() && g[gi] == t[ti] {
            gi += 1;
            ti += 1;
        } else if let Some((sg, st)) = star {
            gi = sg + 1;
            ti = st + 1;
            star = Some((sg, st + 1));
        } else {
            return false;
        }
    }
    while gi < g.len() && g[gi] == b'*' {
        gi += 1;
    }
    gi == g.len()
}

/// One grant: `resource:action`, each half a glob.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Permission {
    resource: String,
    action: String,
}

impl Permission {
    /// Parses `resource:action`.
    pub fn new(text: &str) -> Result<Self, PermissionError> {
        let invalid = || {
            let shown: String = text.chars().take(80).collect();
            Error::new(PermissionErrorKind::Invalid, format!("{shown:?}"))
        };
        let (resource, action) = text.split_once(':').ok_or_else(invalid)?;
        if !glob_ok(resource) || !glob_ok(action) {
            return Err(invalid());
        }
        Ok(Self {
            resource: resource.to_string(),
            action: action.to_string(),
        })
    }

    /// Whether this grant covers `action` on a resource of kind `kind`. Tenancy is
    /// not this type's concern: only [`PermissionSet::check`] evaluates grants, and
    /// only for its own tenant.
    fn covers(&self, kind: &str, action: &str) -> bool {
        glob_match(&self.resource, kind) && glob_match(&self.action, action)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.resource, self.action)
    }
}

impl fmt::Debug for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Permission({self})")
    }
}

impl FromStr for Permission {
    type Err = PermissionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Something an agent acts on: a kind (`reports`, `tool`, ...), an optional name,
/// and the tenant it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Resource {
    tenant: TenantId,
    kind: String,
    name: Option<String>,
}

impl Resource {
    /// A resource of `kind` owned by `tenant`.
    pub fn new(tenant: &TenantId, kind: &str) -> Self {
        Self {
            tenant: tenant.clone(),
            kind: kind.to_string(),
            name: None,
        }
    }

    /// Names the resource (for errors and logs; grants match on the kind).
    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// The owning tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.kind.escape_debug())?;
        if let Some(n) = &self.name {
            write!(f, "/{}", n.escape_debug())?;
        }
        Ok(())
    }
}

/// An agent's grants, bound to its tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionSet {
    tenant: TenantId,
    grants: Vec<Permission>,
}

impl PermissionSet {
    /// The grants of an agent of `tenant`.
    pub fn new(tenant: TenantId, grants: impl IntoIterator<Item = Permission>) -> Self {
        Self {
            tenant,
            grants: grants.into_iter().collect(),
        }
    }

    /// Parses each grant text.
    pub fn parse<S: AsRef<str>>(
        tenant: TenantId,
        grants: impl IntoIterator<Item = S>,
    ) -> Result<Self, PermissionError> {
        let grants = grants
            .into_iter()
            .map(|g| Permission::new(g.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(tenant, grants))
    }

    /// The tenant these grants apply in.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The grants.
    pub fn grants(&self) -> &[Permission] {
        &self.grants
    }

    /// Allows `action` on `resource` if the resource is this tenant's and a grant
    /// covers it.
    pub fn check(&self, resource: &Resource, action: &str) -> Result<(), PermissionError> {
        if resource.tenant != self.tenant {
            return Err(Error::new(
                PermissionErrorKind::CrossTenant,
                format!(
                    "{}:{} of {resource} for an agent of {}",
                    resource.kind, action, self.tenant
                ),
            ));
        }
        if self.grants.iter().any(|g| g.covers(&resource.kind, action)) {
            Ok(())
        } else {
            Err(Error::new(
                PermissionErrorKind::Denied,
                format!("{}:{} on {resource}", resource.kind, action.escape_debug()),
            ))
        }
    }

    /// Whether [`check`](Self::check) allows it.
    pub fn allows(&self, resource: &Resource, action: &str) -> bool {
        self.check(resource, action).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "abc"));
        assert!(glob_match("rep*", "reports"));
        assert!(glob_match("*rts", "reports"));
        assert!(glob_match("r*o*s", "reports"));
        assert!(!glob_match("r*x", "reports"));
        assert!(glob_match("reports", "reports"));
        assert!(!glob_match("reports", "reportsx"));
        assert!(glob_match("a**b", "ab"));
    }

    #[test]
    fn parse_rules() {
        for ok in ["reports:*", "tool:search", "*:read", "*:*", "a/b.c_d-e:x*"] {
            assert!(Permission::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "reports",
            ":read",
            "reports:",
            "a:b:c",
            "Reports:read",
            "a b:c",
        ] {
            assert_eq!(
                Permission::new(bad).unwrap_err().kind(),
                PermissionErrorKind::Invalid,
                "{bad}"
            );
        }
    }

    #[test]
    fn never_crosses_tenants() {
        let a = TenantId::new("a").unwrap();
        let b = TenantId::new("b").unwrap();
        let set = PermissionSet::parse(a.clone(), ["reports:*", "*:*"]).unwrap();
        assert!(set.allows(&Resource::new(&a, "reports"), "read"));
        assert_eq!(
            set.check(&Resource::new(&b, "reports"), "read")
                .unwrap_err()
                .kind(),
            PermissionErrorKind::CrossTenant
        );
        let narrow = PermissionSet::parse(a.clone(), ["reports:read"]).unwrap();
        assert_eq!(
            narrow
                .check(&Resource::new(&a, "reports"), "write")
                .unwrap_err()
                .kind(),
            PermissionErrorKind::Denied
        );
    }
}
