//! Certificates and keys from PEM files, for both sides' TLS: read once,
//! checked where the operator can see the problem (`check`, start-up,
//! reload), and watched for expiry.
//!
//! The MQTT side hands what is read here to rustls (see `mqtt::tls`); the
//! Kafka side only names its files to librdkafka, which reads them itself,
//! so for Kafka this module is used for the expiry checks alone.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate or key file cannot be used. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not PEM: {reason}", file.display())]
    Pem { file: PathBuf, reason: String },
    #[error("{}: holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)", file.display())]
    NoCertificate { file: PathBuf },
    #[error("{}: holds no PEM private key (PKCS#8, RSA or EC)", file.display())]
    NoKey { file: PathBuf },
    #[error("{}: certificate {index} cannot be parsed: {reason}", file.display())]
    Certificate {
        file: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("{}: not usable with the certificate in {}: {reason}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The certificates of one PEM file, in file order.
#[derive(Debug, Clone)]
pub struct CertificateFile {
    pub file: PathBuf,
    pub certs: Vec<CertificateDer<'static>>,
}

impl CertificateFile {
    /// Reads every certificate of a PEM file (a bundle or a chain); other
    /// sections (a key kept in the same file) are skipped. A file with no
    /// certificate is an error: it is always a mistake.
    pub fn read(file: &Path) -> Result<Self, TlsFileError> {
        let bytes = read(file)?;
        let certs = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(file, e))?;
        if certs.is_empty() {
            return Err(TlsFileError::NoCertificate {
                file: file.to_path_buf(),
            });
        }
        let read = Self {
            file: file.to_path_buf(),
            certs,
        };
        // Parsed once here so that a broken certificate is reported by
        // name now, not as a handshake failure later.
        read.expiries()?;
        Ok(read)
    }

    /// When each certificate expires, in file order.
    pub fn expiries(&self) -> Result<Vec<Expiry>, TlsFileError> {
        self.certs
            .iter()
            .enumerate()
            .map(|(index, der)| {
                let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
                    TlsFileError::Certificate {
                        file: self.file.clone(),
                        index: index + 1,
                        reason: e.to_string(),
                    }
                })?;
                Ok(Expiry {
                    subject: cert.subject().to_string(),
                    not_after: cert.validity().not_after.timestamp(),
                })
            })
            .collect()
    }

    /// The certificate that expires first: for a client certificate's chain
    /// or a CA bundle alike, the day the file stops being what it was.
    pub fn earliest_expiry(&self) -> Expiry {
        self.expiries()
            .expect("parsed when read")
            .into_iter()
            .min_by_key(|e| e.not_after)
            .expect("a file read holds a certificate")
    }
}

/// Reads the first private key of a PEM file (`PRIVATE KEY`, `RSA PRIVATE
/// KEY` or `EC PRIVATE KEY`).
pub fn read_key(file: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let bytes = read(file)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsFileError::NoKey {
            file: file.to_path_buf(),
        },
        e => pem_error(file, e),
    })
}

/// One certificate's end of validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// The certificate's subject, e.g. `CN=bridge-1`.
    pub subject: String,
    /// Unix seconds.
    pub not_after: i64,
}

impl Expiry {
    /// Seconds from `now` to expiry; negative once expired.
    pub fn seconds_left(&self, now: SystemTime) -> i64 {
        let now = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        self.not_after
            .saturating_sub(i64::try_from(now).unwrap_or(i64::MAX))
    }

    /// A warning when the certificate expires within `window` of `now` (or
    /// has), else `None`. `what` says which certificate, e.g. `mqtt.tls.cert_file`.
    pub fn warning(
        &self,
        what: &str,
        file: &Path,
        now: SystemTime,
        window: Duration,
    ) -> Option<String> {
        let left = self.seconds_left(now);
        let window = i64::try_from(window.as_secs()).unwrap_or(i64::MAX);
        // Rounded: a certificate made for 10 days reads "10 days" today.
        let days = (left.abs() + 43_200) / 86_400;
        if left < 0 {
            Some(format!(
                "{what}: {} ({}) expired {days} days ago; the peer will refuse it",
                file.display(),
                self.subject
            ))
        } else if left < window {
            Some(format!(
                "{what}: {} ({}) expires in {days} days",
                file.display(),
                self.subject
            ))
        } else {
            None
        }
    }
}

/// Which certificate of a connection an expiry is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateRole {
    /// Ours, shown to the broker.
    Client,
    /// The CAs we trust.
    Ca,
}

impl CertificateRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Ca => "ca",
        }
    }
}

/// A certificate file in use and when its first certificate expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInUse {
    /// `mqtt` or `kafka`.
    pub connection: &'static str,
    pub role: CertificateRole,
    /// The setting naming the file, e.g. `mqtt.tls.cert_file`.
    pub setting: String,
    pub file: PathBuf,
    pub expiry: Expiry,
}

impl CertificateInUse {
    /// The warning `check`, start-up and reloads give when the certificate
    /// expires within [`EXPIRY_WARNING`] of `now`, or has expired.
    pub fn warning(&self, now: SystemTime) -> Option<String> {
        self.expiry
            .warning(&self.setting, &self.file, now, EXPIRY_WARNING)
    }
}

/// How far ahead `check`, start-up and reloads warn of an expiring
/// certificate: long enough to renew through a change process.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

fn read(file: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(file).map_err(|source| TlsFileError::Read {
        file: file.to_path_buf(),
        source,
    })
}

fn pem_error(file: &Path, e: pem::Error) -> TlsFileError {
    match e {
        pem::Error::NoItemsFound => TlsFileError::NoCertificate {
            file: file.to_path_buf(),
        },
        e => TlsFileError::Pem {
            file: file.to_path_buf(),
            reason: e.to_string(),
        },
    }
}
