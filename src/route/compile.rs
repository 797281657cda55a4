//! Compiling mapping files into routes, once at start-up: every problem
//! in every file is collected with its file, line and field, so one `check`
//! run shows them all. The compiled form is in `record.rs`.

use super::format::{regex_error, Format};
use super::index::RouteIndex;
use super::record::{KafkaTarget, Limits, MqttTarget, Route, SparkplugOptions, Target, Timestamp};
use super::reject::DeadLetterLimits;
use super::schema::Schemas;
use super::template::Template;
use super::transform::Transform;
use super::{headers, RouteTable, TopicFilter};
use crate::config::{
    locate_all, Config, ConfigError, ConfigErrors, FormatConfig, Guarantee, MappingSource,
    RouteConfig, RouteKafkaConfig, SparkplugRecords,
};
use crate::kafka;
use crate::mqtt::Qos;
use crate::registry::Encoding;
use crate::sparkplug;
use regex::Regex;
use std::collections::HashMap;
use std::path::Path;

/// What `check` prints for one route.
#[derive(Debug, Clone)]
pub struct RouteSummary {
    pub name: String,
    pub origin: String,
    pub filter: String,
    pub format: &'static str,
    pub schema: bool,
    pub topic: String,
    pub key: Option<String>,
}

impl RouteTable {
    /// Compiles every route of every mapping file, collecting all problems.
    pub fn compile(config: &Config) -> Result<Self, ConfigErrors> {
        let mut routes = Vec::new();
        let mut summaries = Vec::new();
        let mut errors = Vec::new();
        let mut names: HashMap<String, String> = HashMap::new();
        let mut m2m = Vec::new();
        let mut schemas = Schemas::default();
        for source in &config.mappings {
            let mut file_errors = Vec::new();
            let mut m2m_probes = Vec::new();
            for (index, filter) in source.file.m2m.iter().enumerate() {
                let field = format!("m2m[{index}]");
                match TopicFilter::parse(filter) {
                    Ok(f) => {
                        m2m.push((f, String::new()));
                        m2m_probes.push(ConfigError::field(&source.path, field, ""));
                    }
                    Err(e) => file_errors.push(ConfigError::field(&source.path, field, e)),
                }
            }
            locate_all(&source.text, &mut m2m_probes);
            let first_m2m = m2m.len() - m2m_probes.len();
            for ((_, origin), probe) in m2m[first_m2m..].iter_mut().zip(m2m_probes) {
                *origin = format!("{}:{}", source.path.display(), probe.line.unwrap_or(0));
            }
            // One probe per compiled route to find its line: `origin`.
            let mut origins = Vec::new();
            for (index, route) in source.file.routes.iter().enumerate() {
                let field = format!("routes[{index}]");
                if let Some(previous) = names.get(&route.name) {
                    file_errors.push(ConfigError::field(
                        &source.path,
                        format!("{field}.name"),
                        format!("route name `{}` is already used at {previous}", route.name),
                    ));
                }
                match compile_route(config, source, route, &mut schemas) {
                    Ok(compiled) => {
                        summaries.push(summary(route, &compiled));
                        routes.push(compiled);
                        origins.push(ConfigError::field(&source.path, field, ""));
                    }
                    Err(problems) => {
                        file_errors.extend(problems.into_iter().map(|(f, m)| {
                            ConfigError::field(&source.path, format!("{field}.{f}"), m)
                        }))
                    }
                }
                names.insert(route.name.clone(), source.path.display().to_string());
            }
            let first = routes.len() - origins.len();
            file_errors.append(&mut origins);
            locate_all(&source.text, &mut file_errors);
            let probes = file_errors.split_off(file_errors.len() - (routes.len() - first));
            for (route, probe) in routes[first..].iter_mut().zip(probes) {
                route.origin = format!("{}:{}", source.path.display(), probe.line.unwrap_or(0));
            }
            errors.extend(file_errors);
        }
        if config.bridge.mqtt.share_group.is_some() {
            errors.extend(relay_loops(config));
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        for (summary, route) in summaries.iter_mut().zip(&routes) {
            summary.origin = route.origin.clone();
        }
        let mut warnings = shadow_warnings(&routes);
        for route in &routes {
            for (tree, origin) in m2m.iter().filter(|(t, _)| route.filter.overlaps(t)) {
                warnings.push(format!(
                    "{}: route `{}` ({}) overlaps the M2M tree {tree} declared at {origin}: messages there stay on MQTT and never reach this route",
                    route.origin, route.name, route.filter
                ));
            }
        }
        let mut index = RouteIndex::default();
        for (i, route) in routes.iter().enumerate() {
            index.insert(&route.filter, i);
        }
        let l = &config.bridge.limits;
        let mut reserved_topics = vec![
            config.bridge.delivery.state_topic.clone(),
            config.bridge.kafka.dead_letter_topic.clone(),
        ];
        reserved_topics.extend(routes.iter().map(|r| r.dead_letter_topic.clone()));
        reserved_topics.sort();
        reserved_topics.dedup();
        let limits = Limits {
            max_user_properties: l.max_user_properties,
            max_user_property_bytes: l.max_user_property_bytes,
            max_packet_bytes: l.max_packet_bytes,
            timestamp_max_ahead_ms: i64::try_from(l.timestamp_max_ahead_ms).unwrap_or(i64::MAX),
            timestamp_max_behind_ms: l
                .timestamp_max_behind_ms
                .map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
            dead_letter: DeadLetterLimits {
                max_payload_bytes: l.dead_letter_max_payload_bytes,
                max_user_property_bytes: l.max_user_property_bytes,
            },
            reserved_topics,
        };
        Ok(Self {
            routes,
            limits,
            default_dead_letter_topic: config.bridge.kafka.dead_letter_topic.clone(),
            index,
            m2m,
            summaries,
            warnings,
        })
    }
}

fn summary(config: &RouteConfig, route: &Route) -> RouteSummary {
    RouteSummary {
        name: route.name.clone(),
        origin: String::new(),
        filter: match &config.mqtt.regex {
            Some(re) => format!("{} ~ /{re}/", config.mqtt.filter),
            None => config.mqtt.filter.clone(),
        },
        format: match route.format {
            Format::Json => "json",
            Format::Text(_) => "text",
            Format::Raw => "raw",
            Format::SparkplugB => "sparkplug_b",
            Format::Protobuf(_) => "protobuf",
        },
        schema: route.schema.is_some(),
        topic: match (&config.kafka, &config.publish) {
            (Some(k), _) => k.topic.clone(),
            (None, Some(p)) => format!("MQTT {} (relay)", p.topic),
            (None, None) => String::new(),
        },
        key: config
            .kafka
            .as_ref()
            .and_then(|k| k.key.clone())
            .or_else(|| {
                matches!(route.format, Format::SparkplugB).then(|| SPARKPLUG_KEY.to_string())
            }),
    }
}

/// The key of a Sparkplug B route that sets none: the sender,
/// `group/edge_node[/device]`, so one node's or device's records keep
/// their order.
const SPARKPLUG_KEY: &str = "{/descriptor}";

/// A route is shadowed when an earlier route without a regex matches every
/// topic it could match: it would never see a message.
fn shadow_warnings(routes: &[Route]) -> Vec<String> {
    let mut warnings = Vec::new();
    for (i, later) in routes.iter().enumerate() {
        if let Some(earlier) = routes[..i]
            .iter()
            .find(|e| e.regex.is_none() && later.filter.is_covered_by(&e.filter))
        {
            warnings.push(format!(
                "{}: route `{}` ({}) is shadowed by route `{}` at {} ({}), which matches first; it will never receive a message",
                later.origin, later.name, later.filter, earlier.name, earlier.origin, earlier.filter
            ));
        }
    }
    warnings
}

type Problems = Vec<(String, String)>;

fn compile_route(
    config: &Config,
    source: &MappingSource,
    route: &RouteConfig,
    schemas: &mut Schemas,
) -> Result<Route, Problems> {
    let mut problems: Problems = Vec::new();
    let base = source.path.parent().unwrap_or(Path::new("."));
    if route.name.is_empty() {
        problems.push(("name".into(), "must not be empty".into()));
    }
    let filter = TopicFilter::parse(&route.mqtt.filter)
        .map_err(|e| problems.push(("mqtt.filter".into(), e)))
        .ok();
    let mut captures: Vec<String> = filter
        .as_ref()
        .map(|f| f.capture_names().map(String::from).collect())
        .unwrap_or_default();
    let mut regex_groups = Vec::new();
    let regex = match &route.mqtt.regex {
        None => None,
        Some(text) => match Regex::new(text) {
            Ok(re) => {
                for name in re.capture_names().flatten() {
                    if captures.iter().any(|c| c == name) {
                        problems.push((
                            "mqtt.regex".into(),
                            format!("group `{name}` repeats a capture of the filter"),
                        ));
                    }
                    regex_groups.push(name.to_string());
                }
                captures.extend(regex_groups.iter().cloned());
                Some(re)
            }
            Err(e) => {
                problems.push(("mqtt.regex".into(), regex_error(&e)));
                None
            }
        },
    };
    let qos = route.mqtt.qos.unwrap_or(config.bridge.mqtt.qos);
    if route.mqtt.qos == Some(Qos::AtMostOnce)
        && config.bridge.delivery.guarantee == Guarantee::ExactlyOnce
    {
        problems.push((
            "mqtt.qos".into(),
            "is 0 (at most once), below what `delivery.guarantee: exactly_once` needs; use 2 \
             (exact) or 1 (exact where resends are recognisable)"
                .into(),
        ));
    }
    let format = Format::compile(route, base)
        .map_err(|e| problems.push(e))
        .ok();
    let structured = format.as_ref().is_none_or(Format::is_structured);
    let schema = match &route.schema {
        Some(_) if !structured => {
            problems.push((
                "schema".into(),
                "raw payloads cannot be validated against a schema; use `format: json` or `text`"
                    .into(),
            ));
            None
        }
        Some(path) => schemas
            .load(&base.join(path))
            .map_err(|e| problems.push(("schema".into(), e)))
            .ok(),
        None => None,
    };
    let transform = if route.transform.is_empty() {
        None
    } else if !structured {
        problems.push((
            "transform".into(),
            "raw payloads cannot be transformed; use `format: json` or `text`".into(),
        ));
        None
    } else {
        Transform::compile(&route.transform, &captures)
            .map_err(|e| problems.push(e))
            .ok()
    };
    let template = |problems: &mut Problems, field: &str, text: &str| {
        Template::parse(text, &captures, structured)
            .map_err(|e| problems.push((field.to_string(), e)))
            .ok()
    };
    let target = match (&route.kafka, &route.publish) {
        (Some(kafka), None) => {
            let mut kafka = kafka.clone();
            if route.format == FormatConfig::SparkplugB && kafka.key.is_none() {
                kafka.key = Some(SPARKPLUG_KEY.into());
            }
            let encoding = kafka.encoding.as_ref().and_then(|encoding| {
                if config.bridge.schema_registry.is_none() {
                    problems.push((
                        "kafka.encoding".into(),
                        "needs `schema_registry` in the bridge file".into(),
                    ));
                }
                if !structured {
                    problems.push((
                        "kafka.encoding".into(),
                        "raw payloads cannot be encoded; use a structured format".into(),
                    ));
                }
                let literal = (!kafka.topic.contains('{')).then_some(kafka.topic.as_str());
                Encoding::compile(encoding, base, literal, route.schema.as_deref(), schemas)
                    .map_err(|e| problems.push(e))
                    .ok()
                    .flatten()
            });
            kafka_target(
                &kafka,
                &template,
                &mut problems,
                structured,
                &config.bridge.delivery.state_topic,
            )
            .map(|target| match target {
                Target::Kafka(mut kafka) => {
                    kafka.encoding = encoding.map(Box::new);
                    Target::Kafka(kafka)
                }
                relay => relay,
            })
        }
        (None, Some(publish)) => {
            let topic = template(&mut problems, "publish.topic", &publish.topic);
            if publish.topic.contains(['+', '#']) {
                problems.push((
                    "publish.topic".into(),
                    "a topic to publish to cannot hold `+` or `#`".into(),
                ));
            }
            // A relay that hears its own output would loop forever.
            if let (Some(f), Ok(out)) = (
                &filter,
                TopicFilter::parse(&template_as_filter(&publish.topic)),
            ) {
                if out.overlaps(f) {
                    problems.push((
                        "publish.topic".into(),
                        format!(
                            "`{}` can match the route's own filter `{}`: the relay would receive its own output",
                            publish.topic, route.mqtt.filter
                        ),
                    ));
                }
            }
            topic.map(|topic| {
                Target::Mqtt(MqttTarget {
                    topic,
                    qos: publish.qos,
                    retain: publish.retain,
                })
            })
        }
        (Some(_), Some(_)) => {
            problems.push((
                "publish".into(),
                "a route has either `kafka` (ingest) or `publish` (an MQTT relay), not both".into(),
            ));
            None
        }
        (None, None) => {
            problems.push((
                "kafka".into(),
                "missing: a route needs `kafka` (ingest to Kafka) or `publish` (an MQTT relay)"
                    .into(),
            ));
            None
        }
    };
    let dead_letter_topic = route
        .kafka
        .as_ref()
        .and_then(|k| k.dead_letter_topic.clone())
        .unwrap_or_else(|| config.bridge.kafka.dead_letter_topic.clone());
    if !kafka::is_valid_topic_name(&dead_letter_topic) {
        problems.push((
            "kafka.dead_letter_topic".into(),
            format!("`{dead_letter_topic}` is not a valid Kafka topic name"),
        ));
    }
    let max_payload_bytes = route
        .max_payload_bytes
        .unwrap_or(config.bridge.limits.max_payload_bytes);
    let sparkplug = sparkplug_options(route, &config.bridge.delivery.state_topic, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    let (Some(filter), Some(format), Some(target)) = (filter, format, target) else {
        unreachable!("every None above recorded a problem");
    };
    let sparkplug_form = if sparkplug.per_metric {
        // Split from the whole value.
        sparkplug::Form::Value
    } else {
        sparkplug_form(&schema, &transform, &target)
    };
    Ok(Route {
        name: route.name.clone(),
        origin: String::new(),
        filter,
        regex,
        regex_groups,
        captures,
        qos,
        format,
        schema,
        max_payload_bytes,
        transform,
        target,
        dead_letter_topic,
        sparkplug_form,
        sparkplug,
    })
}

/// A route's `sparkplug:` options: only on a `format: sparkplug_b` ingest
/// route, with an online topic the bridge may write to.
fn sparkplug_options(
    route: &RouteConfig,
    state_topic: &str,
    problems: &mut Problems,
) -> SparkplugOptions {
    let Some(options) = &route.sparkplug else {
        return SparkplugOptions::default();
    };
    if route.format != FormatConfig::SparkplugB {
        problems.push((
            "sparkplug".into(),
            "is for `format: sparkplug_b` routes only".into(),
        ));
    }
    if route.publish.is_some() {
        problems.push((
            "sparkplug".into(),
            "is for ingest routes (`kafka`), not relays".into(),
        ));
    }
    if let Some(problem) = options
        .online_topic
        .as_deref()
        .and_then(|topic| topic_name_problem(topic, state_topic))
    {
        problems.push(("sparkplug.online_topic".into(), problem));
    }
    SparkplugOptions {
        per_metric: options.records == SparkplugRecords::PerMetric,
        online_topic: options.online_topic.clone(),
    }
}

/// How a Sparkplug B route wants its messages: as bytes with a header-only
/// value unless something reads the metrics (a schema, a transform, a
/// template pointer past the header fields, a relay).
fn sparkplug_form(
    schema: &Option<super::schema::Schema>,
    transform: &Option<Transform>,
    target: &Target,
) -> sparkplug::Form {
    let header_only = match target {
        // An encoding reads the whole value.
        Target::Kafka(kafka) if kafka.encoding.is_some() => false,
        Target::Kafka(kafka) => kafka.pointers().iter().all(|pointer| {
            let field = pointer.trim_start_matches('/');
            sparkplug::HEADER_FIELDS.contains(&field)
        }),
        Target::Mqtt(_) => false,
    };
    if schema.is_none() && transform.is_none() && header_only {
        sparkplug::Form::Bytes
    } else {
        sparkplug::Form::Value
    }
}

/// The Kafka side of an ingest route.
fn kafka_target(
    kafka: &RouteKafkaConfig,
    template: &impl Fn(&mut Problems, &str, &str) -> Option<Template>,
    problems: &mut Problems,
    structured: bool,
    state_topic: &str,
) -> Option<Target> {
    let topic = template(problems, "kafka.topic", &kafka.topic);
    let key = kafka
        .key
        .as_ref()
        .map(|k| template(problems, "kafka.key", k));
    let mut headers = Vec::new();
    for (name, text) in &kafka.headers {
        if headers::is_reserved(name) {
            problems.push((
                format!("kafka.headers.{name}"),
                "is a header name the bridge writes itself (`mqtt.topic`, `content-type`, `bridge.*`)".into(),
            ));
        }
        if let Some(t) = template(problems, &format!("kafka.headers.{name}"), text) {
            headers.push((name.clone(), t));
        }
    }
    if let Some(problem) = topic
        .as_ref()
        .and_then(Template::as_literal)
        .and_then(|literal| topic_name_problem(literal, state_topic))
    {
        problems.push(("kafka.topic".into(), problem));
    }
    let mut allowed_topics = Vec::new();
    for (i, pattern) in kafka.allowed_topics.iter().enumerate() {
        match glob::Pattern::new(pattern) {
            Ok(p) => allowed_topics.push(p),
            Err(e) => problems.push((format!("kafka.allowed_topics[{i}]"), e.to_string())),
        }
    }
    if let (Some(literal), false) = (
        topic.as_ref().and_then(Template::as_literal),
        allowed_topics.is_empty(),
    ) {
        if !allowed_topics.iter().any(|p| p.matches(literal)) {
            problems.push((
                "kafka.allowed_topics".into(),
                format!("does not allow the route's own topic `{literal}`"),
            ));
        }
    }
    let timestamp = match kafka.timestamp.as_deref() {
        None | Some("received") => Timestamp::Received,
        Some(ptr) if ptr.starts_with('/') && structured => Timestamp::Field(ptr.to_string()),
        Some(other) => {
            problems.push((
                "kafka.timestamp".into(),
                format!(
                    "`{other}` is neither `received` nor a JSON pointer such as `/ts`{}",
                    if structured {
                        ""
                    } else {
                        " (raw payloads only allow `received`)"
                    }
                ),
            ));
            Timestamp::Received
        }
    };
    Some(Target::Kafka(KafkaTarget {
        topic: topic?,
        allowed_topics,
        key: key.flatten(),
        headers,
        timestamp,
        user_properties: kafka.user_properties,
        encoding: None,
    }))
}

/// What is wrong with a topic a route names outright, if anything: not a
/// Kafka name, or one of the topics the bridge keeps for itself.
fn topic_name_problem(topic: &str, state_topic: &str) -> Option<String> {
    if !kafka::is_valid_topic_name(topic) {
        Some(format!("`{topic}` is not a valid Kafka topic name (letters, digits, `.`, `_`, `-`; at most 249)"))
    } else if topic == state_topic || topic.starts_with("__") {
        Some(format!(
            "`{topic}` is the exactly-once state topic or an internal Kafka topic"
        ))
    } else {
        None
    }
}

/// In a share group the bridge receives what it publishes itself (MQTT 5
/// forbids No Local on shared subscriptions), so a relay that publishes
/// where another relay listens, or itself, would loop through the two
/// forever: refused, naming both. (Without a share group No Local keeps a
/// bridge from hearing its own relays, and a relay's own output is checked
/// against its filter in `compile_route`.)
fn relay_loops(config: &Config) -> Vec<ConfigError> {
    let relays: Vec<(&MappingSource, usize, &RouteConfig)> = config
        .mappings
        .iter()
        .flat_map(|source| {
            source
                .file
                .routes
                .iter()
                .enumerate()
                .filter(|(_, r)| r.publish.is_some())
                .map(move |(i, r)| (source, i, r))
        })
        .collect();
    let mut errors = Vec::new();
    for (source, index, relay) in &relays {
        let output = relay.publish.as_ref().expect("filtered").topic.as_str();
        let Ok(output) = TopicFilter::parse(&template_as_filter(output)) else {
            continue;
        };
        for (_, _, listener) in &relays {
            let Ok(input) = TopicFilter::parse(&listener.mqtt.filter) else {
                continue;
            };
            if output.overlaps(&input) {
                let mut error = vec![ConfigError::field(
                    &source.path,
                    format!("routes[{index}].publish.topic"),
                    format!(
                        "relay `{}` publishes where relay `{}` listens ({}); with `mqtt.share_group` the bridge receives its own publishes (MQTT 5 allows no No Local on shared subscriptions), so the relays would loop",
                        relay.name, listener.name, listener.mqtt.filter
                    ),
                )];
                locate_all(&source.text, &mut error);
                errors.append(&mut error);
                break;
            }
        }
    }
    errors
}

/// A topic template read as a filter: every level holding a placeholder
/// becomes `+`, for the loop check.
fn template_as_filter(text: &str) -> String {
    text.split('/')
        .map(|level| {
            if level.replace("{{", "").contains('{') {
                "+"
            } else {
                level
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}
