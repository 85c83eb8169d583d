//! Client of the Product Catalog's inventory reservations (SPEC §4).
//!
//! [`CatalogClient::reserve`] reserves every line of an order or none, and returns the catalog's
//! prices; [`CatalogClient::release`] gives a reservation back. Both are idempotent on the
//! `Idempotency-Key` the caller passes, and the reservation id is ours, so a reservation whose
//! answer was lost can still be released.
//!
//! The catalog's answer is not trusted: it must echo our reservation id and exactly the lines we
//! asked for, with prices in `0 ..= 99,999,999.99` (at most two decimal places) and one ISO-style
//! currency code for every line. Anything else is a transient `contract_violation`, so the saga
//! retries and, when its retries run out, compensates by releasing the reservation.

use std::collections::HashMap;
use std::time::Duration;

use rust_decimal::Decimal;

use super::contract::{Reservation, ReservationRequest, Unavailable, UnavailableAnswer};
use super::transport;
use crate::downstream::DownstreamError;

/// Highest unit price the service accepts (it stores prices as `DECIMAL(10,2)`).
/// (9,999,999,999 hundredths, split into the 32-bit words `from_parts` takes).
pub const MAX_UNIT_PRICE: Decimal = Decimal::from_parts(1_410_065_407, 2, 0, false, 2);

/// Why a reservation was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    /// The catalog answered 409: these lines are short (nothing was reserved). A business
    /// refusal: do not retry.
    #[error("insufficient stock for {} product(s)", .0.len())]
    Unavailable(Vec<Unavailable>),
    /// Any other failure, classified.
    #[error(transparent)]
    Failed(#[from] DownstreamError),
}

/// HTTP client of the Product Catalog.
#[derive(Debug, Clone)]
pub struct CatalogClient {
    base_url: String,
    http: reqwest::Client,
}

impl CatalogClient {
    /// A client for the catalog at `base_url` (`CATALOG_URL`, e.g. `http://127.0.0.1:8081`),
    /// sending through `http`. An unusable URL surfaces as a transient `request` failure of each
    /// call.
    pub fn new(base_url: &str, http: reqwest::Client) -> Self {
        CatalogClient {
            base_url: base_url.trim_end_matches('/').to_string(),
            http,
        }
    }

    /// Reserves every line of `req` or none (`POST /inventory/reservations`).
    ///
    /// `timeout` bounds the whole call. The returned reservation has been checked against `req`,
    /// and its prices are rescaled to exactly two decimal places.
    pub async fn reserve(
        &self,
        idempotency_key: &str,
        req: &ReservationRequest,
        timeout: Duration,
    ) -> Result<Reservation, ReserveError> {
        let url = transport::join_url(&self.base_url, "/inventory/reservations");
        let response = transport::send(
            self.http.post(url).json(req),
            "/inventory/reservations",
            idempotency_key,
            timeout,
        )
        .await?;
        match response.status {
            200 | 201 => {
                let reservation: Reservation = response.json()?;
                Ok(validate_reservation(req, reservation).map_err(|e| e.with_status(response.status))?)
            }
            409 => {
                let answer: UnavailableAnswer = response.json()?;
                validate_unavailable(req, &answer.unavailable).map_err(|e| e.with_status(409))?;
                Err(ReserveError::Unavailable(answer.unavailable))
            }
            _ => Err(response.into_error().into()),
        }
    }

    /// Releases a reservation (`DELETE /inventory/reservations/{reservationID}`).
    ///
    /// 204 and 404 (never made, or already gone) both mean released, as does any other 2xx.
    pub async fn release(
        &self,
        idempotency_key: &str,
        reservation_id: &str,
        timeout: Duration,
    ) -> Result<(), DownstreamError> {
        const ROUTE: &str = "/inventory/reservations/{reservationID}";
        let url = transport::url_of(&self.base_url, ROUTE, reservation_id);
        transport::undo(self.http.delete(url), ROUTE, idempotency_key, timeout).await
    }
}

/// Checks a 2xx reservation answer against the request (see the module docs) and rescales its
/// prices to two decimal places.
pub fn validate_reservation(
    req: &ReservationRequest,
    mut reservation: Reservation,
) -> Result<Reservation, DownstreamError> {
    let violation = |what: String| Err(DownstreamError::contract_violation(what));
    if reservation.reservation_id != req.reservation_id {
        return violation(format!(
            "reservation answer names reservation {:?}, not ours",
            truncate(&reservation.reservation_id)
        ));
    }
    let mut expected: HashMap<i32, i32> = HashMap::new();
    for line in &req.items {
        *expected.entry(line.product_id).or_default() += line.quantity;
    }
    let mut answered: HashMap<i32, i32> = HashMap::new();
    for item in &reservation.items {
        if answered.insert(item.product_id, item.quantity).is_some() {
            return violation(format!(
                "reservation answer lists product {} twice",
                item.product_id
            ));
        }
    }
    if answered != expected {
        return violation(format!(
            "reservation answer lines {:?} differ from the requested {:?}",
            sorted(&answered),
            sorted(&expected)
        ));
    }
    let mut currency: Option<&str> = None;
    for item in &mut reservation.items {
        let price = item.unit_price;
        if price.is_sign_negative() && !price.is_zero() {
            return violation(format!(
                "product {} has a negative unit price {price}",
                item.product_id
            ));
        }
        if price > MAX_UNIT_PRICE {
            return violation(format!(
                "product {} has a unit price {price} above {MAX_UNIT_PRICE}",
                item.product_id
            ));
        }
        if price.normalize().scale() > 2 {
            return violation(format!(
                "product {} has a unit price {price} with more than two decimal places",
                item.product_id
            ));
        }
        let mut two_places = price.normalize();
        two_places.rescale(2);
        item.unit_price = two_places;
        if !is_currency_code(&item.currency) {
            return violation(format!(
                "product {} has currency {:?}, not a three-letter upper-case code",
                item.product_id,
                truncate(&item.currency)
            ));
        }
        match currency {
            None => currency = Some(&item.currency),
            Some(first) if first != item.currency => {
                return violation(format!(
                    "reservation mixes currencies {first} and {}",
                    item.currency
                ));
            }
            Some(_) => {}
        }
    }
    Ok(reservation)
}

/// Checks a 409 answer: it must name at least one product, each one we asked for, with the
/// quantity we asked for and a non-negative availability.
fn validate_unavailable(
    req: &ReservationRequest,
    unavailable: &[Unavailable],
) -> Result<(), DownstreamError> {
    if unavailable.is_empty() {
        return Err(DownstreamError::contract_violation(
            "409 answer lists no unavailable product",
        ));
    }
    for line in unavailable {
        let asked = req.items.iter().find(|item| item.product_id == line.product_id);
        match asked {
            Some(item) if item.quantity == line.requested && line.available >= 0 => {}
            _ => {
                return Err(DownstreamError::contract_violation(format!(
                    "409 answer line {line:?} does not match the request"
                )));
            }
        }
    }
    Ok(())
}

fn is_currency_code(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

fn sorted(lines: &HashMap<i32, i32>) -> Vec<(i32, i32)> {
    let mut lines: Vec<(i32, i32)> = lines.iter().map(|(p, q)| (*p, *q)).collect();
    lines.sort_unstable();
    lines
}

/// At most 64 characters of an untrusted string, for messages.
fn truncate(value: &str) -> String {
    value.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::downstream::contract::{LineItem, ReservedItem};
    use crate::downstream::{FailureClass, FailureKind};
    use std::str::FromStr;

    fn request() -> ReservationRequest {
        ReservationRequest {
            reservation_id: "r-1".into(),
            items: vec![
                LineItem {
                    product_id: 1,
                    quantity: 2,
                },
                LineItem {
                    product_id: 2,
                    quantity: 1,
                },
            ],
        }
    }

    fn item(product_id: i32, quantity: i32, price: &str, currency: &str) -> ReservedItem {
        ReservedItem {
            product_id,
            quantity,
            unit_price: Decimal::from_str(price).unwrap(),
            currency: currency.into(),
        }
    }

    fn answer(items: Vec<ReservedItem>) -> Reservation {
        Reservation {
            reservation_id: "r-1".into(),
            items,
        }
    }

    fn assert_violation(result: Result<Reservation, DownstreamError>) {
        let error = result.expect_err("answer should be refused");
        assert_eq!(error.kind, FailureKind::Transient);
        assert_eq!(error.class, FailureClass::ContractViolation);
    }

    #[test]
    fn the_price_ceiling_is_that_of_decimal_10_2() {
        assert_eq!(MAX_UNIT_PRICE.to_string(), "99999999.99");
    }

    #[test]
    fn a_faithful_answer_is_accepted_in_any_line_order_with_prices_at_two_places() {
        let reservation = validate_reservation(
            &request(),
            answer(vec![item(2, 1, "5", "EUR"), item(1, 2, "19.990", "EUR")]),
        )
        .unwrap();
        let prices: Vec<String> = reservation
            .items
            .iter()
            .map(|i| i.unit_price.to_string())
            .collect();
        assert_eq!(prices, ["5.00", "19.99"]);
    }

    #[test]
    fn another_reservation_id_is_a_contract_violation() {
        let mut reservation = answer(vec![item(1, 2, "1", "EUR"), item(2, 1, "1", "EUR")]);
        reservation.reservation_id = "r-2".into();
        assert_violation(validate_reservation(&request(), reservation));
    }

    #[test]
    fn missing_extra_or_changed_lines_are_contract_violations() {
        let euro = |product_id, quantity| item(product_id, quantity, "1", "EUR");
        let missing = vec![euro(1, 2)];
        let extra = vec![euro(1, 2), euro(2, 1), euro(3, 1)];
        let changed = vec![euro(1, 3), euro(2, 1)];
        let split = vec![euro(1, 1), euro(1, 1), euro(2, 1)];
        for lines in [missing, extra, changed, split] {
            assert_violation(validate_reservation(&request(), answer(lines)));
        }
    }

    #[test]
    fn prices_outside_the_contract_are_violations() {
        for price in ["-0.01", "100000000.00", "1.005"] {
            assert_violation(validate_reservation(
                &request(),
                answer(vec![item(1, 2, price, "EUR"), item(2, 1, "1", "EUR")]),
            ));
        }
        validate_reservation(
            &request(),
            answer(vec![item(1, 2, "99999999.99", "EUR"), item(2, 1, "0", "EUR")]),
        )
        .expect("the bounds themselves are fine");
    }

    #[test]
    fn bad_or_mixed_currencies_are_violations() {
        for (a, b) in [("EUR", "USD"), ("eur", "eur"), ("EURO", "EURO"), ("", "")] {
            assert_violation(validate_reservation(
                &request(),
                answer(vec![item(1, 2, "1", a), item(2, 1, "1", b)]),
            ));
        }
    }

    #[test]
    fn unavailable_lines_must_match_the_request() {
        let req = request();
        let line = |product_id, requested, available| Unavailable {
            product_id,
            requested,
            available,
        };
        assert!(validate_unavailable(&req, &[line(1, 2, 0)]).is_ok());
        assert!(validate_unavailable(&req, &[]).is_err());
        assert!(validate_unavailable(&req, &[line(9, 2, 0)]).is_err());
        assert!(validate_unavailable(&req, &[line(1, 5, 0)]).is_err());
        assert!(validate_unavailable(&req, &[line(1, 2, -1)]).is_err());
    }
}
