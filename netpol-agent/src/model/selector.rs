//! Label selectors (`metav1.LabelSelector`): `matchLabels` AND every `matchExpressions` entry.

use std::fmt;

use super::{Labels, ModelError};

/// A `matchExpressions` operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    /// The label's value is one of `values`.
    In,
    /// The label is absent or its value is none of `values`.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl Operator {
    /// Parses the API spelling.
    pub fn parse(value: &str) -> Result<Self, ModelError> {
        match value {
            "In" => Ok(Operator::In),
            "NotIn" => Ok(Operator::NotIn),
            "Exists" => Ok(Operator::Exists),
            "DoesNotExist" => Ok(Operator::DoesNotExist),
            _ => Err(ModelError::UnknownOperator { value: value.to_string() }),
        }
    }
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    /// Label key.
    pub key: String,
    /// Operator.
    pub operator: Operator,
    /// Values (non-empty for In/NotIn, empty otherwise).
    pub values: Vec<String>,
}

impl Requirement {
    /// Builds a requirement, applying the API's validation: "If the operator is In or NotIn, the
    /// values array must be non-empty. If the operator is Exists or DoesNotExist, the values
    /// array must be empty."
    pub fn new(
        key: impl Into<String>,
        operator: Operator,
        values: Vec<String>,
    ) -> Result<Self, ModelError> {
        let problem = match operator {
            Operator::In | Operator::NotIn if values.is_empty() => Some("requires values"),
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                Some("takes no values")
            }
            _ => None,
        };
        if let Some(problem) = problem {
            return Err(ModelError::SelectorValues { operator, problem });
        }
        Ok(Requirement { key: key.into(), operator, values })
    }

    /// Whether `labels` satisfy this requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A label selector. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelSelector {
    /// `matchLabels`.
    pub match_labels: Labels,
    /// `matchExpressions`.
    pub match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    /// The selector `{}` that matches every object.
    pub fn everything() -> Self {
        LabelSelector::default()
    }

    /// Whether the selector is `{}`.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// "The requirements are ANDed": every `matchLabels` pair and every expression must hold.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn req(key: &str, op: Operator, values: &[&str]) -> Requirement {
        Requirement::new(key, op, values.iter().map(|v| v.to_string()).collect()).unwrap()
    }

    #[test]
    fn operators() {
        use Operator::*;
        let l = labels(&[("app", "web"), ("tier", "fe")]);
        let cases = [
            (req("app", In, &["web", "db"]), true),
            (req("app", In, &["db"]), false),
            (req("missing", In, &["x"]), false),
            (req("app", NotIn, &["db"]), true),
            (req("app", NotIn, &["web"]), false),
            (req("missing", NotIn, &["web"]), true),
            (req("tier", Exists, &[]), true),
            (req("missing", Exists, &[]), false),
            (req("missing", DoesNotExist, &[]), true),
            (req("app", DoesNotExist, &[]), false),
        ];
        for (r, want) in cases {
            assert_eq!(r.matches(&l), want, "{r:?}");
        }
    }

    #[test]
    fn selector_ands_labels_and_expressions() {
        let l = labels(&[("app", "web"), ("tier", "fe")]);
        assert!(LabelSelector::everything().matches(&l));
        assert!(LabelSelector::everything().matches(&Labels::new()));
        let s = LabelSelector {
            match_labels: labels(&[("app", "web")]),
            match_expressions: vec![req("tier", Operator::In, &["be"])],
        };
        assert!(!s.matches(&l));
        let s =
            LabelSelector { match_labels: labels(&[("app", "web")]), match_expressions: vec![] };
        assert!(s.matches(&l));
        assert!(!s.matches(&labels(&[("app", "db")])));
    }

    #[test]
    fn validation() {
        assert!(Operator::parse("in").is_err());
        assert!(Requirement::new("a", Operator::In, vec![]).is_err());
        assert!(Requirement::new("a", Operator::Exists, vec!["x".into()]).is_err());
    }
}
