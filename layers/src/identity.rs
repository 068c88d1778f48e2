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
    /// The SPIFFE id: the index into `parts.uris` of the one valid
    /// `spiffe://` URI, or why there is none.
    spiffe: Result<usize, SpiffeIdError>,
}

/// Why a certificate has no SPIFFE identity although it has `spiffe:` URI
/// SANs (the [SPIFFE ID] and [X.509-SVID] specifications).
///
/// [SPIFFE ID]: https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md
/// [X.509-SVID]: https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The certificate has no `spiffe:` URI SAN.
    #[error("the certificate has no SPIFFE id")]
    Missing,
    /// More than one `spiffe:` URI SAN: an SVID has exactly one.
    #[error("the certificate has {0} SPIFFE ids; an SVID has exactly one")]
    Several(usize),
    /// The one `spiffe:` URI is not a valid SPIFFE id.
    #[error("{id:?} is not a valid SPIFFE id: {reason}")]
    Invalid {
        /// The URI as the certificate has it.
        id: String,
        /// What the specification forbids in it.
        reason: &'static str,
    },
}

/// Checks `id` against the SPIFFE ID specification: the scheme `spiffe://`
/// in lower case, a trust domain of lower-case letters, digits, `.`, `-`
/// and `_` (so no user info and no port), and a path of segments of
/// letters, digits, `.`, `-` and `_`, none empty, none `.` or `..`, with no
/// trailing `/`, query or fragment; 2048 bytes at most.
///
/// # Errors
///
/// [`SpiffeIdError::Invalid`] with what the id breaks.
///
/// ```
/// use sluice_layers::identity::validate_spiffe_id;
///
/// assert!(validate_spiffe_id("spiffe://example.org/ns/a/sa/web").is_ok());
/// assert!(validate_spiffe_id("spiffe://example.org/ns/a/sa/../../b").is_err());
/// assert!(validate_spiffe_id("SPIFFE://example.org/a").is_err());
/// assert!(validate_spiffe_id("spiffe://example.org:443/a").is_err());
/// ```
pub fn validate_spiffe_id(id: &str) -> Result<(), SpiffeIdError> {
    let invalid = |reason| {
        Err(SpiffeIdError::Invalid {
            id: id.to_owned(),
            reason,
        })
    };
    if id.len() > 2048 {
        return invalid("longer than 2048 bytes");
    }
    let Some(rest) = id.strip_prefix(SPIFFE) else {
        return invalid("the scheme must be spiffe:// in lower case");
    };
    let (domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if domain.is_empty() {
        return invalid("the trust domain is empty");
    }
    if domain.len() > 255 {
        return invalid("the trust domain is longer than 255 bytes");
    }
    let domain_char = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b);
    if !domain.bytes().all(domain_char) {
        return invalid(
            "the trust domain may hold only lower-case letters, digits, '.', '-' and '_' (no user info, no port)",
        );
    }
    if path.is_empty() {
        return Ok(());
    }
    let segment_char = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
    for segment in path[1..].split('/') {
        match segment {
            "" => return invalid("the path has an empty segment (or a trailing '/')"),
            "." | ".." => return invalid("the path has a '.' or '..' segment"),
            s if !s.bytes().all(segment_char) => {
                return invalid(
                    "a path segment may hold only letters, digits, '.', '-' and '_' (no query, no fragment)",
                );
            }
            _ => {}
        }
    }
    Ok(())
}

impl PeerIdentity {
    /// The identity a certificate with `parts` proves.
    pub fn new(parts: IdentityParts) -> Self {
        let spiffe = spiffe_of(&parts.uris);
        Self {
            parts: Arc::new(parts),
            spiffe,
        }
    }

    /// The one string that names the peer: its SPIFFE id, else its first
    /// URI SAN that is not a `spiffe:` one, else its first DNS SAN, else
    /// its common name, else `""`.
    ///
    /// A `spiffe:` URI that is not a valid SPIFFE id (or one of several)
    /// is never the id, nor is a common name that looks like a URI
    /// (`scheme://…`): name constraints on a CA bind SANs, not the CN, so a
    /// constrained intermediate could otherwise issue
    /// `CN=spiffe://other-domain/…`.
    pub fn id(&self) -> &str {
        let p = &*self.parts;
        self.spiffe_id()
            .or(p.uris.iter().find(|u| !is_spiffe(u)).map(String::as_str))
            .or(p.dns_names.first().map(String::as_str))
            .or(p.common_name.as_deref().filter(|cn| !cn.contains("://")))
            .unwrap_or("")
    }

    /// The SPIFFE id (`spiffe://trust-domain/path`), if the certificate has
    /// exactly one `spiffe:` URI SAN and it is valid.
    pub fn spiffe_id(&self) -> Option<&str> {
        self.spiffe
            .as_ref()
            .ok()
            .map(|&i| self.parts.uris[i].as_str())
    }

    /// Why [`PeerIdentity::spiffe_id`] is `None`.
    pub fn spiffe_error(&self) -> Option<&SpiffeIdError> {
        self.spiffe.as_ref().err()
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

/// Whether `uri` has the `spiffe` scheme, in any case.
fn is_spiffe(uri: &str) -> bool {
    uri.get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("spiffe:"))
}

/// The index of the one valid SPIFFE id among `uris`.
fn spiffe_of(uris: &[String]) -> Result<usize, SpiffeIdError> {
    let mut found = uris.iter().enumerate().filter(|(_, u)| is_spiffe(u));
    let Some((i, id)) = found.next() else {
        return Err(SpiffeIdError::Missing);
    };
    let more = found.count();
    if more > 0 {
        return Err(SpiffeIdError::Several(more + 1));
    }
    validate_spiffe_id(id).map(|()| i)
}

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

    /// Issue #17.14: the SPIFFE ID specification, and one SPIFFE id per
    /// certificate. An invalid id is no identity a rule can match, by its
    /// trust domain, a prefix or the id it falls back to.
    #[test]
    fn only_a_valid_single_spiffe_id_is_a_spiffe_identity() {
        for bad in [
            "spiffe://example.org/ns/a/sa/../../a/sa/frontend",
            "spiffe://example.org/ns/a/sa/./web",
            "spiffe://example.org/ns/a/",
            "spiffe://example.org//a",
            "spiffe://user@example.org/a",
            "spiffe://example.org:8443/a",
            "SPIFFE://example.org/a",
            "Spiffe://example.org/a",
            "spiffe://Example.org/a",
            "spiffe://example.org/a?x=1",
            "spiffe://example.org/a#f",
            "spiffe:///a",
            "spiffe://example.org/a b",
        ] {
            assert!(validate_spiffe_id(bad).is_err(), "{bad} passed");
            let id = with(IdentityParts {
                uris: vec![bad.to_owned()],
                dns_names: vec!["web.example.org".to_owned()],
                ..Default::default()
            });
            assert_eq!(id.spiffe_id(), None, "{bad}");
            assert!(matches!(
                id.spiffe_error(),
                Some(SpiffeIdError::Invalid { .. })
            ));
            assert_eq!(id.id(), "web.example.org", "{bad} must not be the id");
            for rule in [
                IdentityRule::new().trust_domain("example.org"),
                IdentityRule::new().prefix("spiffe://example.org/ns/a/"),
                IdentityRule::new().prefix("spiffe://"),
            ] {
                assert!(!rule.permits(Some(&id)), "{bad} passed {rule:?}");
            }
        }
        for good in [
            "spiffe://example.org",
            "spiffe://example.org/ns/a/sa/web",
            "spiffe://my-td_1.example/Path.With-Caps_1",
        ] {
            assert_eq!(validate_spiffe_id(good), Ok(()), "{good}");
        }
        // Two SPIFFE ids: neither.
        let two = with(IdentityParts {
            uris: vec![
                "spiffe://example.org/a".to_owned(),
                "spiffe://example.org/b".to_owned(),
                "urn:other".to_owned(),
            ],
            ..Default::default()
        });
        assert_eq!(two.spiffe_id(), None);
        assert_eq!(two.spiffe_error(), Some(&SpiffeIdError::Several(2)));
        assert_eq!(two.id(), "urn:other");
        assert!(
            !IdentityRule::new()
                .exact("spiffe://example.org/a")
                .permits(Some(&two))
        );
    }
}
