//! Kubernetes label selectors in their string form (as in `kubectl -l`):
//! `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`,
//! comma-separated and ANDed.
//!
//! The selector itself is kube-rs's (`kube::core::Selector` of
//! `Expression`s), matched by kube-rs (`SelectorExt::matches`) and printed
//! in its canonical text. Only the parser is ours: kube-core 5.0 builds
//! selectors from label maps and from the API's `LabelSelector` objects,
//! but does not parse the string form that KEDA trigger metadata carries
//! (`podSelector: "app=llm,tier in (gpu)"`).
use std::collections::{BTreeMap, BTreeSet};

use kube::core::{Expression, Selector, SelectorExt as _};

/// A parsed selector; the empty selector matches every pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    selector: Selector,
}

impl LabelSelector {
    /// Parses the string form; the error says which part is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut expressions = Vec::new();
        for part in split_top_level(text)? {
            let part = part.trim();
            if part.is_empty() {
                return Err("empty requirement (stray comma?)".to_string());
            }
            expressions.push(parse_requirement(part)?);
        }
        Ok(Self { selector: expressions.into_iter().collect() })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
    }
}

/// The canonical string form (kube-rs's): `parse` reads it back to an
/// equal selector, so a selector can travel (to node agents) as text.
impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.selector.fmt(f)
    }
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (index, ch) in text.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..index]);
                start = index + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(format!("unbalanced parentheses in {text:?}"));
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced parentheses in {text:?}"));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Expression, String> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Expression::DoesNotExist(label_key(key.trim())?));
    }
    if let Some((key, value)) = part.split_once("!=") {
        return Ok(Expression::NotEqual(label_key(key.trim())?, label_value(value.trim())?));
    }
    if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(Expression::Equal(label_key(key.trim())?, label_value(value.trim())?));
    }
    let words: Vec<&str> = part.splitn(2, char::is_whitespace).collect();
    if words.len() == 2 {
        let rest = words[1].trim();
        let (operator, list) =
            rest.split_once('(').ok_or_else(|| format!("expected `in (...)` or `notin (...)` in {part:?}"))?;
        let list = list.strip_suffix(')').ok_or_else(|| format!("missing `)` in {part:?}"))?;
        let values = list.split(',').map(|v| label_value(v.trim())).collect::<Result<BTreeSet<_>, _>>()?;
        let key = label_key(words[0])?;
        return match operator.trim() {
            "in" => Ok(Expression::In(key, values)),
            "notin" => Ok(Expression::NotIn(key, values)),
            other => Err(format!("unknown operator {other:?} in {part:?}")),
        };
    }
    Ok(Expression::Exists(label_key(part)?))
}

fn label_key(key: &str) -> Result<String, String> {
    let valid =
        !key.is_empty() && key.len() <= 317 && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if valid {
        Ok(key.to_string())
    } else {
        Err(format!("invalid label key {key:?}"))
    }
}

fn label_value(value: &str) -> Result<String, String> {
    let valid = value.len() <= 63 && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if valid {
        Ok(value.to_string())
    } else {
        Err(format!("invalid label value {value:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Each operator matches and rejects what kubectl's would.
    #[test]
    fn operators() {
        let pod = labels(&[("app", "llm"), ("tier", "gpu"), ("app.kubernetes.io/name", "vllm")]);
        let cases = [
            ("", true),
            ("app=llm", true),
            ("app==llm", true),
            ("app=other", false),
            ("app!=other", true),
            ("app!=llm", false),
            ("tier in (gpu, cpu)", true),
            ("tier notin (gpu)", false),
            ("missing notin (x)", true),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("app=llm,tier in (gpu),app.kubernetes.io/name=vllm", true),
            ("app=llm,tier=cpu", false),
        ];
        for (selector, expected) in cases {
            let parsed = LabelSelector::parse(selector).unwrap_or_else(|e| panic!("{selector}: {e}"));
            assert_eq!(parsed.matches(&pod), expected, "{selector}");
        }
    }

    /// The text form reads back to the same selector.
    #[test]
    fn text_form_round_trips() {
        for selector in ["", "app=llm", "app=", "a!=b", "t in (x, y,z)", "t notin (x,)", "k", "!k", "a=b,!c,d in (e)"] {
            let parsed = LabelSelector::parse(selector).unwrap();
            let text = parsed.to_string();
            assert_eq!(LabelSelector::parse(&text).unwrap(), parsed, "{selector} -> {text}");
        }
    }

    /// Malformed selectors are errors, not silently "match all".
    #[test]
    fn malformed() {
        for selector in ["app=llm,", "tier in (a", "tier in a", "tier between (a)", "a b c=(", "app=l l", "(x)"] {
            assert!(LabelSelector::parse(selector).is_err(), "{selector} parsed");
        }
    }
}
