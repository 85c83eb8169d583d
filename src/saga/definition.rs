//! Saga definitions: loaded from `sagas/*.toml` (embedded in the binary) and validated against the
//! step implementations the binary has. A bad definition is an error naming the file and the field.

use std::time::Duration;

use serde::Deserialize;

/// A retry policy: exponential backoff with a cap and jitter, a per-attempt timeout and a bound on
/// attempts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all (the first one included).
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_delay_ms: u64,
    /// Growth of the delay per attempt.
    pub multiplier: f64,
    /// Largest delay.
    pub max_delay_ms: u64,
    /// Random spread as a share of the delay (0.2 = ±20 %).
    pub jitter: f64,
    /// Time allowed for one attempt.
    pub attempt_timeout_ms: u64,
}

impl RetryPolicy {
    /// The delay after failed attempt number `attempt` (1-based), scaled by `scale`, with `unit` in
    /// [0, 1) choosing the jitter.
    pub fn delay_after(&self, attempt: u32, scale: f64, unit: f64) -> Duration {
        let exp = self.multiplier.powi(attempt.saturating_sub(1).min(60) as i32);
        let base = (self.initial_delay_ms as f64 * exp).min(self.max_delay_ms as f64) * scale;
        let spread = base * self.jitter * (2.0 * unit - 1.0);
        Duration::from_secs_f64(((base + spread).max(0.0)) / 1000.0)
    }

    /// The per-attempt timeout.
    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.attempt_timeout_ms)
    }

    fn validate(&self, at: &str) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err(format!("{at}.max_attempts must be at least 1"));
        }
        if self.initial_delay_ms == 0 {
            return Err(format!("{at}.initial_delay_ms must be positive"));
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(format!("{at}.multiplier must be a number ≥ 1"));
        }
        if self.max_delay_ms < self.initial_delay_ms {
            return Err(format!("{at}.max_delay_ms must be ≥ initial_delay_ms"));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(format!("{at}.jitter must be between 0 and 1"));
        }
        if self.attempt_timeout_ms == 0 {
            return Err(format!("{at}.attempt_timeout_ms must be positive"));
        }
        Ok(())
    }
}

/// One step of a saga.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    /// Persisted name of the action.
    pub name: String,
    /// Persisted name of the compensation.
    pub compensation: String,
    /// Retry policy of the action.
    pub retry: RetryPolicy,
    /// Retry policy of the compensation; exhausting it leaves the saga `stuck`.
    pub compensation_retry: RetryPolicy,
}

/// A saga definition.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SagaDef {
    /// Persisted saga type.
    pub name: String,
    /// Definition version, stored with each saga.
    pub version: u32,
    /// A saga still moving forward after this long is compensated.
    pub deadline_seconds: u64,
    /// Ordered steps.
    pub steps: Vec<StepDef>,
}

/// A definition that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid saga definition {file}: {message}")]
pub struct DefinitionError {
    /// The file.
    pub file: String,
    /// What is wrong, naming the field.
    pub message: String,
}

/// The action and compensation names one step implementation provides.
#[derive(Debug, Clone, Copy)]
pub struct StepImpl {
    /// Action name.
    pub action: &'static str,
    /// Compensation name.
    pub compensation: &'static str,
}

impl SagaDef {
    /// Parses and validates a definition against the implementations available, in order.
    pub fn load(
        file: &str,
        text: &str,
        expected_name: &str,
        impls: &[StepImpl],
    ) -> Result<SagaDef, DefinitionError> {
        let err = |message: String| DefinitionError {
            file: file.to_string(),
            message,
        };
        let def: SagaDef = toml::from_str(text).map_err(|e| err(e.to_string().trim().replace('\n', " ")))?;
        if def.name != expected_name {
            return Err(err(format!("name is {:?}, expected {expected_name:?}", def.name)));
        }
        if def.version == 0 {
            return Err(err("version must be at least 1".into()));
        }
        if def.deadline_seconds == 0 {
            return Err(err("deadline_seconds must be positive".into()));
        }
        if def.steps.len() != impls.len() {
            return Err(err(format!(
                "steps lists {} steps; this binary implements {}: {}",
                def.steps.len(),
                impls.len(),
                impls.iter().map(|i| i.action).collect::<Vec<_>>().join(", ")
            )));
        }
        for (i, (step, imp)) in def.steps.iter().zip(impls).enumerate() {
            let at = format!("steps[{i}]");
            if step.name != imp.action {
                return Err(err(format!(
                    "{at}.name is {:?}: this binary has no such step at this position (expected {:?})",
                    step.name, imp.action
                )));
            }
            if step.compensation != imp.compensation {
                return Err(err(format!(
                    "{at}.compensation is {:?}: the compensation of {:?} is {:?}",
                    step.compensation, imp.action, imp.compensation
                )));
            }
            step.retry.validate(&format!("{at}.retry")).map_err(err)?;
            step.compensation_retry
                .validate(&format!("{at}.compensation_retry"))
                .map_err(err)?;
        }
        Ok(def)
    }

    /// The index of a step by action name.
    pub fn index_of(&self, action: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real definition as the loader's fixture (CreateOrder's; the loader knows no saga type).
    const CREATE_ORDER_FILE: &str = "sagas/create_order.toml";
    const CREATE_ORDER_TOML: &str = include_str!("../../sagas/create_order.toml");

    const IMPLS: [StepImpl; 3] = [
        StepImpl {
            action: "reserve_inventory",
            compensation: "release_reservation",
        },
        StepImpl {
            action: "persist_order",
            compensation: "cancel_order",
        },
        StepImpl {
            action: "create_shipment",
            compensation: "cancel_shipment",
        },
    ];

    #[test]
    fn the_embedded_create_order_definition_is_valid() {
        let def = SagaDef::load(CREATE_ORDER_FILE, CREATE_ORDER_TOML, "create_order", &IMPLS).unwrap();
        assert_eq!(def.steps.len(), 3);
        assert_eq!(def.index_of("create_shipment"), Some(2));
    }

    fn broken(from: &str, to: &str) -> String {
        let e = SagaDef::load(
            "x.toml",
            &CREATE_ORDER_TOML.replacen(from, to, 1),
            "create_order",
            &IMPLS,
        )
        .unwrap_err();
        e.to_string()
    }

    #[test]
    fn bad_definitions_name_the_file_and_the_field() {
        let m = broken("max_attempts = 8", "max_attempts = 0");
        assert!(
            m.contains("x.toml") && m.contains("steps[0].retry.max_attempts"),
            "{m}"
        );
        let m = broken("name = \"persist_order\"", "name = \"persist_orders\"");
        assert!(m.contains("steps[1].name"), "{m}");
        let m = broken("jitter = 0.2", "jitter = 2.0");
        assert!(m.contains("steps[0].retry.jitter"), "{m}");
        let m = broken("multiplier = 2.0", "multipler = 2.0");
        assert!(m.contains("multipler"), "{m}");
        let m = broken(
            "compensation = \"cancel_shipment\"",
            "compensation = \"release_reservation\"",
        );
        assert!(m.contains("steps[2].compensation"), "{m}");
        let m = broken("deadline_seconds = 900", "deadline_seconds = \"soon\"");
        assert!(m.contains("deadline_seconds"), "{m}");
    }

    #[test]
    fn delays_grow_are_capped_scaled_and_jittered_within_bounds() {
        let p = RetryPolicy {
            max_attempts: 5,
            initial_delay_ms: 100,
            multiplier: 2.0,
            max_delay_ms: 1000,
            jitter: 0.2,
            attempt_timeout_ms: 1000,
        };
        assert_eq!(p.delay_after(1, 1.0, 0.5), Duration::from_millis(100));
        assert_eq!(p.delay_after(3, 1.0, 0.5), Duration::from_millis(400));
        assert_eq!(p.delay_after(10, 1.0, 0.5), Duration::from_millis(1000));
        assert_eq!(p.delay_after(3, 0.01, 0.5), Duration::from_millis(4));
        let lo = p.delay_after(2, 1.0, 0.0);
        let hi = p.delay_after(2, 1.0, 0.999_999);
        assert!(
            lo >= Duration::from_millis(159) && hi <= Duration::from_millis(241),
            "{lo:?} {hi:?}"
        );
    }
}
