//! The Postgres ceiling: PostgreSQL's pgbench running the saga's own write set.
//!
//! One pgbench transaction script = one order = the three commits the service makes for it, each
//! statement the service's own, taken from `ostore_orders::saga::store` (`LOCK_MANY_SQL`,
//! `STAGE_WRITES_SQL`) and `ostore_orders::orders::store` (CreateOrder's
//! `CREATE_ORDER_SAGA_SQL`, `PERSIST_ORDER_SQL`, `CONFIRM_ORDER_SQL`), the constants the stores
//! run, rendered with literals and pgbench variables where the service binds values, so the script cannot drift from the service: create
//! (idempotency key with the order id from the sequence, order placeholder, saga row) and its
//! events; reservation + persist_order (row lock, order items and total, saga update, step
//! history and events in one statement) and shipment (row lock, order confirmation, saga update
//! with its answer, history, events and the NOTIFY). Values (JSON documents, history rows, events
//! per commit) are copied from a saga the service completed in the same database, so sizes match;
//! ids are fresh per order. Remote calls are not part of it: this is what the database alone can
//! do for the saga.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use sqlx::PgPool;
use time::OffsetDateTime;

/// What pgbench reported.
#[derive(Debug)]
pub struct PgbenchResult {
    /// Scripts (orders) per second, without connection time.
    pub tps: f64,
    /// Mean latency of one script (one order's three commits), ms.
    pub latency_avg_ms: f64,
    /// Scripts run.
    pub transactions: u64,
    /// The script file (kept for reading).
    pub script: String,
    /// CPU ms PostgreSQL's backends used per script (sampled a second into the run).
    pub db_cpu_ms_per_order: Option<f64>,
}

/// A SQL string literal; text pgbench would read as a variable (`:name`) is base64-encoded.
fn lit(s: &str) -> String {
    if s.contains(':') || s.contains('\\') {
        let b = base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
        format!("convert_from(decode('{b}', 'base64'), 'UTF8')")
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

fn opt_lit(s: &Option<String>) -> String {
    match s {
        Some(s) => lit(s),
        None => "null".into(),
    }
}

struct Event {
    at: OffsetDateTime,
    topic: String,
    event_type: String,
    payload: String,
    headers: String,
}

struct Step {
    at: OffsetDateTime,
    step: String,
    kind: String,
    attempt: i32,
    outcome: String,
    error_class: Option<String>,
    error: Option<String>,
    key: Option<String>,
    status: Option<i32>,
    duration_ms: Option<i32>,
}

/// `sql` with each `$N` replaced by `params[N - 1]`: a statement of the service, rendered for
/// pgbench with literals and pgbench variables where the service binds values.
fn render(sql: &str, params: &[String]) -> anyhow::Result<String> {
    let mut out = String::with_capacity(sql.len() * 2);
    let mut chars = sql.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let mut end = i + 1;
        while let Some((j, d)) = chars.peek().copied() {
            if !d.is_ascii_digit() {
                break;
            }
            end = j + 1;
            chars.next();
        }
        let n: usize = sql[i + 1..end]
            .parse()
            .with_context(|| format!("pgbench: a `$` that is no parameter in {sql}"))?;
        let p = params
            .get(n.wrapping_sub(1))
            .with_context(|| format!("pgbench: no value for ${n}"))?;
        write!(out, "({p})")?;
    }
    Ok(out)
}

/// An array of the rendered `items` (the statement casts it), `'{}'` when there is none.
fn array(items: impl IntoIterator<Item = String>) -> String {
    let items: Vec<String> = items.into_iter().collect();
    if items.is_empty() {
        "'{}'".into()
    } else {
        format!("array[{}]", items.join(", "))
    }
}

/// The saga id of one script run, the same expression everywhere: pgbench's random numbers
/// (`\set` has no uuid) as the 32 hex digits of a uuid.
const SAGA_ID: &str = "(lpad(to_hex(:s1::int), 8, '0') || lpad(to_hex(:s2::int), 8, '0') || lpad(to_hex(:s3::int), 8, '0') || lpad(to_hex(:s4::int), 8, '0'))::uuid";

/// The worker and lease the script's sagas are written with.
const WORKER: &str = "'bench-worker'";
const LEASE: &str = "interval '30 seconds'";

/// `STAGE_WRITES_SQL` for one commit: its history rows, its events, and wake-ups.
fn stage_writes(
    steps: &[&Step],
    events: &[&Event],
    notify: &[String],
    update: Option<&SagaUpdate>,
) -> anyhow::Result<String> {
    let h = |f: &dyn Fn(&Step) -> String| array(steps.iter().map(|s| f(s)));
    let e = |f: &dyn Fn(&Event) -> String| array(events.iter().map(|e| f(e)));
    let num = |v: Option<i32>| v.map_or("null".into(), |v| v.to_string());
    render(
        ostore_orders::saga::store::STAGE_WRITES_SQL,
        &[
            h(&|_| SAGA_ID.into()),
            h(&|s| lit(&s.step)),
            h(&|s| lit(&s.kind)),
            h(&|s| s.attempt.to_string()),
            h(&|_| "now()".into()),
            h(&|s| lit(&s.outcome)),
            h(&|s| opt_lit(&s.error_class)),
            h(&|s| opt_lit(&s.error)),
            h(&|s| opt_lit(&s.key)),
            h(&|s| num(s.status)),
            h(&|_| WORKER.into()),
            e(&|e| lit(&e.topic)),
            e(&|_| ":order_id".into()),
            e(&|_| "gen_random_uuid()".into()),
            e(&|e| lit(&e.event_type)),
            e(&|e| lit(&e.payload)),
            e(&|e| format!("{}::jsonb", lit(&e.headers))),
            lit(ostore_orders::wake::CHANNEL),
            array(notify.iter().cloned()),
            h(&|s| num(s.duration_ms)),
        ]
        .into_iter()
        .chain(update_params(update))
        .collect::<Vec<_>>(),
    )
}

/// What `STAGE_WRITES_SQL` writes to the script's saga row after a commit.
struct SagaUpdate<'a> {
    state: &'a str,
    step: i32,
    next_now: bool,
    data: &'a str,
    keep: bool,
    answer: Option<&'a str>,
    finished: bool,
    step_name: &'a str,
}

/// `STAGE_WRITES_SQL`'s saga-row parameters ($21–$35): the script's saga, or none.
fn update_params(u: Option<&SagaUpdate>) -> Vec<String> {
    let Some(u) = u else {
        let empty = || "'{}'".to_string();
        let mut v: Vec<String> = (0..13).map(|_| empty()).collect();
        v.push(LEASE.into());
        v.push(empty());
        return v;
    };
    let one = |v: String| format!("array[{v}]");
    vec![
        one(SAGA_ID.into()),
        one(lit(u.state)),
        one(u.step.to_string()),
        one("0".into()),
        one(if u.next_now {
            "now()".into()
        } else {
            "null::timestamptz".into()
        }),
        one(format!("{}::jsonb", lit(u.data))),
        one("null::jsonb".into()),
        one("null::text".into()),
        one("null::text".into()),
        one(u.keep.to_string()),
        one(u
            .answer
            .map_or("null::jsonb".into(), |a| format!("{}::jsonb", lit(a)))),
        one(u.finished.to_string()),
        one(lit(u.step_name)),
        LEASE.into(),
        one("null::jsonb".into()),
    ]
}

/// Builds the script from the newest completed saga of the database.
async fn script(pool: &PgPool) -> anyhow::Result<String> {
    use ostore_orders::orders::store as order_store;
    use ostore_orders::saga::store;
    // The newest completed saga that went through without a retry: three commits.
    type SagaRow = (uuid::Uuid, i32, String, i32, String, String, String, String);
    let (saga_id, order_id, saga_type, version, input, data, answer, trace): SagaRow = sqlx::query_as(
        "select s.saga_id, s.order_id, s.saga_type, s.definition_version, s.input::text, s.data::text,
                s.answer::text, s.trace_context::text
           from sagas s
          where s.state = 'completed' and s.order_id is not null
            and (select count(*) from saga_steps h where h.saga_id = s.saga_id and h.outcome <> 'succeeded') = 0
          order by s.created_at desc limit 1",
    )
    .fetch_optional(pool)
    .await?
    .context("pgbench: no completed saga to copy the write set from (did the service complete any order?)")?;
    let hash: Vec<u8> = sqlx::query_scalar("select request_hash from idempotency_keys where saga_id = $1")
        .bind(saga_id)
        .fetch_one(pool)
        .await?;
    let (shipment_id, total, currency): (String, String, String) =
        sqlx::query_as("select shipment_id, total_amount::text, currency from orders where order_id = $1")
            .bind(order_id)
            .fetch_one(pool)
            .await?;
    let items: Vec<(i32, i32, String)> = sqlx::query_as(
        "select product_id, quantity, price::text from order_items where order_id = $1 order by order_item_id",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await?;
    let events: Vec<Event> = sqlx::query_as::<_, (OffsetDateTime, String, String, String, String)>(
        "select created_at, topic, event_type, payload::text, headers::text from outbox
          where message_key = $1 and payload->>'sagaID' = $2 order by id",
    )
    .bind(order_id.to_string())
    .bind(saga_id.to_string())
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(at, topic, event_type, payload, headers)| Event {
        at,
        topic,
        event_type,
        payload,
        headers,
    })
    .collect();
    type StepRow = (
        OffsetDateTime,
        String,
        String,
        i32,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<i32>,
        Option<i32>,
    );
    let steps: Vec<Step> = sqlx::query_as::<_, StepRow>(
        "select finished_at, step, kind, attempt, outcome, error_class, error, idempotency_key, downstream_status,
                duration_ms
           from saga_steps where saga_id = $1 order by id",
    )
    .bind(saga_id)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| Step {
        at: r.0,
        step: r.1,
        kind: r.2,
        attempt: r.3,
        outcome: r.4,
        error_class: r.5,
        error: r.6,
        key: r.7,
        status: r.8,
        duration_ms: r.9,
    })
    .collect();
    // Commits are told apart by their transaction time (`now()` in the column defaults).
    let mut commits: Vec<OffsetDateTime> = events.iter().map(|e| e.at).collect();
    commits.dedup();
    anyhow::ensure!(
        commits.len() == 3,
        "pgbench: the sample saga {saga_id} wrote its events in {} commits, not 3",
        commits.len()
    );
    let ev = |i: usize| events.iter().filter(|e| e.at == commits[i]).collect::<Vec<_>>();
    let st = |i: usize| steps.iter().filter(|s| s.at == commits[i]).collect::<Vec<_>>();
    let (min_uid, max_uid): (i32, i32) = sqlx::query_as("select min(user_id), max(user_id) from users")
        .fetch_one(pool)
        .await?;
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let int_array = |v: Vec<String>| format!("'{{{}}}'", v.join(","));
    let step_name = |i: usize| {
        steps
            .iter()
            .filter(|s| s.at == commits[i])
            .map(|s| s.step.clone())
            .next_back()
            .unwrap_or_default()
    };
    let lock = render(store::LOCK_MANY_SQL, &[format!("array[{SAGA_ID}]")])?;
    let mut s = String::new();
    writeln!(
        s,
        "-- The saga's write set, one order per script, with the service's own statements\n-- (ostore_orders::saga::store, ostore_orders::orders::store: *_SQL); values copied from saga {saga_id}."
    )?;
    writeln!(s, "\\set uid random({min_uid}, {max_uid})")?;
    for v in ["s1", "s2", "s3", "s4"] {
        writeln!(s, "\\set {v} random(0, 2147483647)")?;
    }
    // Commit 1: create (the key, the placeholder order and the saga), its events.
    s.push_str("BEGIN;\n");
    let create = render(
        order_store::CREATE_ORDER_SAGA_SQL,
        // One new saga: an array of one element where the service binds one per new saga.
        &[
            array([":uid".into()]),
            array(["'pgbench-' || gen_random_uuid()".into()]),
            array([format!("decode('{hex}', 'hex')")]),
            array([SAGA_ID.into()]),
            lit(&saga_type),
            version.to_string(),
            array([WORKER.into()]),
            LEASE.into(),
            array([format!("{}::jsonb", lit(&input))]),
            array([format!("{}::jsonb", lit(&trace))]),
            "interval '15 minutes'".into(),
            lit(&steps.first().map_or_else(String::new, |h| h.step.clone())),
        ],
    )?;
    writeln!(s, "{create} \\gset")?;
    writeln!(s, "{};", stage_writes(&st(0), &ev(0), &[], None)?)?;
    s.push_str("COMMIT;\n");
    // Commit 2: the reservation's outcome and persist_order.
    s.push_str("BEGIN;\n");
    writeln!(s, "{lock};")?;
    let persist = render(
        order_store::PERSIST_ORDER_SQL,
        &[
            array(items.iter().map(|_| ":order_id::int".to_string())),
            int_array(items.iter().map(|i| i.0.to_string()).collect()),
            int_array(items.iter().map(|i| i.1.to_string()).collect()),
            int_array(items.iter().map(|i| i.2.clone()).collect()),
            array([":order_id::int".into()]),
            array([format!("{total}::numeric")]),
            array([lit(&currency)]),
        ],
    )?;
    writeln!(s, "{persist};")?;
    let running = SagaUpdate {
        state: "running",
        step: 2,
        next_now: true,
        data: &data,
        keep: true,
        answer: None,
        finished: false,
        step_name: &step_name(2),
    };
    writeln!(s, "{};", stage_writes(&st(1), &ev(1), &[], Some(&running))?)?;
    s.push_str("COMMIT;\n");
    // Commit 3: the shipment's outcome; the saga completes and wakes waiters.
    s.push_str("BEGIN;\n");
    writeln!(s, "{lock};")?;
    writeln!(
        s,
        "{};",
        render(
            order_store::CONFIRM_ORDER_SQL,
            &[array([":order_id::int".into()]), array([lit(&shipment_id)])]
        )?
    )?;
    let wake = format!(
        "{} || {SAGA_ID}::text || {}",
        lit("finished:"),
        lit(" bench-worker")
    );
    let completed = SagaUpdate {
        state: "completed",
        step: 3,
        next_now: false,
        data: &data,
        keep: false,
        answer: Some(&answer),
        finished: true,
        step_name: &step_name(2),
    };
    writeln!(s, "{};", stage_writes(&st(2), &ev(2), &[wake], Some(&completed))?)?;
    s.push_str("COMMIT;\n");
    Ok(s)
}

fn field(out: &str, prefix: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Runs pgbench with the write set for `duration` with `clients` connections.
pub async fn run(
    pool: &PgPool,
    url: &str,
    program: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<PgbenchResult> {
    let text = script(pool).await?;
    let path = std::env::temp_dir().join(format!("ostore-bench-write-set-{}.sql", std::process::id()));
    std::fs::write(&path, &text)?;
    let child = tokio::process::Command::new(program)
        .args([
            "--no-vacuum",
            "--protocol=prepared",
            "--client",
            &clients.to_string(),
            "--jobs",
            &clients.clamp(1, 2).to_string(),
            "--time",
            &duration.as_secs().max(1).to_string(),
            "--file",
            &path.to_string_lossy(),
            url,
        ])
        .env("PGAPPNAME", "ostore-bench-pgbench")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("cannot run {program} (install PostgreSQL's client tools, or pass --no-pgbench)")
        })?;
    // Backend CPU over the run: its connections are read once they are all open, and again near
    // the end of the run; the share of the run between the readings scales the transactions.
    let secs = duration.as_secs().max(1) as f64;
    let (skip, window) = if secs >= 4.0 {
        (1.0, secs - 2.0)
    } else {
        (0.0, 0.0)
    };
    let mut cpu = None;
    if window > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(skip)).await;
        let before = crate::bench::backend_cpu(pool, Some("ostore-bench-pgbench")).await;
        tokio::time::sleep(Duration::from_secs_f64(window)).await;
        let after = crate::bench::backend_cpu(pool, Some("ostore-bench-pgbench")).await;
        if let (Some(b), Some(a)) = (before, after) {
            cpu = Some(crate::bench::cpu_delta(&b, &a));
        }
    }
    let out = child.wait_with_output().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "pgbench failed ({}): {stderr}{stdout}\nscript: {}",
        out.status,
        path.display()
    );
    let tps = field(&stdout, "tps =").with_context(|| format!("pgbench printed no tps: {stdout}"))?;
    let latency = field(&stdout, "latency average =").with_context(|| format!("no latency: {stdout}"))?;
    let transactions = field(&stdout, "number of transactions actually processed:").unwrap_or(0.0) as u64;
    Ok(PgbenchResult {
        tps,
        latency_avg_ms: latency,
        transactions,
        script: path.to_string_lossy().into_owned(),
        db_cpu_ms_per_order: cpu.map(|c| c * 1000.0 / (tps * window)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_hide_colons_from_pgbench_and_escape_quotes() {
        assert_eq!(lit("it's"), "'it''s'");
        let l = lit(r#"{"a":1}"#);
        assert!(!l.contains(':'), "{l}");
        assert!(l.starts_with("convert_from(decode('"));
    }

    #[test]
    fn statements_are_rendered_with_each_parameter_in_its_place() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let params = p(&["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"]);
        assert_eq!(
            render("select $1, $12::int[], $2 from t where x = $1", &params).unwrap(),
            "select (a), (l)::int[], (b) from t where x = (a)"
        );
        assert!(render("select $3", &p(&["a"])).is_err());
        assert!(render("select $x", &p(&["a"])).is_err());
        use ostore_orders::orders::store as order_store;
        use ostore_orders::saga::store;
        for (sql, n) in [
            (order_store::CREATE_ORDER_SAGA_SQL, 12),
            (store::CREATE_SQL, 12),
            (order_store::PERSIST_ORDER_SQL, 7),
            (order_store::CONFIRM_ORDER_SQL, 2),
            (store::STAGE_WRITES_SQL, 35),
            (store::LOCK_MANY_SQL, 1),
        ] {
            let out = render(sql, &params.iter().cycle().take(n).cloned().collect::<Vec<_>>()).unwrap();
            assert!(!out.contains('$'), "{out}");
        }
    }

    #[test]
    fn pgbench_summary_fields_are_read() {
        let out = "number of transactions actually processed: 1234\nlatency average = 25.612 ms\ntps = 1249.51 (without initial connection time)\n";
        assert_eq!(field(out, "tps ="), Some(1249.51));
        assert_eq!(field(out, "latency average ="), Some(25.612));
        assert_eq!(
            field(out, "number of transactions actually processed:"),
            Some(1234.0)
        );
    }
}
