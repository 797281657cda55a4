//! What the bridge file names by path rather than holds: secrets kept in
//! files (mounted Kubernetes or Docker secrets) and TLS certificates.
//!
//! Read where the configuration is loaded, so `check`, start-up and every
//! reload see the same files, and a missing or broken one is a
//! configuration error naming the setting, its line and the file. Relative
//! paths are relative to the bridge file, like the mapping globs.

use super::error::ConfigError;
use super::BridgeConfig;
use crate::mqtt::MqttTls;
use crate::secret::Secret;
use crate::tls::{CertificateFile, CertificateInUse, CertificateRole};
use std::path::Path;

/// A `kafka.properties` key ending in this names a file holding the value
/// of the property without it: `sasl.password_file` sets `sasl.password`.
/// (No librdkafka property ends in `_file`: its own files are `*.location`.)
pub const FILE_SUFFIX: &str = "_file";

/// The TLS material the files gave.
#[derive(Debug, Clone, Default)]
pub struct TlsInUse {
    /// `mqtt.tls` made into a client configuration; `None` without TLS.
    pub mqtt: Option<MqttTls>,
    /// Every certificate file in use, MQTT's and Kafka's, for the expiry
    /// warnings and metric.
    pub certificates: Vec<CertificateInUse>,
}

/// Resolves relative paths, reads secrets from files into the settings
/// they stand for, and reads and checks the certificate files.
pub fn load(path: &Path, bridge: &mut BridgeConfig, errors: &mut Vec<ConfigError>) -> TlsInUse {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut loaded = TlsInUse::default();
    let mut fail =
        |field: &str, message: String| errors.push(ConfigError::field(path, field, message));

    if let Some(file) = &bridge.mqtt.password_file {
        if bridge.mqtt.password.is_some() {
            fail(
                "mqtt.password_file",
                "is set together with `password`; keep one".into(),
            );
        }
        match read_secret(&base.join(file)) {
            Ok(secret) => bridge.mqtt.password = Some(Secret::new(secret)),
            Err(message) => fail("mqtt.password_file", message),
        }
    }

    if let Some(registry) = &mut bridge.schema_registry {
        if let Some(file) = &registry.password_file {
            if registry.password.is_some() {
                fail(
                    "schema_registry.password_file",
                    "is set together with `password`; keep one".into(),
                );
            }
            match read_secret(&base.join(file)) {
                Ok(secret) => registry.password = Some(Secret::new(secret)),
                Err(message) => fail("schema_registry.password_file", message),
            }
        }
    }

    let from_files: Vec<String> = bridge
        .kafka
        .properties
        .keys()
        .filter(|k| k.ends_with(FILE_SUFFIX))
        .cloned()
        .collect();
    for key in from_files {
        let file = bridge.kafka.properties.remove(&key).unwrap_or_default();
        let target = key.trim_end_matches(FILE_SUFFIX).to_string();
        let field = format!("kafka.properties.{key}");
        if bridge.kafka.properties.contains_key(&target) {
            fail(&field, format!("is set together with `{target}`; keep one"));
            continue;
        }
        match read_secret(&base.join(&file)) {
            Ok(value) => {
                bridge.kafka.properties.insert(target, value);
            }
            Err(message) => fail(&field, message),
        }
    }
    for (key, value) in bridge.kafka.properties.iter_mut() {
        // librdkafka's own file settings; `probe` finds the system's CAs.
        if key.ends_with(".location") && value != "probe" && Path::new(value).is_relative() {
            *value = base.join(&*value).display().to_string();
        }
    }
    for (key, role) in [
        ("ssl.certificate.location", CertificateRole::Client),
        ("ssl.ca.location", CertificateRole::Ca),
    ] {
        let Some(file) = bridge.kafka.properties.get(key) else {
            continue;
        };
        let file = Path::new(file);
        // A directory of CA files (OpenSSL's CApath) or `probe`: nothing
        // one file can say.
        if file.is_dir() || file == Path::new("probe") {
            continue;
        }
        match CertificateFile::read(file) {
            Ok(read) => loaded.certificates.push(CertificateInUse {
                connection: "kafka",
                role,
                setting: format!("kafka.properties.{key}"),
                file: read.file.clone(),
                expiry: read.earliest_expiry(),
            }),
            Err(e) => fail(&format!("kafka.properties.{key}"), e.to_string()),
        }
    }

    if let Some(tls) = &mut bridge.mqtt.tls {
        tls.resolve_paths(base);
        match MqttTls::load(tls, &bridge.mqtt.host) {
            Ok(made) => {
                loaded
                    .certificates
                    .extend(made.certificates.iter().cloned());
                loaded.mqtt = Some(made);
            }
            Err(problems) => {
                for problem in problems {
                    fail(problem.setting, problem.message);
                }
            }
        }
    }
    loaded
}

/// A secret file's content, less one trailing newline (what `echo` and
/// most editors add, and no password contains).
fn read_secret(file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
    let text = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if text.is_empty() {
        return Err(format!("{}: is empty", file.display()));
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use rcgen::{CertificateParams, DnType, KeyPair};
    use std::path::{Path, PathBuf};
    use std::time::{Duration, SystemTime};

    const BRIDGE: &str = "mqtt:\n  host: localhost\n  client_id: b1\nkafka:\n  bootstrap_servers: localhost:9092\n  transactional_id: b1\nmappings: ['m.yaml']\n";
    const MAPPING: &str =
        "routes:\n  - name: r\n    mqtt: { filter: 'a/{x}' }\n    kafka: { topic: t }\n";

    /// A bridge file with `mqtt_extra` under `mqtt:` and `kafka_extra`
    /// under `kafka:`, in `dir`.
    fn bridge(dir: &Path, mqtt_extra: &str, kafka_extra: &str) -> PathBuf {
        std::fs::write(dir.join("m.yaml"), MAPPING).unwrap();
        let text = BRIDGE
            .replace("client_id: b1\n", &format!("client_id: b1\n{mqtt_extra}"))
            .replace(
                "transactional_id: b1\n",
                &format!("transactional_id: b1\n{kafka_extra}"),
            );
        let path = dir.join("bridge.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A self-signed certificate valid for `days` from now, and its key,
    /// written as `<name>.pem` and `<name>.key`.
    fn certificate(dir: &Path, name: &str, days: i64) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(400);
        params.not_after = now + time::Duration::days(days);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    fn errors(path: &Path) -> Vec<String> {
        Config::load(path)
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn tls_true_false_and_a_map_all_load() {
        let dir = tempfile::tempdir().unwrap();
        let on = Config::load(&bridge(dir.path(), "  tls: true\n", "")).unwrap();
        assert_eq!(on.bridge.mqtt.tls, Some(Default::default()));
        assert!(on.tls.mqtt.is_some());
        let off = Config::load(&bridge(dir.path(), "  tls: false\n", "")).unwrap();
        assert_eq!(off.bridge.mqtt.tls, None);
        assert!(off.tls.mqtt.is_none());

        certificate(dir.path(), "client", 365);
        certificate(dir.path(), "ca", 3650);
        let map = "  tls:\n    ca_file: ca.pem\n    cert_file: client.pem\n    key_file: client.key\n    server_name: broker.internal\n    alpn: [x-amzn-mqtt-ca]\n";
        let config = Config::load(&bridge(dir.path(), map, "")).unwrap();
        let tls = config.bridge.mqtt.tls.as_ref().unwrap();
        // Relative to the bridge file.
        assert_eq!(
            tls.cert_file.as_deref(),
            Some(&*dir.path().join("client.pem"))
        );
        let made = config.tls.mqtt.as_ref().unwrap();
        assert_eq!(made.alpn_protocols(), vec![b"x-amzn-mqtt-ca".to_vec()]);
        let roles: Vec<_> = config
            .tls
            .certificates
            .iter()
            .map(|c| (c.connection, c.role.as_str(), c.setting.as_str()))
            .collect();
        assert_eq!(
            roles,
            [
                ("mqtt", "ca", "mqtt.tls.ca_file"),
                ("mqtt", "client", "mqtt.tls.cert_file")
            ]
        );
        // Watched for renewals.
        assert!(config.files().contains(&dir.path().join("client.key")));
        assert!(config.certificate_warnings(SystemTime::now()).is_empty());
    }

    #[test]
    fn an_unknown_tls_setting_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let texts = errors(&bridge(dir.path(), "  tls:\n    ca_fil: ca.pem\n", ""));
        assert!(
            texts[0].contains(":5:5: mqtt.tls: unknown field `ca_fil`"),
            "{texts:?}"
        );
        let texts = errors(&bridge(dir.path(), "  tls: yes please\n", ""));
        assert!(texts[0].contains("mqtt.tls"), "{texts:?}");
    }

    #[test]
    fn missing_and_unusable_files_are_errors_naming_setting_line_and_file() {
        let dir = tempfile::tempdir().unwrap();
        certificate(dir.path(), "client", 365);
        certificate(dir.path(), "other", 365);
        std::fs::write(dir.path().join("junk.pem"), "not a certificate\n").unwrap();
        let tls =
            "  tls:\n    ca_file: missing.pem\n    cert_file: junk.pem\n    key_file: client.key\n";
        let texts = errors(&bridge(dir.path(), tls, ""));
        assert_eq!(texts.len(), 2, "{texts:?}");
        assert!(
            texts[0].contains(":5:14: mqtt.tls.ca_file: ")
                && texts[0].contains("missing.pem: cannot read"),
            "{texts:?}"
        );
        assert!(
            texts[1].contains("mqtt.tls.cert_file: ")
                && texts[1].contains("junk.pem: holds no PEM certificate"),
            "{texts:?}"
        );

        // A key that is not the certificate's.
        let tls = "  tls:\n    cert_file: client.pem\n    key_file: other.key\n";
        let texts = errors(&bridge(dir.path(), tls, ""));
        assert!(
            texts[0].contains(":6:15: mqtt.tls.key_file: ")
                && texts[0].contains("other.key: not usable with the certificate in"),
            "{texts:?}"
        );
        // A certificate without its key, a key file without a key.
        let texts = errors(&bridge(
            dir.path(),
            "  tls:\n    cert_file: client.pem\n",
            "",
        ));
        assert!(
            texts[0].contains("mqtt.tls.cert_file: is set without `key_file`"),
            "{texts:?}"
        );
        let tls = "  tls:\n    cert_file: client.pem\n    key_file: client.pem\n";
        let texts = errors(&bridge(dir.path(), tls, ""));
        assert!(
            texts[0].contains("client.pem: holds no PEM private key"),
            "{texts:?}"
        );
    }

    #[test]
    fn expiring_and_expired_certificates_are_warned_of() {
        let dir = tempfile::tempdir().unwrap();
        certificate(dir.path(), "soon", 10);
        certificate(dir.path(), "gone", -3);
        let tls = "  tls:\n    ca_file: gone.pem\n    cert_file: soon.pem\n    key_file: soon.key\n    insecure_skip_verify: true\n";
        let config = Config::load(&bridge(dir.path(), tls, "")).unwrap();
        let warnings = config.certificate_warnings(SystemTime::now());
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(
            warnings[0].starts_with("mqtt.tls.ca_file: ")
                && warnings[0].ends_with("(CN=gone) expired 3 days ago; the peer will refuse it"),
            "{warnings:?}"
        );
        assert!(
            warnings[1].starts_with("mqtt.tls.cert_file: ")
                && warnings[1].ends_with("(CN=soon) expires in 10 days"),
            "{warnings:?}"
        );
        assert!(warnings[2].contains("insecure_skip_verify"), "{warnings:?}");
        // And not a month before the warning window opens.
        let earlier = SystemTime::now() - Duration::from_secs(60 * 86_400);
        let warnings = config.certificate_warnings(earlier);
        assert!(!warnings.iter().any(|w| w.contains("soon")), "{warnings:?}");
    }

    #[test]
    fn secrets_come_from_files_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mqtt-password"), "hunter2\n").unwrap();
        std::fs::write(dir.path().join("kafka-password"), "swordfish\r\n").unwrap();
        let config = Config::load(&bridge(
            dir.path(),
            "  username: bridge\n  password_file: mqtt-password\n",
            "  properties:\n    sasl.username: bridge\n    sasl.password_file: kafka-password\n",
        ))
        .unwrap();
        let mqtt = &config.bridge.mqtt;
        assert_eq!(mqtt.password.as_ref().unwrap().expose(), "hunter2");
        let kafka = &config.bridge.kafka;
        assert_eq!(kafka.properties["sasl.password"], "swordfish");
        assert!(!kafka.properties.contains_key("sasl.password_file"));
        let shown = format!("{:?}", config.bridge);
        assert!(
            !shown.contains("hunter2") && !shown.contains("swordfish"),
            "{shown}"
        );

        // Both forms at once, a missing file, an empty one.
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let texts = errors(&bridge(
            dir.path(),
            "  password: inline\n  password_file: mqtt-password\n",
            "  properties:\n    sasl.password: x\n    sasl.password_file: kafka-password\n    ssl.key.password_file: nowhere\n    sasl.oauthbearer.client.secret_file: empty\n",
        ));
        assert_eq!(texts.len(), 4, "{texts:?}");
        assert!(
            texts
                .iter()
                .any(|t| t.contains("mqtt.password_file: is set together with `password`")),
            "{texts:?}"
        );
        assert!(
            texts.iter().any(|t| t.contains(
                "kafka.properties.sasl.password_file: is set together with `sasl.password`"
            )),
            "{texts:?}"
        );
        assert!(
            texts
                .iter()
                .any(|t| t.contains("kafka.properties.ssl.key.password_file: ")
                    && t.contains("nowhere: cannot read")),
            "{texts:?}"
        );
        assert!(
            texts.iter().any(|t| t.contains("empty: is empty")),
            "{texts:?}"
        );
    }

    #[test]
    fn kafka_certificate_files_are_checked_and_watched_for_expiry() {
        let dir = tempfile::tempdir().unwrap();
        certificate(dir.path(), "kafka-ca", 20);
        let config = Config::load(&bridge(
            dir.path(),
            "",
            "  properties:\n    security.protocol: SASL_SSL\n    ssl.ca.location: kafka-ca.pem\n",
        ))
        .unwrap();
        // Relative to the bridge file, for librdkafka too.
        let location = &config.bridge.kafka.properties["ssl.ca.location"];
        assert_eq!(Path::new(location), dir.path().join("kafka-ca.pem"));
        let warnings = config.certificate_warnings(SystemTime::now());
        assert!(
            warnings[0].starts_with("kafka.properties.ssl.ca.location: ")
                && warnings[0].ends_with("expires in 20 days"),
            "{warnings:?}"
        );
        let texts = errors(&bridge(
            dir.path(),
            "",
            "  properties:\n    ssl.certificate.location: nothing.pem\n",
        ));
        assert!(
            texts[0].contains("kafka.properties.ssl.certificate.location: "),
            "{texts:?}"
        );
    }
}
