//! Step 2, `persist_order` (local): the order's lines with the catalog's prices and its total, written
//! in the transaction that records the reservation. A total beyond NUMERIC(10,2) is fatal
//! (`total_overflow`). Compensation `cancel_order` (local): the order becomes `cancelled`.

use rust_decimal::Decimal;
use sqlx::PgConnection;

use crate::orders::OrderStatus;
use crate::orders::saga::{CreateOrderData, Output, PersistedItem, lines, order_id};
use crate::orders::store as order_store;
use crate::saga::machine::{FailureClass, Kind, Outcome, Saga};
use crate::saga::registry::{LocalRun, LocalStep, Registry};

/// Persisted action name.
pub const ACTION: &str = "persist_order";
/// Persisted compensation name.
pub const COMPENSATION: &str = "cancel_order";

/// Runs the action in the caller's transaction.
pub async fn action(conn: &mut PgConnection, saga: &Saga) -> Result<Outcome, sqlx::Error> {
    Ok(match persist(conn, saga).await? {
        Persisted::Ok {
            items,
            total,
            currency,
        } => Outcome::Succeeded(
            Output::Persisted {
                items,
                total,
                currency,
            }
            .into(),
        ),
        Persisted::Overflow(detail) => Outcome::Fatal {
            class: FailureClass::TotalOverflow,
            detail,
        },
        Persisted::Inconsistent(detail) => Outcome::Fatal {
            class: FailureClass::InconsistentReservation,
            detail,
        },
    })
}

/// The result of persist_order.
enum Persisted {
    /// Rows written.
    Ok {
        /// Lines with ids and prices.
        items: Vec<PersistedItem>,
        /// Total.
        total: Decimal,
        /// Currency.
        currency: String,
    },
    /// The total does not fit NUMERIC(10,2).
    Overflow(String),
    /// The reservation is missing or does not cover the lines (a bug or a tampered row).
    Inconsistent(String),
}

/// persist_order: the order's lines with the catalog's prices and its total, in the caller's
/// transaction.
async fn persist(conn: &mut PgConnection, saga: &Saga) -> Result<Persisted, sqlx::Error> {
    let Some(res) = CreateOrderData::of(saga).reservation else {
        return Ok(Persisted::Inconsistent("no reservation recorded".into()));
    };
    let input = lines(saga);
    let mut total = Decimal::ZERO;
    let mut products = Vec::with_capacity(input.len());
    let mut quantities = Vec::with_capacity(input.len());
    let mut prices = Vec::with_capacity(input.len());
    let mut currency: Option<String> = None;
    for line in &input {
        let Some(item) = res.items.iter().find(|i| i.product_id == line.product_id) else {
            return Ok(Persisted::Inconsistent(format!(
                "product {} missing from the reservation",
                line.product_id
            )));
        };
        match &currency {
            None => currency = Some(item.currency.clone()),
            Some(c) if *c != item.currency => return Ok(Persisted::Inconsistent("mixed currencies".into())),
            Some(_) => {}
        }
        let line_total = item.unit_price.checked_mul(Decimal::from(line.quantity));
        total = match line_total.and_then(|t| total.checked_add(t)) {
            Some(t) => t,
            None => {
                return Ok(Persisted::Overflow(
                    "the order total cannot be represented".into(),
                ));
            }
        };
        products.push(line.product_id);
        quantities.push(line.quantity);
        prices.push(item.unit_price);
    }
    if total > order_store::max_total() {
        return Ok(Persisted::Overflow(format!(
            "the order total {} exceeds the largest amount an order can hold (99999999.99)",
            total.round_dp(2)
        )));
    }
    let currency = currency.unwrap_or_default();
    let items = order_store::insert_lines(
        conn,
        order_id(saga)?,
        &products,
        &quantities,
        &prices,
        total,
        &currency,
    )
    .await?;
    Ok(Persisted::Ok {
        items,
        total,
        currency,
    })
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

/// The handler of either half (both local).
struct PersistOrder(Kind);

impl LocalStep for PersistOrder {
    fn run<'a>(&'a self, conn: &'a mut PgConnection, saga: &'a Saga) -> LocalRun<'a> {
        match self.0 {
            Kind::Action => Box::pin(action(conn, saga)),
            Kind::Compensation => Box::pin(compensation(conn, saga)),
        }
    }
}

/// Registers the action and the compensation.
pub fn register(r: &mut Registry) {
    r.local(ACTION, PersistOrder(Kind::Action))
        .local(COMPENSATION, PersistOrder(Kind::Compensation));
}
