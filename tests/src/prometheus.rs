//! Reading samples out of the Prometheus text format the agent exports.

/// The sum of every sample of metric `name` whose labels include all of
/// `labels`, or `None` when no series matches. Summing lets a test ask for
/// "all redirects" without naming every label a series carries.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text)
        .filter(|sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|&(key, value)| sample.labels.iter().any(|(k, v)| *k == key && v == value))
        })
        .map(|sample| sample.value)
        .reduce(|sum, value| sum + value)
}

/// One sample of a scrape.
#[derive(Debug)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub labels: Vec<(&'a str, String)>,
    pub value: f64,
}

impl Sample<'_> {
    /// The value of label `key`, or "" when the series has none.
    pub fn label(&self, key: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| *k == key)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Every sample of a scrape, skipping comments and malformed lines.
pub fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter_map(parse_sample)
}

/// One line such as `weir_redirected_total{dir="out",pod="a"} 3`; comments,
/// blank lines and anything malformed give `None`.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let (name, mut rest) = line.split_at(name_end);
    let mut labels = Vec::new();
    if let Some(label_text) = rest.strip_prefix('{') {
        rest = parse_labels(label_text, &mut labels)?;
    }
    // A timestamp may follow the value; it is not needed.
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `key="value",...}` and returns what follows the closing brace.
fn parse_labels<'a>(mut rest: &'a str, labels: &mut Vec<(&'a str, String)>) -> Option<&'a str> {
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some(after);
        }
        let (key, quoted) = rest.split_once('=')?;
        let quoted = quoted.trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    escaped => value.push(escaped),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim(), value));
        rest = &quoted[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
# HELP weir_decisions_total eBPF decisions.
# TYPE weir_decisions_total counter
weir_decisions_total{decision="redirected",node="a"} 3
weir_decisions_total{decision="redirected",node="b"} 4 1700000000000
weir_decisions_total{decision="denied",node="a"} 1
weir_decisions_total_other 100
weir_map_entries{map="orig_dst",note="say \"hi\", ok"} 7
weir_up 1
"#;

    #[test]
    fn sums_matching_series() {
        let redirected = [("decision", "redirected")];
        assert_eq!(
            metric_value(TEXT, "weir_decisions_total", &redirected),
            Some(7.0)
        );
        assert_eq!(metric_value(TEXT, "weir_decisions_total", &[]), Some(8.0));
        let denied_on_a = [("decision", "denied"), ("node", "a")];
        assert_eq!(
            metric_value(TEXT, "weir_decisions_total", &denied_on_a),
            Some(1.0)
        );
        assert_eq!(
            metric_value(TEXT, "weir_map_entries", &[("note", "say \"hi\", ok")]),
            Some(7.0)
        );
        assert_eq!(metric_value(TEXT, "weir_up", &[]), Some(1.0));
        assert_eq!(
            metric_value(TEXT, "weir_decisions_total", &[("decision", "excluded")]),
            None
        );
        assert_eq!(metric_value(TEXT, "weir_missing", &[]), None);
    }
}
