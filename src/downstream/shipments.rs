//! Client of the Shipment Tracking service (SPEC §4).
//!
//! [`ShipmentsClient::create`] registers the shipment of an order and returns the shipper's
//! `shipmentID`; [`ShipmentsClient::cancel`] cancels it. Both are idempotent on the
//! `Idempotency-Key` the caller passes. The shipment's progress arrives separately, as
//! [`super::contract::TrackingEvent`]s on Kafka.

use std::time::Duration;

use super::contract::{CreateShipmentRequest, Shipment};
use super::transport;
use crate::downstream::DownstreamError;

/// Longest shipment id accepted from the shipper.
pub const MAX_SHIPMENT_ID_CHARS: usize = 200;

/// HTTP client of the Shipment Tracking service.
#[derive(Debug, Clone)]
pub struct ShipmentsClient {
    base_url: String,
    http: reqwest::Client,
}

impl ShipmentsClient {
    /// A client for the shipper at `base_url` (`SHIPMENTS_URL`), sending through `http`. An
    /// unusable URL surfaces as a transient `request` failure of each call.
    pub fn new(base_url: &str, http: reqwest::Client) -> Self {
        ShipmentsClient {
            base_url: base_url.trim_end_matches('/').to_string(),
            http,
        }
    }

    /// Creates the shipment (`POST /shipments`); `timeout` bounds the whole call.
    ///
    /// The answer must carry a non-empty `shipmentID` of at most 200 characters without control
    /// characters; anything else is a transient `contract_violation`.
    pub async fn create(
        &self,
        idempotency_key: &str,
        req: &CreateShipmentRequest,
        timeout: Duration,
    ) -> Result<Shipment, DownstreamError> {
        let url = transport::join_url(&self.base_url, "/shipments");
        let response = transport::send(
            self.http.post(url).json(req),
            "/shipments",
            idempotency_key,
            timeout,
        )
        .await?;
        if !matches!(response.status, 200 | 201) {
            return Err(response.into_error());
        }
        let shipment: Shipment = response.json()?;
        validate_shipment(&shipment).map_err(|e| e.with_status(response.status))?;
        Ok(shipment)
    }

    /// Cancels a shipment (`POST /shipments/{shipmentID}/cancel`).
    ///
    /// 200, 204 (and any other 2xx) and 404 all mean there is no live shipment any more.
    pub async fn cancel(
        &self,
        idempotency_key: &str,
        shipment_id: &str,
        timeout: Duration,
    ) -> Result<(), DownstreamError> {
        const ROUTE: &str = "/shipments/{shipmentID}/cancel";
        let url = transport::url_of(&self.base_url, ROUTE, shipment_id);
        transport::undo(self.http.post(url), ROUTE, idempotency_key, timeout).await
    }
}

/// Checks a shipment answer: non-empty id, at most [`MAX_SHIPMENT_ID_CHARS`], no control
/// characters.
pub fn validate_shipment(shipment: &Shipment) -> Result<(), DownstreamError> {
    let id = &shipment.shipment_id;
    if id.trim().is_empty() {
        return Err(DownstreamError::contract_violation(
            "shipment answer has an empty shipmentID",
        ));
    }
    if id.chars().count() > MAX_SHIPMENT_ID_CHARS {
        return Err(DownstreamError::contract_violation(format!(
            "shipmentID is longer than {MAX_SHIPMENT_ID_CHARS} characters"
        )));
    }
    if id.chars().any(char::is_control) {
        return Err(DownstreamError::contract_violation(
            "shipmentID contains control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipment(id: &str) -> Shipment {
        Shipment {
            shipment_id: id.into(),
            status: "created".into(),
        }
    }

    #[test]
    fn shipment_ids_must_be_present_short_and_printable() {
        assert!(validate_shipment(&shipment("shp-1")).is_ok());
        assert!(validate_shipment(&shipment(&"x".repeat(200))).is_ok());
        assert!(validate_shipment(&shipment("")).is_err());
        assert!(validate_shipment(&shipment("  ")).is_err());
        assert!(validate_shipment(&shipment(&"x".repeat(201))).is_err());
        assert!(validate_shipment(&shipment("a\nb")).is_err());
    }
}
