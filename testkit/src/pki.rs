//! A throwaway PKI for TLS tests and benches: one CA, and server and
//! client certificates it signs, written as PEM files to a directory of
//! their own.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A CA and the directory its files go to.
pub struct Pki {
    /// Where every file is written.
    pub dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// What a leaf certificate says.
#[derive(Clone, Debug, Default)]
pub struct Leaf {
    /// Subject common name.
    pub common_name: String,
    /// DNS SANs (IP addresses given here become IP SANs).
    pub names: Vec<String>,
    /// URI SANs (SPIFFE ids).
    pub uris: Vec<String>,
    /// Subject organization values (Talos's roles).
    pub organizations: Vec<String>,
    /// For a client (clientAuth) rather than a server (serverAuth).
    pub client: bool,
}

impl Leaf {
    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server() -> Self {
        Self {
            common_name: "localhost".to_owned(),
            names: vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            ..Self::default()
        }
    }

    /// A client certificate with SPIFFE id `spiffe` and roles `roles`.
    pub fn client(spiffe: &str, roles: &[&str]) -> Self {
        Self {
            common_name: spiffe.rsplit('/').next().unwrap_or(spiffe).to_owned(),
            uris: vec![spiffe.to_owned()],
            organizations: roles.iter().map(|r| (*r).to_owned()).collect(),
            client: true,
            ..Self::default()
        }
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Pki {
    /// A new CA named `name`, with a fresh directory under the system temp
    /// directory; its certificate is written to `ca.pem`.
    ///
    /// # Panics
    ///
    /// If a key cannot be made or a file written (a test setup failure).
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sluice-pki-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("ca key"))
            .expect("ca certificate");
        let pki = Self { dir, ca };
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).expect("write ca.pem");
        pki
    }

    /// `file` in the PKI's directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A certificate for `leaf` signed by the CA: (certificate PEM, key PEM).
    ///
    /// # Panics
    ///
    /// If rcgen refuses the parameters.
    pub fn issue(&self, leaf: &Leaf) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.common_name.as_str());
        for o in &leaf.organizations {
            params
                .distinguished_name
                .push(DnType::OrganizationName, o.as_str());
        }
        for n in &leaf.names {
            params.subject_alt_names.push(match n.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.as_str().try_into().expect("dns name")),
            });
        }
        for u in &leaf.uris {
            params
                .subject_alt_names
                .push(SanType::URI(u.as_str().try_into().expect("uri")));
        }
        params.extended_key_usages = vec![if leaf.client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca).expect("sign leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// Issues `leaf` and writes it to `<stem>.pem` and `<stem>.key`;
    /// returns both paths. Writing goes through a temporary file and a
    /// rename, as a secret volume update does, so a reader never sees half
    /// a file.
    ///
    /// # Panics
    ///
    /// If a file cannot be written.
    pub fn write(&self, stem: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
        let (cert, key) = self.issue(leaf);
        let (cert_path, key_path) = (
            self.path(&format!("{stem}.pem")),
            self.path(&format!("{stem}.key")),
        );
        replace(&key_path, key.as_bytes());
        replace(&cert_path, cert.as_bytes());
        (cert_path, key_path)
    }
}

/// Replaces `path` with `contents` atomically (write aside, then rename).
///
/// # Panics
///
/// If the file cannot be written.
pub fn replace(path: &Path, contents: &[u8]) {
    let aside = path.with_extension(format!("tmp{}", NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&aside, contents).expect("write aside");
    std::fs::rename(&aside, path).expect("rename into place");
}

impl Pki {
    /// A rustls client trusting this CA, offering `alpn`, over `versions`
    /// (`rustls::DEFAULT_VERSIONS` for both), without session resumption:
    /// every handshake is a full one.
    ///
    /// # Panics
    ///
    /// If the CA certificate does not parse (it always does).
    pub fn connector(
        &self,
        alpn: &[&[u8]],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(&self.ca_pem()).into()).expect("a CA root");
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.resumption = rustls::client::Resumption::disabled();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
    }

    /// The leaf certificate (DER) a fresh handshake with `addr`, as
    /// `localhost`, is shown.
    ///
    /// # Panics
    ///
    /// If the connection or the handshake fails, or takes over 10 s.
    pub async fn served_leaf(&self, addr: std::net::SocketAddr) -> Vec<u8> {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let connect = self
            .connector(&[b"h2"], rustls::DEFAULT_VERSIONS)
            .connect("localhost".try_into().expect("name"), tcp);
        let tls = tokio::time::timeout(std::time::Duration::from_secs(10), connect)
            .await
            .expect("a handshake in time")
            .expect("handshake");
        tls.get_ref().1.peer_certificates().expect("certificates")[0].to_vec()
    }
}

/// The DER of the first certificate of `pem`.
///
/// # Panics
///
/// If `pem` holds no certificate.
pub fn der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("a PEM certificate")
        .to_vec()
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
