//! Certificates for the TLS tests, made in-process with rcgen: a private
//! CA, broker and client certificates it signs, and the bad ones a test
//! needs (expired, signed by a CA nobody trusts, for the wrong name).
//!
//! Files are written world-readable into a directory of their own, because
//! mosquitto started as root reads them after dropping to its own user.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// A certificate and its key, as PEM text and as files.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// A private CA with a directory for what it issues. The directory is
/// removed on drop.
pub struct TestCa {
    dir: PathBuf,
    /// Removes `dir` on drop, unless the CA was made in a directory of the
    /// caller's.
    _temp: Option<tempfile::TempDir>,
    name: String,
    cert: Certificate,
    key: KeyPair,
    /// The CA's certificate, for the side that trusts it.
    pub ca_file: PathBuf,
}

impl TestCa {
    /// A new CA called `name` (its common name and its files' prefix).
    pub fn new(name: &str) -> Self {
        let temp = tempfile::tempdir().expect("certificate dir");
        let mut ca = Self::new_in(name, temp.path());
        ca._temp = Some(temp);
        ca
    }

    /// A new CA whose files go into `dir` (made if missing, left on drop).
    pub fn new_in(name: &str, dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("certificate dir");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the certificate dir");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        valid_for(&mut params, Duration::days(3650));
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca_file = write(dir, &format!("{name}-ca.pem"), &cert.pem());
        Self {
            dir: dir.to_path_buf(),
            _temp: None,
            name: name.to_string(),
            cert,
            key,
            ca_file,
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, file_name: &str, names: &[&str]) -> Identity {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        valid_for(&mut params, Duration::days(365));
        self.issue(file_name, params)
    }

    /// A client certificate whose common name is `cn` (the username a
    /// broker with `use_identity_as_username` sees), valid for `days` from
    /// yesterday; a negative `days` makes one that has expired.
    pub fn client(&self, file_name: &str, cn: &str, days: i64) -> Identity {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if days < 0 {
            let now = OffsetDateTime::now_utc();
            params.not_before = now - Duration::days(30);
            params.not_after = now + Duration::days(days);
        } else {
            valid_for(&mut params, Duration::days(days));
        }
        self.issue(file_name, params)
    }

    fn issue(&self, file_name: &str, params: CertificateParams) -> Identity {
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign a certificate");
        let prefix = format!("{}-{file_name}", self.name);
        Identity {
            cert_file: write(&self.dir, &format!("{prefix}.pem"), &cert.pem()),
            key_file: write(&self.dir, &format!("{prefix}.key"), &key.serialize_pem()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// From yesterday (clocks differ a little) for `days`.
fn valid_for(params: &mut CertificateParams, days: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + days;
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a certificate file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
        .expect("chmod a certificate file");
    path
}
