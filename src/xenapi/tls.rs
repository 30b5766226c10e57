//! How the client decides to trust the XenAPI host's certificate.
//!
//! XenServer hosts mostly present self-signed certificates, so besides a CA bundle the client can
//! pin the SHA-256 fingerprint of the host certificate. Turning verification off needs an
//! explicit setting and is logged at start by the caller.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// Which certificates the client accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsTrust {
    /// The operating system's trust store.
    System,
    /// Only certificates issued by the CAs in this PEM file.
    CaFile(PathBuf),
    /// Only the certificate with this SHA-256 fingerprint (of its DER encoding).
    Pinned(Fingerprint),
    /// Anything (`xenapi_insecure = true`).
    Insecure,
}

/// SHA-256 fingerprint of a certificate.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Parses `AB:CD:...`, `abcd...`, optionally prefixed `sha256:` or `sha-256:`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let text = ["sha256:", "sha-256:", "SHA256:", "SHA-256:"]
            .iter()
            .find_map(|prefix| text.strip_prefix(prefix))
            .unwrap_or(text);
        let digits: String = text.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(&digits).map_err(|_| {
            "a SHA-256 fingerprint is 64 hex digits, optionally colon-separated".to_string()
        })?;
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "a SHA-256 fingerprint is 32 bytes (64 hex digits)".to_string())?;
        Ok(Fingerprint(array))
    }

    /// Fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|b| format!("{b:02X}")).collect();
        f.write_str(&parts.join(":"))
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// The rustls provider for XenAPI connections. xapi's stunnel only offers ECDHE over secp384r1,
/// which aws-lc-rs' default key-exchange groups include.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Builds the rustls client configuration for a trust policy; `None` means "use the system
/// store through reqwest's default verifier".
pub fn client_config(trust: &TlsTrust) -> Result<Option<rustls::ClientConfig>, String> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match trust {
        TlsTrust::System => return Ok(None),
        TlsTrust::CaFile(path) => builder
            .with_root_certificates(load_roots(path)?)
            .with_no_client_auth(),
        TlsTrust::Pinned(fingerprint) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: Some(*fingerprint),
                provider,
            }))
            .with_no_client_auth(),
        TlsTrust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: None,
                provider,
            }))
            .with_no_client_auth(),
    };
    Ok(Some(config))
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("CA file {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "CA file {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(roots)
}

/// Accepts exactly one certificate (`pin`), whatever its issuer and names: the point of pinning
/// a self-signed host certificate. With no pin it accepts any certificate (`xenapi_insecure`).
/// Handshake signatures are checked against the presented certificate either way.
#[derive(Debug)]
struct PinVerifier {
    pin: Option<Fingerprint>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(pin) = self.pin else {
            return Ok(ServerCertVerified::assertion());
        };
        let presented = Fingerprint::of_der(end_entity);
        if presented == pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "host certificate fingerprint {presented} does not match the pinned {pin}"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_the_forms_operators_paste() {
        let colon = "AB:".repeat(31) + "AB";
        let plain = "ab".repeat(32);
        assert_eq!(Fingerprint::parse(&colon).unwrap().0, [0xab; 32]);
        assert_eq!(Fingerprint::parse(&plain).unwrap().0, [0xab; 32]);
        assert_eq!(
            Fingerprint::parse(&format!("sha256:{plain}")).unwrap().0,
            [0xab; 32]
        );
        assert_eq!(Fingerprint::parse(&colon).unwrap().to_string(), colon);
        assert!(Fingerprint::parse("abcd").is_err());
        assert!(Fingerprint::parse(&"zz".repeat(32)).is_err());
    }
}
