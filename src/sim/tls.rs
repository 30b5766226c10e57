//! HTTPS like xapi's stunnel: TLS 1.2 only, ECDHE-RSA with AES-GCM, key exchange over secp384r1
//! only, server preference; certificates generated at start (a private CA and an RSA server
//! certificate for 127.0.0.1 and localhost signed by it).

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// What `--tls` produces.
pub struct TlsMaterial {
    pub server_config: Arc<rustls::ServerConfig>,
    /// PEM of the CA that signed the server certificate (for `--tls-ca-out`).
    pub ca_pem: String,
    /// SHA-256 of the server certificate's DER, `AB:CD:...`.
    pub fingerprint: String,
}

pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Generates a CA and a server certificate and builds the server configuration.
pub fn generate() -> Result<TlsMaterial, String> {
    let err = |what: &str, e: &dyn std::fmt::Display| format!("TLS setup: {what}: {e}");
    let ca_key =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(|e| err("CA key", &e))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| err("CA", &e))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "xenapinfs-sim CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| err("CA certificate", &e))?;

    let server_key =
        KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).map_err(|e| err("server key", &e))?;
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .map_err(|e| err("server certificate", &e))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let server_cert = params
        .signed_by(&server_key, &issuer)
        .map_err(|e| err("server certificate", &e))?;

    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = vec![
        aws_lc_rs::cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        aws_lc_rs::cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ];
    provider.kx_groups = vec![aws_lc_rs::kx_group::SECP384R1];
    let der: CertificateDer<'static> = server_cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .map_err(|e| err("protocol versions", &e))?
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .map_err(|e| err("certificate", &e))?;
    config.ignore_client_order = true;
    Ok(TlsMaterial {
        server_config: Arc::new(config),
        ca_pem: ca_cert.pem(),
        fingerprint: fingerprint(&der),
    })
}
