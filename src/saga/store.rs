//! The SQL of the `sagas` and `saga_steps` tables (their one owner): creating a saga, claiming due
//! sagas under a lease, locking a saga for a fenced write, writing a transition with its history
//! and outbox events, what `POST /orders` and a cancellation read and write of a saga, and the
//! wake-up NOTIFY (its protocol: `crate::wake`). Every function takes a connection (usually a
//! transaction) so a state change and its outbox rows commit together.
//!
//! This store is also the unit-of-work writer of the shared commit: where one statement writes
//! several tables for speed it is here, and says so (the generic new-saga insert writes the
//! idempotency record with the saga; the batch's history statement writes the outbox and sends the
//! NOTIFY). CreateOrder's new-saga insert, which also writes the order placeholder, is the orders
//! store's (`orders::store::CREATE_ORDER_SAGA_SQL`), run here through the type's hooks. A saga
//! type's own changes of a transition (CreateOrder: the order's) are its hooks' SQL
//! (`SagaHooks::apply_many`), run in the same transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgConnection;
use sqlx::postgres::types::PgInterval;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::outbox::{self, NewEvent, Topics};
use crate::saga::machine::{Effect, Failure, FailureClass, HookEffect, Saga, SagaHooks, SagaState, Stream};
use crate::wake::{self, Wake};

// The statements of the saga's write path, one definition each: the functions below run them, and
// the benchmark (`ostore-tools bench`) renders them into the pgbench script of the PostgreSQL
// ceiling, so the two cannot drift apart. The checked ones are files (`sql/`, `query_file!`).

/// The keys and the sagas of a shared commit's new sagas of one type, in one statement; a saga
/// whose key exists writes nothing and is missing from the result (`create_many`): the new-saga
/// insert of a saga type whose hooks bring no statement of their own (`SagaHooks::create_sql`).
/// The sagas name no order (`order_id` null). Its binds, which a type's own statement takes too:
/// one array element per new saga for $1 users, $2 keys, $3 request hashes, $4 saga ids, $7 workers
/// (lease holder or null), $9 inputs, $10 trace contexts; one value for all of them for $5 type,
/// $6 version, $8 lease, $11 deadline from now, $12 first step. It returns, per saga written, its
/// id, order id (null here), creation time and deadline.
pub const CREATE_SQL: &str = r#"with n as (
               select * from unnest($1::int[], $2::text[], $3::bytea[], $4::uuid[], $7::text[], $9::jsonb[],
                                    $10::jsonb[])
                   as n(user_id, key, hash, saga_id, worker, input, trace)),
           k as (
               insert into idempotency_keys (user_id, key, request_hash, saga_id, order_id)
               select user_id, key, hash, saga_id, null from n
               on conflict (user_id, key) do nothing
               returning saga_id),
           s as (
               insert into sagas (saga_id, saga_type, definition_version, order_id, user_id, state, step, attempt,
                                  next_attempt_at, lease_owner, lease_expires_at, fence, input, trace_context,
                                  deadline_at, created_at, step_name)
               select k.saga_id, $5, $6, null, n.user_id, 'running', 0, 0, now(), n.worker,
                      case when n.worker is not null then now() + $8 end, 1, n.input, n.trace, now() + $11,
                      now(), $12
                 from k join n using (saga_id)
               returning saga_id, created_at, deadline_at)
           select saga_id, null::int as order_id, created_at, deadline_at from s"#;
/// A shared commit's saga rows, history rows, outbox events and wake-ups in one statement
/// (`Batch::flush`).
pub const STAGE_WRITES_SQL: &str = r#"with h as (
                   insert into saga_steps (saga_id, step, kind, attempt, started_at, outcome, error_class, error,
                                           idempotency_key, downstream_status, worker, duration_ms, finished_at)
                   -- finished_at from the attempt's own clock when it was timed: now() is the
                   -- transaction's start, earlier than a local step that ran inside it.
                   select u.*, coalesce(u.started + make_interval(secs => u.dur / 1000.0), now())
                     from unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::timestamptz[], $6::text[],
                                 $7::text[], $8::text[], $9::text[], $10::int[], $11::text[], $20::int[])
                          as u(saga, step, kind, attempt, started, outcome, class, error, key, status, worker, dur)),
               o as (
                   insert into outbox (topic, message_key, event_id, event_type, payload, headers)
                   select t, k, i, e, p::json, h
                     from unnest($12::text[], $13::text[], $14::uuid[], $15::text[], $16::text[], $17::jsonb[])
                          as u(t, k, i, e, p, h))
               -- The saga rows through their function (migration 0017), evaluated once for the
               -- one row an aggregate always yields, even when there is nothing to wake.
               select count(pg_notify($18, n)),
                      (select count(*) from (select saga_update_many(
                           $21::uuid[], $22::text[], $23::int[], $24::int[], $25::timestamptz[], $26::jsonb[],
                           $27::jsonb[], $28::text[], $29::text[], $30::bool[], $31::jsonb[], $32::bool[],
                           $33::text[], $34, $35::jsonb[])) u)
                 from unnest($19::text[]) n"#;
/// The rows of the sagas a shared commit advances, locked in key order (`Commit::begin_locking`).
pub const LOCK_MANY_SQL: &str = include_str!("sql/lock_many.sql");

fn interval(d: Duration) -> PgInterval {
    PgInterval {
        months: 0,
        days: 0,
        microseconds: d.as_micros().min(i64::MAX as u128) as i64,
    }
}

/// A new saga to insert.
#[derive(Debug, Clone)]
pub struct NewSaga {
    /// Saga id (also the catalog reservation id).
    pub saga_id: Uuid,
    /// The customer.
    pub user_id: i32,
    /// The Idempotency-Key of the request.
    pub idempotency_key: String,
    /// Fingerprint of the request body.
    pub request_hash: Vec<u8>,
    /// What the saga is asked to do (`sagas.input`, the saga type's JSON; CreateOrder:
    /// `orders::saga::input`).
    pub input: Value,
    /// W3C trace context of the request.
    pub trace: HashMap<String, String>,
    /// Saga type.
    pub saga_type: String,
    /// Definition version.
    pub version: i32,
    /// Deadline from now.
    pub deadline: Duration,
    /// Name of the first action.
    pub first_step: String,
}

/// The idempotency record a request key already has.
#[derive(Debug, Clone)]
pub struct ExistingKey {
    /// Fingerprint of the first request.
    pub request_hash: Vec<u8>,
    /// Its saga.
    pub saga_id: Uuid,
    /// Its order (None for a saga that places none).
    pub order_id: Option<i32>,
}

/// Result of trying to create a saga.
#[derive(Debug, Clone)]
pub enum Created {
    /// A new saga, leased to the creating worker.
    New(Box<Saga>),
    /// The key was used before.
    Existing(ExistingKey),
}

/// A new saga of a shared commit, and who leases it (`None`: the poller will).
pub struct ToCreate<'a> {
    /// The saga.
    pub new: &'a NewSaga,
    /// The lease holder.
    pub worker: Option<&'a str>,
}

/// Inserts the idempotency records and the sagas (each leased to its `worker`) of `sagas`, all of
/// one saga type, with the statement of that type ([`CREATE_SQL`] unless its hooks bring their
/// own: CreateOrder's also writes the order placeholders, `orders::store::CREATE_ORDER_SAGA_SQL`),
/// and stages, saga by saga, the `SagaStarted` event and what the type's hooks add when a saga
/// starts (CreateOrder: `OrderCreated`) in `batch`; a saga whose key exists reports the key's
/// earlier use instead. The answers are in the order of `sagas`.
///
/// Unit of work: one statement for all of them writes the idempotency records and the sagas (and,
/// for CreateOrder, the orders) together: one round trip per saga type in the shared commit.
pub async fn create_many(
    conn: &mut PgConnection,
    batch: &mut Batch,
    sagas: &[ToCreate<'_>],
    lease: Duration,
    topics: &Topics,
    hooks: &dyn SagaHooks,
) -> Result<Vec<Created>, sqlx::Error> {
    let Some(first) = sagas.first().map(|c| c.new) else {
        return Ok(Vec::new());
    };
    debug_assert!(sagas.iter().all(|c| c.new.saga_type == first.saga_type
        && c.new.version == first.version
        && c.new.deadline == first.deadline
        && c.new.first_step == first.first_step));
    let traces: Vec<Value> = sagas
        .iter()
        .map(|c| serde_json::to_value(&c.new.trace).unwrap_or(json!({})))
        .collect();
    // One statement: the keys and the sagas (and the type's own rows); none for a key that exists.
    let sql = hooks.create_sql().unwrap_or(CREATE_SQL);
    let rows: Vec<(Uuid, Option<i32>, OffsetDateTime, OffsetDateTime)> = sqlx::query_as(sql)
        .bind(sagas.iter().map(|c| c.new.user_id).collect::<Vec<_>>())
        .bind(
            sagas
                .iter()
                .map(|c| c.new.idempotency_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            sagas
                .iter()
                .map(|c| c.new.request_hash.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(sagas.iter().map(|c| c.new.saga_id).collect::<Vec<_>>())
        .bind(&first.saga_type)
        .bind(first.version)
        .bind(sagas.iter().map(|c| c.worker).collect::<Vec<_>>())
        .bind(interval(lease))
        .bind(sagas.iter().map(|c| &c.new.input).collect::<Vec<_>>())
        .bind(&traces)
        .bind(interval(first.deadline))
        .bind(&first.first_step)
        .fetch_all(&mut *conn)
        .await?;
    let written: HashMap<Uuid, (Option<i32>, OffsetDateTime, OffsetDateTime)> =
        rows.into_iter().map(|(id, o, c, d)| (id, (o, c, d))).collect();
    let mut out = Vec::with_capacity(sagas.len());
    for c in sagas {
        let n = c.new;
        let Some(&(order_id, created_at, deadline_at)) = written.get(&n.saga_id) else {
            let row = sqlx::query!(
                "select request_hash, saga_id, order_id from idempotency_keys where user_id = $1 and key = $2",
                n.user_id,
                n.idempotency_key
            )
            .fetch_one(&mut *conn)
            .await?;
            out.push(Created::Existing(ExistingKey {
                request_hash: row.request_hash,
                saga_id: row.saga_id,
                order_id: row.order_id,
            }));
            continue;
        };
        out.push(started(
            batch,
            n,
            order_id,
            created_at,
            deadline_at,
            topics,
            hooks,
        ));
    }
    Ok(out)
}

/// The saga just written, with its start's events staged in `batch`.
fn started(
    batch: &mut Batch,
    n: &NewSaga,
    order_id: Option<i32>,
    created_at: OffsetDateTime,
    deadline_at: OffsetDateTime,
    topics: &Topics,
    hooks: &dyn SagaHooks,
) -> Created {
    let saga = Saga {
        id: n.saga_id,
        order_id,
        user_id: n.user_id,
        fence: 1,
        state: SagaState::Running,
        step: 0,
        attempt: 0,
        input: n.input.clone(),
        data: json!({}),
        failure: None,
        cancel_requested: None,
        answered_pending: false,
        trace: n.trace.clone(),
        deadline_at,
        next_attempt_at: Some(created_at),
        created_at,
        last_error: None,
        last_error_class: None,
    };
    batch.push_event(
        NewEvent::of_saga(
            &topics.saga_events,
            "SagaStarted",
            order_id,
            n.saga_id,
            json!({"sagaType": n.saga_type, "version": n.version, "userID": n.user_id}),
            &n.trace,
        ),
        None,
    );
    let mut fx = Vec::new();
    hooks.started(&saga, &mut fx);
    for e in fx {
        if let Effect::Event {
            stream,
            event_type,
            data,
        } = e
        {
            let topic = match stream {
                Stream::Saga => &topics.saga_events,
                Stream::Order => &topics.order_events,
            };
            batch.push_event(
                NewEvent::of_saga(topic, event_type, order_id, n.saga_id, data, &n.trace),
                None,
            );
        }
    }
    Created::New(Box::new(saga))
}

struct SagaRow {
    saga_id: Uuid,
    order_id: Option<i32>,
    user_id: i32,
    fence: i64,
    state: String,
    step: i32,
    attempt: i32,
    input: Value,
    data: Value,
    failure: Option<Value>,
    cancel_requested: Option<String>,
    answered_pending: bool,
    trace_context: Value,
    deadline_at: OffsetDateTime,
    next_attempt_at: Option<OffsetDateTime>,
    created_at: OffsetDateTime,
    last_error: Option<String>,
    last_error_class: Option<String>,
}

fn to_saga(r: SagaRow) -> Result<Saga, sqlx::Error> {
    let decode = |what: &str, e: serde_json::Error| {
        sqlx::Error::Decode(format!("saga {}: {what}: {e}", r.saga_id).into())
    };
    let failure: Option<Failure> = match r.failure.clone() {
        Some(v) if !v.is_null() => Some(serde_json::from_value(v).map_err(|e| decode("failure", e))?),
        _ => None,
    };
    let trace: HashMap<String, String> = serde_json::from_value(r.trace_context.clone()).unwrap_or_default();
    Ok(Saga {
        id: r.saga_id,
        order_id: r.order_id,
        user_id: r.user_id,
        fence: r.fence,
        state: SagaState::parse(&r.state)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown saga state {}", r.state).into()))?,
        step: r.step.max(0) as usize,
        attempt: r.attempt.max(0) as u32,
        input: r.input,
        data: r.data,
        failure,
        cancel_requested: r.cancel_requested,
        answered_pending: r.answered_pending,
        trace,
        deadline_at: r.deadline_at,
        next_attempt_at: r.next_attempt_at,
        created_at: r.created_at,
        last_error: r.last_error,
        last_error_class: match r.last_error_class.as_deref() {
            None => None,
            Some(c) => Some(FailureClass::parse(c).ok_or_else(|| {
                sqlx::Error::Decode(format!("saga {}: unknown error class {c}", r.saga_id).into())
            })?),
        },
    })
}

/// Claims up to `limit` due sagas whose lease is free or expired: each claim takes the lease and
/// bumps the fence, so a previous holder can no longer write.
///
/// The open sagas are read by a plain scan of `sagas_unfinished_idx`, never a bitmap scan: under
/// load the index holds an entry for every saga finished since the last vacuum (a saga's last
/// transition changes `state`, so it cannot stay HOT), and a bitmap scan visited each of their
/// heap pages at every poll (8–16 ms twice a second at 2,000 orders/s), where a plain index scan
/// marks the dead entries as it passes them and skips them from then on (0.3–1 ms;
/// docs/performance.md, finding 31).
pub async fn claim_due(
    conn: &mut PgConnection,
    worker: &str,
    lease: Duration,
    limit: i64,
) -> Result<Vec<Saga>, sqlx::Error> {
    use sqlx::Connection as _;
    let mut tx = conn.begin().await?;
    sqlx::raw_sql("set local enable_bitmapscan = off; set local enable_seqscan = off")
        .execute(&mut *tx)
        .await?;
    let rows = sqlx::query_as!(
        SagaRow,
        r#"with due as (
               -- open sagas through sagas_unfinished_idx (no index on next_attempt_at: the
               -- transitions that change it stay HOT, migration 0015)
               select saga_id from sagas
                where state in ('running', 'compensating')
                  and next_attempt_at <= now()
                  and (lease_expires_at is null or lease_expires_at < now())
                order by next_attempt_at
                limit $3
                for update skip locked)
           update sagas s
              set lease_owner = $1, lease_expires_at = now() + $2, fence = s.fence + 1
             from due
            where s.saga_id = due.saga_id
        returning s.saga_id, s.order_id, s.user_id, s.fence, s.state, s.step, s.attempt, s.input, s.data,
                  s.failure, s.cancel_requested, s.answered_pending, s.trace_context, s.deadline_at,
                  s.next_attempt_at, s.created_at, s.last_error, s.last_error_class"#,
        worker,
        interval(lease),
        limit
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    rows.into_iter().map(to_saga).collect()
}

/// Loads a saga (no lease taken).
pub async fn load(conn: &mut PgConnection, saga_id: Uuid) -> Result<Option<Saga>, sqlx::Error> {
    let row = sqlx::query_as!(
        SagaRow,
        r#"select saga_id, order_id, user_id, fence, state, step, attempt, input, data, failure, cancel_requested,
                  answered_pending, trace_context, deadline_at, next_attempt_at, created_at, last_error, last_error_class
             from sagas where saga_id = $1"#,
        saga_id
    )
    .fetch_optional(&mut *conn)
    .await?;
    row.map(to_saga).transpose()
}

/// What a fenced lock sees of the saga row.
#[derive(Debug, Clone)]
pub struct Locked {
    /// The fence in the database.
    pub fence: i64,
    /// A cancellation was asked for.
    pub cancel_requested: Option<String>,
    /// The creating request answered 202.
    pub answered_pending: bool,
    /// The state in the database.
    pub state: String,
    /// The step in the database.
    pub step: i32,
    /// The attempt count in the database.
    pub attempt: i32,
}

/// What one shared commit writes once for all its jobs: step history, saga rows, outbox events and
/// wake-ups (one statement each, whatever the number of sagas in the commit). Jobs stage into it;
/// `flush` writes it just before the commit.
#[derive(Default)]
pub struct Batch {
    h_saga: Vec<Uuid>,
    h_step: Vec<String>,
    h_kind: Vec<String>,
    h_attempt: Vec<i32>,
    h_started: Vec<OffsetDateTime>,
    h_outcome: Vec<String>,
    h_class: Vec<Option<String>>,
    h_error: Vec<Option<String>>,
    h_key: Vec<Option<String>>,
    h_status: Vec<Option<i32>>,
    h_duration: Vec<Option<i32>>,
    h_worker: Vec<String>,
    s_id: Vec<Uuid>,
    s_state: Vec<String>,
    s_step: Vec<i32>,
    s_attempt: Vec<i32>,
    s_next: Vec<Option<OffsetDateTime>>,
    s_data: Vec<Value>,
    s_failure: Vec<Option<Value>>,
    s_error: Vec<Option<String>>,
    s_class: Vec<Option<String>>,
    s_keep: Vec<bool>,
    s_answer: Vec<Option<Value>>,
    s_finished: Vec<bool>,
    s_step_name: Vec<String>,
    s_session: Vec<Option<Value>>,
    events: Vec<NewEvent>,
    /// Per event: the hook effect whose change it reports (written only if that changed anything).
    event_cond: Vec<Option<usize>>,
    hooks: Vec<HookEffect>,
    notify: Vec<String>,
}

impl Batch {
    /// An event to write, or to write only if the hook effect `cond` changed something.
    fn push_event(&mut self, event: NewEvent, cond: Option<usize>) {
        self.events.push(event);
        self.event_cond.push(cond);
    }

    /// Writes everything staged (the saga type's own changes through `hooks`, then history, saga
    /// rows, outbox, NOTIFY) in `conn`'s transaction.
    pub async fn flush(
        &mut self,
        conn: &mut PgConnection,
        lease: Duration,
        hooks: &dyn SagaHooks,
    ) -> Result<(), sqlx::Error> {
        if !self.hooks.is_empty() {
            let changed = hooks.apply_many(conn, &self.hooks).await?;
            if changed.len() != self.hooks.len() {
                return Err(sqlx::Error::Protocol(format!(
                    "{} hook effects answered {} times",
                    self.hooks.len(),
                    changed.len()
                )));
            }
            let cond = std::mem::take(&mut self.event_cond);
            let mut keep = cond.iter().map(|c| c.is_none_or(|i| changed[i]));
            self.events.retain(|_| keep.next().unwrap_or(true));
        }
        // Saga rows, history, outbox and wake-ups in one statement (one round trip); each part is
        // empty-safe.
        if self.s_id.is_empty() && self.h_saga.is_empty() && self.events.is_empty() && self.notify.is_empty()
        {
            *self = Batch::default();
            return Ok(());
        }
        let c = outbox::Columns::of(&self.events);
        sqlx::query(STAGE_WRITES_SQL)
            .bind(&self.h_saga)
            .bind(&self.h_step)
            .bind(&self.h_kind)
            .bind(&self.h_attempt)
            .bind(&self.h_started)
            .bind(&self.h_outcome)
            .bind(&self.h_class)
            .bind(&self.h_error)
            .bind(&self.h_key)
            .bind(&self.h_status)
            .bind(&self.h_worker)
            .bind(&c.topics)
            .bind(&c.keys)
            .bind(&c.ids)
            .bind(&c.types)
            .bind(&c.payloads)
            .bind(&c.headers)
            .bind(wake::CHANNEL)
            .bind(&self.notify)
            .bind(&self.h_duration)
            .bind(&self.s_id)
            .bind(&self.s_state)
            .bind(&self.s_step)
            .bind(&self.s_attempt)
            .bind(&self.s_next)
            .bind(&self.s_data)
            .bind(&self.s_failure)
            .bind(&self.s_error)
            .bind(&self.s_class)
            .bind(&self.s_keep)
            .bind(&self.s_answer)
            .bind(&self.s_finished)
            .bind(&self.s_step_name)
            .bind(interval(lease))
            .bind(&self.s_session)
            .execute(&mut *conn)
            .await?;
        *self = Batch::default();
        Ok(())
    }
}

/// A shared commit's transaction, begun in the round trip that locks the rows of the sagas it
/// advances: `BEGIN` and [`LOCK_MANY_SQL`] go out as one simple query (the saga ids, which are
/// ours, written into it as a `uuid[]` literal), one round trip fewer than a `BEGIN` of its own
/// (docs/performance.md, finding 23). It derefs to its connection for the commit's statements.
/// Dropped without [`Commit::commit`] (a statement failed, the task was cancelled) the connection
/// is closed, never handed back to the pool inside a transaction.
pub struct Commit {
    conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    open: bool,
}

impl Commit {
    /// Begins the transaction on a connection of `pool` and locks the rows of `ids` (in key
    /// order); what each row holds, for the caller to compare fences and states.
    pub async fn begin_locking(
        pool: &sqlx::PgPool,
        ids: &[Uuid],
    ) -> Result<(Commit, HashMap<Uuid, Locked>), sqlx::Error> {
        use sqlx::Row;
        let mut c = Commit {
            conn: pool.acquire().await?,
            open: true,
        };
        if ids.is_empty() {
            sqlx::raw_sql("begin").execute(&mut *c.conn).await?;
            return Ok((c, HashMap::new()));
        }
        let sql = format!("begin; {}", lock_many_literal(ids));
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut *c.conn)
            .await?;
        let locked = rows
            .iter()
            .map(|r| {
                Ok((
                    r.try_get("saga_id")?,
                    Locked {
                        fence: r.try_get("fence")?,
                        cancel_requested: r.try_get("cancel_requested")?,
                        answered_pending: r.try_get("answered_pending")?,
                        state: r.try_get("state")?,
                        step: r.try_get("step")?,
                        attempt: r.try_get("attempt")?,
                    },
                ))
            })
            .collect::<Result<_, sqlx::Error>>()?;
        Ok((c, locked))
    }

    /// Commits (the connection goes back to the pool).
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        sqlx::raw_sql("commit").execute(&mut *self.conn).await?;
        self.open = false;
        Ok(())
    }
}

impl std::ops::Deref for Commit {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for Commit {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

impl Drop for Commit {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

/// [`LOCK_MANY_SQL`] for `ids`, the array written as a literal (a UUID's text is hex digits and
/// dashes only, so nothing in it needs quoting).
fn lock_many_literal(ids: &[Uuid]) -> String {
    let list: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    LOCK_MANY_SQL.replace("$1", &format!("'{{{}}}'::uuid[]", list.join(",")))
}

/// Key of the saga row's `trace_context` entry that holds the `traceparent` of the last session
/// (drive) that wrote to the saga; the next session links to it.
pub const SESSION_TRACE_KEY: &str = "session-traceparent";

/// Stages a transition in `batch`: the saga type's own effects (CreateOrder: order changes, which
/// its hooks write for the whole commit at flush), the saga row, history rows, outbox events (a
/// subject event after a hook effect only if that changed something) and, for a finished saga, its
/// answer and a wake-up for waiters on other instances. `keep_lease` keeps the lease when the
/// worker continues at once.
#[allow(clippy::too_many_arguments)]
pub async fn stage_transition(
    conn: &mut PgConnection,
    batch: &mut Batch,
    saga: &Saga,
    step_name: &str,
    effects: &[(Effect, Arc<HashMap<String, String>>)],
    keep_lease: bool,
    session: Option<&str>,
    topics: &Topics,
    worker: &str,
) -> Result<(), sqlx::Error> {
    let mut answer: Option<Value> = None;
    let mut finished = false;
    // The hook effect the subject's events after it report (None: write them unconditionally).
    let mut cond: Option<usize> = None;
    for (fx, trace) in effects {
        match fx {
            Effect::History(h) => {
                batch.h_saga.push(saga.id);
                batch.h_step.push(h.step.clone());
                batch.h_kind.push(h.kind.as_str().to_string());
                batch.h_attempt.push(h.attempt as i32);
                batch.h_started.push(h.started_at);
                batch.h_outcome.push(h.outcome.to_string());
                batch.h_class.push(h.error_class.map(|c| c.as_str().to_string()));
                batch.h_error.push(h.error.as_ref().map(|e| truncate(e, 2000)));
                batch.h_key.push(h.idempotency_key.clone());
                batch.h_status.push(h.downstream_status.map(i32::from));
                batch.h_duration.push(h.duration_ms);
                batch.h_worker.push(worker.to_string());
            }
            Effect::Hook(change) => {
                // The saga type's own rows: its hooks write them in this transaction, with those
                // of every other saga of the commit (`Batch::flush`).
                cond = Some(batch.hooks.len());
                batch.hooks.push(HookEffect {
                    saga_id: saga.id,
                    order_id: saga.order_id,
                    effect: change.clone(),
                });
            }
            Effect::Event {
                stream,
                event_type,
                data,
            } => {
                // An event of the saga's subject only when the hook effect before it really
                // changed something.
                let (topic, when) = match stream {
                    Stream::Saga => (&topics.saga_events, None),
                    Stream::Order => (&topics.order_events, cond),
                };
                let mut data = data.clone();
                if *stream == Stream::Saga && data.is_object() {
                    data["state"] = json!(saga.state.as_str());
                }
                batch.push_event(
                    NewEvent::of_saga(topic, event_type, saga.order_id, saga.id, data, trace),
                    when,
                );
            }
            Effect::ClearCancelRequest => {
                sqlx::query("update sagas set cancel_requested = null where saga_id = $1")
                    .bind(saga.id)
                    .execute(&mut *conn)
                    .await?;
            }
            Effect::Finished { answer: a } => {
                finished = true;
                if let Some(a) = a {
                    answer = Some(a.clone());
                }
            }
        }
    }
    batch.s_id.push(saga.id);
    batch.s_state.push(saga.state.as_str().to_string());
    batch.s_step.push(saga.step as i32);
    batch.s_attempt.push(saga.attempt as i32);
    batch.s_next.push(saga.next_attempt_at);
    batch.s_data.push(saga.data.clone());
    batch.s_failure.push(
        saga.failure
            .as_ref()
            .map(|f| serde_json::to_value(f).unwrap_or(Value::Null)),
    );
    batch
        .s_error
        .push(saga.last_error.as_ref().map(|e| truncate(e, 2000)));
    batch
        .s_class
        .push(saga.last_error_class.map(|c| c.as_str().to_string()));
    batch.s_keep.push(keep_lease && !saga.state.is_finished());
    batch.s_answer.push(answer);
    batch.s_finished.push(saga.state.is_finished());
    batch.s_step_name.push(step_name.to_string());
    batch.s_session.push(session.map(|traceparent| {
        let mut entry = serde_json::Map::new();
        entry.insert(
            SESSION_TRACE_KEY.to_string(),
            Value::String(traceparent.to_string()),
        );
        Value::Object(entry)
    }));
    if finished {
        batch.notify.push(
            Wake::Finished {
                saga_id: saga.id,
                worker,
            }
            .payload(),
        );
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Gives a lease back (shutdown): the saga becomes claimable at once by any worker.
pub async fn release_lease(conn: &mut PgConnection, saga_id: Uuid, fence: i64) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "update sagas set lease_owner = null, lease_expires_at = null where saga_id = $1 and fence = $2",
        saga_id,
        fence
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Wakes the saga pollers of every instance (a saga is due now).
pub async fn wake_due(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_notify($1, $2)")
        .bind(wake::CHANNEL)
        .bind(Wake::Due.payload())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A saga's state (None when there is no such saga).
pub async fn state(conn: &mut PgConnection, saga_id: Uuid) -> Result<Option<SagaState>, sqlx::Error> {
    let s: Option<String> = sqlx::query_scalar("select state from sagas where saga_id = $1")
        .bind(saga_id)
        .fetch_optional(&mut *conn)
        .await?;
    s.map(|s| parse_state(&s)).transpose()
}

fn parse_state(s: &str) -> Result<SagaState, sqlx::Error> {
    SagaState::parse(s).ok_or_else(|| sqlx::Error::Decode(format!("unknown saga state {s}").into()))
}

/// What a cancellation reads of the saga row it has locked.
#[derive(Debug)]
pub struct CancelView {
    /// State.
    pub state: SagaState,
    /// W3C trace context of the request that started the saga.
    pub trace_context: Value,
    /// Why it compensates.
    pub failure: Option<Failure>,
    /// Last error class.
    pub last_error_class: Option<FailureClass>,
}

/// Locks a saga's row for a cancellation and reads what it needs.
pub async fn lock_for_cancel(conn: &mut PgConnection, saga_id: Uuid) -> Result<CancelView, sqlx::Error> {
    let (state, trace_context, failure, last_error_class): (String, Value, Option<Value>, Option<String>) =
        sqlx::query_as(
            "select state, trace_context, failure, last_error_class from sagas where saga_id = $1 for update",
        )
        .bind(saga_id)
        .fetch_one(&mut *conn)
        .await?;
    let decode = |e: serde_json::Error| sqlx::Error::Decode(format!("saga {saga_id}: failure: {e}").into());
    Ok(CancelView {
        state: parse_state(&state)?,
        trace_context,
        failure: match failure {
            Some(v) if !v.is_null() => Some(serde_json::from_value(v).map_err(decode)?),
            _ => None,
        },
        last_error_class: last_error_class.as_deref().and_then(FailureClass::parse),
    })
}

/// Asks a running saga to compensate at its next step boundary (due now unless a worker holds
/// it). A repeated request replaces the stored reason, unless `keep_first_reason`.
pub async fn request_cancel(
    conn: &mut PgConnection,
    saga_id: Uuid,
    reason: &str,
    keep_first_reason: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"update sagas set cancel_requested = case when $3 then coalesce(cancel_requested, $2) else $2 end,
                  updated_at = now(),
                  next_attempt_at = case when lease_expires_at is null or lease_expires_at < now()
                                         then now() else next_attempt_at end
            where saga_id = $1"#,
    )
    .bind(saga_id)
    .bind(reason)
    .bind(keep_first_reason)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Turns a completed saga to compensation from `last_step` for a cancellation (`failure`).
pub async fn cancel_completed(
    conn: &mut PgConnection,
    saga_id: Uuid,
    last_step: i32,
    reason: &str,
    failure: &Failure,
) -> Result<(), sqlx::Error> {
    let failure = serde_json::to_value(failure).unwrap_or(Value::Null);
    sqlx::query!(
        r#"update sagas set state = 'compensating', step = $2, attempt = 0, next_attempt_at = now(),
                          cancel_requested = $3, failure = $4, lease_owner = null, lease_expires_at = null,
                          finished_at = null, updated_at = now()
                    where saga_id = $1"#,
        saga_id,
        last_step,
        reason,
        failure
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What a saga's row says for an idempotent replay of `POST /orders`.
#[derive(Debug)]
pub struct ReplayState {
    /// The stored answer, once finished (the saga type's JSON; CreateOrder: `orders::answer`).
    pub answer: Option<Value>,
    /// The first request answered 202.
    pub answered_pending: bool,
    /// The order (None for a saga that places none).
    pub order_id: Option<i32>,
}

/// Reads what a replay needs.
pub async fn replay_state(
    conn: &mut PgConnection,
    saga_id: Uuid,
) -> Result<Option<ReplayState>, sqlx::Error> {
    let r = sqlx::query!(
        "select answer, answered_pending, order_id from sagas where saga_id = $1",
        saga_id
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(r.map(|r| ReplayState {
        answer: r.answer,
        answered_pending: r.answered_pending,
        order_id: r.order_id,
    }))
}

/// Records that the creating request answers 202, if the saga has not finished with an answer;
/// returns false when it has (the caller then answers the outcome instead).
pub async fn mark_answered_pending(conn: &mut PgConnection, saga_id: Uuid) -> Result<bool, sqlx::Error> {
    let r = sqlx::query!(
        "update sagas set answered_pending = true where saga_id = $1 and answer is null",
        saga_id
    )
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Whether a saga was created more than `age` ago.
pub async fn created_before(
    conn: &mut PgConnection,
    saga_id: Uuid,
    age: Duration,
) -> Result<bool, sqlx::Error> {
    let old: Option<bool> = sqlx::query_scalar(
        "select created_at < now() - make_interval(secs => $2) from sagas where saga_id = $1",
    )
    .bind(saga_id)
    .bind(age.as_secs_f64())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(old.unwrap_or(false))
}

/// What an operator's action (re-drive, cancel) reads of the saga row it has locked.
#[derive(Debug)]
pub struct OperatorView {
    /// State.
    pub state: SagaState,
    /// The action or compensation ops see as the saga's step.
    pub step_name: String,
    /// Attempts made of it.
    pub attempt: i32,
    /// When the next attempt is due.
    pub next_attempt_at: Option<OffsetDateTime>,
    /// A worker holds the lease.
    pub leased: bool,
}

/// Locks a saga's row for an operator's action (None: no such saga).
pub async fn lock_for_operator(
    conn: &mut PgConnection,
    saga_id: Uuid,
) -> Result<Option<OperatorView>, sqlx::Error> {
    let r = sqlx::query!(
        r#"select state, step_name, attempt, next_attempt_at,
                  coalesce(lease_expires_at > now(), false) as "leased!"
             from sagas where saga_id = $1 for update"#,
        saga_id
    )
    .fetch_optional(&mut *conn)
    .await?;
    r.map(|r| {
        Ok(OperatorView {
            state: parse_state(&r.state)?,
            step_name: r.step_name,
            attempt: r.attempt,
            next_attempt_at: r.next_attempt_at,
            leased: r.leased,
        })
    })
    .transpose()
}

/// A stuck saga compensates again with fresh attempts, due now; with `cancel`, a cancellation's
/// reason and failure are stored unless the saga has its own already.
pub async fn resume_compensation(
    conn: &mut PgConnection,
    saga_id: Uuid,
    cancel: Option<(&str, &Failure)>,
) -> Result<(), sqlx::Error> {
    let (reason, failure) = match cancel {
        Some((reason, failure)) => (Some(reason), serde_json::to_value(failure).ok()),
        None => (None, None),
    };
    sqlx::query(
        r#"update sagas set state = 'compensating', attempt = 0, next_attempt_at = now(), lease_owner = null,
                  lease_expires_at = null, finished_at = null, updated_at = now(),
                  cancel_requested = coalesce(cancel_requested, $2),
                  failure = coalesce(failure, $3)
            where saga_id = $1"#,
    )
    .bind(saga_id)
    .bind(reason)
    .bind(failure)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A waiting saga runs its next attempt now.
pub async fn run_now(conn: &mut PgConnection, saga_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "update sagas set next_attempt_at = least(coalesce(next_attempt_at, now()), now()), updated_at = now() where saga_id = $1",
        saga_id
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}
