//! The CreateOrder saga's steps, one file each. Every step has a persisted action name and
//! compensation name (never renamed), and says whether each runs remotely (an HTTP call with an
//! `Idempotency-Key` derived from the saga and the step) or locally (inside the transaction that
//! records the previous outcome).

pub mod create_shipment;
pub mod persist_order;
pub mod reserve_inventory;

use std::sync::Arc;

use crate::downstream::catalog::CatalogClient;
use crate::downstream::shipments::ShipmentsClient;
use crate::downstream::{DownstreamError, FailureKind};
use crate::orders::saga::CreateOrder;
use crate::saga::definition::{DefinitionError, SagaDef, StepImpl};
use crate::saga::engine::SagaType;
use crate::saga::machine::{Outcome, Saga, StepShape};
use crate::saga::registry::Registry;

/// The embedded CreateOrder definition's file name.
pub const CREATE_ORDER_FILE: &str = "sagas/create_order.toml";
/// The embedded CreateOrder definition.
pub const CREATE_ORDER_TOML: &str = include_str!("../../../../sagas/create_order.toml");

/// The CreateOrder saga's steps, in order.
pub const CREATE_ORDER: [StepShape; 3] = [
    StepShape {
        action: reserve_inventory::ACTION,
        compensation: reserve_inventory::COMPENSATION,
        local_action: false,
        local_compensation: false,
    },
    StepShape {
        action: persist_order::ACTION,
        compensation: persist_order::COMPENSATION,
        local_action: true,
        local_compensation: true,
    },
    StepShape {
        action: create_shipment::ACTION,
        compensation: create_shipment::COMPENSATION,
        local_action: false,
        local_compensation: false,
    },
];

/// Loads and validates the CreateOrder definition embedded in the binary against its steps.
pub fn load_create_order() -> Result<SagaDef, DefinitionError> {
    SagaDef::load(
        CREATE_ORDER_FILE,
        CREATE_ORDER_TOML,
        "create_order",
        &create_order_impls(),
    )
}

/// The CreateOrder saga as the engine runs it: `def` (from [`load_create_order`]),
/// its steps registered with the downstream clients they call, and its hooks.
pub fn create_order(def: SagaDef, catalog: CatalogClient, shipments: ShipmentsClient) -> SagaType {
    let mut registry = Registry::new();
    reserve_inventory::register(&mut registry, &catalog);
    persist_order::register(&mut registry);
    create_shipment::register(&mut registry, &shipments);
    SagaType {
        file: CREATE_ORDER_FILE.to_string(),
        def,
        registry,
        hooks: Arc::new(CreateOrder),
    }
}

/// The names the definition loader validates `sagas/create_order.toml` against.
pub fn create_order_impls() -> Vec<StepImpl> {
    CREATE_ORDER
        .iter()
        .map(|s| StepImpl {
            action: s.action,
            compensation: s.compensation,
        })
        .collect()
}

pub use crate::saga::registry::idempotency_key;

/// The saga's requested lines as the downstream contracts spell them.
pub fn line_items(saga: &Saga) -> Vec<crate::downstream::contract::LineItem> {
    super::lines(saga)
        .iter()
        .map(|l| crate::downstream::contract::LineItem {
            product_id: l.product_id,
            quantity: l.quantity,
        })
        .collect()
}

impl From<DownstreamError> for Outcome {
    /// A downstream failure, classified where its cause is known: transient (retried) or refused.
    fn from(e: DownstreamError) -> Self {
        match e.kind {
            FailureKind::Transient => Outcome::Transient {
                class: e.class.into(),
                detail: e.message,
                status: e.status,
                retry_after: e.retry_after,
            },
            FailureKind::Refused => Outcome::Refused {
                class: e.class.into(),
                detail: e.message,
                status: e.status,
                refusal: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_resolves_create_order_to_its_steps_in_order() {
        let http = reqwest::Client::new();
        let saga = create_order(
            load_create_order().unwrap(),
            CatalogClient::new("http://127.0.0.1:1", http.clone()),
            ShipmentsClient::new("http://127.0.0.1:1", http),
        );
        let resolved = saga.registry.resolve(&saga.def, &saga.file).unwrap();
        let shapes: Vec<_> = resolved
            .iter()
            .map(|r| {
                (
                    r.shape.action,
                    r.shape.compensation,
                    r.shape.local_action,
                    r.shape.local_compensation,
                )
            })
            .collect();
        let expected: Vec<_> = CREATE_ORDER
            .iter()
            .map(|s| (s.action, s.compensation, s.local_action, s.local_compensation))
            .collect();
        assert_eq!(shapes, expected);
    }

    #[test]
    fn a_definition_naming_an_unregistered_step_cannot_run() {
        let mut def = load_create_order().unwrap();
        def.steps[1].compensation = "forget_order".into();
        let err = Registry::new().resolve(&def, "x.toml").unwrap_err();
        assert!(err.message.contains("steps[0].name"), "{err}");
        let http = reqwest::Client::new();
        let saga = create_order(
            def,
            CatalogClient::new("http://127.0.0.1:1", http.clone()),
            ShipmentsClient::new("http://127.0.0.1:1", http),
        );
        let err = saga.registry.resolve(&saga.def, &saga.file).unwrap_err();
        assert!(
            err.message.contains("steps[1].compensation is \"forget_order\""),
            "{err}"
        );
    }
}
