//! MQTT topic filters with named level captures.
//!
//! `site/{site}/hvac/{device}/telemetry` is the subscription filter
//! `site/+/hvac/+/telemetry` whose `+` levels are also named, so routes can
//! use them in templates. Matching walks levels without allocating; the
//! captures are borrowed slices of the topic.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    /// `+` or `{name}`.
    Single(Option<String>),
    /// `#`: this level and everything below; always last.
    Multi,
}

/// One level of a filter, for the route index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IndexLevel<'a> {
    Literal(&'a str),
    Single,
    Multi,
}

/// A parsed topic filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    levels: Vec<Level>,
}

impl TopicFilter {
    /// Parses a filter, rejecting what MQTT rejects (`#` not last, wildcards
    /// mixed into a level) and malformed or repeated capture names.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("topic filter must not be empty".into());
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        let mut names: Vec<&str> = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let level = match *part {
                "#" if i + 1 == parts.len() => Level::Multi,
                "#" => return Err("`#` must be the last level of a filter".into()),
                "+" => Level::Single(None),
                p if p.starts_with('{') && p.ends_with('}') => {
                    let name = &p[1..p.len() - 1];
                    if name.is_empty()
                        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Err(format!(
                            "capture `{p}` must be `{{name}}` with letters, digits or `_`"
                        ));
                    }
                    if names.contains(&name) {
                        return Err(format!("capture `{{{name}}}` appears twice"));
                    }
                    names.push(name);
                    Level::Single(Some(name.to_string()))
                }
                p if p.contains(['+', '#', '{', '}']) => {
                    return Err(format!(
                        "level `{p}` mixes a wildcard or capture with text; a level is all literal, `+`, `#` or `{{name}}`"
                    ))
                }
                p => Level::Literal(p.to_string()),
            };
            levels.push(level);
        }
        Ok(Self { levels })
    }

    /// Names of the `{captures}`, in level order.
    pub fn capture_names(&self) -> impl Iterator<Item = &str> {
        self.levels.iter().filter_map(|l| match l {
            Level::Single(Some(name)) => Some(name.as_str()),
            _ => None,
        })
    }

    /// Matches a topic and pushes the captured levels, in the order of
    /// [`Self::capture_names`]. On no match `captures` may hold a prefix.
    pub fn matches<'t>(&self, topic: &'t str, captures: &mut Vec<&'t str>) -> bool {
        // MQTT 3.1.1 §4.7.2: wildcards at the first level do not match `$` topics.
        if topic.starts_with('$') && !matches!(self.levels.first(), Some(Level::Literal(_))) {
            return false;
        }
        let mut parts = topic.split('/');
        for level in &self.levels {
            match level {
                Level::Multi => return true,
                _ => {
                    let Some(part) = parts.next() else {
                        return false;
                    };
                    match level {
                        Level::Literal(lit) if lit != part => return false,
                        Level::Single(Some(_)) => captures.push(part),
                        _ => {}
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// Whether every topic this filter matches is also matched by `other`;
    /// used to find shadowed routes and redundant subscriptions.
    pub fn is_covered_by(&self, other: &TopicFilter) -> bool {
        if other.wildcard_first() && self.dollar_first() {
            return false;
        }
        let mut mine = self.levels.iter();
        for theirs in &other.levels {
            match (theirs, mine.next()) {
                (Level::Multi, _) => return true,
                (_, None) => return false,
                (Level::Single(_), Some(Level::Multi)) => return false,
                (Level::Single(_), Some(_)) => {}
                (Level::Literal(a), Some(Level::Literal(b))) if a == b => {}
                (Level::Literal(_), Some(_)) => return false,
            }
        }
        mine.next().is_none()
    }

    /// The levels as the route index sees them.
    pub(crate) fn index_levels(&self) -> impl Iterator<Item = IndexLevel<'_>> {
        self.levels.iter().map(|l| match l {
            Level::Literal(text) => IndexLevel::Literal(text),
            Level::Single(_) => IndexLevel::Single,
            Level::Multi => IndexLevel::Multi,
        })
    }

    /// Whether the first level is `+`, `#` or a capture: such a filter
    /// never matches a `$` topic (MQTT 3.1.1 §4.7.2, MQTT 5 §4.7.2).
    fn wildcard_first(&self) -> bool {
        !matches!(self.levels.first(), Some(Level::Literal(_)))
    }

    /// Whether the filter only matches `$` topics (`$SYS/#`, `$aws/...`).
    fn dollar_first(&self) -> bool {
        matches!(self.levels.first(), Some(Level::Literal(l)) if l.starts_with('$'))
    }

    /// Whether some topic matches both filters.
    pub fn overlaps(&self, other: &TopicFilter) -> bool {
        if (self.wildcard_first() && other.dollar_first())
            || (other.wildcard_first() && self.dollar_first())
        {
            return false;
        }
        let (mut a, mut b) = (self.levels.iter(), other.levels.iter());
        loop {
            match (a.next(), b.next()) {
                (Some(Level::Multi), _) | (_, Some(Level::Multi)) => return true,
                (None, None) => return true,
                (None, Some(_)) | (Some(_), None) => return false,
                (Some(Level::Literal(x)), Some(Level::Literal(y))) if x != y => return false,
                _ => {}
            }
        }
    }

    /// The filter as sent to the broker: captures become `+`.
    pub fn subscription(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, level) in self.levels.iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            match level {
                Level::Literal(lit) => f.write_str(lit)?,
                Level::Single(_) => f.write_str("+")?,
                Level::Multi => f.write_str("#")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `#` and `+/...` never match `$` topics, so they neither cover nor
    /// overlap a `$` filter: with a `#` route beside a `$aws/...` route,
    /// the `$aws` subscription must not be dropped as redundant (it was,
    /// and that route silently received nothing).
    #[test]
    fn wildcards_first_neither_cover_nor_overlap_dollar_filters() {
        let f = |t: &str| TopicFilter::parse(t).unwrap();
        for wide in ["#", "+/things/+/shadow", "{x}/things/#"] {
            assert!(!f("$aws/things/+/shadow").is_covered_by(&f(wide)), "{wide}");
            assert!(!f("$aws/things/+/shadow").overlaps(&f(wide)), "{wide}");
            assert!(!f(wide).overlaps(&f("$aws/things/+/shadow")), "{wide}");
        }
        assert!(f("$aws/things/a/shadow").is_covered_by(&f("$aws/#")));
        assert!(f("$aws/x").overlaps(&f("$aws/+")));
        assert!(f("+/x").is_covered_by(&f("#")));
    }

    fn captures(filter: &str, topic: &str) -> Option<Vec<String>> {
        let filter = TopicFilter::parse(filter).unwrap();
        let mut caps = Vec::new();
        filter
            .matches(topic, &mut caps)
            .then(|| caps.into_iter().map(String::from).collect())
    }

    #[test]
    fn named_levels_capture() {
        assert_eq!(
            captures(
                "site/{site}/hvac/{device}/telemetry",
                "site/s1/hvac/u7/telemetry"
            ),
            Some(vec!["s1".into(), "u7".into()])
        );
        assert_eq!(
            captures("site/{site}/hvac/{device}/telemetry", "site/s1/hvac/u7"),
            None
        );
        assert_eq!(
            captures(
                "site/{site}/hvac/{device}/telemetry",
                "site/s1/hvac/u7/telemetry/x"
            ),
            None
        );
    }

    #[test]
    fn wildcards_follow_mqtt_rules() {
        assert!(captures("a/+/c", "a/b/c").is_some());
        assert!(captures("a/+/c", "a//c").is_some());
        assert!(
            captures("a/#", "a").is_some(),
            "`#` includes the parent level"
        );
        assert!(captures("a/#", "a/b/c").is_some());
        assert!(captures("#", "a/b").is_some());
        assert!(captures("#", "$SYS/x").is_none());
        assert!(captures("+/x", "$SYS/x").is_none());
        assert!(captures("$SYS/#", "$SYS/x").is_some());
        assert!(captures("a/b", "a/b/c").is_none());
    }

    #[test]
    fn invalid_filters_are_refused() {
        assert!(TopicFilter::parse("a/#/b")
            .unwrap_err()
            .contains("last level"));
        assert!(TopicFilter::parse("a/b+").unwrap_err().contains("mixes"));
        assert!(TopicFilter::parse("a/{x}/{x}")
            .unwrap_err()
            .contains("twice"));
        assert!(TopicFilter::parse("a/{x-y}")
            .unwrap_err()
            .contains("letters"));
        assert!(TopicFilter::parse("").is_err());
    }

    #[test]
    fn subscription_replaces_captures() {
        let f = TopicFilter::parse("site/{site}/hvac/+/#").unwrap();
        assert_eq!(f.subscription(), "site/+/hvac/+/#");
        assert_eq!(f.capture_names().collect::<Vec<_>>(), ["site"]);
    }

    #[test]
    fn overlap() {
        let p = |s| TopicFilter::parse(s).unwrap();
        assert!(p("site/#").overlaps(&p("site/+/hvac/+/cmd/#")));
        assert!(p("a/+/c").overlaps(&p("a/b/+")));
        assert!(p("a/b").overlaps(&p("a/#")), "`#` matches its parent");
        assert!(!p("a/b").overlaps(&p("a/c")));
        assert!(!p("a/+").overlaps(&p("a/+/c")));
        assert!(!p("site/+/hvac/+/telemetry").overlaps(&p("site/+/hvac/+/cmd/#")));
    }

    #[test]
    fn coverage() {
        let p = |s| TopicFilter::parse(s).unwrap();
        assert!(p("a/b/c").is_covered_by(&p("a/+/c")));
        assert!(p("a/b/c").is_covered_by(&p("a/#")));
        assert!(p("a").is_covered_by(&p("a/#")));
        assert!(p("a/{x}/c").is_covered_by(&p("a/+/+")));
        assert!(!p("a/+/c").is_covered_by(&p("a/b/c")));
        assert!(!p("a/#").is_covered_by(&p("a/+")));
        assert!(!p("a/b").is_covered_by(&p("a/b/c")));
        assert!(!p("a/b/c").is_covered_by(&p("a/b")));
        assert!(p("#").is_covered_by(&p("#")));
    }
}
