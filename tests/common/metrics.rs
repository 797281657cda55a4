//! Reading a bridge's Prometheus endpoint: what one bridge process did,
//! seen from outside, the way an operator sees it.
//!
//! Tests observe their own bridge here rather than through process-wide
//! counters, which the other tests of a test binary (running in parallel)
//! move too.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// How long one scrape may take before it counts as failed.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// The `/metrics` endpoint on a loopback port.
#[derive(Clone, Copy, Debug)]
pub struct MetricsEndpoint {
    pub port: u16,
}

impl MetricsEndpoint {
    /// One scrape (HTTP/1.0, so the server closes the connection after its
    /// answer). Blocking: call it off the runtime, or via
    /// [`Self::scrape_async`].
    pub fn scrape(&self) -> std::io::Result<Scrape> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
        stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let Some((head, body)) = response.split_once("\r\n\r\n") else {
            return Err(std::io::Error::other(format!(
                "not an HTTP response: {response:.200}"
            )));
        };
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return Err(std::io::Error::other(format!("answered {head}")));
        }
        Ok(Scrape {
            text: body.to_string(),
        })
    }

    /// `GET path`: the status code and body. Blocking, like [`Self::scrape`].
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
        stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| {
            std::io::Error::other(format!("not an HTTP response: {response:.200}"))
        })?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no status in {head}")))?;
        Ok((status, body.to_string()))
    }

    /// [`Self::get`] on the blocking pool.
    pub async fn get_async(&self, path: &str) -> std::io::Result<(u16, String)> {
        let (endpoint, path) = (*self, path.to_string());
        tokio::task::spawn_blocking(move || endpoint.get(&path))
            .await
            .expect("probe task")
    }

    /// [`Self::scrape`] on the blocking pool.
    pub async fn scrape_async(&self) -> std::io::Result<Scrape> {
        let endpoint = *self;
        tokio::task::spawn_blocking(move || endpoint.scrape())
            .await
            .expect("scrape task")
    }
}

/// One scrape's text.
#[derive(Clone, Debug)]
pub struct Scrape {
    pub text: String,
}

impl Scrape {
    /// The sum of the samples of `name` whose labels include every one of
    /// `labels` (all of its samples for `&[]`); `None` when no sample
    /// matches. A counter or gauge the bridge has not touched yet has no
    /// sample at all, so `None` also means "not yet".
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(parse_sample)
            .filter(|sample| sample.name == name)
            .filter(|sample| {
                labels
                    .iter()
                    .all(|(k, v)| sample.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|sample| sample.value)
            .reduce(|a, b| a + b)
    }
}

struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

/// `name{k="v",...} value` or `name value` (the exporter writes no
/// timestamps).
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let (series, value) = line.trim_end().rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let Some((name, labels)) = series.split_once('{') else {
        return Some(Sample {
            name: series,
            labels: Vec::new(),
            value,
        });
    };
    Some(Sample {
        name,
        labels: parse_labels(labels.strip_suffix('}')?)?,
        value,
    })
}

/// `k="v",k2="v2"`, with `\"`, `\\` and `\n` escapes in values.
fn parse_labels(mut text: &str) -> Option<Vec<(&str, String)>> {
    let mut labels = Vec::new();
    while !text.is_empty() {
        let (key, rest) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim_start_matches(','), value));
        text = &rest[end + 1..];
    }
    Some(labels)
}
