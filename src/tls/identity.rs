//! What a verified client certificate says: its URI and DNS SANs, its
//! subject common name, and its roles.

use rustls_pki_types::CertificateDer;
use sluice_layers::identity::{IdentityParts, PeerIdentity, SpiffeIdError};
use x509_parser::{
    der_parser::{ber::BerObjectContent, parse_der},
    extensions::GeneralName,
    prelude::{FromDer, X509Certificate},
};

use crate::config::RoleSource;

/// The identity in `leaf`, a certificate rustls has already verified
/// against the CA bundle. A field the parser cannot read is left empty (the
/// certificate is valid; only that field is unusable as an identity).
pub(super) fn of(leaf: &CertificateDer<'_>, roles: &RoleSource) -> PeerIdentity {
    let Ok((_, cert)) = X509Certificate::from_der(leaf.as_ref()) else {
        return PeerIdentity::new(IdentityParts::default());
    };
    let mut parts = IdentityParts::default();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => parts.uris.push((*uri).to_owned()),
                GeneralName::DNSName(dns) => parts.dns_names.push((*dns).to_owned()),
                _ => {}
            }
        }
    }
    let subject = cert.subject();
    parts.common_name = subject
        .iter_common_name()
        .find_map(|a| a.as_str().ok())
        .map(str::to_owned);
    let texts = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.filter_map(|a| a.as_str().ok().map(str::to_owned))
            .collect::<Vec<_>>()
    };
    parts.roles = match roles {
        RoleSource::Organization => texts(&mut subject.iter_organization()),
        RoleSource::OrganizationalUnit => texts(&mut subject.iter_organizational_unit()),
        RoleSource::Oid(oid) => {
            let mut found = texts(
                &mut subject
                    .iter_attributes()
                    .filter(|a| a.attr_type().to_id_string() == *oid),
            );
            for ext in cert.extensions() {
                if ext.oid.to_id_string() == *oid {
                    found.extend(extension_strings(ext.value));
                }
            }
            found
        }
    };
    let identity = PeerIdentity::new(parts);
    if let Some(e) = identity
        .spiffe_error()
        .filter(|e| !matches!(e, SpiffeIdError::Missing))
    {
        // The certificate is valid; its SPIFFE id is not: the client is
        // known by its other names, and rules on SPIFFE ids refuse it.
        tracing::info!(reason = %e, id = identity.id(), "client certificate has no usable SPIFFE id");
    }
    identity
}

/// The string values of an extension: one DER string, a sequence of them,
/// or else the raw bytes if they are UTF-8.
fn extension_strings(value: &[u8]) -> Vec<String> {
    let Ok((_, obj)) = parse_der(value) else {
        return std::str::from_utf8(value)
            .map(|s| vec![s.to_owned()])
            .unwrap_or_default();
    };
    match &obj.content {
        BerObjectContent::Sequence(items) | BerObjectContent::Set(items) => items
            .iter()
            .filter_map(|i| i.as_str().ok().map(str::to_owned))
            .collect(),
        _ => obj.as_str().map(|s| vec![s.to_owned()]).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, CustomExtension, DnType, KeyPair, SanType};

    use super::*;

    fn cert(tune: impl FnOnce(&mut CertificateParams)) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        tune(&mut params);
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("sign").der().clone()
    }

    #[test]
    fn every_field_of_the_identity_is_read_and_roles_from_where_configured() {
        let der = cert(|p| {
            p.distinguished_name.push(DnType::CommonName, "web-1");
            // (rcgen keeps one value per attribute type.)
            p.distinguished_name
                .push(DnType::OrganizationName, "os:admin");
            p.distinguished_name
                .push(DnType::OrganizationalUnitName, "team-a");
            p.subject_alt_names = vec![
                SanType::DnsName("web.prod.svc".try_into().expect("dns")),
                SanType::URI("urn:example:web".try_into().expect("uri")),
                SanType::URI("spiffe://td/ns/prod/sa/web".try_into().expect("uri")),
            ];
            // A private extension holding one UTF8String (tag 12): a role.
            let mut ext = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], {
                let mut v = vec![12, 9];
                v.extend_from_slice(b"os:operat");
                v
            });
            ext.set_criticality(false);
            p.custom_extensions.push(ext);
        });
        let id = of(&der, &RoleSource::Organization);
        assert_eq!(id.id(), "spiffe://td/ns/prod/sa/web");
        assert_eq!(id.trust_domain(), Some("td"));
        let parts = id.parts();
        assert_eq!(
            parts.uris,
            ["urn:example:web", "spiffe://td/ns/prod/sa/web"]
        );
        assert_eq!(parts.dns_names, ["web.prod.svc"]);
        assert_eq!(parts.common_name.as_deref(), Some("web-1"));
        assert_eq!(parts.roles, ["os:admin"]);

        let by_ou = of(&der, &RoleSource::OrganizationalUnit);
        assert_eq!(by_ou.parts().roles, ["team-a"]);
        let by_oid = of(&der, &RoleSource::Oid("1.3.6.1.4.1.99999.1".to_owned()));
        assert_eq!(by_oid.parts().roles, ["os:operat"]);
        // An OID naming a subject attribute reads it like the named ones.
        let by_attr = of(&der, &RoleSource::Oid("2.5.4.11".to_owned()));
        assert_eq!(by_attr.parts().roles, ["team-a"]);
    }

    #[test]
    fn a_certificate_with_only_a_common_name_is_known_by_it() {
        let der = cert(|p| p.distinguished_name.push(DnType::CommonName, "legacy"));
        let id = of(&der, &RoleSource::Organization);
        assert_eq!(id.id(), "legacy");
        assert!(id.spiffe_id().is_none() && id.parts().roles.is_empty());
    }
}
