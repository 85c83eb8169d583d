//! The simulators of SPEC §4 and the service's downstream clients, driven over real HTTP.
//!
//! Each test starts the simulators it needs on 127.0.0.1 port 0 and talks to them through
//! `CatalogClient` / `ShipmentsClient` (and plain HTTP for the `/sim` control API). Kafka
//! publishing is checked against librdkafka's mock cluster.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::str::FromStr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::routing::post;
use ostore_orders::downstream::catalog::{CatalogClient, ReserveError};
use ostore_orders::downstream::contract::{
    CreateShipmentRequest, LineItem, Reservation, ReservationRequest, TrackingEvent, TrackingStatus,
    Unavailable,
};
use ostore_orders::downstream::shipments::ShipmentsClient;
use ostore_orders::downstream::{DownstreamError, FailureKind, class};
use ostore_orders::sim::catalog::CatalogSim;
use ostore_orders::sim::shipments::{ShipmentsSim, ShipmentsSimConfig};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use support::{free_port, serve_router};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(5);
const TOPIC: &str = "shipments.tracking-events";

/// A server on an ephemeral port, stopped when dropped.
struct Running {
    base: String,
    shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(router: Router) -> Running {
    let shutdown = CancellationToken::new();
    let base = serve_router(router, shutdown.clone()).await;
    Running { base, shutdown }
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// A catalog simulator with products 1 (10 × 19.99 EUR) and 2 (5 × 5.00 EUR), and a client.
struct Catalog {
    server: Running,
    client: CatalogClient,
}

async fn catalog() -> Catalog {
    let sim = CatalogSim::new();
    sim.put_product(1, 10, price("19.99"), "EUR");
    sim.put_product(2, 5, price("5"), "EUR");
    let server = start(sim.router()).await;
    let client = CatalogClient::new(&server.base, http());
    Catalog { server, client }
}

impl Catalog {
    async fn reserve(&self, key: &str, req: &ReservationRequest) -> Result<Reservation, ReserveError> {
        self.client.reserve(key, req, TIMEOUT).await
    }

    async fn product(&self, id: i32) -> Value {
        get_json(&format!("{}/sim/products/{id}", self.server.base)).await
    }

    async fn stock(&self, id: i32) -> (i64, i64) {
        let product = self.product(id).await;
        (
            product["stock"].as_i64().unwrap(),
            product["reserved"].as_i64().unwrap(),
        )
    }

    async fn reservations(&self) -> Vec<Value> {
        list(&format!("{}/sim/reservations", self.server.base)).await
    }

    async fn faults(&self, faults: Value) {
        put_faults(&self.server.base, faults).await;
    }
}

/// A shipments simulator and a client.
struct Shipper {
    sim: ShipmentsSim,
    server: Running,
    client: ShipmentsClient,
}

async fn shipper(config: ShipmentsSimConfig) -> Shipper {
    let sim = ShipmentsSim::new(config).unwrap();
    let server = start(sim.router()).await;
    let client = ShipmentsClient::new(&server.base, http());
    Shipper { sim, server, client }
}

impl Shipper {
    async fn shipments(&self) -> Vec<Value> {
        list(&format!("{}/sim/shipments", self.server.base)).await
    }

    async fn events(&self) -> Vec<TrackingEvent> {
        serde_json::from_value(get_json(&format!("{}/sim/events", self.server.base)).await).unwrap()
    }

    async fn faults(&self, faults: Value) {
        put_faults(&self.server.base, faults).await;
    }

    async fn advance(&self, shipment_id: &str, status: &str) -> reqwest::Response {
        http()
            .post(format!(
                "{}/sim/shipments/{shipment_id}/advance",
                self.server.base
            ))
            .json(&json!({ "status": status }))
            .send()
            .await
            .unwrap()
    }
}

fn price(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

fn key() -> String {
    Uuid::new_v4().to_string()
}

fn lines(items: &[(i32, i32)]) -> Vec<LineItem> {
    items
        .iter()
        .map(|&(product_id, quantity)| LineItem { product_id, quantity })
        .collect()
}

fn reservation(items: &[(i32, i32)]) -> ReservationRequest {
    ReservationRequest {
        reservation_id: Uuid::new_v4().to_string(),
        items: lines(items),
    }
}

fn shipment_request(order_id: i32) -> CreateShipmentRequest {
    CreateShipmentRequest {
        order_id,
        user_id: 7,
        items: lines(&[(1, 2)]),
    }
}

async fn get_json(url: &str) -> Value {
    let response = http().get(url).send().await.unwrap();
    assert!(response.status().is_success(), "GET {url}: {}", response.status());
    response.json().await.unwrap()
}

async fn list(url: &str) -> Vec<Value> {
    get_json(url).await.as_array().unwrap().clone()
}

async fn put_faults(base: &str, faults: Value) {
    support::client::put_faults(&http(), base, faults).await;
}

async fn clear_faults(base: &str) {
    let response = http().delete(format!("{base}/sim/faults")).send().await.unwrap();
    assert_eq!(response.status(), 204);
}

fn failed(result: Result<Reservation, ReserveError>) -> DownstreamError {
    match result {
        Err(ReserveError::Failed(error)) => error,
        other => panic!("expected a failed call, got {other:?}"),
    }
}

fn assert_contract_violation(error: &DownstreamError) {
    assert_eq!(error.kind, FailureKind::Transient, "{error}");
    assert_eq!(error.class.as_str(), class::CONTRACT_VIOLATION, "{error}");
}

#[tokio::test]
async fn reserving_moves_stock_to_reserved_and_releasing_moves_it_back() {
    let catalog = catalog().await;
    let req = reservation(&[(1, 3), (2, 1)]);

    let reserved = catalog.reserve(&key(), &req).await.unwrap();
    assert_eq!(reserved.reservation_id, req.reservation_id);
    let priced: Vec<(i32, i32, String, String)> = reserved
        .items
        .iter()
        .map(|i| {
            (
                i.product_id,
                i.quantity,
                i.unit_price.to_string(),
                i.currency.clone(),
            )
        })
        .collect();
    assert_eq!(
        priced,
        [
            (1, 3, "19.99".into(), "EUR".into()),
            (2, 1, "5.00".into(), "EUR".into())
        ]
    );
    assert_eq!(catalog.stock(1).await, (7, 3));
    assert_eq!(catalog.stock(2).await, (4, 1));

    let release_key = key();
    catalog
        .client
        .release(&release_key, &req.reservation_id, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(catalog.stock(1).await, (10, 0));
    assert_eq!(catalog.stock(2).await, (5, 0));
    assert_eq!(catalog.reservations().await[0]["status"], "released");

    catalog
        .client
        .release(&release_key, &req.reservation_id, TIMEOUT)
        .await
        .expect("releasing twice is fine");
    catalog
        .client
        .release(&key(), "never-made", TIMEOUT)
        .await
        .expect("releasing an unknown reservation is fine");
    assert_eq!(catalog.stock(1).await, (10, 0), "nothing released twice");
}

#[tokio::test]
async fn a_reservation_is_all_or_nothing_when_one_line_is_short() {
    let catalog = catalog().await;
    let result = catalog.reserve(&key(), &reservation(&[(1, 3), (2, 6)])).await;
    assert_eq!(
        result.unwrap_err(),
        ReserveError::Unavailable(vec![Unavailable {
            product_id: 2,
            requested: 6,
            available: 5
        }])
    );
    assert_eq!(
        catalog.stock(1).await,
        (10, 0),
        "the line in stock was not reserved"
    );
    assert_eq!(catalog.stock(2).await, (5, 0));
    assert!(catalog.reservations().await.is_empty());
}

#[tokio::test]
async fn an_unknown_product_is_unavailable_with_nothing_available() {
    let catalog = catalog().await;
    let result = catalog.reserve(&key(), &reservation(&[(1, 1), (999, 2)])).await;
    assert_eq!(
        result.unwrap_err(),
        ReserveError::Unavailable(vec![Unavailable {
            product_id: 999,
            requested: 2,
            available: 0
        }])
    );
    assert_eq!(catalog.stock(1).await, (10, 0));
}

#[tokio::test]
async fn replaying_a_reservation_key_returns_the_same_answer_without_a_second_effect() {
    let catalog = catalog().await;
    let req = reservation(&[(1, 4)]);
    let k = key();

    let first = catalog.reserve(&k, &req).await.unwrap();
    let second = catalog.reserve(&k, &req).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(catalog.stock(1).await, (6, 4), "reserved once");

    let listed = catalog.reservations().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["reservationID"], req.reservation_id.as_str());
    assert_eq!(listed[0]["status"], "active");
    assert_eq!(listed[0]["idempotencyKeys"], json!([k]));
    assert_eq!(listed[0]["calls"], json!({ k.clone(): 2 }));

    let mut other_body = req.clone();
    other_body.items[0].quantity = 5;
    let error = failed(catalog.reserve(&k, &other_body).await);
    assert_eq!(error.kind, FailureKind::Refused, "same key, other body: {error}");
    assert_eq!(error.status, Some(422));
    assert_eq!(catalog.stock(1).await, (6, 4));
}

#[tokio::test]
async fn a_new_key_for_an_existing_reservation_gets_it_back_without_reserving_twice() {
    let catalog = catalog().await;
    let req = reservation(&[(1, 2)]);
    let first = catalog.reserve(&key(), &req).await.unwrap();
    let again = catalog.reserve(&key(), &req).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(catalog.stock(1).await, (8, 2));
    assert_eq!(
        catalog.reservations().await[0]["idempotencyKeys"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn fail_next_answers_503_which_the_client_calls_transient_and_the_call_still_counts() {
    let catalog = catalog().await;
    catalog.faults(json!({ "failNext": 1 })).await;
    let req = reservation(&[(1, 1)]);
    let k = key();

    let error = failed(catalog.reserve(&k, &req).await);
    assert_eq!(error.kind, FailureKind::Transient);
    assert_eq!(error.class.as_str(), class::HTTP_5XX);
    assert_eq!(error.status, Some(503));
    assert_eq!(error.retry_after, Some(Duration::from_secs(1)));
    assert_eq!(catalog.stock(1).await, (10, 0), "a faulted call has no effect");

    catalog.reserve(&k, &req).await.expect("the retry succeeds");
    assert_eq!(catalog.stock(1).await, (9, 1));
    assert_eq!(catalog.reservations().await[0]["calls"], json!({ k: 2 }));
}

#[tokio::test]
async fn too_many_requests_carries_its_retry_after_into_the_classification() {
    let catalog = catalog().await;
    catalog
        .faults(json!({ "failNext": 1, "failStatus": 429, "retryAfterSeconds": 7 }))
        .await;
    let error = failed(catalog.reserve(&key(), &reservation(&[(1, 1)])).await);
    assert_eq!(error.kind, FailureKind::Transient);
    assert_eq!(error.class.as_str(), class::HTTP_429);
    assert_eq!(error.status, Some(429));
    assert_eq!(error.retry_after, Some(Duration::from_secs(7)));
}

#[tokio::test]
async fn a_422_business_refusal_is_classified_as_refused() {
    let catalog = catalog().await;
    catalog.faults(json!({ "failNext": 1, "failStatus": 422 })).await;
    let error = failed(catalog.reserve(&key(), &reservation(&[(1, 1)])).await);
    assert_eq!(error.kind, FailureKind::Refused);
    assert_eq!(error.class.as_str(), class::HTTP_4XX);
    assert_eq!(error.status, Some(422));
    assert_eq!(error.retry_after, None);
}

#[tokio::test]
async fn malformed_catalog_answers_alternate_between_bad_json_and_a_negative_price() {
    let catalog = catalog().await;
    catalog.faults(json!({ "malformed": true })).await;
    let (k1, r1) = (key(), reservation(&[(1, 1)]));
    let (k2, r2) = (key(), reservation(&[(2, 1)]));

    let bad_json = failed(catalog.reserve(&k1, &r1).await);
    assert_contract_violation(&bad_json);
    assert!(bad_json.message.contains("JSON"), "{bad_json}");

    let negative = failed(catalog.reserve(&k2, &r2).await);
    assert_contract_violation(&negative);
    assert!(negative.message.contains("negative"), "{negative}");

    // The reservations were made; once the catalog behaves, a retry with the same key gets them.
    clear_faults(&catalog.server.base).await;
    let recovered = catalog.reserve(&k1, &r1).await.unwrap();
    assert_eq!(recovered.reservation_id, r1.reservation_id);
    assert_eq!(catalog.stock(1).await, (9, 1), "reserved once");
    assert_eq!(catalog.reservations().await.len(), 2);
}

#[tokio::test]
async fn a_malformed_shipment_answer_is_a_contract_violation() {
    let shipper = shipper(ShipmentsSimConfig::default()).await;
    shipper
        .faults(json!({ "malformed": true, "endpoint": "create" }))
        .await;
    let k = key();
    let req = shipment_request(11);

    let error = shipper.client.create(&k, &req, TIMEOUT).await.unwrap_err();
    assert_contract_violation(&error);
    assert_eq!(error.status, Some(201));

    clear_faults(&shipper.server.base).await;
    let shipment = shipper.client.create(&k, &req, TIMEOUT).await.unwrap();
    let listed = shipper.shipments().await;
    assert_eq!(listed.len(), 1, "one shipment for one key");
    assert_eq!(listed[0]["shipmentID"], shipment.shipment_id.as_str());
    assert_eq!(listed[0]["calls"], json!({ k: 2 }));
}

#[tokio::test]
async fn a_hanging_call_is_released_with_503_when_faults_are_cleared() {
    let catalog = catalog().await;
    catalog.faults(json!({ "hang": true })).await;
    let client = catalog.client.clone();
    let req = reservation(&[(1, 1)]);
    let call = tokio::spawn(async move { client.reserve(&key(), &req, Duration::from_secs(30)).await });

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!call.is_finished(), "the call hangs");

    let cleared_at = Instant::now();
    clear_faults(&catalog.server.base).await;
    let error = failed(
        tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("released")
            .unwrap(),
    );
    assert!(cleared_at.elapsed() < Duration::from_secs(2));
    assert_eq!(error.kind, FailureKind::Transient);
    assert_eq!(error.status, Some(503));
    assert_eq!(catalog.stock(1).await, (10, 0));
}

#[tokio::test]
async fn an_endpoint_scoped_fault_leaves_the_other_endpoint_alone() {
    let catalog = catalog().await;
    catalog
        .faults(json!({ "failNext": 5, "endpoint": "release" }))
        .await;
    let req = reservation(&[(1, 1)]);
    catalog
        .reserve(&key(), &req)
        .await
        .expect("reserve is not faulted");

    let error = catalog
        .client
        .release(&key(), &req.reservation_id, TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(error.status, Some(503));
    assert_eq!(catalog.stock(1).await, (9, 1), "the faulted release did nothing");

    let remaining = get_json(&format!("{}/sim/faults", catalog.server.base)).await;
    assert_eq!(remaining[0]["failNext"], 4);
}

#[tokio::test]
async fn a_list_of_faults_applies_each_to_its_own_endpoint() {
    let shipper = shipper(ShipmentsSimConfig::default()).await;
    shipper
        .faults(json!([
            { "failNext": 1, "failStatus": 422, "endpoint": "create" },
            { "failNext": 1, "endpoint": "cancel" },
        ]))
        .await;
    let k = key();
    let req = shipment_request(12);

    let refused = shipper.client.create(&k, &req, TIMEOUT).await.unwrap_err();
    assert_eq!(refused.kind, FailureKind::Refused);
    let shipment = shipper.client.create(&k, &req, TIMEOUT).await.unwrap();

    let transient = shipper
        .client
        .cancel(&key(), &shipment.shipment_id, TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(transient.kind, FailureKind::Transient);
    assert_eq!(transient.status, Some(503));
    shipper
        .client
        .cancel(&key(), &shipment.shipment_id, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(shipper.shipments().await[0]["status"], "cancelled");
}

#[tokio::test]
async fn latency_beyond_the_client_timeout_is_a_transient_timeout() {
    let catalog = catalog().await;
    catalog.faults(json!({ "latencyMs": 1500 })).await;
    let req = reservation(&[(1, 1)]);
    let k = key();

    let started = Instant::now();
    let error = failed(catalog.client.reserve(&k, &req, Duration::from_millis(150)).await);
    assert!(started.elapsed() < Duration::from_millis(1000));
    assert_eq!(error.kind, FailureKind::Transient);
    assert_eq!(error.class.as_str(), class::TIMEOUT);
    assert_eq!(error.status, None);

    catalog
        .client
        .reserve(&k, &req, Duration::from_secs(3))
        .await
        .expect("a patient caller gets the answer");
}

#[tokio::test]
async fn an_oversized_answer_is_a_contract_violation_not_an_allocation() {
    let announced = Router::new().route(
        "/inventory/reservations",
        post(|| async { (axum::http::StatusCode::CREATED, vec![b' '; 2 << 20]) }),
    );
    let endless = Router::new().route(
        "/shipments",
        post(|| async {
            let chunk = Bytes::from(vec![b' '; 64 * 1024]);
            let stream = futures::stream::repeat_with(move || Ok::<_, Infallible>(chunk.clone()));
            (axum::http::StatusCode::CREATED, Body::from_stream(stream))
        }),
    );
    let announced = start(announced).await;
    let endless = start(endless).await;

    let error = failed(
        CatalogClient::new(&announced.base, http())
            .reserve(&key(), &reservation(&[(1, 1)]), TIMEOUT)
            .await,
    );
    assert_contract_violation(&error);

    let started = Instant::now();
    let error = ShipmentsClient::new(&endless.base, http())
        .create(&key(), &shipment_request(1), TIMEOUT)
        .await
        .unwrap_err();
    assert_contract_violation(&error);
    assert!(
        started.elapsed() < TIMEOUT,
        "gave up at the cap, not at the timeout"
    );
}

#[tokio::test]
async fn a_reservation_that_does_not_echo_our_request_is_a_contract_violation() {
    let liar = Router::new().route(
        "/inventory/reservations",
        post(|| async {
            (
                axum::http::StatusCode::CREATED,
                axum::Json(json!({"reservationID": "someone-else", "items": [
                    {"productID": 1, "quantity": 1, "unitPrice": "1.00", "currency": "EUR"}
                ]})),
            )
        }),
    );
    let liar = start(liar).await;
    let error = failed(
        CatalogClient::new(&liar.base, http())
            .reserve(&key(), &reservation(&[(1, 1)]), TIMEOUT)
            .await,
    );
    assert_contract_violation(&error);
}

#[tokio::test]
async fn a_refused_connection_is_a_transient_connect_failure() {
    let base = format!("http://127.0.0.1:{}", free_port());
    let error = failed(
        CatalogClient::new(&base, http())
            .reserve(&key(), &reservation(&[(1, 1)]), TIMEOUT)
            .await,
    );
    assert_eq!(error.kind, FailureKind::Transient);
    assert_eq!(error.class.as_str(), class::CONNECT, "{error}");
}

#[tokio::test]
async fn an_error_rate_of_one_fails_every_call_and_of_zero_none() {
    let catalog = catalog().await;
    catalog.faults(json!({ "errorRate": 1.0 })).await;
    for _ in 0..3 {
        let error = failed(catalog.reserve(&key(), &reservation(&[(1, 1)])).await);
        assert_eq!(error.status, Some(503));
    }
    catalog.faults(json!({ "errorRate": 0.0 })).await;
    catalog.reserve(&key(), &reservation(&[(1, 1)])).await.unwrap();
}

#[tokio::test]
async fn faults_never_apply_to_the_control_api() {
    let catalog = catalog().await;
    catalog
        .faults(json!({ "hang": true, "failNext": 100, "errorRate": 1.0 }))
        .await;
    let control = async {
        let put = http()
            .put(format!("{}/sim/products/3", catalog.server.base))
            .json(&json!({ "stock": 4, "unitPrice": "2.50", "currency": "EUR" }))
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 200);
        assert_eq!(
            catalog.product(3).await,
            json!({"productID": 3, "stock": 4, "reserved": 0, "unitPrice": "2.50", "currency": "EUR"})
        );
        catalog.reservations().await
    };
    tokio::time::timeout(Duration::from_secs(2), control)
        .await
        .expect("control calls answer at once");
    clear_faults(&catalog.server.base).await;
}

#[tokio::test]
async fn invalid_fault_settings_are_refused_with_422() {
    let catalog = catalog().await;
    for faults in [
        json!({ "errorRate": 2 }),
        json!({ "endpoint": "create" }),
        json!({ "failStatus": 200 }),
        json!({ "failnext": 1 }),
        json!([{ "failNext": 1 }, { "endpoint": "nowhere" }]),
    ] {
        let response = http()
            .put(format!("{}/sim/faults", catalog.server.base))
            .json(&faults)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{faults}");
    }
    let current = get_json(&format!("{}/sim/faults", catalog.server.base)).await;
    assert_eq!(current, json!([]), "a refused PUT changes nothing");
}

#[tokio::test]
async fn a_business_call_without_an_idempotency_key_is_refused() {
    let catalog = catalog().await;
    let response = http()
        .post(format!("{}/inventory/reservations", catalog.server.base))
        .json(&reservation(&[(1, 1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(catalog.stock(1).await, (10, 0));
}

#[tokio::test]
async fn creating_a_shipment_is_idempotent_and_cancelling_it_too() {
    let shipper = shipper(ShipmentsSimConfig::default()).await;
    let k = key();
    let first = shipper
        .client
        .create(&k, &shipment_request(21), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(first.status, "created");
    let again = shipper
        .client
        .create(&k, &shipment_request(21), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(first, again);
    let listed = shipper.shipments().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["orderID"], 21);
    assert_eq!(listed[0]["idempotencyKeys"], json!([k]));
    assert_eq!(listed[0]["calls"], json!({ k: 2 }));
    assert_eq!(shipper.events().await.len(), 1, "one created event");

    let cancel_key = key();
    for _ in 0..2 {
        shipper
            .client
            .cancel(&cancel_key, &first.shipment_id, TIMEOUT)
            .await
            .unwrap();
    }
    assert_eq!(shipper.shipments().await[0]["status"], "cancelled");
    shipper
        .client
        .cancel(&key(), "shp_unknown", TIMEOUT)
        .await
        .expect("an unknown shipment counts as cancelled");
}

#[tokio::test]
async fn a_picked_up_shipment_can_no_longer_be_cancelled() {
    let shipper = shipper(ShipmentsSimConfig::default()).await;
    let shipment = shipper
        .client
        .create(&key(), &shipment_request(22), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        shipper.advance(&shipment.shipment_id, "picked_up").await.status(),
        200
    );
    let error = shipper
        .client
        .cancel(&key(), &shipment.shipment_id, TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(error.kind, FailureKind::Refused);
    assert_eq!(error.status, Some(409));
    assert_eq!(shipper.advance(&shipment.shipment_id, "lost").await.status(), 422);
    assert_eq!(shipper.advance("shp_unknown", "delivered").await.status(), 404);
}

#[tokio::test]
async fn a_cancelled_shipment_stops_auto_advance() {
    let shipper = shipper(ShipmentsSimConfig {
        auto_advance_ms: Some(500),
        ..ShipmentsSimConfig::default()
    })
    .await;
    let shipment = shipper
        .client
        .create(&key(), &shipment_request(23), TIMEOUT)
        .await
        .unwrap();
    shipper
        .client
        .cancel(&key(), &shipment.shipment_id, TIMEOUT)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(shipper.shipments().await[0]["status"], "cancelled");
    let statuses: Vec<TrackingStatus> = shipper.events().await.iter().map(|e| e.status).collect();
    assert_eq!(statuses, [TrackingStatus::Created]);
}

/// A record read back from Kafka.
struct Consumed {
    key: String,
    headers: HashMap<String, String>,
    event: TrackingEvent,
}

fn mock_kafka() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic(TOPIC, 1, 1).unwrap();
    mock
}

async fn consume(bootstrap: &str, count: usize) -> Vec<Consumed> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("sim-test-{}", Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[TOPIC]).unwrap();
    let mut consumed = Vec::new();
    while consumed.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .expect("tracking events arrive")
            .unwrap();
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8(h.value.unwrap_or_default().to_vec()).unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        consumed.push(Consumed {
            key: String::from_utf8(message.key().unwrap().to_vec()).unwrap(),
            headers,
            event: serde_json::from_slice(message.payload().unwrap()).unwrap(),
        });
    }
    consumed
}

#[tokio::test]
async fn created_and_advanced_shipments_publish_tracking_events_to_kafka() {
    let mock = mock_kafka();
    let shipper = shipper(ShipmentsSimConfig {
        kafka_bootstrap_servers: Some(mock.bootstrap_servers()),
        ..ShipmentsSimConfig::default()
    })
    .await;
    let shipment = shipper
        .client
        .create(&key(), &shipment_request(42), TIMEOUT)
        .await
        .unwrap();
    let advanced = shipper.advance(&shipment.shipment_id, "in_transit").await;
    assert_eq!(advanced.status(), 200);
    let advanced: TrackingEvent = advanced.json().await.unwrap();
    shipper
        .sim
        .flush(Duration::from_secs(10))
        .await
        .expect("both events reach the broker");

    let consumed = consume(&mock.bootstrap_servers(), 2).await;
    let statuses: Vec<TrackingStatus> = consumed.iter().map(|c| c.event.status).collect();
    assert_eq!(statuses, [TrackingStatus::Created, TrackingStatus::InTransit]);
    assert_eq!(consumed[1].event, advanced);
    for record in &consumed {
        assert_eq!(record.key, "42");
        assert_eq!(record.event.order_id, 42);
        assert_eq!(record.event.shipment_id, shipment.shipment_id);
        assert_eq!(record.headers["event-type"], "TrackingEvent");
        assert_eq!(record.headers["event-id"], record.event.event_id.to_string());
    }
    assert_eq!(shipper.shipments().await[0]["status"], "in_transit");
}

#[tokio::test]
async fn auto_advance_walks_a_new_shipment_to_delivered() {
    let mock = mock_kafka();
    let shipper = shipper(ShipmentsSimConfig {
        kafka_bootstrap_servers: Some(mock.bootstrap_servers()),
        tracking_topic: TOPIC.to_string(),
        auto_advance_ms: Some(50),
    })
    .await;
    shipper
        .client
        .create(&key(), &shipment_request(43), TIMEOUT)
        .await
        .unwrap();

    let consumed = consume(&mock.bootstrap_servers(), 4).await;
    let statuses: Vec<TrackingStatus> = consumed.iter().map(|c| c.event.status).collect();
    assert_eq!(
        statuses,
        [
            TrackingStatus::Created,
            TrackingStatus::PickedUp,
            TrackingStatus::InTransit,
            TrackingStatus::Delivered
        ]
    );
    assert_eq!(shipper.shipments().await[0]["status"], "delivered");
}

#[tokio::test]
async fn the_callers_trace_reaches_the_simulator_and_its_tracking_events() {
    use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
    use tracing::Instrument as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("sim-test")));
    // This test runs on a current-thread runtime, so the simulator's handlers share this
    // thread-local subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let mock = mock_kafka();
    let shipper = shipper(ShipmentsSimConfig {
        kafka_bootstrap_servers: Some(mock.bootstrap_servers()),
        ..ShipmentsSimConfig::default()
    })
    .await;
    let saga = tracing::info_span!("saga");
    let trace_id = saga.context().span().span_context().trace_id();
    shipper
        .client
        .create(&key(), &shipment_request(44), TIMEOUT)
        .instrument(saga)
        .await
        .unwrap();

    let consumed = consume(&mock.bootstrap_servers(), 1).await;
    let traceparent = &consumed[0].headers["traceparent"];
    assert!(
        traceparent.starts_with(&format!("00-{trace_id}-")),
        "{traceparent} continues trace {trace_id}"
    );
}

/// `POST /sim/poison` publishes one record that is not a TrackingEvent (the poison a consumer must
/// set aside), keyed by the given order, of the given size; `GET /sim/poison` counts them. Without
/// a broker it is refused, and so is a size out of range.
#[tokio::test]
async fn poison_records_reach_the_tracking_topic_and_are_counted() {
    let http = http();
    let without = shipper(ShipmentsSimConfig::default()).await;
    let r = http
        .post(format!("{}/sim/poison", without.server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);

    let mock = mock_kafka();
    let shipper = shipper(ShipmentsSimConfig {
        kafka_bootstrap_servers: Some(mock.bootstrap_servers()),
        ..ShipmentsSimConfig::default()
    })
    .await;
    let base = shipper.server.base.clone();
    for bytes in [10, 2_000_000] {
        let r = http
            .post(format!("{base}/sim/poison"))
            .json(&json!({"bytes": bytes}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bytes} bytes");
    }
    let r = http
        .post(format!("{base}/sim/poison"))
        .json(&json!({"orderID": 9, "bytes": 50_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get_json(&format!("{base}/sim/poison")).await["published"], 1);

    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("group.id", "poison-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    rdkafka::consumer::Consumer::subscribe(&consumer, &["shipments.tracking-events"]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(std::time::Instant::now() < deadline, "no poison record read");
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let payload = rdkafka::Message::payload(&m).unwrap();
            assert_eq!(payload.len(), 50_000);
            assert_eq!(rdkafka::Message::key(&m), Some(&b"9"[..]));
            assert!(
                serde_json::from_slice::<TrackingEvent>(payload).is_err(),
                "not a TrackingEvent"
            );
            break;
        }
    }
}
