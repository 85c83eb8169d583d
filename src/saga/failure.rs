//! Failure classes: why a step attempt failed or why a saga compensates (a downstream call's
//! class, `crate::downstream::FailureClass`, is one of them). Typed everywhere in the
//! engine; the persisted spelling (`failure.class`, `last_error_class`, `saga_steps.error_class`,
//! the events' `errorClass`) is [`FailureClass::as_str`], byte for byte what earlier releases wrote.

use serde::{Deserialize, Serialize};

use crate::downstream::FailureClass as Downstream;

/// Why an attempt failed or a saga compensates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
    /// Downstream: the connection could not be made.
    Connect,
    /// Downstream: no complete answer within the call's timeout.
    Timeout,
    /// Downstream: any other transport failure.
    Request,
    /// Downstream: a 5xx answer.
    #[serde(rename = "http_5xx")]
    Http5xx,
    /// Downstream: a 429 answer.
    #[serde(rename = "http_429")]
    Http429,
    /// Downstream: another 4xx answer (a business refusal).
    #[serde(rename = "http_4xx")]
    Http4xx,
    /// Downstream: the answer did not fit the contract.
    ContractViolation,
}

impl FailureClass {
    /// Every class.
    pub const ALL: [FailureClass; 15] = [
        FailureClass::Cancelled,
        FailureClass::InsufficientStock,
        FailureClass::TotalOverflow,
        FailureClass::DeadlineExceeded,
        FailureClass::CancelRefused,
        FailureClass::InconsistentReservation,
        FailureClass::Skipped,
        FailureClass::Unknown,
        FailureClass::Connect,
        FailureClass::Timeout,
        FailureClass::Request,
        FailureClass::Http5xx,
        FailureClass::Http429,
        FailureClass::Http4xx,
        FailureClass::ContractViolation,
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
            FailureClass::Connect => Downstream::Connect.as_str(),
            FailureClass::Timeout => Downstream::Timeout.as_str(),
            FailureClass::Request => Downstream::Request.as_str(),
            FailureClass::Http5xx => Downstream::Http5xx.as_str(),
            FailureClass::Http429 => Downstream::Http429.as_str(),
            FailureClass::Http4xx => Downstream::Http4xx.as_str(),
            FailureClass::ContractViolation => Downstream::ContractViolation.as_str(),
        }
    }

    /// Parses a persisted name (the database edge).
    pub fn parse(s: &str) -> Option<FailureClass> {
        FailureClass::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl From<Downstream> for FailureClass {
    /// A downstream client's failure class, as the saga records it.
    fn from(c: Downstream) -> Self {
        match c {
            Downstream::Connect => FailureClass::Connect,
            Downstream::Timeout => FailureClass::Timeout,
            Downstream::Request => FailureClass::Request,
            Downstream::Http5xx => FailureClass::Http5xx,
            Downstream::Http429 => FailureClass::Http429,
            Downstream::Http4xx => FailureClass::Http4xx,
            Downstream::ContractViolation => FailureClass::ContractViolation,
        }
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_keeps_its_persisted_spelling_in_json_and_text() {
        for c in FailureClass::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), serde_json::json!(c.as_str()));
            assert_eq!(FailureClass::parse(c.as_str()), Some(c));
        }
        assert_eq!(FailureClass::Http5xx.as_str(), "http_5xx");
        assert_eq!(FailureClass::InsufficientStock.as_str(), "insufficient_stock");
        assert_eq!(FailureClass::parse("nonsense"), None);
        for d in [
            Downstream::Connect,
            Downstream::Timeout,
            Downstream::Request,
            Downstream::Http5xx,
            Downstream::Http429,
            Downstream::Http4xx,
            Downstream::ContractViolation,
        ] {
            assert_eq!(FailureClass::from(d).as_str(), d.as_str());
        }
    }
}
