//! `${VAR}` interpolation for secrets kept out of git.
//!
//! Interpolation runs on the raw text before YAML parsing, line by line, so
//! line numbers in later parse errors still point into the file as written.
//! Only the braced form is recognised: regexes in mapping files use `$` as an
//! anchor, and a bare `$name` there must stay untouched.

use super::error::ConfigError;
use std::path::Path;

/// Replaces `${VAR}` and `${VAR:-default}`; `$${` escapes a literal `${`.
///
/// Every missing variable is reported, not just the first.
pub fn interpolate(
    file: &Path,
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<ConfigError>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            // Comments are left alone, so documenting `${VAR}` is safe.
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            if rest[..start].ends_with('$') {
                out.push_str(&rest[..start - 1]);
                out.push_str("${");
                rest = &rest[start + 2..];
                continue;
            }
            out.push_str(&rest[..start]);
            let Some(len) = rest[start + 2..].find('}') else {
                errors.push(ConfigError::at(
                    file,
                    index + 1,
                    start + 1,
                    "",
                    "unterminated `${`: expected `${NAME}` or `${NAME:-default}`",
                ));
                rest = "";
                break;
            };
            let inner = &rest[start + 2..start + 2 + len];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                errors.push(ConfigError::at(
                    file,
                    index + 1,
                    start + 1,
                    "",
                    format!("`${{{inner}}}` is not a valid environment variable reference"),
                ));
            } else {
                match (lookup(name), default) {
                    // As in the shell, `:-` also replaces an empty value.
                    (Some(value), Some(default)) if value.is_empty() => out.push_str(default),
                    (Some(value), _) => out.push_str(&value),
                    (None, Some(default)) => out.push_str(default),
                    (None, None) => errors.push(ConfigError::at(
                        file,
                        index + 1,
                        start + 1,
                        "",
                        format!(
                            "environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)"
                        ),
                    )),
                }
            }
            rest = &rest[start + 3 + len..];
        }
        out.push_str(rest);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "USER_NAME" => Some("bridge".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn run(text: &str) -> Result<String, Vec<ConfigError>> {
        interpolate(Path::new("bridge.yaml"), text, env)
    }

    #[test]
    fn replaces_set_variables_and_defaults() {
        assert_eq!(
            run("user: ${USER_NAME}\npass: ${PASS:-secret}\nx: '${EMPTY}'\n").unwrap(),
            "user: bridge\npass: secret\nx: ''\n"
        );
        assert_eq!(run("a: ${EMPTY:-d}\n").unwrap(), "a: d\n");
    }

    #[test]
    fn skips_comment_lines() {
        assert_eq!(
            run("# uses ${UNSET}\na: 1\n").unwrap(),
            "# uses ${UNSET}\na: 1\n"
        );
    }

    #[test]
    fn leaves_bare_dollars_and_escapes_alone() {
        assert_eq!(
            run("re: '^a$'\nlit: $${HOME}\n").unwrap(),
            "re: '^a$'\nlit: ${HOME}\n"
        );
    }

    #[test]
    fn missing_variable_names_file_line_and_variable() {
        let errors = run("a: 1\npassword: ${MQTT_PASSWORD}\n").unwrap_err();
        assert_eq!(errors.len(), 1);
        let text = errors[0].to_string();
        assert!(text.starts_with("bridge.yaml:2:11:"), "{text}");
        assert!(text.contains("`MQTT_PASSWORD` is not set"), "{text}");
    }

    #[test]
    fn unterminated_reference_is_an_error() {
        let text = run("a: ${OOPS\n").unwrap_err()[0].to_string();
        assert!(text.contains("unterminated"), "{text}");
    }
}
