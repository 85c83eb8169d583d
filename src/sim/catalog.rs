//! The Product Catalog simulator: products with stock, and atomic inventory reservations.
//!
//! Business endpoints (SPEC §4), subject to faults:
//! - `POST /inventory/reservations` (`Idempotency-Key` required) → 201 with the priced lines, or
//!   409 `{error, unavailable}` listing every short line (an unknown product has `available: 0`);
//!   all lines are reserved or none. The same key with the same body replays the first answer
//!   without a second effect; with another body → 422. A new key naming an existing active
//!   reservation with the same lines gets that reservation back (nothing is reserved twice).
//! - `DELETE /inventory/reservations/{reservationID}` → 204, also when already released or never
//!   made; a release moves the quantities from `reserved` back to `stock`.
//!
//! Control API (never faulted):
//! - `PUT /sim/products/{productID}` `{stock, unitPrice, currency}` and
//!   `GET /sim/products/{productID}` → `{productID, stock, reserved, unitPrice, currency}`;
//! - `GET /sim/reservations` → a list of `{reservationID, status, items, idempotencyKeys, calls}`;
//! - `GET /sim/calls` → `{endpoint: {idempotencyKey: calls}}` for every business request, also
//!   those that never reached a reservation;
//! - `PUT`, `GET`, `DELETE /sim/faults` (endpoints `reserve`, `release`).
//!
//! A `malformed` fault answers reservations alternately with bad JSON and with a negative unit
//! price (an answer that has no lines, like a 409, gets bad JSON both times); the reservation is
//! still made. Releases answer 204 with no body, so there is nothing for `malformed` to break.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::Instrument as _;

use super::faults::{FaultError, FaultSpec, Faults, Malformed, Verdict, bad_json_answer};
use super::{
    CallLog, Rejection, fault_routes, idempotency_key, json_error, missing_idempotency_key, parse_body,
    request_span,
};
use crate::downstream::contract::{
    LineItem, Reservation, ReservationRequest, ReservedItem, Unavailable, UnavailableAnswer,
};

/// Fault endpoint names of the catalog.
pub const ENDPOINTS: &[&str] = &[RESERVE, RELEASE];
const RESERVE: &str = "reserve";
const RELEASE: &str = "release";

/// Longest reservation id the simulator accepts.
const MAX_RESERVATION_ID_CHARS: usize = 200;

/// The Product Catalog simulator; cheap to clone (all clones share one state).
#[derive(Clone)]
pub struct CatalogSim {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<Store>,
    faults: Faults,
}

#[derive(Default)]
struct Store {
    products: BTreeMap<i32, Product>,
    /// Reservations in creation order.
    reservations: Vec<ReservationRecord>,
    by_id: HashMap<String, usize>,
    /// The answer given to each reservation key, replayed on a repeat.
    answers: HashMap<String, StoredAnswer>,
    calls: CallLog,
}

#[derive(Debug, Clone)]
struct Product {
    stock: i64,
    reserved: i64,
    unit_price: Decimal,
    currency: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum ReservationStatus {
    Active,
    Released,
}

struct ReservationRecord {
    reservation: Reservation,
    status: ReservationStatus,
    /// Keys of the reserve requests answered with this reservation, first use first.
    keys: Vec<String>,
}

struct StoredAnswer {
    request: ReservationRequest,
    status: StatusCode,
    body: Value,
}

/// Body of `PUT /sim/products/{productID}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductBody {
    stock: i64,
    /// A decimal string (a JSON number is accepted too). Any value is stored, so a test can make
    /// the catalog answer prices outside the contract.
    #[serde(rename = "unitPrice")]
    unit_price: Decimal,
    currency: String,
}

/// Answer of `GET /sim/products/{productID}`.
#[derive(Debug, Serialize)]
struct ProductView {
    #[serde(rename = "productID")]
    product_id: i32,
    stock: i64,
    reserved: i64,
    #[serde(rename = "unitPrice", with = "rust_decimal::serde::str")]
    unit_price: Decimal,
    currency: String,
}

/// One entry of `GET /sim/reservations`.
#[derive(Debug, Serialize)]
struct ReservationView {
    #[serde(rename = "reservationID")]
    reservation_id: String,
    status: ReservationStatus,
    items: Vec<ReservedItem>,
    #[serde(rename = "idempotencyKeys")]
    idempotency_keys: Vec<String>,
    calls: BTreeMap<String, u64>,
}

impl Default for CatalogSim {
    fn default() -> Self {
        Self::new()
    }
}

impl CatalogSim {
    /// An empty catalog with no faults.
    pub fn new() -> Self {
        CatalogSim {
            inner: Arc::new(Inner {
                state: Mutex::new(Store::default()),
                faults: Faults::new(ENDPOINTS),
            }),
        }
    }

    /// Creates or replaces a product: `stock` is what is still available to reserve (what is
    /// already reserved stays reserved).
    pub fn put_product(&self, product_id: i32, stock: i64, unit_price: Decimal, currency: &str) {
        let mut state = self.lock();
        let reserved = state.products.get(&product_id).map_or(0, |p| p.reserved);
        state.products.insert(
            product_id,
            Product {
                stock,
                reserved,
                unit_price,
                currency: currency.to_string(),
            },
        );
    }

    /// Replaces the fault set, as `PUT /sim/faults` does (for start-up flags).
    pub fn set_faults(&self, faults: Vec<FaultSpec>) -> Result<(), FaultError> {
        self.inner.faults.replace(faults)
    }

    /// Makes this process leave on its `n`th business call (`--crash-after`; 0: never).
    pub fn crash_after(&self, n: u64) {
        self.inner.faults.crash_after(n);
    }

    /// The HTTP routes: business endpoints and the `/sim` control API.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/inventory/reservations", post(reserve))
            .route("/inventory/reservations/{reservation_id}", delete(release))
            .route("/sim/products/{product_id}", put(put_product).get(get_product))
            .route("/sim/reservations", get(list_reservations))
            .route("/sim/calls", get(list_calls))
            .route(
                "/sim/faults",
                put(put_faults).get(get_faults).delete(delete_faults),
            )
            .with_state(self.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn reserve(&self, headers: HeaderMap, body: Bytes) -> Response {
        let Some(key) = idempotency_key(&headers) else {
            return missing_idempotency_key();
        };
        self.lock().calls.count(RESERVE, &key);
        let malformed = match self.inner.faults.apply(RESERVE).await {
            Verdict::Answer(response) => return response,
            Verdict::Proceed { malformed } => malformed,
        };
        let request: ReservationRequest = match parse_body(&body) {
            Ok(request) => request,
            Err(rejection) => return rejection.into_response(),
        };
        let (status, body) = self.lock().reserve(&key, request);
        match malformed {
            None => (status, Json(body)).into_response(),
            Some(Malformed::BadValue) if status == StatusCode::CREATED => {
                (status, Json(with_negative_price(body))).into_response()
            }
            Some(_) => bad_json_answer(status, "{\"reservationID\": "),
        }
    }

    async fn release(&self, headers: HeaderMap, reservation_id: String) -> Response {
        if let Some(key) = idempotency_key(&headers) {
            self.lock().calls.count(RELEASE, &key);
        }
        if let Verdict::Answer(response) = self.inner.faults.apply(RELEASE).await {
            return response;
        }
        self.lock().release(&reservation_id);
        StatusCode::NO_CONTENT.into_response()
    }
}

impl Store {
    /// Handles one reservation request under the state lock; returns the answer to give (and to
    /// replay for this key).
    fn reserve(&mut self, key: &str, request: ReservationRequest) -> (StatusCode, Value) {
        if let Some(stored) = self.answers.get(key) {
            if stored.request == request {
                return (stored.status, stored.body.clone());
            }
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                error_body("Idempotency-Key reused with a different request"),
            );
        }
        let (status, body) = self.decide(key, &request);
        self.answers.insert(
            key.to_string(),
            StoredAnswer {
                request,
                status,
                body: body.clone(),
            },
        );
        (status, body)
    }

    fn decide(&mut self, key: &str, request: &ReservationRequest) -> (StatusCode, Value) {
        if let Err(message) = check_request(request) {
            return (StatusCode::UNPROCESSABLE_ENTITY, error_body(&message));
        }
        if let Some(&index) = self.by_id.get(&request.reservation_id) {
            let record = &mut self.reservations[index];
            let same_lines = record
                .reservation
                .items
                .iter()
                .map(|i| (i.product_id, i.quantity))
                .collect::<HashSet<_>>()
                == request
                    .items
                    .iter()
                    .map(|i| (i.product_id, i.quantity))
                    .collect::<HashSet<_>>();
            if record.status == ReservationStatus::Active && same_lines {
                if !record.keys.iter().any(|k| k == key) {
                    record.keys.push(key.to_string());
                }
                return (StatusCode::CREATED, to_json(&record.reservation));
            }
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                error_body("reservationID already used for another or a released reservation"),
            );
        }
        let unavailable: Vec<Unavailable> = request
            .items
            .iter()
            .filter_map(|line| {
                let available = self.products.get(&line.product_id).map_or(0, |p| p.stock);
                (available < i64::from(line.quantity)).then_some(Unavailable {
                    product_id: line.product_id,
                    requested: line.quantity,
                    available,
                })
            })
            .collect();
        if !unavailable.is_empty() {
            return (
                StatusCode::CONFLICT,
                to_json(&UnavailableAnswer {
                    error: "insufficient stock".into(),
                    unavailable,
                }),
            );
        }
        let mut items = Vec::with_capacity(request.items.len());
        for line in &request.items {
            let product = self
                .products
                .get_mut(&line.product_id)
                .expect("availability was checked above under the same lock");
            product.stock -= i64::from(line.quantity);
            product.reserved += i64::from(line.quantity);
            items.push(ReservedItem {
                product_id: line.product_id,
                quantity: line.quantity,
                unit_price: product.unit_price,
                currency: product.currency.clone(),
            });
        }
        let reservation = Reservation {
            reservation_id: request.reservation_id.clone(),
            items,
        };
        let body = to_json(&reservation);
        self.by_id
            .insert(request.reservation_id.clone(), self.reservations.len());
        self.reservations.push(ReservationRecord {
            reservation,
            status: ReservationStatus::Active,
            keys: vec![key.to_string()],
        });
        (StatusCode::CREATED, body)
    }

    fn release(&mut self, reservation_id: &str) {
        let Some(&index) = self.by_id.get(reservation_id) else {
            return;
        };
        let record = &mut self.reservations[index];
        if record.status == ReservationStatus::Released {
            return;
        }
        record.status = ReservationStatus::Released;
        for item in &record.reservation.items {
            if let Some(product) = self.products.get_mut(&item.product_id) {
                product.stock += i64::from(item.quantity);
                product.reserved -= i64::from(item.quantity);
            }
        }
    }
}

/// Refuses requests no catalog would accept: an empty or over-long id, no lines, a line with a
/// non-positive product id or quantity, the same product twice.
fn check_request(request: &ReservationRequest) -> Result<(), String> {
    let id = &request.reservation_id;
    if id.trim().is_empty() || id.chars().count() > MAX_RESERVATION_ID_CHARS {
        return Err(format!(
            "reservationID must be 1 to {MAX_RESERVATION_ID_CHARS} characters"
        ));
    }
    if request.items.is_empty() {
        return Err("items must not be empty".into());
    }
    let mut seen = HashSet::new();
    for LineItem { product_id, quantity } in &request.items {
        if *product_id <= 0 {
            return Err(format!("productID must be positive, got {product_id}"));
        }
        if *quantity <= 0 {
            return Err(format!("quantity must be positive, got {quantity}"));
        }
        if !seen.insert(*product_id) {
            return Err(format!("productID {product_id} appears twice"));
        }
    }
    Ok(())
}

fn error_body(message: &str) -> Value {
    serde_json::json!({ "error": message })
}

fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("contract types serialize to JSON")
}

/// A reservation answer whose first line has a negative unit price.
fn with_negative_price(mut body: Value) -> Value {
    if let Some(item) = body
        .get_mut("items")
        .and_then(Value::as_array_mut)
        .and_then(|items| items.first_mut())
    {
        item["unitPrice"] = Value::String("-1.00".into());
    }
    body
}

/// Parses a positive product id from the path.
fn product_id(raw: &str) -> Result<i32, Rejection> {
    match raw.parse::<i32>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "productID must be a positive 32-bit integer",
        )),
    }
}

async fn reserve(State(sim): State<CatalogSim>, headers: HeaderMap, body: Bytes) -> Response {
    let span = request_span("catalog.reserve", "POST", "/inventory/reservations", &headers);
    sim.reserve(headers, body).instrument(span).await
}

async fn release(
    State(sim): State<CatalogSim>,
    Path(reservation_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let span = request_span(
        "catalog.release",
        "DELETE",
        "/inventory/reservations/{reservationID}",
        &headers,
    );
    sim.release(headers, reservation_id).instrument(span).await
}

async fn put_product(State(sim): State<CatalogSim>, Path(raw_id): Path<String>, body: Bytes) -> Response {
    let id = match product_id(&raw_id) {
        Ok(id) => id,
        Err(rejection) => return rejection.into_response(),
    };
    let product: ProductBody = match parse_body(&body) {
        Ok(product) => product,
        Err(rejection) => return rejection.into_response(),
    };
    if product.stock < 0 {
        return json_error(StatusCode::UNPROCESSABLE_ENTITY, "stock must not be negative");
    }
    if product.currency.trim().is_empty() {
        return json_error(StatusCode::UNPROCESSABLE_ENTITY, "currency must not be empty");
    }
    sim.put_product(id, product.stock, product.unit_price, &product.currency);
    get_product(State(sim), Path(raw_id)).await
}

async fn get_product(State(sim): State<CatalogSim>, Path(raw_id): Path<String>) -> Response {
    let id = match product_id(&raw_id) {
        Ok(id) => id,
        Err(rejection) => return rejection.into_response(),
    };
    let state = sim.lock();
    match state.products.get(&id) {
        Some(product) => Json(ProductView {
            product_id: id,
            stock: product.stock,
            reserved: product.reserved,
            unit_price: product.unit_price,
            currency: product.currency.clone(),
        })
        .into_response(),
        None => json_error(StatusCode::NOT_FOUND, "no such product"),
    }
}

async fn list_reservations(State(sim): State<CatalogSim>) -> Response {
    let state = sim.lock();
    let views: Vec<ReservationView> = state
        .reservations
        .iter()
        .map(|record| ReservationView {
            reservation_id: record.reservation.reservation_id.clone(),
            status: record.status,
            items: record.reservation.items.clone(),
            idempotency_keys: record.keys.clone(),
            calls: state.calls.for_keys(RESERVE, &record.keys),
        })
        .collect();
    Json(views).into_response()
}

async fn list_calls(State(sim): State<CatalogSim>) -> Response {
    Json(sim.lock().calls.all().clone()).into_response()
}

async fn put_faults(State(sim): State<CatalogSim>, body: Bytes) -> Response {
    fault_routes::put(&sim.inner.faults, &body)
}

async fn get_faults(State(sim): State<CatalogSim>) -> Response {
    fault_routes::get(&sim.inner.faults)
}

async fn delete_faults(State(sim): State<CatalogSim>) -> Response {
    fault_routes::delete(&sim.inner.faults)
}
