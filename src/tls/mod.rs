//! TLS with rustls (the ring provider): the downstream listener's
//! handshake and the identity in a verified client certificate
//! ([`server`]), TLS to upstreams ([`client`]), and the certificates, keys
//! and CA bundles read from files and swapped in whole when they change
//! ([`reload`]).
//!
//! Every TLS connection negotiates ALPN `h2` (a client that offers only
//! other protocols fails the handshake with `no_application_protocol`),
//! over TLS 1.3 or 1.2.

use std::{io, path::Path, sync::Arc};

use rustls::{RootCertStore, crypto::CryptoProvider};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

pub(crate) mod client;
mod identity;
pub(crate) mod reload;
pub(crate) mod server;

/// The one protocol sluice speaks over TLS.
const ALPN_H2: &[u8] = b"h2";

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The pieces do not make a TLS configuration (a key that does not
    /// match its certificate, a CA bundle with no usable certificate).
    #[error("{what}: {}", material_reason(source))]
    Config {
        /// Which configuration.
        what: String,
        /// rustls's reason.
        #[source]
        source: rustls::Error,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 and 1.2.
static VERSIONS: [&rustls::SupportedProtocolVersion; 2] =
    [&rustls::version::TLS13, &rustls::version::TLS12];

fn versions() -> &'static [&'static rustls::SupportedProtocolVersion] {
    &VERSIONS
}

fn file_error(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// The certificates of a PEM file, in order; at least one, each a
/// well-formed X.509 certificate (a PEM block of anything else would only
/// fail later, as a handshake error that names no file).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, pem_reason(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, pem_reason(&e)))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    for (i, cert) in certs.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(cert) {
            return Err(file_error(
                path,
                format!(
                    "certificate {} of the file is not a valid X.509 certificate ({e})",
                    i + 1
                ),
            ));
        }
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, pem_reason(&e)))
}

/// What is wrong with a PEM file, in words.
fn pem_reason(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::Io(io) if io.kind() == io::ErrorKind::NotFound => "no such file".to_owned(),
        E::Io(io) => format!("cannot be read: {io}"),
        E::NoItemsFound => "no PEM block of the expected kind (a certificate, or a PKCS#8, PKCS#1 or SEC1 private key) in the file".to_owned(),
        E::Base64Decode(_) | E::IllegalSectionStart { .. } | E::MissingSectionEnd { .. } => {
            format!("not a well-formed PEM file ({e})")
        }
        _ => e.to_string(),
    }
}

/// What a rustls error about our own material means, in words (rustls
/// speaks of the *peer* certificate, which misleads about a local file).
pub(crate) fn material_reason(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(why) => {
            format!("the certificate cannot be used ({why:?})")
        }
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "the private key is not the certificate's".to_owned()
        }
        rustls::Error::InconsistentKeys(_) => {
            "the private key cannot be checked against the certificate".to_owned()
        }
        other => other.to_string(),
    }
}

/// A CA bundle: every certificate of the file must be a usable root.
fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Why a handshake failed, as a metric label.
pub(crate) fn failure_reason(e: &io::Error) -> &'static str {
    use rustls::Error as E;
    let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof => "closed",
            io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    match tls {
        E::NoCertificatesPresented => "no_client_certificate",
        E::InvalidCertificate(_) => "bad_certificate",
        E::NoApplicationProtocol => "no_application_protocol",
        E::InvalidMessage(_) => "not_tls",
        E::AlertReceived(_) => "alert_from_client",
        E::PeerIncompatible(_) => "incompatible",
        E::PeerMisbehaved(_) | E::InappropriateMessage { .. } => "protocol",
        _ => "other",
    }
}

/// Loads every piece of TLS material `config` names, as `sluice check`
/// and [`crate::run`] do: the first file that cannot be used is the error.
///
/// # Errors
///
/// [`TlsError`] naming the file (or the configuration) that is unusable.
pub fn check(config: &crate::config::Config) -> Result<(), TlsError> {
    if let Some(tls) = &config.server.tls {
        server::build(tls)?;
    }
    let groups = std::iter::once(config.upstream.tls.as_ref())
        .chain(config.upstreams.values().map(|g| g.tls.as_ref()));
    for tls in groups.flatten() {
        client::build(tls)?;
    }
    if let Some(tls) = config.tunnel.hub.as_ref().and_then(|h| h.tls.as_ref()) {
        server::build(tls)?;
    }
    if let Some(tls) = config.tunnel.agent.as_ref().and_then(|a| a.tls.as_ref()) {
        client::build(tls)?;
    }
    Ok(())
}
