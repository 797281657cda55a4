//! Loading and checking configuration: one bridge file plus mapping files.
//!
//! Loading collects every problem it can find before giving up, each with
//! file, line and field, because a user fixing a config wants the whole list
//! in one `check` run.

mod bridge;
mod env;
mod error;
mod files;
mod locate;
mod mapping;

pub use crate::kafka::KafkaConfig;
pub use crate::mqtt::{MqttConfig, MqttProtocol};
pub use bridge::{BridgeConfig, DeliveryConfig, Guarantee, LimitsConfig, MetricsConfig};
pub use error::{ConfigError, ConfigErrors};
pub use files::{TlsInUse, FILE_SUFFIX};
pub use locate::locate_all;
pub use mapping::{
    CommandConfig, CommandKafkaConfig, CommandMqttConfig, EncodingConfig, EncodingFormat,
    FieldType, FormatConfig, MappingFile, ProtobufFormatConfig, RouteConfig, RouteKafkaConfig,
    RouteMqttConfig, SparkplugRecords, SparkplugRouteConfig, SubjectStrategy, TextFormatConfig,
    TransformConfig,
};

use crate::mqtt::Qos;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// A bridge file with its mapping files, parsed but not yet compiled.
#[derive(Debug, Clone)]
pub struct Config {
    pub bridge: BridgeConfig,
    /// The bridge file, for messages.
    pub path: PathBuf,
    pub mappings: Vec<MappingSource>,
    /// The TLS files the bridge file names, read and checked.
    pub tls: TlsInUse,
}

/// One mapping file with its text kept for locating later errors.
#[derive(Debug, Clone)]
pub struct MappingSource {
    pub path: PathBuf,
    pub text: String,
    pub file: MappingFile,
}

impl MappingSource {
    /// Parses a mapping file's text (after `${VAR}` interpolation).
    pub fn parse(path: &Path, raw: &str) -> Result<Self, ConfigErrors> {
        let text = env::interpolate(path, raw, |name| std::env::var(name).ok())?;
        let file = parse_yaml(path, &text)?;
        Ok(Self {
            path: path.to_path_buf(),
            text,
            file,
        })
    }

    /// Reads and parses a mapping file.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        Self::parse(path, &read(path)?)
    }
}

impl Config {
    /// The files this configuration was read from: the bridge file, the
    /// mapping files and the schemas they name (what `--watch` watches).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.path.clone()];
        let mut compiled = std::collections::HashSet::new();
        // Renewed certificates are taken by a reload.
        if let Some(tls) = &self.bridge.mqtt.tls {
            files.extend(tls.files().cloned());
        }
        for mapping in &self.mappings {
            files.push(mapping.path.clone());
            let dir = mapping.path.parent().unwrap_or(Path::new("."));
            let schemas = mapping.file.routes.iter().filter_map(|r| r.schema.as_ref());
            let command_schemas = mapping
                .file
                .commands
                .iter()
                .filter_map(|c| c.schema.as_ref());
            // The schemas records are encoded with (a `.proto` one's
            // imports are not followed: the registry takes no references).
            let encodings = mapping.file.routes.iter().filter_map(|r| {
                r.kafka
                    .as_ref()
                    .and_then(|k| k.encoding.as_ref())
                    .and_then(|e| e.schema.as_ref())
            });
            files.extend(
                schemas
                    .chain(command_schemas)
                    .chain(encodings)
                    .map(|s| dir.join(s)),
            );
            // A route's .proto with every file it imports (compiled once
            // however many routes use it).
            for protobuf in mapping
                .file
                .routes
                .iter()
                .filter_map(|r| r.protobuf.as_ref())
            {
                let file = dir.join(&protobuf.file);
                let include: Vec<PathBuf> = protobuf.include.iter().map(|d| dir.join(d)).collect();
                if !compiled.insert((file.clone(), include.clone())) {
                    continue;
                }
                let sources = crate::route::ProtobufFormat::source_files(&file, &include);
                if sources.is_empty() {
                    files.push(file);
                }
                files.extend(sources);
            }
        }
        files.sort();
        files.dedup();
        files
    }

    /// The bridge file's mapping globs, as full patterns.
    pub fn mapping_globs(&self) -> Vec<PathBuf> {
        let base = self.path.parent().unwrap_or(Path::new("."));
        self.bridge.mappings.iter().map(|p| base.join(p)).collect()
    }

    /// Warnings about the certificates in use at `now`: expired, or
    /// expiring within [`crate::tls::EXPIRY_WARNING`].
    pub fn certificate_warnings(&self, now: std::time::SystemTime) -> Vec<String> {
        let mut warnings: Vec<String> = self
            .tls
            .certificates
            .iter()
            .filter_map(|c| c.warning(now))
            .collect();
        if self
            .bridge
            .mqtt
            .tls
            .as_ref()
            .is_some_and(|t| t.insecure_skip_verify)
        {
            warnings.push(
                "mqtt.tls.insecure_skip_verify: the broker's certificate is not checked; \
                 anyone on the network path can read and change the traffic"
                    .into(),
            );
        }
        warnings
    }

    /// Reads the bridge file and every mapping file its globs name.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let raw = read(path)?;
        let text = env::interpolate(path, &raw, |name| std::env::var(name).ok())?;
        let mut bridge: BridgeConfig = parse_yaml(path, &text)?;
        apply_defaults(&mut bridge);
        let mut errors = Vec::new();
        let tls = files::load(path, &mut bridge, &mut errors);
        errors.extend(validate_bridge(path, &bridge, &raw));
        let mappings = load_mappings(path, &bridge, &mut errors);
        Self::checked(path, &text, bridge, mappings, tls, errors)
    }

    /// A config from a bridge file's text and mappings already parsed, with
    /// the same checks as [`Config::load`] but no mapping globs read: the
    /// demo, benchmarks and tests build their configs here so that none of
    /// them runs a config a user could not load.
    pub fn from_parts(
        path: &Path,
        raw: &str,
        mappings: Vec<MappingSource>,
    ) -> Result<Self, ConfigErrors> {
        let text = env::interpolate(path, raw, |name| std::env::var(name).ok())?;
        let mut bridge: BridgeConfig = parse_yaml(path, &text)?;
        apply_defaults(&mut bridge);
        let mut errors = Vec::new();
        let tls = files::load(path, &mut bridge, &mut errors);
        errors.extend(validate_bridge(path, &bridge, raw));
        Self::checked(path, &text, bridge, mappings, tls, errors)
    }

    /// `Self` when `errors` is empty, else the errors with the bridge
    /// file's own located in `text`.
    fn checked(
        path: &Path,
        text: &str,
        bridge: BridgeConfig,
        mappings: Vec<MappingSource>,
        tls: TlsInUse,
        errors: Vec<ConfigError>,
    ) -> Result<Self, ConfigErrors> {
        let (mut own, others): (Vec<_>, Vec<_>) = errors.into_iter().partition(|e| e.file == path);
        locate_all(text, &mut own);
        own.extend(others);
        if own.is_empty() {
            Ok(Self {
                bridge,
                path: path.to_path_buf(),
                mappings,
                tls,
            })
        } else {
            Err(ConfigErrors(own))
        }
    }
}

/// Reads every mapping file the bridge file's globs name, once each.
fn load_mappings(
    path: &Path,
    bridge: &BridgeConfig,
    errors: &mut Vec<ConfigError>,
) -> Vec<MappingSource> {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut mappings = Vec::new();
    for (index, pattern) in bridge.mappings.iter().enumerate() {
        match expand_glob(base, pattern) {
            Ok(paths) if paths.is_empty() => errors.push(ConfigError::field(
                path,
                format!("mappings[{index}]"),
                format!("`{pattern}` matches no file"),
            )),
            Ok(paths) => {
                let this_file = std::fs::canonicalize(path).ok();
                for mapping_path in paths {
                    // `*.yaml` next to the bridge file matches the bridge
                    // file itself, which is not a mapping file.
                    let is_self = std::fs::canonicalize(&mapping_path).ok() == this_file;
                    let seen = mappings
                        .iter()
                        .any(|m: &MappingSource| m.path == mapping_path);
                    if is_self || seen {
                        continue;
                    }
                    match MappingSource::load(&mapping_path) {
                        Ok(source) => mappings.push(source),
                        Err(e) => errors.extend(e.0),
                    }
                }
            }
            Err(message) => errors.push(ConfigError::field(
                path,
                format!("mappings[{index}]"),
                message,
            )),
        }
    }
    mappings
}

/// Defaults that depend on other settings. The members of a share group
/// consume the command topics in one consumer group, `<group>.commands`:
/// in a group of their own each (`<transactional_id>.commands`, the
/// default of a lone bridge) every member would deliver every command.
fn apply_defaults(bridge: &mut BridgeConfig) {
    if let (None, Some(group)) = (&bridge.kafka.command_group, &bridge.mqtt.share_group) {
        bridge.kafka.command_group = Some(format!("{group}.commands"));
    }
}

/// Whether the bridge file as written (`raw`, before `${VAR}`
/// interpolation) gives `mqtt.client_id` from the environment: then every
/// replica running the file may have an identity of its own. An unreadable
/// file counts as templated (the parse error is reported elsewhere).
fn identity_from_environment(raw: &str) -> bool {
    serde_yaml_ng::from_str::<serde_yaml_ng::Value>(raw)
        .ok()
        .and_then(|v| {
            v.get("mqtt")?
                .get("client_id")?
                .as_str()
                .map(str::to_string)
        })
        .is_none_or(|id| id.contains("${"))
}

/// Range checks serde cannot express; `raw` is the file as written.
fn validate_bridge(path: &Path, bridge: &BridgeConfig, raw: &str) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut check = |ok: bool, field: &str, message: &str| {
        if !ok {
            errors.push(ConfigError::field(path, field, message));
        }
    };
    check(
        !bridge.mqtt.host.is_empty(),
        "mqtt.host",
        "must not be empty",
    );
    check(
        !bridge.mqtt.client_id.is_empty(),
        "mqtt.client_id",
        "must not be empty",
    );
    check(
        bridge.limits.max_user_properties <= crate::mqtt::MAX_KEPT_USER_PROPERTIES,
        "limits.max_user_properties",
        "must be at most 1024 (the decoder keeps no more per message)",
    );
    if let Some(group) = &bridge.mqtt.share_group {
        check(
            !group.is_empty() && !group.contains(['/', '+', '#']),
            "mqtt.share_group",
            "must be a non-empty name without `/`, `+` or `#` (it becomes a topic level of `$share/<group>/...`)",
        );
        check(
            bridge.partition.is_none(),
            "mqtt.share_group",
            "cannot go with `partition`: in a share group the broker decides which bridge gets a message, so no bridge could keep the keys it owns",
        );
        let standby = bridge
            .ha
            .as_ref()
            .is_some_and(|ha| ha.mode == crate::scale::HaMode::Standby);
        check(
            !standby || identity_from_environment(raw),
            "mqtt.share_group",
            "with `ha.mode: standby` and one identity (a literal `mqtt.client_id`), every bridge running this file is a standby of one identity, so only one ever runs and the group has one member; give each standby pair an identity of its own from the environment (`client_id: bridges-${PAIR}`), or drop the share group",
        );
    }
    if let Some(ha) = bridge
        .ha
        .as_ref()
        .filter(|ha| ha.mode == crate::scale::HaMode::Standby)
    {
        check(
            (1_000..=3_600_000).contains(&ha.session_timeout_ms),
            "ha.session_timeout_ms",
            "must be between 1000 and 3600000 (and at least the broker's group.min.session.timeout.ms, 6000 by default)",
        );
        check(
            crate::kafka::is_valid_topic_name(&ha.lease_topic),
            "ha.lease_topic",
            "is not a valid Kafka topic name",
        );
        check(
            !crate::scale::host_name().is_empty(),
            "ha.mode",
            "is `standby`, but this host has no name to join the lease group with (set HOSTNAME)",
        );
    }
    if let Some(partition) = &bridge.partition {
        let host = crate::scale::host_name();
        if let Err((field, message)) = partition.resolve(&host) {
            errors.push(ConfigError::field(path, field, message));
        }
    }
    let mut check = |ok: bool, field: &str, message: &str| {
        if !ok {
            errors.push(ConfigError::field(path, field, message));
        }
    };
    check(
        bridge.mqtt.inflight_window > 0,
        "mqtt.inflight_window",
        "must be at least 1",
    );
    check(
        bridge.mqtt.keep_alive_s >= 5,
        "mqtt.keep_alive_s",
        "must be at least 5 seconds",
    );
    check(
        !bridge.kafka.bootstrap_servers.is_empty(),
        "kafka.bootstrap_servers",
        "must not be empty",
    );
    check(
        !bridge.kafka.transactional_id.is_empty(),
        "kafka.transactional_id",
        "must not be empty",
    );
    check(
        crate::kafka::is_valid_topic_name(&bridge.kafka.dead_letter_topic),
        "kafka.dead_letter_topic",
        "is not a valid Kafka topic name (letters, digits, `.`, `_`, `-`; at most 249)",
    );
    for reserved in [
        "transactional.id",
        "bootstrap.servers",
        "transaction.timeout.ms",
    ] {
        check(
            !bridge.kafka.properties.contains_key(reserved),
            &format!("kafka.properties.{reserved}"),
            "is set by the bridge; use `kafka.bootstrap_servers`, `kafka.transactional_id` or `delivery.transaction_timeout_ms`",
        );
    }
    check(
        bridge.delivery.batch_max_messages > 0,
        "delivery.batch_max_messages",
        "must be at least 1",
    );
    check(
        bridge.delivery.commit_interval_ms > 0,
        "delivery.commit_interval_ms",
        "must be at least 1",
    );
    check(
        bridge.delivery.commit_timeout_ms <= bridge.delivery.transaction_timeout_ms,
        "delivery.commit_timeout_ms",
        "must not exceed delivery.transaction_timeout_ms",
    );
    check(
        crate::kafka::is_valid_topic_name(&bridge.delivery.state_topic),
        "delivery.state_topic",
        "is not a valid Kafka topic name (letters, digits, `.`, `_`, `-`; at most 249)",
    );
    if bridge.delivery.guarantee == Guarantee::ExactlyOnce {
        check(
            !bridge.mqtt.clean_session,
            "mqtt.clean_session",
            "must be false for `delivery.guarantee: exactly_once`: a clean session forgets \
             unacknowledged messages and the packet ids the bridge uses to recognise resends \
             (or set `delivery.guarantee: at_least_once`)",
        );
        check(
            bridge.mqtt.qos != Qos::AtMostOnce,
            "mqtt.qos",
            "is 0 (at most once), below what `delivery.guarantee: exactly_once` needs; \
             use 2 (exact) or 1 (exact where resends are recognisable)",
        );
    }
    check(
        !bridge.mappings.is_empty(),
        "mappings",
        "names no mapping file",
    );
    errors
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::field(path, "", format!("cannot read file: {e}")))
}

fn expand_glob(base: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
    let full = base.join(pattern);
    let full = full.to_str().ok_or("path is not valid UTF-8")?;
    let mut paths = glob::glob(full)
        .map_err(|e| format!("`{pattern}` is not a valid glob: {e}"))?
        .filter_map(Result::ok)
        .filter(|p| p.is_file())
        .collect::<Vec<_>>();
    paths.sort();
    Ok(paths)
}

/// Deserializes YAML, turning serde's error into file, line and field.
pub(crate) fn parse_yaml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    serde_yaml_ng::from_str(text).map_err(|e| {
        let full = e.to_string();
        // serde_yaml_ng appends " at line L column C"; we print position first.
        let message = match full.rfind(" at line ") {
            Some(at) => full[..at].to_string(),
            None => full,
        };
        let (field, message) = match message.split_once(": ") {
            Some((field, rest))
                if !field.contains(' ') && !field.is_empty() && field != "invalid type" =>
            {
                (field.to_string(), rest.to_string())
            }
            _ => (String::new(), message),
        };
        match e.location() {
            Some(loc) => ConfigError::at(path, loc.line(), loc.column(), field, message),
            None => ConfigError::field(path, field, message),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    const BRIDGE: &str = "mqtt:\n  host: localhost\n  client_id: b1\nkafka:\n  bootstrap_servers: localhost:9092\n  transactional_id: b1\nmappings: ['m/*.yaml']\n";
    const MAPPING: &str =
        "routes:\n  - name: r\n    mqtt: { filter: 'a/{x}' }\n    kafka: { topic: t }\n";

    /// `--watch` sees a change to any file a route is built from: a
    /// `.proto` imported by a route's `.proto` (two levels down, from an
    /// `include` directory) and a registry encoding's schema.
    #[test]
    fn watched_files_follow_proto_imports_and_encoding_schemas() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "m/p/top.proto",
            "syntax = \"proto3\";\npackage t;\nimport \"mid.proto\";\nmessage Top { Mid mid = 1; }\n",
        );
        write(
            dir.path(),
            "m/p/mid.proto",
            "syntax = \"proto3\";\npackage t;\nimport \"deep/leaf.proto\";\nimport \"google/protobuf/timestamp.proto\";\nmessage Mid { Leaf leaf = 1; google.protobuf.Timestamp at = 2; }\n",
        );
        write(
            dir.path(),
            "m/shared/deep/leaf.proto",
            "syntax = \"proto3\";\npackage t;\nmessage Leaf { int32 n = 1; }\n",
        );
        write(
            dir.path(),
            "m/s/t.avsc",
            r#"{"type": "record", "name": "T", "fields": []}"#,
        );
        write(
            dir.path(),
            "m/a.yaml",
            "routes:\n  - name: r\n    mqtt: { filter: 'a/{x}' }\n    format: protobuf\n    protobuf: { file: p/top.proto, message: t.Top, include: [shared] }\n    kafka: { topic: t, encoding: { format: avro, schema: s/t.avsc } }\n",
        );
        let path = write(dir.path(), "bridge.yaml", BRIDGE);
        let config = Config::load(&path).unwrap();
        let watched: Vec<String> = config
            .files()
            .iter()
            .map(|f| {
                let f = f.strip_prefix(dir.path()).unwrap_or(f);
                f.components()
                    .filter(|c| !matches!(c, std::path::Component::CurDir))
                    .collect::<PathBuf>()
                    .display()
                    .to_string()
            })
            .collect();
        for expected in [
            "bridge.yaml",
            "m/a.yaml",
            "m/p/top.proto",
            "m/p/mid.proto",
            "m/shared/deep/leaf.proto",
            "m/s/t.avsc",
        ] {
            assert!(
                watched.iter().any(|w| w == expected),
                "{expected} in {watched:?}"
            );
        }
        assert!(
            !watched.iter().any(|w| w.contains("timestamp")),
            "{watched:?}"
        );
    }

    #[test]
    fn loads_bridge_and_sorted_mappings() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "m/b.yaml", MAPPING);
        write(dir.path(), "m/a.yaml", MAPPING);
        let path = write(dir.path(), "bridge.yaml", BRIDGE);
        let config = Config::load(&path).unwrap();
        let names: Vec<_> = config
            .mappings
            .iter()
            .map(|m| m.path.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["a.yaml", "b.yaml"]);
        assert_eq!(config.bridge.delivery.batch_max_messages, 1000);
        assert_eq!(config.bridge.mqtt.protocol, MqttProtocol::V5);
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "m/a.yaml",
            "routes:\n  - name: r\n    mqtt: { filter: a }\n    kafka:\n      topik: t\n",
        );
        let path = write(dir.path(), "bridge.yaml", BRIDGE);
        let errors = Config::load(&path).unwrap_err();
        let text = errors.0[0].to_string();
        assert!(
            text.contains("a.yaml:5:7: routes[0].kafka: unknown field `topik`"),
            "{text}"
        );
    }

    #[test]
    fn exactly_once_refuses_a_clean_session_and_qos_0() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "m/a.yaml",
            "routes:\n  - name: r\n    mqtt: { filter: a, qos: 0 }\n    kafka: { topic: t }\n",
        );
        let bad = BRIDGE.replace(
            "client_id: b1",
            "client_id: b1\n  clean_session: true\n  qos: 0",
        );
        let path = write(dir.path(), "bridge.yaml", &bad);
        let errors = Config::load(&path).unwrap_err().0;
        let texts: Vec<_> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(texts.len(), 2, "{texts:?}");
        assert!(
            texts[0].contains(":4:18: mqtt.clean_session: must be false"),
            "{texts:?}"
        );
        assert!(texts[1].contains(":5:8: mqtt.qos: is 0"), "{texts:?}");
        // At least once accepts all of it. (The route's own QoS 0 is
        // refused where routes are compiled: see `route::tests`.)
        let relaxed = format!("{bad}delivery: {{ guarantee: at_least_once }}\n");
        std::fs::write(&path, relaxed).unwrap();
        Config::load(&path).unwrap();
    }

    #[test]
    fn syntax_error_names_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "bridge.yaml", "mqtt:\n  host: [unclosed\n");
        let text = Config::load(&path).unwrap_err().0[0].to_string();
        assert!(text.starts_with(&format!("{}:", path.display())), "{text}");
        assert!(text.contains(":3:") || text.contains(":2:"), "{text}");
    }

    #[test]
    fn range_errors_are_all_reported_with_lines() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "m/a.yaml", MAPPING);
        let bad = BRIDGE.replace(
            "client_id: b1",
            "client_id: b1\n  keep_alive_s: 1\n  inflight_window: 0",
        );
        let path = write(dir.path(), "bridge.yaml", &bad);
        let errors = Config::load(&path).unwrap_err().0;
        let texts: Vec<_> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(texts.len(), 2, "{texts:?}");
        assert!(
            texts[0].contains(":5:20: mqtt.inflight_window: must be at least 1"),
            "{texts:?}"
        );
        assert!(
            texts[1].contains(":4:17: mqtt.keep_alive_s: must be at least 5"),
            "{texts:?}"
        );
        // QoS out of range is the parser's refusal, at the value itself.
        let bad = BRIDGE.replace("client_id: b1", "client_id: b1\n  qos: 3");
        std::fs::write(&path, bad).unwrap();
        let text = Config::load(&path).unwrap_err().0[0].to_string();
        assert!(
            text.ends_with(":4:8: mqtt.qos: is 3; must be 0, 1 or 2"),
            "{text}"
        );
    }

    #[test]
    fn contradictory_scale_settings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "m/a.yaml", MAPPING);
        let load = |extra: &str, partition: &str| {
            let text = format!(
                "{}{partition}",
                BRIDGE.replace("client_id: b1", &format!("client_id: b1\n  {extra}"))
            );
            let path = write(dir.path(), "bridge.yaml", &text);
            Config::load(&path)
                .err()
                .map(|e| e.0.iter().map(ToString::to_string).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert!(load("share_group: bridges", "").is_empty());
        let both = load(
            "share_group: bridges",
            "partition: { instances: 3, instance: 0 }\n",
        );
        assert_eq!(both.len(), 1, "{both:?}");
        assert!(
            both[0].contains("mqtt.share_group: cannot go with `partition`"),
            "{both:?}"
        );
        let out_of_range = load(
            "keep_alive_s: 30",
            "partition: { instances: 3, instance: 3 }\n",
        );
        assert!(
            out_of_range[0]
                .contains("partition.instance: is 3, out of range for 3 instances (0 to 2)"),
            "{out_of_range:?}"
        );
        let one_identity = load("share_group: bridges", "ha: { mode: standby }\n");
        assert!(
            one_identity[0].contains("with `ha.mode: standby` and one identity"),
            "{one_identity:?}"
        );
        std::env::set_var("BRIDGE_TEST_PAIR", "1");
        let per_pair = BRIDGE.replace(
            "client_id: b1",
            "client_id: b${BRIDGE_TEST_PAIR}\n  share_group: bridges",
        ) + "ha: { mode: standby }\n";
        let path = write(dir.path(), "bridge.yaml", &per_pair);
        assert!(Config::load(&path).is_ok(), "an identity per pair is fine");
        let bad_name = load("share_group: 'a/b'", "");
        assert!(
            bad_name[0].contains("mqtt.share_group: must be a non-empty name"),
            "{bad_name:?}"
        );
    }

    #[test]
    fn glob_does_not_load_the_bridge_file_as_a_mapping() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", MAPPING);
        let path = write(
            dir.path(),
            "bridge.yaml",
            &BRIDGE.replace("m/*.yaml", "*.yaml"),
        );
        let config = Config::load(&path).unwrap();
        assert_eq!(config.mappings.len(), 1);
    }

    #[test]
    fn glob_matching_nothing_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "bridge.yaml", BRIDGE);
        let text = Config::load(&path).unwrap_err().0[0].to_string();
        assert!(
            text.contains("mappings[0]: `m/*.yaml` matches no file"),
            "{text}"
        );
    }

    #[test]
    fn missing_file_is_named() {
        let text = Config::load(Path::new("/nonexistent/bridge.yaml"))
            .unwrap_err()
            .0[0]
            .to_string();
        assert!(
            text.starts_with("/nonexistent/bridge.yaml: cannot read file"),
            "{text}"
        );
    }

    #[test]
    fn reserved_kafka_properties_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "m/a.yaml", MAPPING);
        let bad = BRIDGE.replace(
            "transactional_id: b1",
            "transactional_id: b1\n  properties:\n    transactional.id: other",
        );
        let path = write(dir.path(), "bridge.yaml", &bad);
        let text = Config::load(&path).unwrap_err().0[0].to_string();
        assert!(
            text.contains("kafka.properties.transactional.id: is set by the bridge"),
            "{text}"
        );
    }
}
