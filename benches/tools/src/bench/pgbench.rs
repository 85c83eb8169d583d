//! The Postgres ceiling: PostgreSQL's pgbench running the saga's own write set.
//!
//! One pgbench transaction script = one order = the three commits the service makes for it, with
//! the same statements (`src/saga/store.rs`, `src/outbox/mod.rs`): create (idempotency key with the
//! order id from the sequence, order placeholder, saga row, outbox rows), reservation + persist_order
//! (fenced row lock, order items, order total, step history, saga update, outbox rows) and shipment
//! (fenced row lock, order confirmation, step history, saga update with its answer, outbox rows,
//! NOTIFY). Values (JSON documents, history rows, events per commit) are copied from a saga the
//! service completed in the same database, so sizes match; ids are fresh per order. Remote calls
//! are not part of it: this is what the database alone can do for the saga.

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
}

fn outbox_insert(events: &[&Event]) -> String {
    if events.is_empty() {
        return String::new();
    }
    let col = |f: &dyn Fn(&Event) -> String| events.iter().map(|e| f(e)).collect::<Vec<_>>().join(", ");
    format!(
        "insert into outbox (topic, message_key, event_id, event_type, payload, headers) select * from unnest(array[{}]::text[], array[{}]::text[], array[{}]::uuid[], array[{}]::text[], array[{}]::json[], array[{}]::jsonb[]);\n",
        col(&|e| lit(&e.topic)),
        col(&|_| ":order_id".into()),
        col(&|_| "gen_random_uuid()".into()),
        col(&|e| lit(&e.event_type)),
        col(&|e| lit(&e.payload)),
        col(&|e| lit(&e.headers)),
    )
}

fn steps_insert(steps: &[&Step]) -> String {
    if steps.is_empty() {
        return String::new();
    }
    let col = |f: &dyn Fn(&Step) -> String| steps.iter().map(|s| f(s)).collect::<Vec<_>>().join(", ");
    format!(
        "insert into saga_steps (saga_id, step, kind, attempt, started_at, outcome, error_class, error, idempotency_key, downstream_status, worker) select :saga_id::uuid, *, 'bench-worker' from unnest(array[{}]::text[], array[{}]::text[], array[{}]::int[], array[{}]::timestamptz[], array[{}]::text[], array[{}]::text[], array[{}]::text[], array[{}]::text[], array[{}]::int[]);\n",
        col(&|s| lit(&s.step)),
        col(&|s| lit(&s.kind)),
        col(&|s| s.attempt.to_string()),
        col(&|_| "now()".into()),
        col(&|s| lit(&s.outcome)),
        col(&|s| opt_lit(&s.error_class)),
        col(&|s| opt_lit(&s.error)),
        col(&|s| opt_lit(&s.key)),
        col(&|s| s.status.map(|v| v.to_string()).unwrap_or("null".into())),
    )
}

/// Builds the script from the newest completed saga of the database.
async fn script(pool: &PgPool) -> anyhow::Result<String> {
    // The newest completed saga that went through without a retry: three commits.
    let (saga_id, order_id, input, data, answer, trace): (
        uuid::Uuid,
        i32,
        String,
        String,
        String,
        String,
    ) = sqlx::query_as(
        "select s.saga_id, s.order_id, s.input::text, s.data::text, s.answer::text, s.trace_context::text
           from sagas s
          where s.state = 'completed'
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
    );
    let steps: Vec<Step> = sqlx::query_as::<_, StepRow>(
        "select finished_at, step, kind, attempt, outcome, error_class, error, idempotency_key, downstream_status
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
    let products = items
        .iter()
        .map(|i| i.0.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let quantities = items
        .iter()
        .map(|i| i.1.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let prices = items.iter().map(|i| i.2.clone()).collect::<Vec<_>>().join(",");
    let lock = "select cancel_requested, answered_pending, state, step, attempt from sagas where saga_id = :saga_id and fence = 1 for update;\n";
    let mut s = String::new();
    writeln!(
        s,
        "-- The saga's write set, one order per script; copied from saga {saga_id}."
    )?;
    writeln!(s, "\\set uid random({min_uid}, {max_uid})")?;
    // Commit 1: create.
    s.push_str("BEGIN;\n");
    // One statement, as `saga::store::create`: the key, the placeholder order and the saga.
    writeln!(
        s,
        "with k as (insert into idempotency_keys (user_id, key, request_hash, saga_id, order_id) values (:uid, 'pgbench-' || gen_random_uuid(), decode('{hex}', 'hex'), gen_random_uuid(), nextval('orders_order_id_seq')::int) on conflict (user_id, key) do nothing returning order_id, saga_id), o as (insert into orders (order_id, user_id, status, saga_id) select order_id, :uid, 'pending', saga_id from k returning order_id, order_date, saga_id), s as (insert into sagas (saga_id, saga_type, definition_version, order_id, user_id, state, step, attempt, next_attempt_at, lease_owner, lease_expires_at, fence, input, trace_context, deadline_at, created_at, step_name) select o.saga_id, 'create_order', 1, o.order_id, :uid, 'running', 0, 0, o.order_date, 'bench-worker', case when 'bench-worker'::text is not null then now() + interval '30 seconds' end, 1, {}::jsonb, {}::jsonb, o.order_date + interval '15 minutes', o.order_date, 'reserve_inventory' from o) select order_id, saga_id, order_date from o \\gset",
        lit(&input),
        lit(&trace)
    )?;
    s.push_str(&outbox_insert(&ev(0)));
    s.push_str("COMMIT;\n");
    // Commit 2: the reservation's outcome and persist_order.
    s.push_str("BEGIN;\n");
    s.push_str(lock);
    // One statement, as `saga::store::persist_order`: the lines and the total.
    writeln!(
        s,
        "with i as (insert into order_items (order_id, product_id, quantity, price) select :order_id::int, * from unnest('{{{products}}}'::int[], '{{{quantities}}}'::int[], '{{{prices}}}'::numeric[]) returning order_item_id, product_id, quantity, price), u as (update orders set total_amount = {total}, currency = {} where order_id = :order_id) select * from i;",
        lit(&currency)
    )?;
    s.push_str(&steps_insert(&st(1)));
    writeln!(
        s,
        "update sagas set state = 'running', step = 2, attempt = 0, next_attempt_at = now(), data = {}::jsonb, failure = null, last_error = null, last_error_class = null, lease_owner = case when true then lease_owner end, lease_expires_at = case when true then now() + interval '30 seconds' end, answer = coalesce(answer, null::jsonb), updated_at = now(), finished_at = case when false then now() end, step_name = 'create_shipment' where saga_id = :saga_id;",
        lit(&data)
    )?;
    s.push_str(&outbox_insert(&ev(1)));
    s.push_str("COMMIT;\n");
    // Commit 3: the shipment's outcome; the saga completes and wakes waiters.
    s.push_str("BEGIN;\n");
    s.push_str(lock);
    writeln!(
        s,
        "update orders set shipment_id = {}, status = case when status = 'pending' then 'confirmed' else status end where order_id = :order_id;",
        lit(&shipment_id)
    )?;
    s.push_str(&steps_insert(&st(2)));
    writeln!(
        s,
        "update sagas set state = 'completed', step = 3, attempt = 0, next_attempt_at = null, data = {}::jsonb, failure = null, last_error = null, last_error_class = null, lease_owner = case when false then lease_owner end, lease_expires_at = case when false then now() + interval '30 seconds' end, answer = coalesce(answer, {}::jsonb), updated_at = now(), finished_at = case when true then now() end, step_name = 'create_shipment' where saga_id = :saga_id;",
        lit(&data),
        lit(&answer)
    )?;
    s.push_str(&outbox_insert(&ev(2)));
    writeln!(
        s,
        "select pg_notify({}, {} || :saga_id || {});",
        lit(ostore_orders::saga::store::CHANNEL),
        lit("finished:"),
        lit(" bench-worker")
    )?;
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
