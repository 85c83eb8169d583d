//! Values written into SQL text for the shared commit's flights (`db::literal`): what PostgreSQL
//! reads back is what was written, whatever the text holds, through a statement prepared on each
//! connection of a pool (`db::pool_preparing`), as the committers run theirs.

use std::str::FromStr;
use std::time::Duration;

use ostore_orders::db::literal::{Bytea, Interval, Prepared};
use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;
use sqlx::postgres::types::PgInterval;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::support::TestDb;

const INSERT: Prepared = Prepared {
    name: "lit_insert",
    sql: "insert into lit_values (texts, one_text, docs, blobs, times, span, ints, flags, ids) \
          values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
};

type Read = (
    Vec<Option<String>>,
    Option<String>,
    Vec<Option<Value>>,
    Vec<Vec<u8>>,
    Vec<OffsetDateTime>,
    PgInterval,
    Vec<i32>,
    Vec<bool>,
    Vec<Uuid>,
);

#[tokio::test]
async fn hostile_text_json_and_binary_values_read_back_as_written() {
    let db = TestDb::new().await;
    let plain = db.pool().await;
    sqlx::query(
        "create table lit_values (texts text[], one_text text, docs jsonb[], blobs bytea[], \
         times timestamptz[], span interval, ints int[], flags bool[], ids uuid[])",
    )
    .execute(&plain)
    .await
    .unwrap();
    let pool = ostore_orders::db::pool_preparing(PgConnectOptions::from_str(&db.url).unwrap(), 1, &[INSERT]);

    let hostile = "'; delete from lit_values; -- \\' \\\\ \" {a,b} $$ $x$ E'\\x41' NULL";
    let texts: Vec<Option<&str>> = vec![
        Some("plain"),
        Some("it's"),
        Some(r"back\slash"),
        Some(r#""quoted""#),
        Some("{braces},comma"),
        Some("NULL"),
        None,
        Some(""),
        Some(" spaced "),
        Some("ünïcødé ✓ 🚀"),
        Some("line\nbreak\ttab\r"),
        Some(hostile),
    ];
    let docs: Vec<Option<Value>> = vec![
        Some(json!({"k": hostile, "n": [1, null, 2.5], "nested": {"q": "\"\\"}})),
        None,
        Some(json!("NULL")),
        Some(Value::Null),
        Some(json!([])),
    ];
    let all_bytes: Vec<u8> = (0..=255).collect();
    let blobs = vec![Bytea(&all_bytes), Bytea(&[]), Bytea(b"\\x00'")];
    let t = OffsetDateTime::now_utc();
    let times = vec![
        t,
        t + Duration::from_nanos(999),
        time::macros::datetime!(2000-01-01 00:00:00.000001 UTC),
    ];
    let ints = vec![i32::MIN, -1, 0, i32::MAX];
    let flags = vec![true, false];
    let ids = vec![Uuid::new_v4(), Uuid::nil()];

    let sql = INSERT
        .execute()
        .arg(&texts)
        .arg(hostile)
        .arg(&docs)
        .arg(&blobs)
        .arg(&times)
        .arg(&Interval(Duration::from_micros(1_500_001)))
        .arg(&ints)
        .arg(&flags)
        .arg(&ids)
        .finish()
        .unwrap();
    // Two flights on the pool's one connection: the statement was prepared when it was made.
    for _ in 0..2 {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&pool)
            .await
            .unwrap();
    }

    let rows: Vec<Read> = sqlx::query_as("select * from lit_values")
        .fetch_all(&plain)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "both rows written, nothing deleted");
    for r in rows {
        let want: Vec<Option<String>> = texts.iter().map(|s| s.map(str::to_string)).collect();
        assert_eq!(r.0, want);
        assert_eq!(r.1.as_deref(), Some(hostile));
        assert_eq!(r.2, docs);
        assert_eq!(r.3, vec![all_bytes.clone(), Vec::new(), b"\\x00'".to_vec()]);
        let micros = |t: OffsetDateTime| t.unix_timestamp_nanos() / 1000;
        assert_eq!(
            r.4.iter().map(|t| micros(*t)).collect::<Vec<_>>(),
            times.iter().map(|t| micros(*t)).collect::<Vec<_>>()
        );
        assert_eq!((r.5.months, r.5.days, r.5.microseconds), (0, 0, 1_500_001));
        assert_eq!(r.6, ints);
        assert_eq!(r.7, flags);
        assert_eq!(r.8, ids);
    }
}

#[tokio::test]
async fn a_nul_character_is_refused_before_anything_is_sent() {
    let e = INSERT.execute().arg(&vec![Some("a\0b")]).finish();
    assert!(e.is_err());
    let e = INSERT.execute().arg(&json!({"k": "fine"})).arg("x\0").finish();
    assert!(e.is_err());
}
