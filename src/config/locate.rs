//! Finds the line of a field in a YAML file from its dotted path.
//!
//! serde tells us *which* field is wrong only while deserializing; problems
//! found afterwards (an unknown capture in a template, a schema that does not
//! compile) would otherwise lose their position. Re-reading the text with
//! saphyr's marked loader gives every node its line back.

use super::error::ConfigError;
use saphyr::{LoadableYamlNode, MarkedYaml};

/// Fills in line and column of every error that names a field of `text`.
pub fn locate_all(text: &str, errors: &mut [ConfigError]) {
    if errors.iter().all(|e| e.line.is_some()) {
        return;
    }
    let Ok(docs) = MarkedYaml::load_from_str(text) else {
        return;
    };
    let Some(root) = docs.first() else {
        return;
    };
    for error in errors.iter_mut().filter(|e| e.line.is_none()) {
        if let Some(node) = find(root, &error.field) {
            error.line = Some(node.span.start.line());
            error.column = Some(node.span.start.col() + 1);
        }
    }
}

/// Walks `routes[2].kafka.topic` (or `rename./a/b`) as far as it exists and
/// returns the deepest node reached, so an error about a missing child still
/// points at its parent.
fn find<'a>(root: &'a MarkedYaml<'a>, path: &str) -> Option<&'a MarkedYaml<'a>> {
    let mut node = root;
    for segment in segments(path) {
        let next = match segment {
            Segment::Key(key) => node.data.as_mapping_get(key),
            Segment::Index(index) => node.data.as_sequence_get(index),
        };
        match next {
            Some(next) => node = next,
            None => break,
        }
    }
    if std::ptr::eq(node, root) {
        return None;
    }
    Some(node)
}

enum Segment<'p> {
    Key(&'p str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, indices) = match part.find('[') {
            Some(open) => (&part[..open], &part[open..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        for index in indices.split('[').filter(|s| !s.is_empty()) {
            if let Ok(index) = index.trim_end_matches(']').parse() {
                out.push(Segment::Index(index));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const TEXT: &str =
        "routes:\n  - name: a\n    kafka:\n      topic: t\n  - name: b\n    kafka:\n      key: k\n";

    fn line_of(field: &str) -> Option<usize> {
        let mut errors = vec![ConfigError::field(Path::new("m.yaml"), field, "x")];
        locate_all(TEXT, &mut errors);
        errors[0].line
    }

    #[test]
    fn finds_nested_fields_in_sequences() {
        assert_eq!(line_of("routes[0].kafka.topic"), Some(4));
        assert_eq!(line_of("routes[1].kafka.key"), Some(7));
        assert_eq!(line_of("routes[1].name"), Some(5));
    }

    #[test]
    fn missing_child_points_at_deepest_existing_parent() {
        assert_eq!(line_of("routes[1].kafka.topic"), Some(7));
        assert_eq!(line_of("nothing.here"), None);
    }
}
