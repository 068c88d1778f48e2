//! The verified identity of the peer that sent a call, and rules that
//! require one.
//!
//! A server that verifies client certificates (sluice's TLS listener with
//! `client_auth`) puts a [`PeerIdentity`] on every request of the
//! connection as a request extension; a call on a connection without a
//! verified certificate carries none. Layers read it from there: the
//! [`enrich`](crate::enrich) layer's `client_id` rule puts
//! [`PeerIdentity::id`] into the request metadata, and a route's
//! [`IdentityRule`] refuses a call whose identity it does not accept.
//!
//! The identity is what the certificate says, already verified against a
//! CA: its URI SANs (a SPIFFE id among them), DNS SANs, subject common
//! name, and the role values the server was told to read (Talos reads
//! roles from the subject's organization).
//!
//! # Example
//!
//! ```
//! use sluice_layers::identity::{IdentityParts, IdentityRule, PeerIdentity};
//!
//! let id = PeerIdentity::new(IdentityParts {
//!     uris: vec!["spiffe://cluster.local/ns/prod/sa/web".into()],
//!     dns_names: vec!["web.prod.svc".into()],
//!     common_name: Some("web".into()),
//!     roles: vec!["os:reader".into()],
//! });
//! assert_eq!(id.id(), "spiffe://cluster.local/ns/prod/sa/web");
//! assert_eq!(id.trust_domain(), Some("cluster.local"));
//!
//! let prod = IdentityRule::new().trust_domain("cluster.local").prefix("spiffe://cluster.local/ns/prod/");
//! assert!(prod.permits(Some(&id)));
//! assert!(!prod.permits(None));
//! let admins = IdentityRule::new().role("os:admin");
//! assert!(!admins.permits(Some(&id)));
//! ```

use std::sync::Arc;

/// What a verified certificate says about its holder; the fields of a
/// [`PeerIdentity`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityParts {
    /// URI subject alternative names, in certificate order (a SPIFFE id is
    /// one of them).
    pub uris: Vec<String>,
    /// DNS subject alternative names, in certificate order.
    pub dns_names: Vec<String>,
    /// The subject's common name.
    pub common_name: Option<String>,
    /// Role values, from wherever the server was told to read them (the
    /// subject's organization or organizational unit, or an extension).
    pub roles: Vec<String>,
}

/// The verified identity of a call's peer, as a request extension. Cheap
/// to clone: every call of a connection shares one.
///
/// See the [module docs](crate::identity) for an example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    parts: Arc<IdentityParts>,
    /// Index into `parts.uris` of the first `spiffe://` URI.
    spiffe: Option<usize>,
}

impl PeerIdentity {
    /// The identity a certificate with `parts` proves.
    pub fn new(parts: IdentityParts) -> Self {
        let spiffe = parts.uris.iter().position(|u| u.starts_with(SPIFFE));
        Self {
            parts: Arc::new(parts),
            spiffe,
        }
    }

    /// The one string that names the peer: its SPIFFE id, else its first
    /// URI SAN, else its first DNS SAN, else its common name, else `""`.
    ///
    /// A common name that looks like a URI (`scheme://…`) is never the id:
    /// name constraints on a CA bind SANs, not the CN, so a constrained
    /// intermediate could otherwise issue `CN=spiffe://other-domain/…`.
    pub fn id(&self) -> &str {
        let p = &*self.parts;
        self.spiffe_id()
            .or(p.uris.first().map(String::as_str))
            .or(p.dns_names.first().map(String::as_str))
            .or(p.common_name.as_deref().filter(|cn| !cn.contains("://")))
            .unwrap_or("")
    }

    /// The SPIFFE id (`spiffe://trust-domain/path`), if the certificate has
    /// one.
    pub fn spiffe_id(&self) -> Option<&str> {
        self.spiffe.map(|i| self.parts.uris[i].as_str())
    }

    /// The trust domain of the SPIFFE id.
    pub fn trust_domain(&self) -> Option<&str> {
        let rest = self.spiffe_id()?.strip_prefix(SPIFFE)?;
        Some(rest.split('/').next().unwrap_or(rest))
    }

    /// Everything the certificate says.
    pub fn parts(&self) -> &IdentityParts {
        &self.parts
    }

    /// Whether the peer holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.parts.roles.iter().any(|r| r == role)
    }
}

const SPIFFE: &str = "spiffe://";

/// Which identities a route accepts. Every condition that is set must
/// hold; within a list, one match is enough. A rule with nothing set
/// accepts any verified identity, and never a call without one.
///
/// See the [module docs](crate::identity) for an example.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityRule {
    trust_domain: Option<String>,
    exact: Vec<String>,
    prefix: Option<String>,
    roles: Vec<String>,
}

impl IdentityRule {
    /// A rule that accepts any verified identity.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requires a SPIFFE id in trust domain `domain`.
    #[must_use]
    pub fn trust_domain(mut self, domain: impl Into<String>) -> Self {
        self.trust_domain = Some(domain.into());
        self
    }

    /// Accepts [`PeerIdentity::id`] equal to `id` (with several calls, to
    /// any of them).
    #[must_use]
    pub fn exact(mut self, id: impl Into<String>) -> Self {
        self.exact.push(id.into());
        self
    }

    /// Requires [`PeerIdentity::id`] to start with `prefix`.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Requires role `role` (with several calls, any of them).
    #[must_use]
    pub fn role(mut self, role: impl Into<String>) -> Self {
        self.roles.push(role.into());
        self
    }

    /// Whether a call from `identity` (`None`: no verified certificate)
    /// passes.
    pub fn permits(&self, identity: Option<&PeerIdentity>) -> bool {
        let Some(identity) = identity else {
            return false;
        };
        // A rule naming a SPIFFE id is held against the SPIFFE id (a URI
        // SAN) alone, whatever the id falls back to.
        let subject = |rule: &str| {
            if rule.starts_with(SPIFFE) {
                identity.spiffe_id().unwrap_or("")
            } else {
                identity.id()
            }
        };
        self.trust_domain
            .as_deref()
            .is_none_or(|d| identity.trust_domain() == Some(d))
            && (self.exact.is_empty() || self.exact.iter().any(|e| subject(e) == e))
            && self
                .prefix
                .as_deref()
                .is_none_or(|p| subject(p).starts_with(p))
            && (self.roles.is_empty() || self.roles.iter().any(|r| identity.has_role(r)))
    }

    /// One line saying what the rule accepts (for `sluice check`).
    pub fn describe(&self) -> String {
        let mut terms = Vec::new();
        if let Some(d) = &self.trust_domain {
            terms.push(format!("trust domain {d:?}"));
        }
        if !self.exact.is_empty() {
            terms.push(format!("id one of {:?}", self.exact));
        }
        if let Some(p) = &self.prefix {
            terms.push(format!("id starting {p:?}"));
        }
        if !self.roles.is_empty() {
            terms.push(format!("role one of {:?}", self.roles));
        }
        if terms.is_empty() {
            "any verified client".to_owned()
        } else {
            terms.join(" and ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(parts: IdentityParts) -> PeerIdentity {
        PeerIdentity::new(parts)
    }

    #[test]
    fn the_id_falls_back_from_spiffe_to_uri_to_dns_to_cn() {
        let full = IdentityParts {
            uris: vec!["urn:x".into(), "spiffe://td/a".into()],
            dns_names: vec!["a.example".into()],
            common_name: Some("a".into()),
            roles: vec![],
        };
        assert_eq!(with(full.clone()).id(), "spiffe://td/a");
        let no_spiffe = IdentityParts {
            uris: vec!["urn:x".into()],
            ..full.clone()
        };
        assert_eq!(with(no_spiffe).id(), "urn:x");
        let dns = IdentityParts {
            uris: vec![],
            ..full.clone()
        };
        assert_eq!(with(dns).id(), "a.example");
        let cn = IdentityParts {
            uris: vec![],
            dns_names: vec![],
            ..full
        };
        assert_eq!(with(cn).id(), "a");
        assert_eq!(with(IdentityParts::default()).id(), "");
    }

    #[test]
    fn a_rule_needs_every_condition_and_one_of_each_list() {
        let id = with(IdentityParts {
            uris: vec!["spiffe://prod/ns/a/sa/web".into()],
            roles: vec!["reader".into()],
            ..IdentityParts::default()
        });
        assert!(IdentityRule::new().permits(Some(&id)));
        assert!(IdentityRule::new().trust_domain("prod").permits(Some(&id)));
        assert!(!IdentityRule::new().trust_domain("pro").permits(Some(&id)));
        assert!(
            IdentityRule::new()
                .exact("spiffe://prod/ns/b/sa/x")
                .exact("spiffe://prod/ns/a/sa/web")
                .permits(Some(&id))
        );
        assert!(
            !IdentityRule::new()
                .trust_domain("prod")
                .role("admin")
                .permits(Some(&id))
        );
        assert!(
            IdentityRule::new()
                .role("admin")
                .role("reader")
                .permits(Some(&id))
        );
        assert!(
            !IdentityRule::new()
                .prefix("spiffe://prod/ns/b/")
                .permits(Some(&id))
        );
        assert!(!IdentityRule::new().permits(None));
    }

    #[test]
    fn a_common_name_never_passes_for_a_spiffe_id() {
        // No SANs: only a CN, shaped like a SPIFFE id.
        let forged = with(IdentityParts {
            common_name: Some("spiffe://prod/ns/ops/sa/admin".into()),
            ..IdentityParts::default()
        });
        assert_eq!(forged.id(), "");
        assert!(
            !IdentityRule::new()
                .prefix("spiffe://prod/ns/ops/")
                .permits(Some(&forged))
        );
        assert!(
            !IdentityRule::new()
                .exact("spiffe://prod/ns/ops/sa/admin")
                .permits(Some(&forged))
        );
        // A DNS identity cannot pass a SPIFFE rule either.
        let dns = with(IdentityParts {
            dns_names: vec!["spiffe://prod/ns/ops/sa/admin".into()],
            ..IdentityParts::default()
        });
        assert!(
            !IdentityRule::new()
                .exact("spiffe://prod/ns/ops/sa/admin")
                .permits(Some(&dns))
        );
        let plain = with(IdentityParts {
            common_name: Some("legacy-client".into()),
            ..IdentityParts::default()
        });
        assert!(
            IdentityRule::new()
                .exact("legacy-client")
                .permits(Some(&plain))
        );
    }
}
