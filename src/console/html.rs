//! HTML building blocks of the console: escaping, the page frame, and generic renderings of JSON
//! values (so a field the admin API gains later shows up without a console change).
//!
//! Every value that reaches a page goes through [`esc`]: payloads, error texts and keys are
//! hostile input. Hand-written instead of a template engine: the pages are few and small, and one
//! escaping function that every path calls is easier to audit than a template's auto-escaping
//! rules.

use std::fmt::Write as _;

use serde_json::Value;

/// Escapes text for HTML element content and double- or single-quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query-string value.
pub fn url_enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The signed-in admin shown in the header, with the CSRF token of the logout form.
pub struct Who<'a> {
    /// Email.
    pub email: &'a str,
    /// CSRF token of the session.
    pub csrf: &'a str,
}

/// A whole page: title, navigation (when signed in) and body (already escaped HTML).
pub fn page(title: &str, who: Option<&Who<'_>>, body: &str) -> String {
    let nav = match who {
        Some(w) => format!(
            r#"<nav aria-label="Main"><a href="/console/sagas">Sagas</a> <a href="/console/sagas?state=stuck">Stuck</a> <a href="/console/pipeline">Outbox, dead letters, lag</a> <a href="/console/audit">Audit</a>
<form method="post" action="/console/logout" class="inline"><input type="hidden" name="csrf" value="{}"><span class="who">{}</span> <button type="submit">Sign out</button></form></nav>"#,
            esc(w.csrf),
            esc(w.email)
        ),
        None => String::new(),
    };
    format!(
        r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{} · OStore ops console</title><link rel="stylesheet" href="/console/assets/console.css"></head>
<body><a class="skip" href="#main">Skip to the content</a><header><a class="brand" href="/console/sagas">OStore ops console</a>{nav}</header>
<main id="main">
<h1>{}</h1>
{body}
</main></body></html>"##,
        esc(title),
        esc(title)
    )
}

/// A value as text: strings bare, null as empty, the rest as compact JSON.
pub fn text_of(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A value as escaped HTML: objects and arrays pretty-printed in a `<pre>`.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Object(_) | Value::Array(_) => format!(
            "<pre>{}</pre>",
            esc(&serde_json::to_string_pretty(v).unwrap_or_default())
        ),
        other => esc(&text_of(other)),
    }
}

/// The fields of a JSON object as a two-column table, in the object's order, skipping `skip`.
pub fn kv_table(v: &Value, skip: &[&str]) -> String {
    let mut out = String::from(r#"<table class="kv"><tbody>"#);
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            if skip.contains(&k.as_str()) {
                continue;
            }
            let _ = write!(
                out,
                "<tr><th scope=\"row\">{}</th><td>{}</td></tr>",
                esc(k),
                cell(val)
            );
        }
    }
    out.push_str("</tbody></table>");
    out
}

/// The columns of a table of JSON objects: `preferred` first (those present in some row), then
/// every other key in first-seen order.
pub fn columns(rows: &[Value], preferred: &[&str]) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for r in rows {
        if let Some(o) = r.as_object() {
            for k in o.keys() {
                if !seen.contains(k) {
                    seen.push(k.clone());
                }
            }
        }
    }
    let mut cols: Vec<String> = preferred
        .iter()
        .filter(|p| seen.iter().any(|s| s == *p))
        .map(|p| p.to_string())
        .collect();
    for s in seen {
        if !cols.contains(&s) {
            cols.push(s);
        }
    }
    cols
}

/// A `<select>` of `options` (value = label) with an empty "any" choice.
pub fn select(name: &str, label: &str, options: &[&str], current: Option<&str>) -> String {
    let mut out = format!(
        r#"<label>{} <select name="{}"><option value="">any</option>"#,
        esc(label),
        esc(name)
    );
    for o in options {
        let sel = if current == Some(*o) { " selected" } else { "" };
        let _ = write!(out, r#"<option value="{0}"{sel}>{0}</option>"#, esc(o));
    }
    out.push_str("</select></label>");
    out
}

/// A saga state as a coloured badge.
pub fn state_badge(state: &str) -> String {
    format!(
        r#"<span class="badge s-{}">{}</span>"#,
        esc(&state.replace(|c: char| !c.is_ascii_alphanumeric(), "_")),
        esc(state)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_neutralises_markup_and_attribute_breakouts() {
        assert_eq!(
            esc(r#"<script>alert('x')</script>" onload="x"&"#),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot; onload=&quot;x&quot;&amp;"
        );
    }

    #[test]
    fn nested_values_are_escaped_inside_pre() {
        let v = serde_json::json!({"k": "<img src=x onerror=alert(1)>"});
        let html = cell(&v);
        assert!(html.starts_with("<pre>"));
        assert!(!html.contains("<img"));
        assert!(html.contains("&lt;img"));
    }

    #[test]
    fn columns_put_preferred_first_and_keep_unknown_fields() {
        let rows = vec![
            serde_json::json!({"b": 1, "a": 2, "later": 3}),
            serde_json::json!({"a": 1, "extra": 4}),
        ];
        assert_eq!(
            columns(&rows, &["a", "missing", "b"]),
            ["a", "b", "later", "extra"]
        );
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(url_enc("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
