//! TLS to the MQTT broker: the `mqtt.tls` settings, the rustls client
//! configuration made from their files, and handshake failures said in the
//! operator's terms.
//!
//! The files are read where the configuration is loaded (start-up, `check`,
//! each reload), so a bad file is a configuration error naming it, and a
//! renewed certificate is picked up by a reload without a restart: the
//! session uses the newest [`MqttTls`] for its next connection.

use crate::tls::{CertificateFile, CertificateInUse, CertificateRole, TlsFileError};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls::{self, pki_types::ServerName};

/// `mqtt.tls`: `true` (the system's roots, no client certificate) or a map
/// of these.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM bundle of the CAs trusted to sign the broker's certificate;
    /// replaces the system's roots. Relative to the bridge file.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (its chain after it) for brokers that
    /// authenticate clients by certificate. Needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, RSA or EC).
    pub key_file: Option<PathBuf>,
    /// The name sent as SNI and checked against the broker's certificate,
    /// when it differs from `mqtt.host` (a broker reached by IP address or
    /// through a tunnel).
    pub server_name: Option<String>,
    /// ALPN protocols offered, e.g. `[x-amzn-mqtt-ca]` for AWS IoT Core on
    /// port 443.
    #[serde(default)]
    pub alpn: Vec<String>,
    /// Accept any broker certificate. For a lab only: anyone on the path
    /// can read and change the traffic. Logged as a warning at every start.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

impl TlsConfig {
    /// Makes relative file names relative to `base` (the bridge file's
    /// directory), as mapping and schema paths are.
    pub fn resolve_paths(&mut self, base: &Path) {
        for file in [&mut self.ca_file, &mut self.cert_file, &mut self.key_file]
            .into_iter()
            .flatten()
        {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
    }

    /// The files the settings name, for `--watch`.
    pub fn files(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.ca_file, &self.cert_file, &self.key_file]
            .into_iter()
            .flatten()
    }
}

/// `tls: true`, `tls: false` or `tls: { ... }`.
pub(super) fn deserialize_tls<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<TlsConfig>, D::Error> {
    struct TlsVisitor;
    impl<'de> Visitor<'de> for TlsVisitor {
        type Value = Option<TlsConfig>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(
                "`true`, `false` or a map (ca_file, cert_file, key_file, server_name, alpn, insecure_skip_verify)",
            )
        }

        fn visit_bool<E: de::Error>(self, on: bool) -> Result<Self::Value, E> {
            Ok(on.then(TlsConfig::default))
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            TlsConfig::deserialize(de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    deserializer.deserialize_any(TlsVisitor)
}

/// A problem with the TLS settings, with the setting it is about.
#[derive(Debug)]
pub struct TlsSettingError {
    /// e.g. `mqtt.tls.key_file`.
    pub setting: &'static str,
    pub message: String,
}

/// What the session needs for a TLS connection, made from the files.
#[derive(Clone)]
pub struct MqttTls {
    pub(super) config: Arc<rustls::ClientConfig>,
    pub(super) server_name: ServerName<'static>,
    /// For the expiry metric and warnings.
    pub certificates: Vec<CertificateInUse>,
}

impl fmt::Debug for MqttTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttTls")
            .field("server_name", &self.server_name)
            .field("certificates", &self.certificates)
            .finish_non_exhaustive()
    }
}

impl MqttTls {
    /// The ALPN protocols offered, as configured.
    pub fn alpn_protocols(&self) -> &[Vec<u8>] {
        &self.config.alpn_protocols
    }

    /// Reads the files `settings` name and makes the client configuration.
    /// `host` is the name checked when `server_name` is not set. Every
    /// problem is returned, each with its setting.
    pub fn load(settings: &TlsConfig, host: &str) -> Result<Self, Vec<TlsSettingError>> {
        let mut errors = Vec::new();
        let mut certificates = Vec::new();
        let mut fail = |setting: &'static str, message: String| {
            errors.push(TlsSettingError { setting, message });
        };
        let name = settings.server_name.as_deref().unwrap_or(host);
        let server_name = match ServerName::try_from(name.to_string()) {
            Ok(name) => Some(name),
            Err(e) => {
                let setting = if settings.server_name.is_some() {
                    "mqtt.tls.server_name"
                } else {
                    "mqtt.host"
                };
                fail(
                    setting,
                    format!("`{name}` cannot be checked against a certificate: {e}"),
                );
                None
            }
        };

        let mut roots = rustls::RootCertStore::empty();
        match &settings.ca_file {
            Some(file) => match CertificateFile::read(file) {
                Ok(bundle) => {
                    let (added, ignored) = roots.add_parsable_certificates(bundle.certs.clone());
                    if added == 0 {
                        fail(
                            "mqtt.tls.ca_file",
                            format!(
                                "{}: none of its {ignored} certificates can be a trust anchor",
                                file.display()
                            ),
                        );
                    }
                    certificates.push(in_use(CertificateRole::Ca, "mqtt.tls.ca_file", &bundle));
                }
                Err(e) => fail("mqtt.tls.ca_file", e.to_string()),
            },
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    // A certificate the store cannot use is skipped, as
                    // browsers do.
                    let _ = roots.add(cert);
                }
            }
        }

        let identity = match (&settings.cert_file, &settings.key_file) {
            (None, None) => None,
            (Some(_), None) => {
                fail(
                    "mqtt.tls.cert_file",
                    "is set without `key_file`: a client certificate needs its private key".into(),
                );
                None
            }
            (None, Some(_)) => {
                fail(
                    "mqtt.tls.key_file",
                    "is set without `cert_file`: a private key needs its certificate".into(),
                );
                None
            }
            (Some(cert_file), Some(key_file)) => {
                let chain = CertificateFile::read(cert_file)
                    .map_err(|e| fail("mqtt.tls.cert_file", e.to_string()))
                    .ok();
                let key = crate::tls::read_key(key_file)
                    .map_err(|e| fail("mqtt.tls.key_file", e.to_string()))
                    .ok();
                if let Some(chain) = &chain {
                    certificates.push(in_use(CertificateRole::Client, "mqtt.tls.cert_file", chain));
                }
                chain.zip(key)
            }
        };

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions");
        let builder = if settings.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
        } else {
            builder.with_root_certificates(roots)
        };
        let config = match identity {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.certs, key)
                .map_err(|e| {
                    let error = TlsFileError::KeyMismatch {
                        cert: chain.file.clone(),
                        key: settings.key_file.clone().unwrap_or_default(),
                        reason: e.to_string(),
                    };
                    fail("mqtt.tls.key_file", error.to_string());
                })
                .ok(),
            None => Some(builder.with_no_client_auth()),
        };
        match (config, server_name) {
            (Some(mut config), Some(server_name)) if errors.is_empty() => {
                config.alpn_protocols = settings
                    .alpn
                    .iter()
                    .map(|p| p.as_bytes().to_vec())
                    .collect();
                Ok(Self {
                    config: Arc::new(config),
                    server_name,
                    certificates,
                })
            }
            _ => Err(errors),
        }
    }
}

fn in_use(role: CertificateRole, setting: &str, file: &CertificateFile) -> CertificateInUse {
    CertificateInUse {
        connection: "mqtt",
        role,
        setting: setting.to_string(),
        file: file.file.clone(),
        expiry: file.earliest_expiry(),
    }
}

/// A TLS failure said as what to check. rustls reports a handshake failure
/// as an I/O error carrying its own error; the broker's refusal of our
/// certificate arrives as an alert (with TLS 1.3 only when we first read,
/// after the handshake: the server checks the client's certificate last).
pub(super) fn explain(error: &std::io::Error) -> Option<String> {
    let tls = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    Some(match tls {
        E::InvalidCertificate(C::UnknownIssuer) => format!(
            "the broker's certificate is not signed by a trusted CA ({tls}); set mqtt.tls.ca_file to the CA that signed it"
        ),
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "the broker's certificate does not name the host we connected to ({tls}); set mqtt.tls.server_name to a name it holds"
        ),
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            format!("the broker's certificate has expired ({tls})")
        }
        E::InvalidCertificate(_) => format!("the broker's certificate was refused ({tls})"),
        E::AlertReceived(A::CertificateRequired) => format!(
            "the broker requires a client certificate ({tls}); set mqtt.tls.cert_file and key_file"
        ),
        E::AlertReceived(
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::AccessDenied,
        ) => format!("the broker refused our client certificate ({tls})"),
        E::NoApplicationProtocol => format!(
            "the broker accepts none of the ALPN protocols in mqtt.tls.alpn ({tls})"
        ),
        other => format!("TLS failed: {other}"),
    })
}

/// `insecure_skip_verify`: every certificate is taken, but the handshake's
/// signatures are still checked against it (what the peer proves is then
/// only that it holds the key of whatever certificate it sent).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
