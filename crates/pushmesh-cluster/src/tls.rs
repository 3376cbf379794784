//! Cluster certificates: a CA and node certificates, either generated
//! (`pushmesh cluster init`) or derived from the cluster secret (development
//! mode), and the mutual-TLS rustls configurations of the QUIC links.

use std::path::Path;
use std::sync::Arc;

use hkdf::Hkdf;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber, PKCS_ED25519,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::Sha256;

/// The name every node certificate carries and every dial verifies.
pub const NODE_SERVER_NAME: &str = "pushmesh-node";
/// ALPN of the peer protocol.
pub const ALPN: &[u8] = b"pushmesh/1";

/// Why TLS material cannot be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("{0}: no usable PEM item")]
    Pem(String),
    /// A PEM file could not be read or parsed.
    #[error("{path}: {source}: no usable PEM item")]
    PemFile {
        /// File.
        path: String,
        /// Cause.
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the material.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A verifier could not be built.
    #[error("tls verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The TLS configuration has no cipher suite QUIC can start with.
    #[error("tls verifier: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// This node's certificate does not name its node id.
    #[error("the node certificate names {names:?}, not the node id {node:?}: issue it with `pushmesh cluster init --node {node}`")]
    NodeMismatch {
        /// The node id.
        node: String,
        /// Names in the certificate.
        names: Vec<String>,
    },
    /// The node id is reserved.
    #[error("node id {0:?} is reserved (every node certificate carries it)")]
    ReservedNodeId(String),
}

/// What a node needs for mutual TLS.
pub struct TlsMaterial {
    /// The cluster CA (trust root).
    pub ca: CertificateDer<'static>,
    /// This node's certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// This node's private key (PKCS#8).
    pub key: PrivatePkcs8KeyDer<'static>,
    /// Development mode: the seed of the CA key derived from the secret, so
    /// a certificate naming this node can be issued at start.
    dev_ca_seed: Option<[u8; 32]>,
}

impl TlsMaterial {
    /// Material for node `node`. In development mode a certificate naming
    /// the node is issued by the CA derived from the secret; otherwise the
    /// loaded certificate must name the node (as a DNS name or common name).
    pub fn for_node(self, node: &str) -> Result<Self, TlsError> {
        if node == NODE_SERVER_NAME {
            return Err(TlsError::ReservedNodeId(node.to_string()));
        }
        if let Some(seed) = self.dev_ca_seed {
            let issuer = Issuer::new(ca_params()?, key_from_seed(&seed)?);
            let key = KeyPair::generate_for(&PKCS_ED25519)?;
            let cert = node_params(node, rand::random::<u64>())?.signed_by(&key, &issuer)?;
            return Ok(Self {
                chain: vec![cert.der().clone()],
                key: PrivatePkcs8KeyDer::from(key.serialize_der()),
                ..self
            });
        }
        let names = self
            .chain
            .first()
            .map(certificate_node_names)
            .unwrap_or_default();
        if names_node(&names, node) {
            Ok(self)
        } else {
            Err(TlsError::NodeMismatch {
                node: node.to_string(),
                names,
            })
        }
    }
}

/// The names a certificate carries: its DNS subject alternative names and
/// common names (empty when it does not parse).
pub fn certificate_node_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, c)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = c
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    for cn in c.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            if !names.iter().any(|n| n == cn) {
                names.push(cn.to_string());
            }
        }
    }
    names
}

/// Whether certificate names `names` name node `node`: exactly, and never
/// through [`NODE_SERVER_NAME`], which every node certificate carries.
pub fn names_node(names: &[String], node: &str) -> bool {
    node != NODE_SERVER_NAME && names.iter().any(|n| n == node)
}

/// An Ed25519 PKCS#8 (v1) document for a 32-byte seed.
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

fn derive_seed(secret: &str, label: &str) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(b"pushmesh cluster v1"), secret.as_bytes());
    let mut out = [0u8; 32];
    // 32 bytes is always a valid HKDF-SHA256 output length.
    let _ = hk.expand(label.as_bytes(), &mut out);
    out
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "pushmesh cluster CA");
    p.distinguished_name = dn;
    p.serial_number = Some(SerialNumber::from(1u64));
    Ok(p)
}

fn node_params(node: &str, serial: u64) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(vec![NODE_SERVER_NAME.to_string(), node.to_string()])?;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    p.distinguished_name = dn;
    p.serial_number = Some(SerialNumber::from(serial));
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

fn key_from_seed(seed: &[u8; 32]) -> Result<KeyPair, TlsError> {
    let der = PrivatePkcs8KeyDer::from(ed25519_pkcs8(seed));
    Ok(KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ED25519)?)
}

/// Development mode: a CA derived from the cluster secret alone, identical
/// on every node that knows the secret, and a placeholder node certificate;
/// [`TlsMaterial::for_node`] replaces it with one naming the node. A host
/// without the secret cannot present a certificate chained to this CA; a
/// host with it can issue one for any node id (use real certificates in
/// production).
pub fn derive_from_secret(secret: &str) -> Result<TlsMaterial, TlsError> {
    let ca_seed = derive_seed(secret, "ca key");
    let ca_key = key_from_seed(&ca_seed)?;
    let ca_params = ca_params()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let node_key = key_from_seed(&derive_seed(secret, "node key"))?;
    let node_cert = node_params("pushmesh-dev-node", 2)?.signed_by(&node_key, &issuer)?;
    Ok(TlsMaterial {
        ca: ca_cert.der().clone(),
        chain: vec![node_cert.der().clone()],
        key: PrivatePkcs8KeyDer::from(node_key.serialize_der()),
        dev_ca_seed: Some(ca_seed),
    })
}

fn write(path: &Path, contents: &str) -> Result<(), TlsError> {
    std::fs::write(path, contents).map_err(|source| TlsError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// `pushmesh cluster init`: writes `ca.pem`, `ca-key.pem` and, per node,
/// `<node>.pem` and `<node>-key.pem` into `dir`. Keep `ca-key.pem` offline.
pub fn init(dir: &Path, nodes: &[String]) -> Result<Vec<String>, TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let ca_key = KeyPair::generate_for(&PKCS_ED25519)?;
    let mut params = ca_params()?;
    params.serial_number = Some(SerialNumber::from(rand::random::<u64>()));
    let ca_cert = params.self_signed(&ca_key)?;
    let mut written = vec![];
    write(&dir.join("ca.pem"), &ca_cert.pem())?;
    write(&dir.join("ca-key.pem"), &ca_key.serialize_pem())?;
    written.push(dir.join("ca.pem").display().to_string());
    written.push(dir.join("ca-key.pem").display().to_string());
    let issuer = Issuer::new(params, ca_key);
    for node in nodes {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let cert = node_params(node, rand::random::<u64>())?.signed_by(&key, &issuer)?;
        let c = dir.join(format!("{node}.pem"));
        let k = dir.join(format!("{node}-key.pem"));
        write(&c, &cert.pem())?;
        write(&k, &key.serialize_pem())?;
        written.push(c.display().to_string());
        written.push(k.display().to_string());
    }
    Ok(written)
}

fn pem_err(path: &Path, source: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::PemFile {
        path: path.display().to_string(),
        source,
    }
}

/// Loads a CA certificate, a node certificate (chain) and its PKCS#8 key from PEM files.
pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<TlsMaterial, TlsError> {
    let ca_der = CertificateDer::from_pem_file(ca).map_err(|e| pem_err(ca, e))?;
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_err(cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(cert, e))?;
    if chain.is_empty() {
        return Err(TlsError::Pem(cert.display().to_string()));
    }
    let key_der = PrivatePkcs8KeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
    Ok(TlsMaterial {
        ca: ca_der,
        chain,
        key: key_der,
        dev_ca_seed: None,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(m: &TlsMaterial) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut r = rustls::RootCertStore::empty();
    r.add(m.ca.clone())?;
    Ok(Arc::new(r))
}

/// The QUIC server side: requires a client certificate chained to the CA.
pub fn server_config(m: &TlsMaterial) -> Result<quinn::ServerConfig, TlsError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(m)?, provider())
            .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), PrivateKeyDer::Pkcs8(m.key.clone_key()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(cfg)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport());
    Ok(server)
}

/// The QUIC client side: verifies the peer against the CA, presents this node's certificate.
pub fn client_config(m: &TlsMaterial) -> Result<quinn::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(m)?)
        .with_client_auth_cert(m.chain.clone(), PrivateKeyDer::Pkcs8(m.key.clone_key()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(transport());
    Ok(client)
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(std::time::Duration::from_millis(500)));
    // A link silent this long is dead: part of the failure bound.
    if let Ok(idle) = quinn::IdleTimeout::try_from(std::time::Duration::from_secs(3)) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivation_is_deterministic_and_secret_bound() {
        let a = derive_from_secret("s1").unwrap_or_else(|e| panic!("{e}"));
        let b = derive_from_secret("s1").unwrap_or_else(|e| panic!("{e}"));
        let c = derive_from_secret("s2").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.ca, b.ca);
        assert_eq!(a.chain, b.chain);
        assert_ne!(a.ca, c.ca);
        assert!(server_config(&a).is_ok());
        assert!(client_config(&a).is_ok());
    }

    #[test]
    fn init_writes_loadable_files() {
        let dir = std::env::temp_dir().join(format!("pushmesh-tls-{}", rand::random::<u64>()));
        let nodes = vec!["n1".to_string()];
        init(&dir, &nodes).unwrap_or_else(|e| panic!("{e}"));
        let m = load(
            &dir.join("ca.pem"),
            &dir.join("n1.pem"),
            &dir.join("n1-key.pem"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(server_config(&m).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn production_certificates_name_their_node() {
        let dir = std::env::temp_dir().join(format!("pushmesh-tls-{}", rand::random::<u64>()));
        init(&dir, &["n1".to_string(), "n2".to_string()]).unwrap_or_else(|e| panic!("{e}"));
        let n1 = || {
            load(
                &dir.join("ca.pem"),
                &dir.join("n1.pem"),
                &dir.join("n1-key.pem"),
            )
            .unwrap_or_else(|e| panic!("{e}"))
        };
        let names = certificate_node_names(&n1().chain[0]);
        assert!(names_node(&names, "n1"), "{names:?}");
        assert!(!names_node(&names, "n2"));
        assert!(!names_node(&names, "n"));
        assert!(
            !names_node(&names, NODE_SERVER_NAME),
            "the shared name names nobody"
        );
        assert!(n1().for_node("n1").is_ok());
        assert!(matches!(
            n1().for_node("n2"),
            Err(TlsError::NodeMismatch { node, names }) if node == "n2" && names.contains(&"n1".to_string())
        ));
        assert!(matches!(
            n1().for_node(NODE_SERVER_NAME),
            Err(TlsError::ReservedNodeId(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn development_certificates_are_issued_per_node() {
        let a = derive_from_secret("s1")
            .and_then(|m| m.for_node("alpha"))
            .unwrap_or_else(|e| panic!("{e}"));
        let b = derive_from_secret("s1")
            .and_then(|m| m.for_node("beta"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.ca, b.ca, "one CA per secret");
        let names = certificate_node_names(&a.chain[0]);
        assert!(
            names_node(&names, "alpha") && !names_node(&names, "beta"),
            "{names:?}"
        );
        assert!(names_node(&certificate_node_names(&b.chain[0]), "beta"));
        // Chained to the secret's CA: accepted by a verifier rooted there.
        let roots = roots(&a).unwrap_or_else(|e| panic!("{e}"));
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
        let now = rustls::pki_types::UnixTime::now();
        assert!(verifier.verify_client_cert(&b.chain[0], &[], now).is_ok());
        let other = derive_from_secret("s2")
            .and_then(|m| m.for_node("beta"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(verifier
            .verify_client_cert(&other.chain[0], &[], now)
            .is_err());
    }

    #[test]
    fn garbage_certificate_names_nothing() {
        assert!(
            certificate_node_names(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_empty()
        );
    }
}
