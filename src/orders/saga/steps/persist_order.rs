//! Step 2, `persist_order` (local): the order's lines with the catalog's prices and its total, written
//! in the transaction that records the reservation (the orders of every saga in a shared commit in
//! one statement). A total beyond NUMERIC(10,2) is fatal (`total_overflow`). Compensation
//! `cancel_order` (local): the order becomes `cancelled`.

use rust_decimal::Decimal;
use sqlx::PgConnection;

use crate::orders::OrderStatus;
use crate::orders::saga::{CreateOrderData, Output, lines, order_id};
use crate::orders::store as order_store;
use crate::saga::machine::{FailureClass, Outcome, Saga};
use crate::saga::registry::{LocalRun, LocalRunMany, LocalStep, Registry};

/// Persisted action name.
pub const ACTION: &str = "persist_order";
/// Persisted compensation name.
pub const COMPENSATION: &str = "cancel_order";

/// Runs the action in the caller's transaction.
pub async fn action(conn: &mut PgConnection, saga: &Saga) -> Result<Outcome, sqlx::Error> {
    Ok(action_many(conn, &[saga]).await?.remove(0))
}

/// Runs the action for every saga of a shared commit that is due to run it: the orders that can
/// be priced are written in one statement; the outcomes in the order of `sagas`.
pub async fn action_many(conn: &mut PgConnection, sagas: &[&Saga]) -> Result<Vec<Outcome>, sqlx::Error> {
    let priced: Vec<Result<order_store::PricedOrder, Outcome>> =
        sagas.iter().map(|s| price(s)).collect::<Result<_, _>>()?;
    let to_write: Vec<_> = priced.iter().filter_map(|p| p.as_ref().ok()).cloned().collect();
    let mut written = order_store::insert_lines_many(conn, &to_write).await?;
    Ok(priced
        .into_iter()
        .map(|p| match p {
            Ok(order) => Outcome::Succeeded(
                Output::Persisted {
                    items: written.remove(&order.order_id).unwrap_or_default(),
                    total: order.total,
                    currency: order.currency,
                }
                .into(),
            ),
            Err(fatal) => fatal,
        })
        .collect())
}

/// The order of `saga` priced from its reservation, or the fatal outcome that stops it: a total
/// beyond NUMERIC(10,2) (`total_overflow`), or a reservation that is missing or does not cover the
/// lines (`inconsistent_reservation`: a bug or a tampered row).
fn price(saga: &Saga) -> Result<Result<order_store::PricedOrder, Outcome>, sqlx::Error> {
    let inconsistent = |detail: String| {
        Ok(Err(Outcome::Fatal {
            class: FailureClass::InconsistentReservation,
            detail,
        }))
    };
    let overflow = |detail: String| {
        Ok(Err(Outcome::Fatal {
            class: FailureClass::TotalOverflow,
            detail,
        }))
    };
    let Some(res) = CreateOrderData::of(saga).reservation else {
        return inconsistent("no reservation recorded".into());
    };
    let input = lines(saga);
    let mut total = Decimal::ZERO;
    let mut priced = Vec::with_capacity(input.len());
    let mut currency: Option<String> = None;
    for line in &input {
        let Some(item) = res.items.iter().find(|i| i.product_id == line.product_id) else {
            return inconsistent(format!(
                "product {} missing from the reservation",
                line.product_id
            ));
        };
        match &currency {
            None => currency = Some(item.currency.clone()),
            Some(c) if *c != item.currency => return inconsistent("mixed currencies".into()),
            Some(_) => {}
        }
        let line_total = item.unit_price.checked_mul(Decimal::from(line.quantity));
        total = match line_total.and_then(|t| total.checked_add(t)) {
            Some(t) => t,
            None => return overflow("the order total cannot be represented".into()),
        };
        priced.push((line.product_id, line.quantity, item.unit_price));
    }
    if total > order_store::max_total() {
        return overflow(format!(
            "the order total {} exceeds the largest amount an order can hold (99999999.99)",
            total.round_dp(2)
        ));
    }
    Ok(Ok(order_store::PricedOrder {
        order_id: order_id(saga)?,
        lines: priced,
        total,
        currency: currency.unwrap_or_default(),
    }))
}

/// Runs the compensation in the caller's transaction.
pub async fn compensation(conn: &mut PgConnection, saga: &Saga) -> Result<Outcome, sqlx::Error> {
    let reason = saga
        .failure
        .as_ref()
        .map(crate::orders::saga::customer_text)
        .unwrap_or_else(|| "compensated".into());
    // No-op when the order is cancelled already, or can no longer move.
    let changed =
        order_store::set_status(conn, order_id(saga)?, OrderStatus::Cancelled, Some(&reason)).await?;
    Ok(Outcome::Succeeded(Output::OrderCancelled(changed).into()))
}

/// The action's handler: a shared commit's orders in one statement.
struct PersistOrder;

impl LocalStep for PersistOrder {
    fn run<'a>(&'a self, conn: &'a mut PgConnection, saga: &'a Saga) -> LocalRun<'a> {
        Box::pin(action(conn, saga))
    }

    fn run_many<'a>(&'a self, conn: &'a mut PgConnection, sagas: &'a [&'a Saga]) -> LocalRunMany<'a> {
        Box::pin(action_many(conn, sagas))
    }
}

/// The compensation's handler (rare: one saga after another).
struct CancelOrder;

impl LocalStep for CancelOrder {
    fn run<'a>(&'a self, conn: &'a mut PgConnection, saga: &'a Saga) -> LocalRun<'a> {
        Box::pin(compensation(conn, saga))
    }
}

/// Registers the action and the compensation.
pub fn register(r: &mut Registry) {
    r.local(ACTION, PersistOrder).local(COMPENSATION, CancelOrder);
}
