//! Compiled routes and the table that matches topics against them.

use super::format::{regex_error, Format};
use super::index::RouteIndex;
use super::reject::{self, DeadLetterLimits, Evidence, Form};
use super::template::{Context, Template};
use super::transform::Transform;
use super::{headers, Outcome, RejectReason, Rejection, TopicFilter};
use crate::config::{
    locate_all, Config, ConfigError, ConfigErrors, Guarantee, MappingSource, RouteConfig,
    RouteKafkaConfig,
};
use crate::kafka;
use crate::mqtt::{Defect, MqttMessage, OutgoingPublish, Qos, Subscription};
use crate::route::schema::Schema;
use bytes::Bytes;
use regex::Regex;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// Up to this many routes, matching scans them in order instead of using
/// the index (measured: the index costs ~50 ns more for 3 routes and saves
/// 38 µs for 1 000).
const LINEAR_SCAN_MAX: usize = 16;

/// Where the record timestamp comes from.
#[derive(Debug)]
enum Timestamp {
    Received,
    Field(String),
}

/// One compiled route.
#[derive(Debug)]
struct Route {
    name: String,
    /// `file:line` of the route, for `check` output and warnings.
    origin: String,
    filter: TopicFilter,
    regex: Option<Regex>,
    /// Group names of `regex`, appended to the filter's captures.
    regex_groups: Vec<String>,
    captures: Vec<String>,
    qos: Qos,
    format: Format,
    schema: Option<Schema>,
    max_payload_bytes: usize,
    transform: Option<Transform>,
    target: Target,
    dead_letter_topic: String,
}

/// Where a route sends what it made of a message.
#[derive(Debug)]
enum Target {
    Kafka(KafkaTarget),
    /// A relay: back to MQTT.
    Mqtt(MqttTarget),
}

#[derive(Debug)]
struct KafkaTarget {
    topic: Template,
    /// Glob patterns a templated topic must match (empty: any).
    allowed_topics: Vec<glob::Pattern>,
    key: Option<Template>,
    headers: Vec<(String, Template)>,
    timestamp: Timestamp,
    user_properties: bool,
}

#[derive(Debug)]
struct MqttTarget {
    topic: Template,
    qos: Qos,
    retain: bool,
}

/// What a route made of one message.
enum Processed {
    Record(kafka::Record),
    Publish(OutgoingPublish),
}

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

/// Bounds on what one device message may carry, from `limits`.
#[derive(Debug, Clone)]
struct Limits {
    max_user_properties: usize,
    max_user_property_bytes: usize,
    max_packet_bytes: usize,
    timestamp_max_ahead_ms: i64,
    timestamp_max_behind_ms: Option<i64>,
    dead_letter: DeadLetterLimits,
    /// Topics a templated Kafka topic may never render to: the state topic
    /// and every dead-letter topic (internal `__` topics are refused too).
    reserved_topics: Vec<String>,
}

/// All routes in precedence order.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    limits: Limits,
    default_dead_letter_topic: String,
    index: RouteIndex,
    /// M2M trees with where they were declared (`file:line`).
    m2m: Vec<(TopicFilter, String)>,
    summaries: Vec<RouteSummary>,
    /// Problems that do not stop the bridge, e.g. shadowed routes.
    pub warnings: Vec<String>,
}

impl RouteTable {
    /// Compiles every route of every mapping file, collecting all problems.
    pub fn compile(config: &Config) -> Result<Self, ConfigErrors> {
        let mut routes = Vec::new();
        let mut summaries = Vec::new();
        let mut errors = Vec::new();
        let mut names: HashMap<String, String> = HashMap::new();
        let mut m2m = Vec::new();
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
                match compile_route(config, source, route) {
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

    /// Route summaries in precedence order.
    pub fn routes(&self) -> &[RouteSummary] {
        &self.summaries
    }

    /// The dead-letter record of `message` in the given form: the route's
    /// dead-letter topic (the bridge's default without a route), bounded as
    /// `limits` says. `kafka_error` names the broker's error when Kafka
    /// refused the record this replaces.
    pub fn dead_letter(
        &self,
        route: Option<usize>,
        message: &MqttMessage,
        rejection: &Rejection,
        kafka_error: Option<&str>,
        form: Form,
    ) -> kafka::Record {
        let route = route.map(|r| &self.routes[r]);
        let topic = route.map_or(self.default_dead_letter_topic.as_str(), |r| {
            r.dead_letter_topic.as_str()
        });
        let original = match &message.defect {
            Some(Defect::TooLarge {
                payload_bytes,
                sha256,
                ..
            }) => Some((*payload_bytes, *sha256)),
            _ => None,
        };
        let evidence = Evidence {
            source: &message.topic,
            from_mqtt: true,
            key: None,
            payload: &message.payload,
            original,
            user_properties: &message.user_properties,
            timestamp_ms: message.received_at.timestamp_millis(),
        };
        reject::dead_letter_record(
            topic,
            route.map_or("", |r| r.name.as_str()),
            &evidence,
            rejection,
            kafka_error,
            &self.limits.dead_letter,
            form,
        )
    }

    /// The declared M2M trees (filter, `file:line`).
    pub fn m2m_trees(&self) -> impl Iterator<Item = (String, &str)> {
        self.m2m
            .iter()
            .map(|(f, origin)| (f.to_string(), origin.as_str()))
    }

    /// Name of the route at `index` (metrics labels).
    pub fn route_name(&self, index: usize) -> &str {
        &self.routes[index].name
    }

    /// The subscriptions that cover every route, without redundant ones: a
    /// broker may deliver a message once per matching subscription.
    pub fn subscriptions(&self) -> Vec<Subscription> {
        let mut subs: Vec<(TopicFilter, Qos)> = Vec::new();
        for route in &self.routes {
            if let Some(existing) = subs.iter_mut().find(|(f, _)| route.filter.is_covered_by(f)) {
                existing.1 = existing.1.max(route.qos);
                continue;
            }
            // A broader filter replaces the narrower ones it covers.
            let mut qos = route.qos;
            subs.retain(|(f, q)| {
                let covered = f.is_covered_by(&route.filter);
                if covered {
                    qos = qos.max(*q);
                }
                !covered
            });
            subs.push((route.filter.clone(), qos));
        }
        subs.into_iter()
            .map(|(f, qos)| Subscription {
                filter: f.subscription(),
                qos,
            })
            .collect()
    }

    /// Decides what happens to one message. Never panics on input: every
    /// problem with the message becomes a dead-letter outcome.
    pub fn route(&self, message: &MqttMessage) -> Outcome {
        let mut scratch = Vec::new();
        if self.m2m.iter().any(|(tree, _)| {
            scratch.clear();
            tree.matches(&message.topic, &mut scratch)
        }) {
            return Outcome::KeptOnMqtt;
        }
        // A handful of routes is quicker to scan than to look up.
        if self.routes.len() <= LINEAR_SCAN_MAX {
            return self.first_match(message, 0..self.routes.len());
        }
        let mut candidates = Vec::with_capacity(4);
        self.index.candidates(&message.topic, &mut candidates);
        self.first_match(message, candidates.into_iter())
    }

    /// The outcome of the first candidate route (ascending) that matches.
    fn first_match(
        &self,
        message: &MqttMessage,
        candidates: impl Iterator<Item = usize>,
    ) -> Outcome {
        let mut captures: Vec<&str> = Vec::with_capacity(8);
        for index in candidates {
            let route = &self.routes[index];
            captures.clear();
            if route.matches(&message.topic, &mut captures) {
                return match route.process(message, &captures, &self.limits) {
                    Ok(Processed::Record(record)) => Outcome::Forward {
                        route: index,
                        record,
                    },
                    Ok(Processed::Publish(publish)) => Outcome::Relay {
                        route: index,
                        publish,
                    },
                    Err(rejection) => Outcome::DeadLetter {
                        route: Some(index),
                        record: self.dead_letter(
                            Some(index),
                            message,
                            &rejection,
                            None,
                            Form::Full,
                        ),
                        rejection,
                    },
                };
            }
        }
        if message.defect.is_some() {
            // Dead-lettered whether a route matches or not: a defective
            // message is evidence of a broken or hostile device.
            let rejection = defect_rejection(message, &self.limits).expect("has a defect");
            return Outcome::DeadLetter {
                route: None,
                record: self.dead_letter(None, message, &rejection, None, Form::Full),
                rejection,
            };
        }
        Outcome::Unrouted
    }
}

/// The rejection a message's defect calls for, if it has one.
fn defect_rejection(message: &MqttMessage, limits: &Limits) -> Option<Rejection> {
    Some(match message.defect.as_ref()? {
        Defect::TooLarge { packet_bytes, .. } => Rejection::new(
            RejectReason::TooLarge,
            format!(
                "the packet is {packet_bytes} bytes, over limits.max_packet_bytes ({}); its payload was discarded as it arrived",
                limits.max_packet_bytes
            ),
        ),
        Defect::TopicNotUtf8 => Rejection::new(
            RejectReason::NotUtf8,
            "the topic is not UTF-8 (invalid bytes shown as U+FFFD)",
        ),
        Defect::Malformed(what) => Rejection::new(
            RejectReason::Parse,
            format!("the MQTT packet is malformed ({what}); its payload is not kept"),
        ),
    })
}

/// Bytes of user-property names and values.
fn property_bytes(message: &MqttMessage) -> usize {
    message
        .user_properties
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum()
}

/// Refuses a message over any size limit, before any work is spent on it.
fn check_size(message: &MqttMessage, max_bytes: usize, limits: &Limits) -> Result<(), Rejection> {
    let too_large = |detail: String| Err(Rejection::new(RejectReason::TooLarge, detail));
    let count = message.user_properties.len();
    if count > limits.max_user_properties {
        return too_large(format!(
            "{count} user properties, the limit is {} (limits.max_user_properties)",
            limits.max_user_properties
        ));
    }
    let props = property_bytes(message);
    if props > limits.max_user_property_bytes {
        return too_large(format!(
            "user properties of {props} bytes, the limit is {} (limits.max_user_property_bytes)",
            limits.max_user_property_bytes
        ));
    }
    let size = message.payload.len()
        + message.topic.len()
        + props
        + message.content_type.as_ref().map_or(0, String::len);
    if size > max_bytes {
        return too_large(format!(
            "message is {size} bytes (payload {}, topic {}, user properties {props}), the limit is {max_bytes}",
            message.payload.len(),
            message.topic.len(),
        ));
    }
    Ok(())
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
        },
        schema: route.schema.is_some(),
        topic: match (&config.kafka, &config.publish) {
            (Some(k), _) => k.topic.clone(),
            (None, Some(p)) => format!("MQTT {} (relay)", p.topic),
            (None, None) => String::new(),
        },
        key: config.kafka.as_ref().and_then(|k| k.key.clone()),
    }
}

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
    let format = Format::compile(route.format, route.text.as_ref())
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
        Some(path) => Schema::load(&base.join(path))
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
        (Some(kafka), None) => kafka_target(
            kafka,
            &template,
            &mut problems,
            structured,
            &config.bridge.delivery.state_topic,
        ),
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
    if !problems.is_empty() {
        return Err(problems);
    }
    let (Some(filter), Some(format), Some(target)) = (filter, format, target) else {
        unreachable!("every None above recorded a problem");
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
    })
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
    if let Some(literal) = topic.as_ref().and_then(Template::as_literal) {
        if !kafka::is_valid_topic_name(literal) {
            problems.push((
                "kafka.topic".into(),
                format!("`{literal}` is not a valid Kafka topic name (letters, digits, `.`, `_`, `-`; at most 249)"),
            ));
        } else if literal == state_topic || literal.starts_with("__") {
            problems.push((
                "kafka.topic".into(),
                format!("`{literal}` is the exactly-once state topic or an internal Kafka topic"),
            ));
        }
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
    }))
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

impl Route {
    fn matches<'t>(&self, topic: &'t str, captures: &mut Vec<&'t str>) -> bool {
        if !self.filter.matches(topic, captures) {
            return false;
        }
        let Some(regex) = &self.regex else {
            return true;
        };
        let Some(caps) = regex.captures(topic) else {
            return false;
        };
        for name in &self.regex_groups {
            captures.push(caps.name(name).map_or("", |m| m.as_str()));
        }
        true
    }

    fn process(
        &self,
        message: &MqttMessage,
        captures: &[&str],
        limits: &Limits,
    ) -> Result<Processed, Rejection> {
        debug_assert_eq!(captures.len(), self.captures.len());
        if let Some(rejection) = defect_rejection(message, limits) {
            return Err(rejection);
        }
        check_size(message, self.max_payload_bytes, limits)?;
        let parsed = self.format.parse(&message.payload)?;
        if let (Some(schema), Some(value)) = (&self.schema, &parsed) {
            schema.validate(value)?;
        }
        let (value, bytes) = match (parsed, &self.transform) {
            (Some(value), Some(transform)) => {
                let out = transform
                    .apply(value, captures, message)
                    .map_err(|e| Rejection::new(RejectReason::Transform, e))?;
                let bytes =
                    Bytes::from(serde_json::to_vec(&out).expect("a Value always serializes"));
                (Some(out), bytes)
            }
            // JSON passes through byte for byte: no re-encoding cost, and
            // the consumer sees exactly what the device sent.
            (Some(value), None) if matches!(self.format, Format::Json) => {
                (Some(value), message.payload.clone())
            }
            (Some(value), None) => {
                let bytes =
                    Bytes::from(serde_json::to_vec(&value).expect("a Value always serializes"));
                (Some(value), bytes)
            }
            (None, _) => (None, message.payload.clone()),
        };
        let ctx = Context {
            captures,
            message,
            value: value.as_ref(),
        };
        match &self.target {
            Target::Kafka(kafka) => kafka
                .record(&ctx, message, value.as_ref(), bytes, limits)
                .map(Processed::Record),
            Target::Mqtt(mqtt) => {
                let topic = mqtt
                    .topic
                    .render_mqtt_topic(&ctx)
                    .map_err(|e| Rejection::new(RejectReason::Topic, format!("topic: {e}")))?;
                Ok(Processed::Publish(OutgoingPublish {
                    topic,
                    payload: bytes,
                    qos: mqtt.qos,
                    retain: mqtt.retain,
                }))
            }
        }
    }
}

impl KafkaTarget {
    fn record(
        &self,
        ctx: &Context<'_>,
        message: &MqttMessage,
        value: Option<&Value>,
        bytes: Bytes,
        limits: &Limits,
    ) -> Result<kafka::Record, Rejection> {
        let topic = self
            .topic
            .render(ctx)
            .map_err(|e| Rejection::new(RejectReason::Topic, format!("topic: {e}")))?;
        if self.topic.as_literal().is_none() {
            self.check_topic(&topic, limits)?;
        }
        let key = match &self.key {
            Some(t) => Some(
                t.render(ctx)
                    .map_err(|e| Rejection::new(RejectReason::Key, format!("key: {e}")))?,
            ),
            None => None,
        };
        let mut headers =
            Vec::with_capacity(2 + self.headers.len() + message.user_properties.len());
        headers.push((
            headers::MQTT_TOPIC.to_string(),
            message.topic.as_bytes().to_vec(),
        ));
        if let Some(ct) = &message.content_type {
            headers.push((headers::CONTENT_TYPE.to_string(), ct.as_bytes().to_vec()));
        }
        if self.user_properties {
            // Configured headers win over a device's property of the same
            // name: a device cannot shadow `schema` or `tenant`.
            let carried = message.user_properties.iter().filter(|(k, _)| {
                !headers::is_reserved(k)
                    && !self.headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(k))
            });
            for (k, v) in carried {
                headers.push((k.clone(), v.as_bytes().to_vec()));
            }
        }
        for (name, template) in &self.headers {
            let v = template.render(ctx).map_err(|e| {
                Rejection::new(RejectReason::Header, format!("header `{name}`: {e}"))
            })?;
            headers.push((name.clone(), v.into_bytes()));
        }
        let timestamp_ms = match &self.timestamp {
            Timestamp::Received => message.received_at.timestamp_millis(),
            Timestamp::Field(ptr) => {
                let ts = timestamp_from(value, ptr)?;
                check_timestamp(ts, message.received_at.timestamp_millis(), limits)
                    .map_err(|e| e.with_path(ptr.as_str()))?;
                ts
            }
        };
        Ok(kafka::Record {
            topic,
            key,
            value: bytes,
            headers,
            timestamp_ms,
        })
    }
}

impl KafkaTarget {
    /// A topic that data chose must be a valid Kafka name, never one of
    /// the bridge's own topics or an internal one, and within the route's
    /// allow-list.
    fn check_topic(&self, topic: &str, limits: &Limits) -> Result<(), Rejection> {
        let refuse = |why: &str| {
            Err(Rejection::new(
                RejectReason::Topic,
                format!(
                    "`{}` {why}",
                    reject::truncate(topic, reject::MAX_DETAIL_BYTES / 2)
                ),
            ))
        };
        if !kafka::is_valid_topic_name(topic) {
            return refuse("is not a valid Kafka topic name");
        }
        if topic.starts_with("__") {
            return refuse("is an internal Kafka topic");
        }
        if limits.reserved_topics.iter().any(|t| t == topic) {
            return refuse("is the bridge's own state or dead-letter topic");
        }
        if !self.allowed_topics.is_empty() && !self.allowed_topics.iter().any(|p| p.matches(topic))
        {
            return refuse("is not in the route's kafka.allowed_topics");
        }
        Ok(())
    }
}

/// Refuses a timestamp Kafka would refuse (or that is absurd), before one
/// record aborts a whole transaction.
fn check_timestamp(ts: i64, now: i64, limits: &Limits) -> Result<(), Rejection> {
    let reject = |detail: String| Err(Rejection::new(RejectReason::Timestamp, detail));
    if ts < 0 {
        return reject(format!("timestamp {ts} is before 1970"));
    }
    let ahead = ts.saturating_sub(now);
    if ahead > limits.timestamp_max_ahead_ms {
        return reject(format!(
            "timestamp {ts} is {ahead} ms ahead of the bridge's clock; the limit is {} (limits.timestamp_max_ahead_ms)",
            limits.timestamp_max_ahead_ms
        ));
    }
    if let Some(behind) = limits.timestamp_max_behind_ms {
        let age = now.saturating_sub(ts);
        if age > behind {
            return reject(format!(
                "timestamp {ts} is {age} ms old; the limit is {behind} (limits.timestamp_max_behind_ms)"
            ));
        }
    }
    Ok(())
}

/// Reads a record timestamp: epoch milliseconds or an RFC 3339 string.
fn timestamp_from(value: Option<&Value>, ptr: &str) -> Result<i64, Rejection> {
    let reject = |detail: String| Rejection::new(RejectReason::Timestamp, detail).with_path(ptr);
    match value.and_then(|v| v.pointer(ptr)) {
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .filter(|ms| *ms >= 0)
            .ok_or_else(|| {
                reject(format!(
                    "timestamp {n} is not non-negative epoch milliseconds"
                ))
            }),
        Some(Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_millis())
            .map_err(|e| reject(format!("timestamp {s:?} is not RFC 3339: {e}"))),
        Some(other) => Err(reject(format!(
            "timestamp field holds {other}, not a number or string"
        ))),
        None => Err(reject(format!("payload has no timestamp field at `{ptr}`"))),
    }
}

#[cfg(test)]
mod tests;
