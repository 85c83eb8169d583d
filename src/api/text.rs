//! The one check every client string passes before it reaches the database or a log line: no
//! control characters (C0, DEL, C1 — `NUL` among them, which PostgreSQL refuses in `text` and
//! which would have been a 500) and at most [`MAX_TEXT_BYTES`] bytes. The extractors apply it to
//! every string of a JSON body (keys included) and of a query string, so a new field gets it
//! without a line of its own; handlers add tighter, field-specific bounds (an e-mail's 254
//! characters) on top.

use serde_json::Value;

use crate::error::ApiError;

/// Longest string accepted anywhere in a body or a query string (a password's 1024 bytes is the
/// longest any field needs).
pub const MAX_TEXT_BYTES: usize = 1024;

/// Why a string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextProblem {
    /// It holds a control character (the first one).
    Control(char),
    /// It is longer than [`MAX_TEXT_BYTES`].
    TooLong,
}

/// Checks one string against the rules.
pub fn check(s: &str) -> Result<(), TextProblem> {
    if s.len() > MAX_TEXT_BYTES {
        return Err(TextProblem::TooLong);
    }
    match s.chars().find(|c| c.is_control()) {
        Some(c) => Err(TextProblem::Control(c)),
        None => Ok(()),
    }
}

/// The 422 answer for a refused string, naming the field and never echoing the value.
pub fn refusal(field: &str, problem: &TextProblem) -> ApiError {
    let detail = match problem {
        TextProblem::Control(c) => {
            format!(
                "{field}: control characters are not allowed (found U+{:04X})",
                *c as u32
            )
        }
        TextProblem::TooLong => format!("{field}: at most {MAX_TEXT_BYTES} bytes"),
    };
    ApiError::invalid_field(field, detail)
}

/// Checks one named string, answering the refusal.
pub fn check_field(field: &str, s: &str) -> Result<(), ApiError> {
    check(s).map_err(|p| refusal(field, &p))
}

/// Whether a raw JSON body may hold a string the rules refuse: one longer than the limit (then the
/// body is too), an escape that may stand for a control character (`\u0000`, `\n`...), or a raw DEL
/// or C1 character. Raw C0 characters are not JSON
/// at all, and the parser refuses them. Bodies that pass (nearly every order) skip the walk.
pub fn body_needs_walk(bytes: &[u8]) -> bool {
    bytes.len() > MAX_TEXT_BYTES
        || bytes.windows(2).any(|w| {
            (w[0] == b'\\' && b"ubfnrt".contains(&w[1])) || (w[0] == 0xC2 && (0x80..=0x9F).contains(&w[1]))
        })
        || bytes.contains(&0x7F)
}

/// Checks every string of a JSON document, keys included, naming the first offender by its path
/// (`orderItems[2].note`, the same spelling as the type errors).
pub fn check_json(value: &Value) -> Result<(), ApiError> {
    walk(value, &mut String::new())
}

fn walk(value: &Value, path: &mut String) -> Result<(), ApiError> {
    match value {
        Value::String(s) => check(s).map_err(|p| refusal(field_name(path), &p)),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(item, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(map) => {
            for (k, v) in map {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                match check(k) {
                    // The key itself is the offender: name it by its safe prefix only.
                    Err(p) => {
                        let shown: String = k.chars().take_while(|c| !c.is_control()).take(64).collect();
                        path.push_str(&shown);
                        return Err(refusal(field_name(path), &p));
                    }
                    Ok(()) => path.push_str(k),
                }
                walk(v, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn field_name(path: &str) -> &str {
    if path.is_empty() { "body" } else { path }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_text_passes_and_control_characters_do_not() {
        assert_eq!(check("ada@example.com"), Ok(()));
        assert_eq!(check("pässwörd ✓ 日本"), Ok(()));
        assert_eq!(check("a\u{0}b"), Err(TextProblem::Control('\u{0}')));
        assert_eq!(check("tab\there"), Err(TextProblem::Control('\t')));
        assert_eq!(check("del\u{7f}"), Err(TextProblem::Control('\u{7f}')));
        assert_eq!(check("c1\u{85}"), Err(TextProblem::Control('\u{85}')));
        assert_eq!(check(&"x".repeat(MAX_TEXT_BYTES)), Ok(()));
        assert_eq!(check(&"x".repeat(MAX_TEXT_BYTES + 1)), Err(TextProblem::TooLong));
    }

    #[test]
    fn the_walk_names_the_offending_field_by_its_path() {
        let v = json!({"orderItems": [{"productID": 1}, {"note": "a\u{0}"}]});
        let e = check_json(&v).unwrap_err();
        assert_eq!(e.body()["field"], "orderItems[1].note");
        assert!(!e.body()["detail"].as_str().unwrap().contains('\u{0}'));
        let e = check_json(&json!({"ok\u{1}key": 1})).unwrap_err();
        assert_eq!(e.body()["field"], "ok");
        assert!(check_json(&json!({"email": "a@b.c", "n": [1, 2]})).is_ok());
    }

    #[test]
    fn only_bodies_that_may_hold_a_refused_string_are_walked() {
        assert!(!body_needs_walk(
            br#"{"orderItems":[{"productID":1,"quantity":2}]}"#
        ));
        assert!(body_needs_walk(br#"{"email":"a\u0000"}"#));
        assert!(body_needs_walk(br#"{"email":"a\n"}"#));
        assert!(!body_needs_walk(br#"{"email":"a\"b\\"}"#));
        assert!(body_needs_walk("{\"email\":\"a\u{85}\"}".as_bytes()));
        assert!(body_needs_walk(b"{\"email\":\"a\x7f\"}"));
        assert!(body_needs_walk(
            format!("\"{}\"", "x".repeat(MAX_TEXT_BYTES)).as_bytes()
        ));
    }
}
