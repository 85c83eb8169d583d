//! Failure classes: why a step attempt failed or why a saga compensates (a downstream call's
//! class, `crate::downstream::FailureClass`, is one of them). Typed everywhere in the
//! engine; the persisted spelling (`failure.class`, `last_error_class`, `saga_steps.error_class`,
//! the events' `errorClass`) is [`FailureClass::as_str`], byte for byte what earlier releases wrote.

use serde::{Deserialize, Serialize};

pub use crate::downstream::FailureClass as Downstream;

/// Why an attempt failed or a saga compensates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// The customer or an admin cancelled the saga.
    Cancelled,
    /// The catalog had not enough stock.
    InsufficientStock,
    /// The order's total does not fit NUMERIC(10,2).
    TotalOverflow,
    /// The saga did not finish before its deadline.
    DeadlineExceeded,
    /// The shipper refused to cancel a shipment already picked up (`lastErrorClass` of a saga back
    /// at `completed`).
    CancelRefused,
    /// The recorded reservation does not cover the order's lines.
    InconsistentReservation,
    /// An action reported nothing to do (never expected: treated as a refusal).
    Skipped,
    /// A compensation finished without a recorded failure (never expected).
    Unknown,
    /// A downstream call failed (connect, timeout, 5xx, 429, 4xx, contract violation ...).
    Downstream(Downstream),
}

impl FailureClass {
    /// The classes the saga itself decides (the downstream ones are [`Downstream::ALL`]).
    const OWN: [FailureClass; 8] = [
        FailureClass::Cancelled,
        FailureClass::InsufficientStock,
        FailureClass::TotalOverflow,
        FailureClass::DeadlineExceeded,
        FailureClass::CancelRefused,
        FailureClass::InconsistentReservation,
        FailureClass::Skipped,
        FailureClass::Unknown,
    ];

    /// The persisted name.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Cancelled => "cancelled",
            FailureClass::InsufficientStock => "insufficient_stock",
            FailureClass::TotalOverflow => "total_overflow",
            FailureClass::DeadlineExceeded => "deadline_exceeded",
            FailureClass::CancelRefused => "cancel_refused",
            FailureClass::InconsistentReservation => "inconsistent_reservation",
            FailureClass::Skipped => "skipped",
            FailureClass::Unknown => "unknown",
            FailureClass::Downstream(d) => d.as_str(),
        }
    }

    /// Every class.
    pub fn all() -> impl Iterator<Item = FailureClass> {
        FailureClass::OWN
            .into_iter()
            .chain(Downstream::ALL.into_iter().map(FailureClass::Downstream))
    }

    /// Parses a persisted name (the database edge).
    pub fn parse(s: &str) -> Option<FailureClass> {
        FailureClass::all().find(|c| c.as_str() == s)
    }
}

impl From<Downstream> for FailureClass {
    fn from(c: Downstream) -> Self {
        FailureClass::Downstream(c)
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for FailureClass {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for FailureClass {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        FailureClass::parse(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown failure class {name:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_keeps_its_persisted_spelling_in_json_and_text() {
        for c in FailureClass::all() {
            assert_eq!(serde_json::to_value(c).unwrap(), serde_json::json!(c.as_str()));
            assert_eq!(
                serde_json::from_value::<FailureClass>(serde_json::json!(c.as_str())).unwrap(),
                c
            );
            assert_eq!(FailureClass::parse(c.as_str()), Some(c));
        }
        assert_eq!(FailureClass::all().count(), 15);
        assert_eq!(FailureClass::Downstream(Downstream::Http5xx).as_str(), "http_5xx");
        assert_eq!(FailureClass::InsufficientStock.as_str(), "insufficient_stock");
        assert_eq!(FailureClass::parse("nonsense"), None);
        assert!(serde_json::from_value::<FailureClass>(serde_json::json!("nonsense")).is_err());
    }
}
