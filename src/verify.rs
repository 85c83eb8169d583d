//! The invariants of a drained system, checked once: what the crash tests assert after their
//! kills and what the fault-injection suite (`scripts/chaos`, through `ostore-tools verify --json`)
//! checks after its run. Each check reads the database (checked queries) and, when given, the
//! simulators' control APIs (`/sim/reservations`, `/sim/shipments`, `/sim/products/{id}`,
//! `/sim/events`, `/sim/poison`), and reports pass or fail with the figures behind it.
//!
//! The checks, numbered as the chaos suite prints them (6, the answers its clients were given, is
//! the suite's own: only it knows them; it also adds the broker's contents to check 4):
//! 1. every saga is terminal, or stuck with a reason;
//! 2. no double reservation or shipment, one Idempotency-Key per saga;
//! 3. reservations and live shipments match the live orders, and stock adds up;
//! 4. every outbox row is published (at or below the relay's floor, `outbox_published_through()`)
//!    and, given the broker's records, found in its topic;
//! 5. every tracking event the shipper published is applied once (or parked for a stuck saga's
//!    order), dead letters are exactly the poison records, orders agree with their shipments and
//!    every status change was notified once;
//! 7. orders agree with their sagas.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

/// The simulators' base URLs, for the checks that compare the service with them (2, 3 and 5).
#[derive(Debug, Clone)]
pub struct Simulators {
    /// The Product Catalog simulator.
    pub catalog_url: String,
    /// The Shipment Tracking simulator.
    pub shipments_url: String,
}

/// What to check against.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The simulators; without them checks 2, 3 and 5 are not run.
    pub simulators: Option<Simulators>,
    /// Stock of each product before the run (check 3: available + reserved must add up to it).
    pub initial_stock: BTreeMap<i32, i64>,
    /// Every record the broker holds (as `ostore-tools kafka dump` reads them): check 4 then also
    /// finds each published outbox row in its topic, and check 5 tells the tracking events that
    /// never reached their topic from those the consumer did not apply.
    pub topic_records: Option<Vec<TopicRecord>>,
    /// The topics' names (`TOPIC_*`).
    pub topics: crate::topics::Topics,
}

/// One record of a topic, as far as the checks need it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicRecord {
    /// Its topic.
    pub topic: String,
    /// The `eventID` of its value (the envelope's), when it has one.
    pub event_id: Option<String>,
    /// Its key.
    pub key: Option<String>,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Its number (see the module's documentation).
    pub id: u8,
    /// What it checks.
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// The figures behind the verdict; the first line is the summary, the others name offenders.
    pub figures: String,
}

/// Every check run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// In the order run.
    pub checks: Vec<Check>,
}

impl Report {
    /// The checks that failed.
    pub fn failed(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.ok).collect()
    }

    /// Check `id`, if it was run.
    pub fn check(&self, id: u8) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }

    /// Panics (a test's failure) unless every check in `ids` ran and passed.
    pub fn assert_hold(&self, ids: &[u8]) {
        for id in ids {
            let c = self
                .check(*id)
                .unwrap_or_else(|| panic!("check {id} was not run"));
            assert!(c.ok, "check {} failed: {}\n{}", c.id, c.name, c.figures);
        }
    }
}

/// At most `n` items, then how many more.
fn sample<T: std::fmt::Display>(items: &[T]) -> String {
    const N: usize = 5;
    let mut s = items
        .iter()
        .take(N)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > N {
        s.push_str(&format!(" … (+{})", items.len() - N));
    }
    s
}

/// Appends `label: offenders` lines for the lists that are not empty.
fn offenders(fig: &mut String, lists: &[(&str, Vec<String>)]) {
    for (label, list) in lists {
        if !list.is_empty() {
            fig.push_str(&format!("\n{label}: {}", sample(list)));
        }
    }
}

fn counts<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut m: BTreeMap<&str, usize> = BTreeMap::new();
    for i in items {
        *m.entry(i).or_default() += 1;
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

struct SagaRow {
    id: String,
    order_id: i32,
    state: String,
    step_name: String,
    last_error: Option<String>,
    last_error_class: Option<String>,
}

struct OrderRow {
    order_id: i32,
    status: String,
    shipment_id: Option<String>,
    saga: String,
    total: Option<String>,
}

/// Order statuses of an order whose saga completed (its reservation active, its shipment live).
const LIVE: [&str; 3] = ["confirmed", "shipped", "delivered"];

async fn get_json(http: &reqwest::Client, url: String) -> anyhow::Result<Value> {
    let r = http.get(&url).send().await?.error_for_status()?;
    Ok(r.json().await?)
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// Runs every check `options` allows and reports them all.
pub async fn run(pool: &PgPool, options: &Options) -> anyhow::Result<Report> {
    let sagas: Vec<SagaRow> = sqlx::query_as!(
        SagaRow,
        r#"select saga_id::text as "id!", order_id as "order_id!", state, step_name, last_error, last_error_class
             from sagas where order_id is not null"#
    )
    .fetch_all(pool)
    .await?;
    let orders: Vec<OrderRow> = sqlx::query_as!(
        OrderRow,
        r#"select order_id, status, shipment_id, saga_id::text as "saga!", total_amount::text as total
             from orders"#
    )
    .fetch_all(pool)
    .await?;
    let by_saga: HashMap<&str, &SagaRow> = sagas.iter().map(|s| (s.id.as_str(), s)).collect();
    let order_by_id: HashMap<i32, &OrderRow> = orders.iter().map(|o| (o.order_id, o)).collect();
    let stuck: HashSet<&str> = sagas
        .iter()
        .filter(|s| s.state == "stuck")
        .map(|s| s.id.as_str())
        .collect();
    let stuck_orders: HashSet<i32> = sagas
        .iter()
        .filter(|s| s.state == "stuck")
        .map(|s| s.order_id)
        .collect();
    let mut checks = vec![sagas_settled(&sagas)];

    if let Some(sims) = &options.simulators {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()?;
        let reservations = get_json(&http, format!("{}/sim/reservations", sims.catalog_url)).await?;
        let shipments = get_json(&http, format!("{}/sim/shipments", sims.shipments_url)).await?;
        let (reservations, shipments) = (list(&reservations), list(&shipments));
        checks.push(
            no_doubles(
                pool,
                &sagas,
                &orders,
                &by_saga,
                &order_by_id,
                reservations,
                shipments,
            )
            .await?,
        );
        let mut products = BTreeMap::new();
        for pid in options.initial_stock.keys() {
            let p = get_json(&http, format!("{}/sim/products/{pid}", sims.catalog_url)).await?;
            products.insert(*pid, p);
        }
        checks.push(
            reservations_match(
                pool,
                &orders,
                &order_by_id,
                &stuck,
                &stuck_orders,
                reservations,
                shipments,
                &options.initial_stock,
                &products,
            )
            .await?,
        );
        let events = get_json(&http, format!("{}/sim/events", sims.shipments_url)).await?;
        let poison = get_json(&http, format!("{}/sim/poison", sims.shipments_url)).await?;
        let poisons = poison["published"].as_i64().unwrap_or(0);
        let tracking_in_topic = options.topic_records.as_ref().map(|records| {
            records
                .iter()
                .filter(|r| r.topic == options.topics.tracking_events)
                .filter_map(|r| r.event_id.clone())
                .collect::<HashSet<String>>()
        });
        checks.push(
            tracking_applied(
                pool,
                &orders,
                &order_by_id,
                &stuck_orders,
                list(&events),
                shipments,
                poisons,
                tracking_in_topic.as_ref(),
                &options.topics.notifications,
            )
            .await?,
        );
    }
    checks.push(outbox_published(pool, options.topic_records.as_deref()).await?);
    checks.push(
        orders_agree(
            pool,
            &sagas,
            &orders,
            &by_saga,
            &order_by_id,
            &options.topics.order_events,
        )
        .await?,
    );
    checks.sort_by_key(|c| c.id);
    Ok(Report { checks })
}

fn sagas_settled(sagas: &[SagaRow]) -> Check {
    let open: Vec<String> = sagas
        .iter()
        .filter(|s| s.state == "running" || s.state == "compensating")
        .map(|s| s.id.clone())
        .collect();
    let no_reason: Vec<String> = sagas
        .iter()
        .filter(|s| s.state == "stuck" && s.last_error.as_deref().is_none_or(str::is_empty))
        .map(|s| s.id.clone())
        .collect();
    let reasons: Vec<String> = sagas
        .iter()
        .filter(|s| s.state == "stuck")
        .map(|s| {
            format!(
                "{}/{}",
                s.step_name,
                s.last_error_class.as_deref().unwrap_or("None")
            )
        })
        .collect();
    let mut fig = format!(
        "{} sagas: {}",
        sagas.len(),
        counts(sagas.iter().map(|s| s.state.as_str()))
    );
    if !reasons.is_empty() {
        fig.push_str(&format!(
            "\nstuck by step/errorClass: {}",
            counts(reasons.iter().map(String::as_str))
        ));
    }
    let ok = open.is_empty() && no_reason.is_empty();
    offenders(
        &mut fig,
        &[("still open", open), ("stuck without a reason", no_reason)],
    );
    Check {
        id: 1,
        name: "sagas terminal or stuck with a reason".into(),
        ok,
        figures: fig,
    }
}

fn calls(v: &Value) -> i64 {
    v["calls"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_i64).sum())
        .unwrap_or(0)
}

async fn no_doubles(
    pool: &PgPool,
    sagas: &[SagaRow],
    orders: &[OrderRow],
    by_saga: &HashMap<&str, &SagaRow>,
    order_by_id: &HashMap<i32, &OrderRow>,
    reservations: &[Value],
    shipments: &[Value],
) -> anyhow::Result<Check> {
    let mut res_ids: HashMap<&str, usize> = HashMap::new();
    for r in reservations {
        *res_ids
            .entry(r["reservationID"].as_str().unwrap_or(""))
            .or_default() += 1;
    }
    let dup_res: Vec<String> = res_ids
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k.to_string())
        .collect();
    let rid = |r: &Value| r["reservationID"].as_str().unwrap_or("").to_string();
    let unknown_res: Vec<String> = reservations
        .iter()
        .filter(|r| !by_saga.contains_key(r["reservationID"].as_str().unwrap_or("")))
        .map(rid)
        .collect();
    let multi_key_res: Vec<String> = reservations
        .iter()
        .filter(|r| list(&r["idempotencyKeys"]).len() > 1)
        .map(rid)
        .collect();
    let reserve_calls: i64 = reservations.iter().map(calls).sum();
    let mut ship_per_order: HashMap<i64, usize> = HashMap::new();
    for s in shipments {
        *ship_per_order
            .entry(s["orderID"].as_i64().unwrap_or(-1))
            .or_default() += 1;
    }
    let dup_ship: Vec<String> = ship_per_order
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k.to_string())
        .collect();
    let order_of = |s: &Value| s["orderID"].as_i64().and_then(|o| i32::try_from(o).ok());
    let unknown_ship: Vec<String> = shipments
        .iter()
        .filter(|s| order_of(s).is_none_or(|o| !order_by_id.contains_key(&o)))
        .map(|s| s["shipmentID"].as_str().unwrap_or("").to_string())
        .collect();
    let ship_calls: i64 = shipments.iter().map(calls).sum();
    let keys_rows = sqlx::query_scalar!(r#"select count(*) as "n!" from idempotency_keys"#)
        .fetch_one(pool)
        .await?;
    let sagas_per_key: Vec<String> = sqlx::query!(
        r#"select user_id, key, count(*) as "n!" from idempotency_keys group by 1, 2 having count(*) > 1"#
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| format!("{}:{}x{}", r.user_id, r.key, r.n))
    .collect();
    let mismatched_ship: Vec<String> = orders
        .iter()
        .filter(|o| {
            o.shipment_id.as_deref().is_some_and(|id| !id.is_empty())
                && !shipments.iter().any(|s| {
                    s["shipmentID"].as_str() == o.shipment_id.as_deref() && order_of(s) == Some(o.order_id)
                })
        })
        .map(|o| o.order_id.to_string())
        .collect();
    let ok = dup_res.is_empty()
        && unknown_res.is_empty()
        && multi_key_res.is_empty()
        && dup_ship.is_empty()
        && unknown_ship.is_empty()
        && sagas_per_key.is_empty()
        && mismatched_ship.is_empty()
        && keys_rows == sagas.len() as i64;
    let mut fig = format!(
        "{} reservations ({reserve_calls} reserve requests), none twice: {}; {} shipments ({ship_calls} create requests), at most one per order: {}\n{keys_rows} Idempotency-Keys for {} sagas",
        reservations.len(),
        dup_res.is_empty() && multi_key_res.is_empty(),
        shipments.len(),
        dup_ship.is_empty(),
        sagas.len()
    );
    offenders(
        &mut fig,
        &[
            ("reservation ids twice", dup_res),
            ("reservations of no saga", unknown_res),
            ("reservations under several keys", multi_key_res),
            ("orders with 2+ shipments", dup_ship),
            ("shipments of no order", unknown_ship),
            ("Idempotency-Keys of several sagas", sagas_per_key),
            ("orders whose shipmentID the shipper lacks", mismatched_ship),
        ],
    );
    Ok(Check {
        id: 2,
        name: "no double reservation or shipment".into(),
        ok,
        figures: fig,
    })
}

#[allow(clippy::too_many_arguments)]
async fn reservations_match(
    pool: &PgPool,
    orders: &[OrderRow],
    order_by_id: &HashMap<i32, &OrderRow>,
    stuck: &HashSet<&str>,
    stuck_orders: &HashSet<i32>,
    reservations: &[Value],
    shipments: &[Value],
    initial_stock: &BTreeMap<i32, i64>,
    products: &BTreeMap<i32, Value>,
) -> anyhow::Result<Check> {
    let items = sqlx::query!("select order_id, product_id, quantity from order_items")
        .fetch_all(pool)
        .await?;
    let is_live = |o: &OrderRow| LIVE.contains(&o.status.as_str());
    let active: HashSet<&str> = reservations
        .iter()
        .filter(|r| r["status"] == "active")
        .filter_map(|r| r["reservationID"].as_str())
        .collect();
    let expected_active: HashSet<&str> = orders
        .iter()
        .filter(|o| is_live(o))
        .map(|o| o.saga.as_str())
        .collect();
    let mut extra_active: Vec<String> = active
        .iter()
        .filter(|r| !expected_active.contains(*r) && !stuck.contains(*r))
        .map(|r| r.to_string())
        .collect();
    extra_active.sort();
    let mut missing_active: Vec<String> = expected_active
        .iter()
        .filter(|r| !active.contains(*r))
        .map(|r| r.to_string())
        .collect();
    missing_active.sort();
    let live_ship_orders: HashSet<i32> = shipments
        .iter()
        .filter(|s| s["status"] != "cancelled")
        .filter_map(|s| s["orderID"].as_i64().and_then(|o| i32::try_from(o).ok()))
        .collect();
    let confirmed_orders: HashSet<i32> = orders.iter().filter(|o| is_live(o)).map(|o| o.order_id).collect();
    let mut orphan_ship: Vec<i32> = live_ship_orders
        .iter()
        .filter(|o| !confirmed_orders.contains(*o) && !stuck_orders.contains(*o))
        .copied()
        .collect();
    orphan_ship.sort();
    let mut missing_ship: Vec<i32> = confirmed_orders
        .iter()
        .filter(|o| !live_ship_orders.contains(*o))
        .copied()
        .collect();
    missing_ship.sort();
    let (mut active_qty, mut active_qty_nonstuck, mut live_qty_nonstuck) = (
        HashMap::<i64, i64>::new(),
        HashMap::<i64, i64>::new(),
        HashMap::<i64, i64>::new(),
    );
    for r in reservations.iter().filter(|r| r["status"] == "active") {
        let held_by_stuck = stuck.contains(r["reservationID"].as_str().unwrap_or(""));
        for it in list(&r["items"]) {
            let (pid, q) = (
                it["productID"].as_i64().unwrap_or(-1),
                it["quantity"].as_i64().unwrap_or(0),
            );
            *active_qty.entry(pid).or_default() += q;
            if !held_by_stuck {
                *active_qty_nonstuck.entry(pid).or_default() += q;
            }
        }
    }
    for it in &items {
        if let Some(o) = order_by_id.get(&it.order_id)
            && is_live(o)
            && !stuck.contains(o.saga.as_str())
        {
            *live_qty_nonstuck.entry(i64::from(it.product_id)).or_default() += i64::from(it.quantity);
        }
    }
    let mut stock_bad = Vec::new();
    for (pid, initial) in initial_stock {
        let p = &products[pid];
        let (stock, reserved) = (
            p["stock"].as_i64().unwrap_or(-1),
            p["reserved"].as_i64().unwrap_or(-1),
        );
        let key = i64::from(*pid);
        let (aq, aqn, lqn) = (
            active_qty.get(&key).copied().unwrap_or(0),
            active_qty_nonstuck.get(&key).copied().unwrap_or(0),
            live_qty_nonstuck.get(&key).copied().unwrap_or(0),
        );
        if stock + reserved != *initial || reserved != aq || aqn != lqn {
            stock_bad.push(format!(
                "product {pid}: initial {initial}, available {stock}, reserved {reserved}, in active reservations {aq} ({aqn} not stuck), in live orders {lqn} (not stuck)"
            ));
        }
    }
    let ok = extra_active.is_empty()
        && missing_active.is_empty()
        && orphan_ship.is_empty()
        && missing_ship.is_empty()
        && stock_bad.is_empty();
    let mut fig = format!(
        "{} active reservations for {} confirmed/shipped/delivered orders ({} more held by stuck sagas); {} live shipments; stock adds up for {}/{} products",
        active.len(),
        expected_active.len(),
        active.iter().filter(|r| stuck.contains(*r)).count(),
        live_ship_orders.len(),
        initial_stock.len() - stock_bad.len(),
        initial_stock.len()
    );
    let strings = |v: Vec<i32>| v.into_iter().map(|i| i.to_string()).collect::<Vec<_>>();
    offenders(
        &mut fig,
        &[
            ("active reservations without a live order", extra_active),
            ("live orders without an active reservation", missing_active),
            ("live shipments of orders not confirmed", strings(orphan_ship)),
            ("live orders without a live shipment", strings(missing_ship)),
        ],
    );
    for line in stock_bad.iter().take(5) {
        fig.push('\n');
        fig.push_str(line);
    }
    Ok(Check {
        id: 3,
        name: "reservations match confirmed orders".into(),
        ok,
        figures: fig,
    })
}

async fn outbox_published(pool: &PgPool, records: Option<&[TopicRecord]>) -> anyhow::Result<Check> {
    let rows = sqlx::query!(
        r#"select topic, count(*) as "n!", count(*) filter (where id > outbox_published_through()) as "unpublished!"
             from outbox group by topic order by topic"#
    )
    .fetch_all(pool)
    .await?;
    let unpublished: i64 = rows.iter().map(|r| r.unpublished).sum();
    let total: i64 = rows.iter().map(|r| r.n).sum();
    let mut ok = unpublished == 0 && !rows.is_empty();
    let mut fig = format!(
        "{total} rows, {unpublished} unpublished: {}",
        rows.iter()
            .map(|r| format!("{} {}", r.topic, r.n))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(records) = records {
        let mut in_kafka: HashMap<(&str, Option<&str>, Option<&str>), usize> = HashMap::new();
        for r in records {
            *in_kafka
                .entry((r.topic.as_str(), r.event_id.as_deref(), r.key.as_deref()))
                .or_default() += 1;
        }
        let events = sqlx::query!(
            r#"select topic, event_id::text as "id!", message_key, id <= outbox_published_through() as "published!"
                 from outbox"#
        )
        .fetch_all(pool)
        .await?;
        let found_in =
            |(t, i, k, _): &(&str, &str, &str, bool)| in_kafka.contains_key(&(*t, Some(*i), Some(*k)));
        let rows: Vec<(&str, &str, &str, bool)> = events
            .iter()
            .map(|e| {
                (
                    e.topic.as_str(),
                    e.id.as_str(),
                    e.message_key.as_str(),
                    e.published,
                )
            })
            .collect();
        let lost: Vec<String> = rows
            .iter()
            .filter(|r| r.3 && !found_in(r))
            .map(|(t, i, _, _)| format!("{t}:{i}"))
            .collect();
        let topics: HashSet<&str> = rows.iter().map(|r| r.0).collect();
        let copies: usize = in_kafka
            .iter()
            .filter(|((t, _, _), _)| topics.contains(t))
            .map(|(_, n)| n)
            .sum();
        let found = rows.iter().filter(|r| found_in(r)).count();
        fig.push_str(&format!(
            "\nin the topics: {found}/{} rows found (by eventID and key), {copies} records ({} duplicate copies, allowed: at-least-once)",
            rows.len(),
            copies - found
        ));
        ok = ok && lost.is_empty();
        offenders(
            &mut fig,
            &[("rows marked published but not in their topic", lost)],
        );
    }
    Ok(Check {
        id: 4,
        name: "every outbox row published".into(),
        ok,
        figures: fig,
    })
}

/// The order status a shipment's latest status implies.
fn status_for_shipment(shipment: &str) -> Option<&'static str> {
    Some(match shipment {
        "created" => "confirmed",
        "picked_up" | "in_transit" | "out_for_delivery" => "shipped",
        "delivered" => "delivered",
        "cancelled" => "cancelled",
        _ => return None,
    })
}

#[allow(clippy::too_many_arguments)]
async fn tracking_applied(
    pool: &PgPool,
    orders: &[OrderRow],
    order_by_id: &HashMap<i32, &OrderRow>,
    stuck_orders: &HashSet<i32>,
    events: &[Value],
    shipments: &[Value],
    poisons: i64,
    tracking_in_topic: Option<&HashSet<String>>,
    notifications_topic: &str,
) -> anyhow::Result<Check> {
    let inbox = sqlx::query!(r#"select event_id::text as "id!", outcome from tracking_inbox"#)
        .fetch_all(pool)
        .await?;
    let inbox_ids: HashSet<&str> = inbox.iter().map(|r| r.id.as_str()).collect();
    let ev_ids: HashSet<&str> = events.iter().filter_map(|e| e["eventID"].as_str()).collect();
    // An event of an order whose saga is stuck (check 1 reports it, with its reason) waits in
    // tracking_retries until its window ends and is then dead-lettered: accounted for, not lost.
    let parked_rows = sqlx::query!(r#"select event_id::text as "id!", order_id from tracking_retries"#)
        .fetch_all(pool)
        .await?;
    let parked_stuck: HashSet<&str> = parked_rows
        .iter()
        .filter(|r| stuck_orders.contains(&r.order_id))
        .map(|r| r.id.as_str())
        .collect();
    let parked = parked_rows.len() - parked_stuck.len();
    let mut missing_ev: Vec<String> = ev_ids
        .iter()
        .filter(|e| !inbox_ids.contains(*e) && !parked_stuck.contains(*e))
        .map(|e| e.to_string())
        .collect();
    missing_ev.sort();
    let mut foreign: Vec<String> = inbox_ids
        .iter()
        .filter(|e| !ev_ids.contains(*e))
        .map(|e| e.to_string())
        .collect();
    foreign.sort();
    let dead = sqlx::query_scalar!(r#"select count(*) as "n!" from dead_letters"#)
        .fetch_one(pool)
        .await?;
    let malformed =
        sqlx::query_scalar!(r#"select count(*) as "n!" from dead_letters where reason like 'malformed%'"#)
            .fetch_one(pool)
            .await?;
    // Notifications: one per order and status the tracking consumer changed (duplicates would
    // mean an event was applied twice).
    let notifications = sqlx::query!(
        r#"select message_key, payload->'data'->>'status' as status, count(*) as "n!" from outbox
            where topic = $1 and event_type = 'OrderStatusChanged' group by 1, 2"#,
        notifications_topic
    )
    .fetch_all(pool)
    .await?;
    let notif_dups: Vec<String> = notifications
        .iter()
        .filter(|r| r.n > 1)
        .map(|r| format!("{}:{}x{}", r.message_key, r.status.as_deref().unwrap_or(""), r.n))
        .collect();
    let notified: HashSet<(String, String)> = notifications
        .iter()
        .map(|r| (r.message_key.clone(), r.status.clone().unwrap_or_default()))
        .collect();
    let mut latest: HashMap<i32, &str> = HashMap::new();
    for s in shipments {
        if let Some(o) = s["orderID"].as_i64().and_then(|o| i32::try_from(o).ok()) {
            latest.insert(o, s["status"].as_str().unwrap_or(""));
        }
    }
    let mut disagree: Vec<String> = latest
        .iter()
        .filter(|(oid, _)| !stuck_orders.contains(*oid))
        .filter_map(|(oid, st)| {
            let o = order_by_id.get(oid)?;
            (status_for_shipment(st) != Some(o.status.as_str()))
                .then(|| format!("order {oid} {} / shipment {st}", o.status))
        })
        .collect();
    disagree.sort();
    // The current status must have been notified (an order may skip `shipped` when the shipper's
    // picked_up/in_transit events never arrived: then there is no shipped notification to expect).
    let missing_notif: Vec<String> = orders
        .iter()
        .filter(|o| o.status == "shipped" || o.status == "delivered")
        .filter(|o| !notified.contains(&(o.order_id.to_string(), o.status.clone())))
        .map(|o| format!("{}:{}", o.order_id, o.status))
        .collect();
    // Dead letters: exactly the poison records the shipper published, each as malformed.
    let bad_dead = dead != poisons || malformed != poisons;
    let ok = missing_ev.is_empty()
        && foreign.is_empty()
        && parked == 0
        && !bad_dead
        && notif_dups.is_empty()
        && disagree.is_empty()
        && missing_notif.is_empty();
    let mut fig = format!(
        "{} events published by the shipper, {} in the inbox ({}); parked {parked}{}, dead letters {dead} ({malformed} malformed) for {poisons} poison records sent; duplicate notifications {}; order/shipment disagreements {}",
        events.len(),
        inbox.len(),
        counts(inbox.iter().map(|r| r.outcome.as_str())),
        if parked_stuck.is_empty() {
            String::new()
        } else {
            format!(
                " (+ {} for orders of stuck sagas, waiting out their window)",
                parked_stuck.len()
            )
        },
        notif_dups.len(),
        disagree.len()
    );
    if let Some(in_topic) = tracking_in_topic
        && !missing_ev.is_empty()
    {
        let never = missing_ev.iter().filter(|e| !in_topic.contains(*e)).count();
        fig.push_str(&format!(
            "\nof the {} events never applied, {never} never reached the topic (lost between the simulator and the broker)",
            missing_ev.len()
        ));
    }
    offenders(
        &mut fig,
        &[
            ("events never applied", missing_ev),
            ("inbox rows the shipper never sent", foreign),
            ("duplicate notifications", notif_dups),
            ("disagreements", disagree),
            ("missing notifications", missing_notif),
        ],
    );
    Ok(Check {
        id: 5,
        name: "every tracking event applied once".into(),
        ok,
        figures: fig,
    })
}

async fn orders_agree(
    pool: &PgPool,
    sagas: &[SagaRow],
    orders: &[OrderRow],
    by_saga: &HashMap<&str, &SagaRow>,
    order_by_id: &HashMap<i32, &OrderRow>,
    order_events_topic: &str,
) -> anyhow::Result<Check> {
    let allowed = |state: &str, status: Option<&str>| match state {
        "completed" => status.is_some_and(|s| LIVE.contains(&s)),
        "failed" => matches!(status, None | Some("cancelled" | "rejected")),
        "compensated" => status == Some("cancelled"),
        "stuck" => status.is_some_and(|s| s != "rejected"),
        _ => false,
    };
    let mut mismatch = Vec::new();
    for sg in sagas {
        let o = order_by_id.get(&sg.order_id);
        let st = o.map(|o| o.status.as_str());
        if !allowed(&sg.state, st) {
            mismatch.push(format!(
                "order {} {} / saga {}",
                sg.order_id,
                st.unwrap_or("None"),
                sg.state
            ));
        } else if let Some(o) = o
            && o.saga != sg.id
        {
            mismatch.push(format!(
                "order {} belongs to saga {}, not {}",
                sg.order_id, o.saga, sg.id
            ));
        }
    }
    let sagaless: Vec<String> = orders
        .iter()
        .filter(|o| !by_saga.contains_key(o.saga.as_str()))
        .map(|o| o.order_id.to_string())
        .collect();
    let no_total: Vec<String> = orders
        .iter()
        .filter(|o| {
            LIVE.contains(&o.status.as_str())
                && (o.total.is_none() || o.shipment_id.as_deref().is_none_or(str::is_empty))
        })
        .map(|o| o.order_id.to_string())
        .collect();
    // No event may contradict the order: no OrderConfirmed after its OrderCancelled.
    let contradicted: Vec<String> = sqlx::query_scalar!(
        r#"select c.message_key from outbox c
             join outbox k on k.message_key = c.message_key and k.topic = c.topic
            where c.topic = $1 and c.event_type = 'OrderConfirmed' and k.event_type = 'OrderCancelled'
              and c.id > k.id
            group by c.message_key"#,
        order_events_topic
    )
    .fetch_all(pool)
    .await?;
    let ok = mismatch.is_empty() && sagaless.is_empty() && no_total.is_empty() && contradicted.is_empty();
    let mut fig = format!(
        "{} orders, {} sagas; mismatches {}; orders without a saga {}; live orders without total or shipmentID {}; OrderConfirmed after OrderCancelled {}",
        orders.len(),
        sagas.len(),
        mismatch.len(),
        sagaless.len(),
        no_total.len(),
        contradicted.len()
    );
    offenders(
        &mut fig,
        &[
            ("mismatches", mismatch),
            ("orders without a saga", sagaless),
            ("incomplete", no_total),
            ("OrderConfirmed after OrderCancelled", contradicted),
        ],
    );
    Ok(Check {
        id: 7,
        name: "orders agree with their sagas".into(),
        ok,
        figures: fig,
    })
}
