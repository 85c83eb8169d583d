//! Values written into SQL text, for the statements that go out together in one simple query (one
//! round trip) where sqlx would send each with its binds and wait for its answer before the next
//! (docs/performance.md, finding 35): the shared commit's `BEGIN`, row locks and new sagas in one
//! flight, its saga rows, history, outbox and `COMMIT` in another. The statements themselves are
//! prepared once per connection ([`Prepared`]); a flight runs them as `EXECUTE name(values…)`.
//!
//! Every value is written as an escape string literal (`E'…'`, backslashes and quotes doubled, so
//! its meaning does not depend on `standard_conforming_strings`) of PostgreSQL's input syntax for
//! the parameter's type, which the prepared statement gives it; `NULL` for none. An array is the
//! array input syntax (`{"…",NULL}`, every element quoted) inside such a literal. A NUL character,
//! which no PostgreSQL text can hold and which would end the query text early, is refused.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

/// A value as PostgreSQL reads it from text; `None` is SQL's NULL.
pub trait SqlText {
    /// The input syntax of the value, or `None` for NULL.
    fn sql_text(&self) -> Option<Cow<'_, str>>;
}

impl SqlText for i32 {
    fn sql_text(&self) -> Option<Cow<'_, str>> {
        Some(self.to_string().into())
    }
}

impl SqlText for i64 {
    fn sql_text(&self) -> Option<Cow<'_, str>> {
        Some(self.to_string().into())
    }
}

impl SqlText for bool {
    fn sql_text(&self) -> Option<Cow<'_, str>> {
        Some(if *self { "t" } else { "f" }.into())
    }
}

impl SqlText for str {
    fn sql_text(&self) -> Option<Cow<'_, str>> {
        Some(self.into())
    }
}

impl SqlText for String {
    fn sql_text(&self) -> Option<Cow<'_, str>> {
        Some(self.as_str().into())
    }
}

impl SqlText for Uuid {
    fn sql_text(&self) -> Option<Cow<'_, str>> {
        Some(self.hyphenated().to_string().into())
    }
}

/// ISO 8601 in UTC to the microsecond, which is all PostgreSQL keeps: the digits below are cut, as
/// sqlx's binary encoding cuts them, so a time reads back the same whichever way it was written.
impl SqlText for OffsetDateTime {
    fn sql_text(&self) -> Option<Cow<'_, str>> {
        let t = self.to_offset(time::UtcOffset::UTC);
        let mut s = String::with_capacity(32);
        let _ = write!(
            s,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.microsecond()
        );
        Some(s.into())
    }
}

/// JSON's text (for `json`/`jsonb`).
impl SqlText for Value {
    fn sql_text(&self) -> Option<Cow<'_, str>> {
        Some(self.to_string().into())
    }
}

impl<T: SqlText + ?Sized> SqlText for &T {
    fn sql_text(&self) -> Option<Cow<'_, str>> {
        (**self).sql_text()
    }
}

impl<T: SqlText> SqlText for Option<T> {
    fn sql_text(&self) -> Option<Cow<'_, str>> {
        self.as_ref().and_then(SqlText::sql_text)
    }
}

/// A `bytea` (hex format).
pub struct Bytea<'a>(pub &'a [u8]);

impl SqlText for Bytea<'_> {
    fn sql_text(&self) -> Option<Cow<'_, str>> {
        let mut s = String::with_capacity(2 + 2 * self.0.len());
        s.push_str("\\x");
        for b in self.0 {
            let _ = write!(s, "{b:02x}");
        }
        Some(s.into())
    }
}

/// An `interval` of whole microseconds.
pub struct Interval(pub std::time::Duration);

impl SqlText for Interval {
    fn sql_text(&self) -> Option<Cow<'_, str>> {
        Some(format!("{} microseconds", self.0.as_micros().min(i64::MAX as u128)).into())
    }
}

/// A one-dimensional array of the values (elements may be NULL).
impl<T: SqlText> SqlText for [T] {
    fn sql_text(&self) -> Option<Cow<'_, str>> {
        let mut s = String::with_capacity(2 + 16 * self.len());
        s.push('{');
        for (i, v) in self.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            match v.sql_text() {
                None => s.push_str("NULL"),
                Some(t) => {
                    s.push('"');
                    for c in t.chars() {
                        if c == '"' || c == '\\' {
                            s.push('\\');
                        }
                        s.push(c);
                    }
                    s.push('"');
                }
            }
        }
        s.push('}');
        Some(s.into())
    }
}

impl<T: SqlText> SqlText for Vec<T> {
    fn sql_text(&self) -> Option<Cow<'_, str>> {
        self.as_slice().sql_text()
    }
}

/// A value that cannot be written into SQL text.
#[derive(Debug, thiserror::Error)]
#[error("a value for statement {statement} holds a NUL character, which PostgreSQL text cannot hold")]
pub struct NulInValue {
    statement: &'static str,
}

impl From<NulInValue> for sqlx::Error {
    fn from(e: NulInValue) -> Self {
        sqlx::Error::Encode(Box::new(e))
    }
}

/// `v` as an SQL literal: `NULL`, or an escape string literal of its text.
pub fn literal(v: &(impl SqlText + ?Sized), out: &mut String) -> Result<(), char> {
    match v.sql_text() {
        None => out.push_str("NULL"),
        Some(t) => {
            out.reserve(t.len() + 3);
            out.push_str("E'");
            for c in t.chars() {
                match c {
                    '\0' => return Err(c),
                    '\'' => out.push_str("''"),
                    '\\' => out.push_str("\\\\"),
                    c => out.push(c),
                }
            }
            out.push('\'');
        }
    }
    Ok(())
}

/// A statement prepared on every connection of a pool under `name` (`PREPARE name AS sql`, the
/// parameters' types as PostgreSQL infers them, as for sqlx's own prepared statements).
#[derive(Debug, Clone, Copy)]
pub struct Prepared {
    /// The statement's name on the connection.
    pub name: &'static str,
    /// Its SQL, with `$1`… for its values.
    pub sql: &'static str,
}

impl Prepared {
    /// The `PREPARE` for a new connection.
    pub fn prepare(&self) -> String {
        format!("prepare {} as {}", self.name, self.sql)
    }

    /// `EXECUTE name(…)`, its values added with [`Execute::arg`].
    pub fn execute(&self) -> Execute {
        let mut sql = String::with_capacity(256);
        sql.push_str("execute ");
        sql.push_str(self.name);
        sql.push('(');
        Execute {
            name: self.name,
            sql,
            args: 0,
            nul: false,
        }
    }
}

/// An `EXECUTE` of a [`Prepared`] statement being written.
pub struct Execute {
    name: &'static str,
    sql: String,
    args: usize,
    nul: bool,
}

impl Execute {
    /// The next value (`$1`, then `$2`, …).
    pub fn arg(mut self, v: &(impl SqlText + ?Sized)) -> Self {
        if self.args > 0 {
            self.sql.push_str(", ");
        }
        self.args += 1;
        if literal(v, &mut self.sql).is_err() {
            self.nul = true;
        }
        self
    }

    /// The statement's text, or why a value could not be written.
    pub fn finish(mut self) -> Result<String, NulInValue> {
        if self.nul {
            return Err(NulInValue { statement: self.name });
        }
        self.sql.push(')');
        Ok(self.sql)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(v: &(impl SqlText + ?Sized)) -> String {
        let mut s = String::new();
        literal(v, &mut s).unwrap();
        s
    }

    #[test]
    fn quotes_and_backslashes_are_doubled_and_nul_is_refused() {
        assert_eq!(lit("it's a \\ test"), r"E'it''s a \\ test'");
        assert_eq!(lit(&None::<i32>), "NULL");
        assert_eq!(lit(&Some(7)), "E'7'");
        let mut s = String::new();
        assert_eq!(literal("a\0b", &mut s), Err('\0'));
        let e = Prepared { name: "x", sql: "" }.execute().arg("a\0").finish();
        assert!(e.is_err());
    }

    #[test]
    fn arrays_quote_every_element_and_write_null_bare() {
        let v: Vec<Option<&str>> = vec![Some("a\"b"), None, Some(r"c\d"), Some("NULL")];
        assert_eq!(v.sql_text().unwrap(), r#"{"a\"b",NULL,"c\\d","NULL"}"#);
        assert_eq!(Vec::<i32>::new().sql_text().unwrap(), "{}");
    }

    #[test]
    fn times_are_utc_to_the_microsecond() {
        let t = time::macros::datetime!(2026-12-05 17:04:05.123456789 +02:00);
        assert_eq!(t.sql_text().unwrap(), "2026-12-05T15:04:05.123456Z");
    }

    #[test]
    fn bytea_is_hex_and_intervals_are_microseconds() {
        assert_eq!(Bytea(&[0, 255, 16]).sql_text().unwrap(), r"\x00ff10");
        assert_eq!(
            Interval(std::time::Duration::from_millis(1500))
                .sql_text()
                .unwrap(),
            "1500000 microseconds"
        );
    }

    #[test]
    fn execute_lists_the_values_in_order() {
        let p = Prepared {
            name: "s",
            sql: "select $1, $2",
        };
        assert_eq!(p.prepare(), "prepare s as select $1, $2");
        let sql = p.execute().arg(&1).arg(&vec![true, false]).finish().unwrap();
        assert_eq!(sql, "execute s(E'1', E'{\"t\",\"f\"}')");
    }
}
