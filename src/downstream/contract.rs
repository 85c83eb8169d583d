//! Wire types of the downstream contracts (SPEC §4 and the TrackingEvent of §5).
//!
//! These are the JSON bodies exchanged with the Product Catalog and Shipment Tracking services and
//! the TrackingEvents the shipper publishes to Kafka. Field names follow the seed's spelling
//! (`productID`, `orderID`, `reservationID`, …), so every field carries an explicit rename rather
//! than relying on `camelCase` (which would give `productId`).
//!
//! Money is a [`Decimal`] written and read as a JSON string (`"59.98"`); a price sent as a JSON
//! number is refused when reading, so a catalog that sends floats breaks the contract visibly.
//!
//! The service's clients ([`super::catalog`], [`super::shipments`]) and the simulators
//! ([`crate::sim`]) share these types and nothing else.

use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// One order line as sent downstream: a product and how many of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LineItem {
    /// The catalog's product id (a positive 32-bit integer).
    #[serde(rename = "productID")]
    pub product_id: i32,
    /// How many units (1–10,000 once validated by the API).
    pub quantity: i32,
}

/// Body of `POST /inventory/reservations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationRequest {
    /// Our id for the reservation (the service sends a UUID string); the catalog echoes it and it
    /// is what `DELETE /inventory/reservations/{reservationID}` releases.
    #[serde(rename = "reservationID")]
    pub reservation_id: String,
    /// Every line to reserve; the catalog reserves all of them or none.
    pub items: Vec<LineItem>,
}

/// One reserved line in the catalog's 201 answer, priced by the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedItem {
    /// The product reserved.
    #[serde(rename = "productID")]
    pub product_id: i32,
    /// The quantity reserved (must equal the requested quantity).
    pub quantity: i32,
    /// The catalog's unit price, a decimal string on the wire.
    #[serde(rename = "unitPrice", with = "rust_decimal::serde::str")]
    pub unit_price: Decimal,
    /// ISO 4217 code, three upper-case letters (`"EUR"`).
    pub currency: String,
}

/// The catalog's 201 answer to a reservation request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Echo of our reservation id.
    #[serde(rename = "reservationID")]
    pub reservation_id: String,
    /// The reserved lines, each with its price.
    pub items: Vec<ReservedItem>,
}

/// One product the catalog could not reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unavailable {
    /// The product that is short (or unknown).
    #[serde(rename = "productID")]
    pub product_id: i32,
    /// The quantity we asked for.
    pub requested: i32,
    /// The quantity the catalog still had; 0 for an unknown product.
    pub available: i64,
}

/// The catalog's 409 answer: not enough stock for one or more lines, nothing reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnavailableAnswer {
    /// Human-readable reason.
    pub error: String,
    /// Every line that could not be reserved.
    pub unavailable: Vec<Unavailable>,
}

/// Body of `POST /shipments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateShipmentRequest {
    /// The order being shipped.
    #[serde(rename = "orderID")]
    pub order_id: i32,
    /// The customer who placed it.
    #[serde(rename = "userID")]
    pub user_id: i32,
    /// What goes in the parcel.
    pub items: Vec<LineItem>,
}

/// The shipper's 201 answer to `POST /shipments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    /// The shipper's id for the shipment (opaque, non-empty, at most 200 characters).
    #[serde(rename = "shipmentID")]
    pub shipment_id: String,
    /// The shipment's status as the shipper spells it (normally `created`). Kept as text: the
    /// service only needs the id, and a status it does not know is no reason to refuse a shipment.
    pub status: String,
}

/// Status carried by a [`TrackingEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackingStatus {
    /// The shipment was registered.
    Created,
    /// The carrier collected the parcel.
    PickedUp,
    /// The parcel is on its way.
    InTransit,
    /// The parcel is out for delivery today.
    OutForDelivery,
    /// The parcel was delivered.
    Delivered,
    /// Something went wrong (damaged, lost, address problem).
    Exception,
    /// The parcel went back to the sender.
    Returned,
}

impl TrackingStatus {
    /// Every tracking status, in the order a parcel normally meets them.
    pub const ALL: [TrackingStatus; 7] = [
        TrackingStatus::Created,
        TrackingStatus::PickedUp,
        TrackingStatus::InTransit,
        TrackingStatus::OutForDelivery,
        TrackingStatus::Delivered,
        TrackingStatus::Exception,
        TrackingStatus::Returned,
    ];

    /// The wire spelling (`"picked_up"`).
    pub fn as_str(self) -> &'static str {
        match self {
            TrackingStatus::Created => "created",
            TrackingStatus::PickedUp => "picked_up",
            TrackingStatus::InTransit => "in_transit",
            TrackingStatus::OutForDelivery => "out_for_delivery",
            TrackingStatus::Delivered => "delivered",
            TrackingStatus::Exception => "exception",
            TrackingStatus::Returned => "returned",
        }
    }

    /// Parses the wire spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }
}

impl fmt::Display for TrackingStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Status of a shipment as the Shipment Tracking service reports it: `cancelled`, or its latest
/// tracking status (`created` once registered). On the wire it is spelt as that status is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "&'static str", try_from = "String")]
pub enum ShipmentStatus {
    /// Cancelled before it was collected.
    Cancelled,
    /// Its latest tracking status.
    Tracked(TrackingStatus),
}

impl ShipmentStatus {
    /// Registered, not yet collected.
    pub const CREATED: ShipmentStatus = ShipmentStatus::Tracked(TrackingStatus::Created);

    /// The wire spelling (`"cancelled"`, `"picked_up"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ShipmentStatus::Cancelled => "cancelled",
            ShipmentStatus::Tracked(status) => status.as_str(),
        }
    }
}

impl fmt::Display for ShipmentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<TrackingStatus> for ShipmentStatus {
    fn from(status: TrackingStatus) -> Self {
        ShipmentStatus::Tracked(status)
    }
}

impl From<ShipmentStatus> for &'static str {
    fn from(status: ShipmentStatus) -> Self {
        status.as_str()
    }
}

impl TryFrom<String> for ShipmentStatus {
    type Error = String;

    fn try_from(spelling: String) -> Result<Self, Self::Error> {
        if spelling == ShipmentStatus::Cancelled.as_str() {
            return Ok(ShipmentStatus::Cancelled);
        }
        TrackingStatus::parse(&spelling)
            .map(ShipmentStatus::Tracked)
            .ok_or_else(|| format!("unknown shipment status {spelling:?}"))
    }
}

/// A shipment's progress, published by Shipment Tracking to Kafka (`shipments.tracking-events`).
///
/// On the wire: `{eventID, shipmentID, orderID, status, occurredAt}`, `occurredAt` in RFC 3339.
/// The Kafka record's key is the orderID as a decimal string; its headers carry `event-type`
/// (`TrackingEvent`), `event-id`, and the W3C `traceparent` when there is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackingEvent {
    /// Unique per event; consumers deduplicate on it. Any non-empty text of at most
    /// [`MAX_EVENT_ID_LEN`] bytes without control characters (the shipper's own ids; ours are UUIDs).
    #[serde(rename = "eventID")]
    pub event_id: String,
    /// The shipment it is about.
    #[serde(rename = "shipmentID")]
    pub shipment_id: String,
    /// The order the shipment belongs to.
    #[serde(rename = "orderID")]
    pub order_id: i32,
    /// The new tracking status.
    pub status: TrackingStatus,
    /// When it happened, RFC 3339.
    #[serde(rename = "occurredAt", with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
}

/// Longest `eventID` of a TrackingEvent the consumer accepts, in bytes.
pub const MAX_EVENT_ID_LEN: usize = 200;

/// The `event-type` header value of a [`TrackingEvent`] record.
pub const TRACKING_EVENT_TYPE: &str = "TrackingEvent";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipment_statuses_are_spelt_as_their_tracking_status_or_cancelled() {
        let spellings: Vec<String> = [ShipmentStatus::CREATED, ShipmentStatus::Cancelled]
            .into_iter()
            .chain(TrackingStatus::ALL.into_iter().map(ShipmentStatus::from))
            .map(|s| serde_json::to_value(s).unwrap().as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            spellings,
            [
                "created",
                "cancelled",
                "created",
                "picked_up",
                "in_transit",
                "out_for_delivery",
                "delivered",
                "exception",
                "returned"
            ]
        );
        for spelling in spellings {
            let status: ShipmentStatus =
                serde_json::from_value(serde_json::Value::String(spelling.clone())).unwrap();
            assert_eq!(status.as_str(), spelling);
        }
        assert!(serde_json::from_str::<ShipmentStatus>("\"lost\"").is_err());
    }
    use serde_json::json;

    #[test]
    fn reservation_uses_the_seed_field_names_and_string_money() {
        let reservation = Reservation {
            reservation_id: "r-1".into(),
            items: vec![ReservedItem {
                product_id: 7,
                quantity: 2,
                unit_price: Decimal::new(2999, 2),
                currency: "EUR".into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(&reservation).unwrap(),
            json!({"reservationID": "r-1", "items": [
                {"productID": 7, "quantity": 2, "unitPrice": "29.99", "currency": "EUR"}
            ]})
        );
    }

    #[test]
    fn a_price_sent_as_a_json_number_is_refused() {
        let body = json!({"reservationID": "r-1", "items": [
            {"productID": 7, "quantity": 2, "unitPrice": 29.99, "currency": "EUR"}
        ]});
        assert!(serde_json::from_value::<Reservation>(body).is_err());
    }

    #[test]
    fn tracking_event_round_trips_with_snake_case_status() {
        let event = TrackingEvent {
            event_id: "00000000-0000-0000-0000-000000000000".into(),
            shipment_id: "s-1".into(),
            order_id: 42,
            status: TrackingStatus::OutForDelivery,
            occurred_at: time::macros::datetime!(2026-01-02 03:04:05 UTC),
        };
        let value = serde_json::to_value(&event).unwrap();
        assert_eq!(
            value,
            json!({"eventID": "00000000-0000-0000-0000-000000000000", "shipmentID": "s-1",
                   "orderID": 42, "status": "out_for_delivery",
                   "occurredAt": "2026-01-02T03:04:05Z"})
        );
        assert_eq!(serde_json::from_value::<TrackingEvent>(value).unwrap(), event);
    }

    #[test]
    fn tracking_status_parses_every_wire_spelling() {
        for status in TrackingStatus::ALL {
            assert_eq!(TrackingStatus::parse(status.as_str()), Some(status));
            assert_eq!(serde_json::to_value(status).unwrap(), json!(status.as_str()));
        }
        assert_eq!(TrackingStatus::parse("cancelled"), None);
    }
}
