//! The route table: which compiled route a message takes (first match
//! wins), what a dead letter for it looks like, and the subscriptions that
//! cover every route. Compiling lives in `compile.rs`, turning a matched
//! message into a record in `record.rs`; this file is the lookup alone.

use super::index::RouteIndex;
use super::record::{defect_rejection, Limits, Route, Target};
use super::reject::{self, Evidence, Form};
use super::{Outcome, Rejection, RouteSummary, TopicFilter};
use crate::kafka;
use crate::mqtt::{Defect, MqttMessage, Qos, Subscription};
use crate::registry::Encoding;
use crate::sparkplug::Sessions;

/// Up to this many routes, matching scans them in order instead of using
/// the index (measured: the index costs ~50 ns more for 3 routes and saves
/// 38 µs for 1 000).
pub(super) const LINEAR_SCAN_MAX: usize = 16;

/// All routes in precedence order.
#[derive(Debug)]
pub struct RouteTable {
    pub(super) routes: Vec<Route>,
    pub(super) limits: Limits,
    pub(super) default_dead_letter_topic: String,
    pub(super) index: RouteIndex,
    /// M2M trees with where they were declared (`file:line`).
    pub(super) m2m: Vec<(TopicFilter, String)>,
    pub(super) summaries: Vec<RouteSummary>,
    /// Problems that do not stop the bridge, e.g. shadowed routes.
    pub warnings: Vec<String>,
}

impl RouteTable {
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

    /// Each route's registry encoding (`kafka.encoding`), with a label
    /// naming the route and where it is defined, to be given its schema id
    /// (see [`crate::registry`]).
    pub fn encodings_mut(&mut self) -> impl Iterator<Item = (String, &mut Encoding)> {
        self.routes
            .iter_mut()
            .filter_map(|route| match &mut route.target {
                Target::Kafka(kafka) => kafka.encoding.as_mut().map(|e| {
                    (
                        format!("{}: route `{}`", route.origin, route.name),
                        &mut **e,
                    )
                }),
                Target::Mqtt(_) => None,
            })
    }

    /// Whether any route writes the registry's wire format.
    pub fn has_encodings(&self) -> bool {
        self.routes
            .iter()
            .any(|r| matches!(&r.target, Target::Kafka(k) if k.encoding.is_some()))
    }

    /// The declared M2M trees (filter, `file:line`).
    pub fn m2m_trees(&self) -> impl Iterator<Item = (String, &str)> {
        self.m2m
            .iter()
            .map(|(f, origin)| (f.to_string(), origin.as_str()))
    }

    /// The index of the route named `name` (names are unique).
    pub fn route_index(&self, name: &str) -> Option<usize> {
        self.routes.iter().position(|r| r.name == name)
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

    /// [`Self::route_with`] knowing no Sparkplug session: for one message
    /// on its own (tests, a dry run); a Sparkplug DATA message then has no
    /// birth to be decoded with.
    pub fn route(&self, message: &MqttMessage) -> Outcome {
        self.route_with(message, &mut Sessions::default())
    }

    /// Decides what happens to one message. Never panics on input: every
    /// problem with the message becomes a dead-letter outcome. `sparkplug`
    /// is what the bridge knows of Sparkplug edge nodes, read and updated
    /// by routes with `format: sparkplug_b`.
    pub fn route_with(&self, message: &MqttMessage, sparkplug: &mut Sessions) -> Outcome {
        let mut scratch = Vec::new();
        if self.m2m.iter().any(|(tree, _)| {
            scratch.clear();
            tree.matches(&message.topic, &mut scratch)
        }) {
            return Outcome::KeptOnMqtt;
        }
        // A handful of routes is quicker to scan than to look up.
        if self.routes.len() <= LINEAR_SCAN_MAX {
            return self.first_match(message, 0..self.routes.len(), sparkplug);
        }
        let mut candidates = Vec::with_capacity(4);
        self.index.candidates(&message.topic, &mut candidates);
        self.first_match(message, candidates.into_iter(), sparkplug)
    }

    /// The outcome of the first candidate route (ascending) that matches.
    fn first_match(
        &self,
        message: &MqttMessage,
        candidates: impl Iterator<Item = usize>,
        sparkplug: &mut Sessions,
    ) -> Outcome {
        let mut captures: Vec<&str> = Vec::with_capacity(8);
        for index in candidates {
            let route = &self.routes[index];
            captures.clear();
            if route.matches(&message.topic, &mut captures) {
                let mut also = Vec::new();
                let outcome = route.process(
                    index,
                    message,
                    &captures,
                    &self.limits,
                    sparkplug,
                    &mut also,
                );
                return match outcome {
                    Ok(Outcome::Forward { route, record, .. }) => Outcome::Forward {
                        route,
                        record,
                        also,
                    },
                    Ok(outcome) => outcome,
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
                        also,
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
                also: Vec::new(),
            };
        }
        Outcome::Unrouted
    }
}
