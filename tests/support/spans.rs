//! Collected spans drawn as a tree, for assertion messages.

use std::collections::{BTreeSet, HashMap};

/// One span to draw: its id, its parent's id, and the text of its line.
pub struct SpanLine {
    pub id: String,
    pub parent: String,
    pub label: String,
}

/// The spans as an indented tree, one line per span under a `(remote parent …)` line for each
/// parent that is not among them. Siblings keep the order they have in `spans`.
pub fn tree(spans: &[SpanLine]) -> String {
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.id.as_str()).collect();
    let mut children: HashMap<&str, Vec<&SpanLine>> = HashMap::new();
    for s in spans {
        children.entry(s.parent.as_str()).or_default().push(s);
    }
    fn walk(out: &mut String, children: &HashMap<&str, Vec<&SpanLine>>, id: &str, depth: usize) {
        for s in children.get(id).into_iter().flatten() {
            out.push_str(&format!("{}{}\n", "  ".repeat(depth), s.label));
            walk(out, children, &s.id, depth + 1);
        }
    }
    let roots: BTreeSet<&str> = spans
        .iter()
        .map(|s| s.parent.as_str())
        .filter(|p| !ids.contains(p))
        .collect();
    let mut out = String::new();
    for r in roots {
        out.push_str(&format!("(remote parent {r})\n"));
        walk(&mut out, &children, r, 1);
    }
    out
}
