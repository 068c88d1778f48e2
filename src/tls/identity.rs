//! What a verified client certificate says: its URI and DNS SANs, its
//! subject common name, and its roles.

use rustls_pki_types::CertificateDer;
use sluice_layers::identity::{IdentityParts, PeerIdentity};
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
    PeerIdentity::new(parts)
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
