//! The Shipment Tracking simulator: shipments, and the TrackingEvents a real shipper publishes.
//!
//! Business endpoints (SPEC §4), subject to faults:
//! - `POST /shipments` (`Idempotency-Key` required) `{orderID, userID, items}` → 201
//!   `{shipmentID, status: "created"}` and a `created` TrackingEvent. The same key with the same
//!   body replays the first answer without a second shipment or event; with another body → 422.
//! - `POST /shipments/{shipmentID}/cancel` → 200 `{shipmentID, status: "cancelled"}`, again on a
//!   repeat; 404 for an unknown shipment; 409 once the parcel was picked up.
//!
//! Control API (never faulted):
//! - `GET /sim/shipments` → a list of `{shipmentID, orderID, userID, status, items,
//!   idempotencyKeys, calls}`;
//! - `POST /sim/shipments/{shipmentID}/advance` `{status}` (any tracking status) sets the status
//!   and publishes that TrackingEvent; answers the event;
//! - `GET /sim/events` → the TrackingEvents published so far (the last 100,000);
//! - `GET /sim/calls` → `{endpoint: {idempotencyKey: calls}}`;
//! - `PUT`, `GET`, `DELETE /sim/faults` (endpoints `create`, `cancel`).
//!
//! With `auto_advance_ms`, each new shipment walks `picked_up` → `in_transit` → `delivered`, one
//! step every N ms; it stops when the shipment is cancelled (or reaches a final or exceptional
//! status some other way), and never moves a shipment backwards.
//!
//! Events go to Kafka when `kafka_bootstrap_servers` is set: JSON [`TrackingEvent`], key = orderID
//! as a decimal string, headers `event-type: TrackingEvent`, `event-id`, and the W3C trace context
//! of the handling span when it has one. They are produced in the order they happen, gathered for
//! up to 50 ms into a batch, one request in flight at a time (so a retry cannot reorder them); a
//! retry after a lost acknowledgement may publish an event twice, with the same eventID, as any
//! at-least-once shipper may. A delivery failure is logged, not retried by the simulator.
//!
//! The producer is deliberately not idempotent: after a broker restart librdkafka's idempotent
//! producer may bump its epoch locally, which Tansu 0.6.0 (the project's test broker) does not
//! support: it panics in its storage task and stops serving every client (see
//! docs/reliability.md). A simulator that wedges the test broker would hide what the service does.
//!
//! A `malformed` fault answers creations with bad JSON (the shipment is still created); cancel
//! answers are unaffected.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::Context as _;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use tracing::Instrument as _;
use uuid::Uuid;

use super::faults::{FaultError, FaultSpec, Faults, Verdict, bad_json_answer};
use super::{
    CallLog, current_trace_headers, fault_routes, idempotency_key, json_error, missing_idempotency_key,
    parse_body, request_span,
};
use crate::downstream::contract::{
    CreateShipmentRequest, LineItem, Shipment, ShipmentStatus, TRACKING_EVENT_TYPE, TrackingEvent,
    TrackingStatus,
};

/// Fault endpoint names of the shipper.
pub const ENDPOINTS: &[&str] = &[CREATE, CANCEL];
const CREATE: &str = "create";
const CANCEL: &str = "cancel";

/// Default topic of the TrackingEvents.
pub const DEFAULT_TRACKING_TOPIC: &str = crate::topics::TRACKING_EVENTS;

/// How many published events `GET /sim/events` remembers.
const EVENT_LOG_CAPACITY: usize = 100_000;

/// The steps of auto-advance, in order.
const AUTO_STEPS: [TrackingStatus; 3] = [
    TrackingStatus::PickedUp,
    TrackingStatus::InTransit,
    TrackingStatus::Delivered,
];

/// Settings of the Shipment Tracking simulator.
#[derive(Debug, Clone)]
pub struct ShipmentsSimConfig {
    /// Kafka cluster to publish TrackingEvents to; events are only kept in memory when unset.
    pub kafka_bootstrap_servers: Option<String>,
    /// Topic of the TrackingEvents (default `shipments.tracking-events`).
    pub tracking_topic: String,
    /// Walk each new shipment forward every N ms; off when unset.
    pub auto_advance_ms: Option<u64>,
}

impl Default for ShipmentsSimConfig {
    fn default() -> Self {
        ShipmentsSimConfig {
            kafka_bootstrap_servers: None,
            tracking_topic: DEFAULT_TRACKING_TOPIC.to_string(),
            auto_advance_ms: None,
        }
    }
}

/// The Shipment Tracking simulator; cheap to clone (all clones share one state).
#[derive(Clone)]
pub struct ShipmentsSim {
    inner: Arc<Inner>,
}

struct Inner {
    config: ShipmentsSimConfig,
    producer: Option<FutureProducer>,
    state: Mutex<Store>,
    faults: Faults,
}

#[derive(Default)]
struct Store {
    /// Shipments in creation order.
    shipments: Vec<ShipmentRecord>,
    by_id: HashMap<String, usize>,
    /// The answer given to each creation key, replayed on a repeat.
    answers: HashMap<String, StoredAnswer>,
    calls: CallLog,
    events: VecDeque<TrackingEvent>,
    /// Poison records published (`POST /sim/poison`).
    poisoned: u64,
}

struct ShipmentRecord {
    shipment_id: String,
    order_id: i32,
    user_id: i32,
    items: Vec<LineItem>,
    status: ShipmentStatus,
    /// Keys of the creation requests answered with this shipment.
    keys: Vec<String>,
}

struct StoredAnswer {
    request: CreateShipmentRequest,
    status: StatusCode,
    body: Value,
}

/// One entry of `GET /sim/shipments`.
#[derive(Debug, Serialize)]
struct ShipmentView {
    #[serde(rename = "shipmentID")]
    shipment_id: String,
    #[serde(rename = "orderID")]
    order_id: i32,
    #[serde(rename = "userID")]
    user_id: i32,
    status: ShipmentStatus,
    items: Vec<LineItem>,
    #[serde(rename = "idempotencyKeys")]
    idempotency_keys: Vec<String>,
    calls: BTreeMap<String, u64>,
}

/// Body of `POST /sim/shipments/{shipmentID}/advance`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdvanceBody {
    status: String,
}

/// How long the simulator's producer gathers tracking events into one batch (`linger.ms`).
const LINGER_MS: u64 = 50;

impl ShipmentsSim {
    /// A simulator with no shipments; connects a Kafka producer when
    /// `kafka_bootstrap_servers` is set (the connection itself is made lazily by librdkafka).
    pub fn new(config: ShipmentsSimConfig) -> anyhow::Result<Self> {
        let producer = match &config.kafka_bootstrap_servers {
            Some(servers) => Some({
                let mut config = ClientConfig::new();
                config
                    .set("bootstrap.servers", servers)
                    .set("client.id", "ostore-shipments-sim")
                    .set("enable.idempotence", "false")
                    .set("acks", "all")
                    .set("max.in.flight.requests.per.connection", "1")
                    // Larger batches under load (a 5 ms linger sent a few events each): a broker
                    // stores and serves whole batches, and librdkafka's mock cluster (the
                    // embedded broker of `dev` and `bench`) looks a fetch's offset up by walking
                    // a partition's batches one by one, so small batches made each fetch of the
                    // service's tracking consumer dearer as the partition filled
                    // (docs/performance.md, finding 39). 50 ms is nothing to a shipper's
                    // tracking events.
                    .set("linger.ms", LINGER_MS.to_string())
                    // A shipper keeps trying through a broker outage: 10 minutes before an event
                    // is given up (a shorter limit dropped events during long outages).
                    .set("message.timeout.ms", "600000");
                // The same KAFKA_CLIENT_* pass-through (TLS, SASL) as the service.
                crate::kafka::client_properties().apply(&mut config);
                config
                    .create::<FutureProducer>()
                    .with_context(|| format!("creating a Kafka producer for {servers}"))?
            }),
            None => None,
        };
        if config.tracking_topic.trim().is_empty() {
            anyhow::bail!("the tracking topic name must not be empty");
        }
        Ok(ShipmentsSim {
            inner: Arc::new(Inner {
                config,
                producer,
                state: Mutex::new(Store::default()),
                faults: Faults::new(ENDPOINTS),
            }),
        })
    }

    /// Replaces the fault set, as `PUT /sim/faults` does (for start-up flags).
    pub fn set_faults(&self, faults: Vec<FaultSpec>) -> Result<(), FaultError> {
        self.inner.faults.replace(faults)
    }

    /// Makes this process leave on its `n`th business call (`--crash-after`; 0: never).
    pub fn crash_after(&self, n: u64) {
        self.inner.faults.crash_after(n);
    }

    /// Waits up to `timeout` for the TrackingEvents still queued to reach Kafka. Call it before
    /// dropping the last handle on shutdown: dropping the producer discards what is still queued.
    pub async fn flush(&self, timeout: Duration) -> anyhow::Result<()> {
        let Some(producer) = self.inner.producer.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .context("the Kafka flush task failed")?
            .context("tracking events still queued after the flush timeout")
    }

    /// The HTTP routes: business endpoints and the `/sim` control API.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/shipments", post(create))
            .route("/shipments/{shipment_id}/cancel", post(cancel))
            .route("/sim/shipments", get(list_shipments))
            .route("/sim/shipments/{shipment_id}/advance", post(advance))
            .route("/sim/events", get(list_events))
            .route("/sim/calls", get(list_calls))
            .route("/sim/poison", post(poison).get(poisoned))
            .route(
                "/sim/faults",
                put(put_faults).get(get_faults).delete(delete_faults),
            )
            .with_state(self.clone())
    }

    async fn create(&self, headers: HeaderMap, body: Bytes) -> Response {
        let Some(key) = idempotency_key(&headers) else {
            return missing_idempotency_key();
        };
        self.inner.lock().calls.count(CREATE, &key);
        let malformed = match self.inner.faults.apply(CREATE).await {
            Verdict::Answer(response) => return response,
            Verdict::Proceed { malformed } => malformed,
        };
        let request: CreateShipmentRequest = match parse_body(&body) {
            Ok(request) => request,
            Err(rejection) => return rejection.into_response(),
        };
        let (status, body, created) = self.inner.create(&key, request);
        if let (Some(shipment_id), Some(every)) = (created, self.inner.config.auto_advance_ms) {
            let span = tracing::info_span!("sim.shipments.auto_advance", %shipment_id);
            tokio::spawn(
                auto_advance(
                    Arc::downgrade(&self.inner),
                    shipment_id,
                    Duration::from_millis(every),
                )
                .instrument(span),
            );
        }
        match malformed {
            None => (status, Json(body)).into_response(),
            Some(_) => bad_json_answer(status, "{\"shipmentID\": "),
        }
    }

    async fn cancel(&self, headers: HeaderMap, shipment_id: String) -> Response {
        if let Some(key) = idempotency_key(&headers) {
            self.inner.lock().calls.count(CANCEL, &key);
        }
        if let Verdict::Answer(response) = self.inner.faults.apply(CANCEL).await {
            return response;
        }
        let mut store = self.inner.lock();
        let Some(&index) = store.by_id.get(&shipment_id) else {
            return json_error(StatusCode::NOT_FOUND, "no such shipment");
        };
        let record = &mut store.shipments[index];
        match record.status {
            ShipmentStatus::CREATED | ShipmentStatus::Cancelled => {
                record.status = ShipmentStatus::Cancelled;
                Json(Shipment {
                    shipment_id,
                    status: ShipmentStatus::Cancelled.to_string(),
                })
                .into_response()
            }
            other => (
                StatusCode::CONFLICT,
                Json(serde_json::json!({
                    "error": format!("shipment is already {other}; it can no longer be cancelled"),
                    "status": other,
                })),
            )
                .into_response(),
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Handles one creation request; returns the answer and, when a shipment was created, its id.
    fn create(&self, key: &str, request: CreateShipmentRequest) -> (StatusCode, Value, Option<String>) {
        let mut store = self.lock();
        if let Some(stored) = store.answers.get(key) {
            if stored.request == request {
                return (stored.status, stored.body.clone(), None);
            }
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({"error": "Idempotency-Key reused with a different request"}),
                None,
            );
        }
        let (status, body, created) = match check_request(&request) {
            Err(message) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({ "error": message }),
                None,
            ),
            Ok(()) => {
                let shipment_id = format!("shp_{}", Uuid::new_v4().simple());
                let index = store.shipments.len();
                store.by_id.insert(shipment_id.clone(), index);
                store.shipments.push(ShipmentRecord {
                    shipment_id: shipment_id.clone(),
                    order_id: request.order_id,
                    user_id: request.user_id,
                    items: request.items.clone(),
                    status: ShipmentStatus::CREATED,
                    keys: vec![key.to_string()],
                });
                self.emit(&mut store, index, TrackingStatus::Created);
                let body = serde_json::to_value(Shipment {
                    shipment_id: shipment_id.clone(),
                    status: ShipmentStatus::CREATED.to_string(),
                })
                .expect("contract types serialize to JSON");
                (StatusCode::CREATED, body, Some(shipment_id))
            }
        };
        store.answers.insert(
            key.to_string(),
            StoredAnswer {
                request,
                status,
                body: body.clone(),
            },
        );
        (status, body, created)
    }

    /// Sets a shipment's tracking status and publishes the event. Called with the store locked,
    /// so events of one shipment are enqueued to Kafka in the order they happen.
    fn emit(&self, store: &mut Store, index: usize, status: TrackingStatus) -> TrackingEvent {
        let record = &mut store.shipments[index];
        record.status = status.into();
        let event = TrackingEvent {
            event_id: Uuid::new_v4().to_string(),
            shipment_id: record.shipment_id.clone(),
            order_id: record.order_id,
            status,
            occurred_at: OffsetDateTime::now_utc(),
        };
        if store.events.len() == EVENT_LOG_CAPACITY {
            store.events.pop_front();
        }
        store.events.push_back(event.clone());
        if let Some(producer) = &self.producer {
            self.publish(producer, &event);
        }
        event
    }

    fn publish(&self, producer: &FutureProducer, event: &TrackingEvent) {
        let payload = serde_json::to_vec(event).expect("contract types serialize to JSON");
        let key = event.order_id.to_string();
        let event_id = event.event_id.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "event-type",
                value: Some(TRACKING_EVENT_TYPE),
            })
            .insert(Header {
                key: "event-id",
                value: Some(event_id.as_str()),
            });
        // A PRODUCER span per event (OpenTelemetry messaging conventions); the consumer's span
        // continues from it through the message's `traceparent`.
        let span = tracing::info_span!(
            "sim.publish",
            otel.name = format!("send {}", self.config.tracking_topic),
            otel.kind = "producer",
            messaging.system = "kafka",
            messaging.operation.type = "send",
            messaging.operation.name = "send",
            messaging.destination.name = %self.config.tracking_topic,
            messaging.message.id = %event_id,
            messaging.kafka.message.key = %key,
            messaging.destination.partition.id = tracing::field::Empty,
            messaging.kafka.offset = tracing::field::Empty,
        );
        for (name, value) in span.in_scope(current_trace_headers) {
            headers = headers.insert(Header {
                key: name.as_str(),
                value: Some(value.as_str()),
            });
        }
        let record = FutureRecord::to(&self.config.tracking_topic)
            .key(key.as_str())
            .payload(payload.as_slice())
            .headers(headers);
        match producer.send_result(record) {
            Ok(delivery) => {
                let event_id = event.event_id.clone();
                tokio::spawn(
                    async move {
                        match delivery.await {
                            Ok(Ok(d)) => {
                                let span = tracing::Span::current();
                                span.record("messaging.destination.partition.id", d.partition.to_string());
                                span.record("messaging.kafka.offset", d.offset);
                            }
                            Ok(Err((error, _))) => {
                                tracing::warn!(%event_id, %error, "tracking event not delivered")
                            }
                            Err(_) => tracing::warn!(%event_id, "tracking event delivery abandoned"),
                        }
                    }
                    .instrument(span),
                );
            }
            Err((error, _)) => {
                tracing::warn!(event_id = %event.event_id, %error, "tracking event not enqueued")
            }
        }
    }
}

/// Refuses requests no shipper would accept: non-positive ids or quantities, no lines.
fn check_request(request: &CreateShipmentRequest) -> Result<(), String> {
    if request.order_id <= 0 {
        return Err(format!("orderID must be positive, got {}", request.order_id));
    }
    if request.user_id <= 0 {
        return Err(format!("userID must be positive, got {}", request.user_id));
    }
    if request.items.is_empty() {
        return Err("items must not be empty".into());
    }
    for line in &request.items {
        if line.product_id <= 0 || line.quantity <= 0 {
            return Err(format!("productID and quantity must be positive, got {line:?}"));
        }
    }
    Ok(())
}

/// Rank of a status along the normal path; `None` for statuses auto-advance never leaves.
fn progress(status: ShipmentStatus) -> Option<u8> {
    match status {
        ShipmentStatus::Tracked(TrackingStatus::Created) => Some(0),
        ShipmentStatus::Tracked(TrackingStatus::PickedUp) => Some(1),
        ShipmentStatus::Tracked(TrackingStatus::InTransit) => Some(2),
        ShipmentStatus::Tracked(TrackingStatus::OutForDelivery) => Some(3),
        ShipmentStatus::Tracked(
            TrackingStatus::Delivered | TrackingStatus::Exception | TrackingStatus::Returned,
        )
        | ShipmentStatus::Cancelled => None,
    }
}

/// Walks one shipment through [`AUTO_STEPS`]; stops when the simulator is gone or the shipment
/// reached a status it never leaves.
async fn auto_advance(inner: Weak<Inner>, shipment_id: String, every: Duration) {
    for step in AUTO_STEPS {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut store = inner.lock();
        let Some(&index) = store.by_id.get(&shipment_id) else {
            return;
        };
        let Some(current) = progress(store.shipments[index].status) else {
            return;
        };
        let target = progress(step.into()).unwrap_or(u8::MAX);
        if current < target {
            inner.emit(&mut store, index, step);
        }
    }
}

async fn create(State(sim): State<ShipmentsSim>, headers: HeaderMap, body: Bytes) -> Response {
    let span = request_span("shipments.create", "POST", "/shipments", &headers);
    sim.create(headers, body).instrument(span).await
}

async fn cancel(
    State(sim): State<ShipmentsSim>,
    Path(shipment_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let span = request_span(
        "shipments.cancel",
        "POST",
        "/shipments/{shipmentID}/cancel",
        &headers,
    );
    sim.cancel(headers, shipment_id).instrument(span).await
}

async fn advance(
    State(sim): State<ShipmentsSim>,
    Path(shipment_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let span = request_span(
        "sim.shipments.advance",
        "POST",
        "/sim/shipments/{shipmentID}/advance",
        &headers,
    );
    let _entered = span.enter();
    let request: AdvanceBody = match parse_body(&body) {
        Ok(request) => request,
        Err(rejection) => return rejection.into_response(),
    };
    let Some(status) = TrackingStatus::parse(&request.status) else {
        return json_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!(
                "status must be one of {:?}",
                TrackingStatus::ALL.map(TrackingStatus::as_str)
            ),
        );
    };
    let mut store = sim.inner.lock();
    let Some(&index) = store.by_id.get(&shipment_id) else {
        return json_error(StatusCode::NOT_FOUND, "no such shipment");
    };
    let event = sim.inner.emit(&mut store, index, status);
    Json(event).into_response()
}

async fn list_shipments(State(sim): State<ShipmentsSim>) -> Response {
    let store = sim.inner.lock();
    let views: Vec<ShipmentView> = store
        .shipments
        .iter()
        .map(|record| ShipmentView {
            shipment_id: record.shipment_id.clone(),
            order_id: record.order_id,
            user_id: record.user_id,
            status: record.status,
            items: record.items.clone(),
            idempotency_keys: record.keys.clone(),
            calls: store.calls.for_keys(CREATE, &record.keys),
        })
        .collect();
    Json(views).into_response()
}

async fn list_events(State(sim): State<ShipmentsSim>) -> Response {
    Json(sim.inner.lock().events.clone()).into_response()
}

/// Largest poison record (below the broker's 1 MB default limit, so that it reaches the topic).
const MAX_POISON_BYTES: usize = 900_000;

/// `POST /sim/poison` `{orderID?, bytes?}`: publishes one record that is not a TrackingEvent (a
/// JSON text cut off, `bytes` long, 780,000 by default) to the tracking topic, keyed by `orderID`
/// (0 by default), and answers once the broker acknowledged it: the poison a consumer must set
/// aside without stopping (fault-injection runs use it).
async fn poison(State(sim): State<ShipmentsSim>, body: Bytes) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct PoisonRequest {
        #[serde(default, rename = "orderID")]
        order_id: i32,
        #[serde(default = "default_poison_bytes")]
        bytes: usize,
    }
    fn default_poison_bytes() -> usize {
        780_000
    }
    let req: PoisonRequest = if body.is_empty() {
        PoisonRequest {
            order_id: 0,
            bytes: default_poison_bytes(),
        }
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("invalid poison request: {e}")),
        }
    };
    if !(32..=MAX_POISON_BYTES).contains(&req.bytes) {
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!("bytes must be from 32 to {MAX_POISON_BYTES}"),
        );
    }
    let Some(producer) = sim.inner.producer.clone() else {
        return json_error(StatusCode::CONFLICT, "the simulator publishes to no Kafka broker");
    };
    let head = format!("{{\"orderID\": {}, \"status\": \"", req.order_id);
    let payload = head.clone() + &"x".repeat(req.bytes - head.len());
    let key = req.order_id.to_string();
    let record = FutureRecord::to(&sim.inner.config.tracking_topic)
        .key(key.as_str())
        .payload(payload.as_bytes());
    match producer.send(record, Duration::from_secs(30)).await {
        Ok(_) => {
            sim.inner.lock().poisoned += 1;
            Json(serde_json::json!({"published": true, "bytes": req.bytes})).into_response()
        }
        Err((e, _)) => json_error(StatusCode::SERVICE_UNAVAILABLE, &format!("not published: {e}")),
    }
}

/// `GET /sim/poison`: how many poison records were published.
async fn poisoned(State(sim): State<ShipmentsSim>) -> Response {
    Json(serde_json::json!({"published": sim.inner.lock().poisoned})).into_response()
}

async fn list_calls(State(sim): State<ShipmentsSim>) -> Response {
    Json(sim.inner.lock().calls.all().clone()).into_response()
}

async fn put_faults(State(sim): State<ShipmentsSim>, body: Bytes) -> Response {
    fault_routes::put(&sim.inner.faults, &body)
}

async fn get_faults(State(sim): State<ShipmentsSim>) -> Response {
    fault_routes::get(&sim.inner.faults)
}

async fn delete_faults(State(sim): State<ShipmentsSim>) -> Response {
    fault_routes::delete(&sim.inner.faults)
}
