//! Request extractors that answer bad input with problem documents: `ApiJson` (content type, size,
//! syntax and shape checked, the offending field named) and `AuthUser` / `AdminUser`.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::api::{AppState, text};
use crate::auth::{Claims, Role};
use crate::error::ApiError;

/// Reads a request body's struct from a JSON object only. serde's derive also reads a struct from
/// an array of its fields in order (`[null, [[4, 1]]]` for `{"orderItems": [{"productID": 4,
/// "quantity": 1}]}`), which placed an order; every struct a body read by [`ApiJson`] holds is
/// derived with `#[serde(remote = "Self")]`, which keeps the derived reading as an inherent
/// function, and given this `Deserialize`, which calls it for a map and refuses anything else.
macro_rules! object_only {
    ($t:ident) => {
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Object;
                impl<'de> serde::de::Visitor<'de> for Object {
                    type Value = $t;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("an object")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<$t, A::Error> {
                        $t::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    }
                }
                d.deserialize_map(Object)
            }
        }
    };
}
pub(crate) use object_only;

/// Largest request body the API reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON body: 415 without a JSON content type, 413 over 64 KiB, 400 when it is not JSON, 422
/// naming the field when it is JSON of the wrong shape (unknown fields included).
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| {
                let m = m.trim().to_ascii_lowercase();
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::new(
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
                "send the body as application/json",
            ));
        }
        let too_large = || {
            ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
                "the request body is larger than 64 KiB",
            )
        };
        // A declared length over the limit is refused before any of the body is read (a client
        // that declares more than it sends is not waited for).
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(too_large());
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                ApiError::bad_request("the request body could not be read")
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses a JSON document into `T`, strictly: one document and nothing after it but whitespace
/// (400), no key twice in an object (422), every string through [`text::check`] (422), and any
/// shape error (a wrong type, a number out of its type's range, an unknown or missing field) 422
/// naming the field at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let parsed = serde_path_to_error::deserialize::<_, T>(&mut *de);
    if parsed.is_ok() {
        // Trailing data (`{...}garbage`, a second document) is a syntax error, like in a value.
        de.end()
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    }
    // Strings are checked on the generic form (typed fields may not keep them all: an unknown
    // key that serde skips, a duplicate). Bodies without an escape or a long string skip this.
    if text::body_needs_walk(bytes)
        && let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes)
    {
        text::check_json(&doc)?;
    }
    match parsed {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            use serde_json::error::Category;
            match inner.classify() {
                Category::Syntax | Category::Eof | Category::Io => Err(ApiError::bad_request(format!(
                    "the body is not valid JSON: {inner}"
                ))),
                Category::Data => {
                    let msg = plain_words(&strip_position(&inner.to_string()));
                    let at_root = path.is_empty() || path == ".";
                    if let Some(name) = duplicate_field_name(&msg) {
                        let field = if at_root {
                            name.to_string()
                        } else {
                            format!("{path}.{name}")
                        };
                        return Err(ApiError::invalid_field(
                            &field,
                            format!("{field}: the key appears more than once"),
                        ));
                    }
                    let field = match (unknown_field_name(&msg), missing_field_name(&msg)) {
                        // serde_path_to_error's path already ends with the unknown key.
                        (Some(name), _) if at_root => name.to_string(),
                        (Some(_), _) => path,
                        (None, Some(name)) if at_root => name.to_string(),
                        (None, Some(name)) => format!("{path}.{name}"),
                        (None, None) if at_root => "body".to_string(),
                        (None, None) => path,
                    };
                    Err(ApiError::invalid_field(&field, format!("{field}: {msg}")))
                }
            }
        }
    }
}

/// serde's words for what a field should be, in the API's terms: no Rust type names (`expected
/// struct CreateOrderBody`, `expected i64`) in a client's error.
fn plain_words(msg: &str) -> String {
    const TYPES: [(&str, &str); 16] = [
        ("i8", "an integer"),
        ("i16", "an integer"),
        ("i32", "an integer"),
        ("i64", "an integer"),
        ("i128", "an integer"),
        ("isize", "an integer"),
        ("u8", "a non-negative integer"),
        ("u16", "a non-negative integer"),
        ("u32", "a non-negative integer"),
        ("u64", "a non-negative integer"),
        ("u128", "a non-negative integer"),
        ("usize", "a non-negative integer"),
        ("f32", "a number"),
        ("f64", "a number"),
        ("a sequence", "an array"),
        ("a map", "an object"),
    ];
    let word_end = |s: &str| {
        s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len())
    };
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(at) = rest.find("expected ") {
        out.push_str(&rest[..at + "expected ".len()]);
        rest = &rest[at + "expected ".len()..];
        if let Some(after) = rest.strip_prefix("struct ") {
            out.push_str("an object");
            rest = &after[word_end(after)..];
            continue;
        }
        if let Some(after) = rest.strip_prefix("enum ") {
            out.push_str("one of the allowed values");
            rest = &after[word_end(after)..];
            continue;
        }
        for (name, plain) in TYPES {
            if let Some(after) = rest.strip_prefix(name)
                && word_end(after) == 0
            {
                out.push_str(plain);
                rest = after;
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A query string: every key and value through [`text::check`] (422 naming it), then into `T`
/// (422 naming the parameter when the shape is wrong, an unknown parameter included).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned> FromRequestParts<AppState> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &AppState) -> Result<Self, Self::Rejection> {
        parse_query(parts.uri.query().unwrap_or("")).map(ApiQuery)
    }
}

/// Parses a query string into `T` after checking every decoded key and value.
pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if let Err(p) = text::check(&k) {
            let shown: String = k.chars().take_while(|c| !c.is_control()).take(64).collect();
            return Err(text::refusal(if shown.is_empty() { "query" } else { &shown }, &p));
        }
        text::check_field(&k, &v)?;
    }
    serde_urlencoded::from_str::<T>(query).map_err(|e| {
        let msg = e.to_string();
        let field = unknown_field_name(&msg)
            .or_else(|| missing_field_name(&msg))
            .or_else(|| duplicate_field_name(&msg))
            .unwrap_or("query")
            .to_string();
        ApiError::invalid_field(&field, format!("invalid query: {msg}"))
    })
}

fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

fn unknown_field_name(msg: &str) -> Option<&str> {
    msg.strip_prefix("unknown field `")?.split('`').next()
}

fn duplicate_field_name(msg: &str) -> Option<&str> {
    msg.strip_prefix("duplicate field `")?.split('`').next()
}

fn missing_field_name(msg: &str) -> Option<&str> {
    msg.strip_prefix("missing field `")?.split('`').next()
}

/// The authenticated caller, from a valid, unrevoked Bearer access token.
#[derive(Debug, Clone)]
pub struct AuthUser(pub Claims);

impl AuthUser {
    /// The caller's user id.
    pub fn user_id(&self) -> i32 {
        self.0.user_id()
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is case-insensitive, and one
/// or more spaces follow it (RFC 9110 §11.1 and §11.4); only `Bearer` and `bearer` were read
/// before, so `BEARER <token>` was refused.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthenticated("a Bearer access token is required"))?;
        let value = header
            .to_str()
            .map_err(|_| ApiError::unauthorized("the Authorization header is malformed"))?;
        let token = bearer_token(value)
            .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer <token>`"))?;
        let claims = state
            .auth
            .verify_access_token(token)
            .map_err(|_| ApiError::unauthorized("the access token is invalid or expired"))?;
        if state.auth.is_revoked(&state.db, &claims).await? {
            return Err(ApiError::unauthorized("the access token has been revoked"));
        }
        tracing::Span::current().record("user_id", claims.user_id());
        Ok(AuthUser(claims))
    }
}

/// An authenticated caller with the `admin` role (403 for other roles).
#[derive(Debug, Clone)]
pub struct AdminUser(pub Claims);

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let AuthUser(claims) = AuthUser::from_request_parts(parts, state).await?;
        if !claims.has_role(Role::Admin) {
            return Err(ApiError::forbidden("this endpoint requires the admin role"));
        }
        Ok(AdminUser(claims))
    }
}

#[cfg(test)]
mod bearer_tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_follows_a_space() {
        for ok in [
            "Bearer t.k.n",
            "bearer t.k.n",
            "BEARER t.k.n",
            "BeArEr t.k.n",
            "Bearer   t.k.n  ",
        ] {
            assert_eq!(bearer_token(ok), Some("t.k.n"), "{ok:?}");
        }
        for bad in [
            "Basic t.k.n",
            "Bearert.k.n",
            "Bearer",
            "Bearer ",
            "Bearer\tt.k.n",
            "t.k.n",
            "",
        ] {
            assert_eq!(bearer_token(bad), None, "{bad:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    //! Property tests of the body and query parsers: whatever the bytes, the answer is a value
    //! that passed every rule or a 400/422 problem, never a panic and never a 5xx.
    use proptest::prelude::*;
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Login {
        email: String,
        password: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Page {
        limit: Option<String>,
        cursor: Option<String>,
    }

    #[test]
    fn serde_words_become_the_api_s() {
        assert_eq!(
            plain_words("invalid type: floating point `1e+23`, expected i64"),
            "invalid type: floating point `1e+23`, expected an integer"
        );
        assert_eq!(
            plain_words("invalid type: sequence, expected struct CreateOrderBody"),
            "invalid type: sequence, expected an object"
        );
        assert_eq!(
            plain_words("invalid type: integer `2`, expected a sequence"),
            "invalid type: integer `2`, expected an array"
        );
        assert_eq!(
            plain_words("invalid value: integer `-1`, expected u32"),
            "invalid value: integer `-1`, expected a non-negative integer"
        );
        assert_eq!(
            plain_words("unknown variant `x`, expected one of `a`, `b`"),
            "unknown variant `x`, expected one of `a`, `b`"
        );
        assert_eq!(plain_words("expected i64x"), "expected i64x");
    }

    /// JSON's whitespace (not Rust's: a vertical tab is trailing data).
    fn json_blank(s: &str) -> bool {
        s.chars().all(|c| matches!(c, ' ' | '\t' | '\r' | '\n'))
    }

    fn client_error(e: &ApiError) -> bool {
        matches!(e.0.status.as_u16(), 400 | 422)
    }

    fn json_ish() -> impl Strategy<Value = String> {
        // Fragments of JSON glued at random, with strings of any characters (control ones
        // included) written the way a serializer would, and junk after them.
        let fragment = prop_oneof![
            Just("{".to_string()),
            Just("}".to_string()),
            Just("[".to_string()),
            Just("]".to_string()),
            Just(",".to_string()),
            Just(":".to_string()),
            Just("\"email\"".to_string()),
            Just("\"password\"".to_string()),
            Just("null".to_string()),
            Just("1e999".to_string()),
            Just("-0".to_string()),
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            any::<i64>().prop_map(|n| n.to_string()),
            "[ \t\r\n]{0,3}",
        ];
        prop::collection::vec(fragment, 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_bytes_are_a_value_or_a_client_error(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Err(e) = parse_json::<Login>(&bytes) {
                prop_assert!(client_error(&e), "{e}");
            }
        }

        #[test]
        fn json_ish_text_is_a_value_or_a_client_error(text in json_ish()) {
            if let Err(e) = parse_json::<Login>(text.as_bytes()) {
                prop_assert!(client_error(&e), "{e}");
            }
        }

        #[test]
        fn an_accepted_login_holds_only_checked_strings(email in any::<String>(), password in any::<String>(), tail in "[ \t\r\n]{0,3}|[^ \t\r\n]{1,3}") {
            let body = format!("{}{tail}", serde_json::json!({"email": email, "password": password}));
            match parse_json::<Login>(body.as_bytes()) {
                Ok(l) => {
                    prop_assert!(text::check(&l.email).is_ok() && text::check(&l.password).is_ok());
                    prop_assert!(json_blank(&tail), "trailing data accepted: {tail:?}");
                }
                Err(e) => {
                    prop_assert!(client_error(&e), "{e}");
                    let clean = text::check(&email).is_ok() && text::check(&password).is_ok();
                    prop_assert!(!(clean && json_blank(&tail)), "a clean body was refused: {e}");
                }
            }
        }

        #[test]
        fn any_query_is_a_value_or_a_422(query in any::<String>()) {
            match parse_query::<Page>(&query) {
                Ok(p) => {
                    for v in [p.limit, p.cursor].into_iter().flatten() {
                        prop_assert!(text::check(&v).is_ok());
                    }
                }
                Err(e) => prop_assert_eq!(e.0.status.as_u16(), 422),
            }
        }
    }
}
