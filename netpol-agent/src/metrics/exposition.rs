//! A small parser of the text exposition for tests: turns `name{k="v",...} value` lines into
//! samples, so tests compare numbers and label sets instead of substrings.

use std::collections::BTreeMap;

/// Label name → value.
pub(super) type Labels = BTreeMap<String, String>;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Sample {
    pub(super) name: String,
    pub(super) labels: Labels,
    pub(super) value: f64,
}

/// Parses every sample line; panics (test helper) on a line it cannot read, so a malformed
/// exposition fails the test.
pub(super) fn parse(text: &str) -> Vec<Sample> {
    assert!(text.ends_with("# EOF\n"), "exposition must end with # EOF: {text}");
    text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).map(parse_line).collect()
}

fn parse_line(line: &str) -> Sample {
    let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
    };
    let (name, labels) = match series.split_once('{') {
        None => (series.to_owned(), Labels::new()),
        Some((name, rest)) => {
            let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"));
            (name.to_owned(), parse_labels(body, line))
        }
    };
    Sample { name, labels, value }
}

fn parse_labels(mut body: &str, line: &str) -> Labels {
    let mut labels = Labels::new();
    while !body.is_empty() {
        let (key, rest) = body.split_once("=\"").unwrap_or_else(|| panic!("bad label: {line}"));
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => panic!("dangling escape: {line}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value: {line}"),
            }
        };
        labels.insert(key.to_owned(), value);
        body = rest[end + 1..].strip_prefix(',').unwrap_or(&rest[end + 1..]);
    }
    labels
}

/// The samples named `name`, keyed by label set; panics on a duplicate series.
pub(super) fn series(samples: &[Sample], name: &str) -> BTreeMap<Labels, f64> {
    let mut out = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == name) {
        assert!(out.insert(s.labels.clone(), s.value).is_none(), "duplicate series {s:?}");
    }
    out
}

/// Builds a label set from pairs.
pub(super) fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

#[test]
fn parses_labels_values_and_escapes() {
    let s = parse(
        "# TYPE a counter\na_total{x=\"1\",y=\"q\\\"z\"} 3\nb 2.5\nc{le=\"+Inf\"} +Inf\n# EOF\n",
    );
    assert_eq!(s.len(), 3);
    assert_eq!(s[0].labels, labels(&[("x", "1"), ("y", "q\"z")]));
    assert_eq!(s[0].value, 3.0);
    assert_eq!(s[1], Sample { name: "b".into(), labels: Labels::new(), value: 2.5 });
    assert_eq!(s[2].value, f64::INFINITY);
}
