//! Fault injection shared by the simulators (`PUT /sim/faults`, `DELETE /sim/faults`).
//!
//! A fault set is a list of [`FaultSpec`]s; each PUT replaces the whole set and DELETE clears it.
//! A fault without `endpoint` applies to every business endpoint of its simulator; with one, only
//! to that endpoint. Faults never touch the `/sim` control API. For a business call, the matching
//! faults are applied in this order:
//!
//! 1. `latencyMs` — the call waits the sum of the matching latencies;
//! 2. `hang` — the call never answers until the fault set is replaced or cleared, then gets 503;
//! 3. `failNext` — the first matching fault with calls left answers `failStatus` (503 unless set)
//!    and counts one down; 429 and 503 carry `Retry-After: retryAfterSeconds` (default 1);
//! 4. `errorRate` — each matching fault answers 503 to that share of calls;
//! 5. `malformed` — the call is carried out, then its answer is replaced by one that breaks the
//!    contract (the simulator decides how; see [`Malformed`]).
//!
//! Faulted calls (steps 2–4) have no business effect.
//!
//! A standalone simulator also takes `--crash-after N` (`SIM_CRASH_AFTER`): on its Nth business
//! call it leaves at once with [`CRASH_EXIT_CODE`], before any effect and without answering (its
//! callers see the connection close), as a crashing service would; restarting it is the drill's
//! business. Its state lives in memory, so a restarted simulator starts empty.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::json_error;

/// Longest latency a fault may add.
const MAX_LATENCY_MS: u64 = 10 * 60 * 1000;
/// Longest `Retry-After` a fault may announce.
const MAX_RETRY_AFTER_SECONDS: u64 = 24 * 60 * 60;

/// One fault, as sent to `PUT /sim/faults` (camelCase JSON; unknown fields are refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultSpec {
    /// Added latency before the call is handled, in milliseconds (at most ten minutes).
    #[serde(default)]
    pub latency_ms: u64,
    /// Share of calls, 0 to 1, answered 503.
    #[serde(default)]
    pub error_rate: f64,
    /// How many of the next calls are answered `fail_status`; counts down as calls arrive.
    #[serde(default)]
    pub fail_next: u32,
    /// Status of the `fail_next` answers (400–599): 503 by default, 422 for a business refusal.
    #[serde(default = "default_fail_status")]
    pub fail_status: u16,
    /// Calls never answer until the fault set is replaced or cleared (then 503).
    #[serde(default)]
    pub hang: bool,
    /// Answers break the contract (bad JSON; for the catalog, alternately a negative price).
    #[serde(default)]
    pub malformed: bool,
    /// `Retry-After` of 429 and 503 `fail_next` answers, in seconds.
    #[serde(default = "default_retry_after_seconds")]
    pub retry_after_seconds: u64,
    /// Limits the fault to one endpoint (catalog: `reserve`, `release`; shipments: `create`,
    /// `cancel`); all business endpoints when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

fn default_fail_status() -> u16 {
    503
}

fn default_retry_after_seconds() -> u64 {
    1
}

impl Default for FaultSpec {
    fn default() -> Self {
        FaultSpec {
            latency_ms: 0,
            error_rate: 0.0,
            fail_next: 0,
            fail_status: default_fail_status(),
            hang: false,
            malformed: false,
            retry_after_seconds: default_retry_after_seconds(),
            endpoint: None,
        }
    }
}

/// A fault set that could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FaultError(pub String);

/// How a malformed answer should break the contract, alternating between calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// A body that is not valid JSON.
    BadJson,
    /// Valid JSON with a value outside the contract (the catalog: a negative price). Simulators
    /// with no such value fall back to bad JSON.
    BadValue,
}

/// What the simulator should do with a business call after faults were applied.
#[derive(Debug)]
pub enum Verdict {
    /// Handle the call; when `malformed` is set, break the answer that way.
    Proceed {
        /// How to break the answer, if at all.
        malformed: Option<Malformed>,
    },
    /// Answer this instead, with no business effect.
    Answer(Response),
}

#[derive(Debug)]
struct FaultState {
    faults: Vec<FaultSpec>,
    /// Cancelled (and replaced) whenever the fault set changes, releasing hanging calls.
    release: CancellationToken,
    malformed_answers: u64,
}

/// The exit status of a simulator that crashed on purpose (`--crash-after`).
pub const CRASH_EXIT_CODE: i32 = 70;

/// The fault set of one simulator.
#[derive(Debug)]
pub struct Faults {
    endpoints: &'static [&'static str],
    state: Mutex<FaultState>,
    /// The business call the process dies on (0: never).
    crash_after: AtomicU64,
    calls: AtomicU64,
}

impl Faults {
    /// An empty fault set for a simulator whose business endpoints are `endpoints`.
    pub fn new(endpoints: &'static [&'static str]) -> Self {
        Faults {
            endpoints,
            state: Mutex::new(FaultState {
                faults: Vec::new(),
                release: CancellationToken::new(),
                malformed_answers: 0,
            }),
            crash_after: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        }
    }

    /// Makes the process leave on its `n`th business call from now (0: never); see the module
    /// docs. For a simulator that runs as a process of its own only.
    pub fn crash_after(&self, n: u64) {
        self.calls.store(0, Ordering::SeqCst);
        self.crash_after.store(n, Ordering::SeqCst);
    }

    /// Parses a `PUT /sim/faults` body: one fault object or a list of them.
    pub fn parse(body: &[u8]) -> Result<Vec<FaultSpec>, FaultError> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| FaultError(format!("body is not JSON: {e}")))?;
        let parsed = if value.is_array() {
            serde_json::from_value::<Vec<FaultSpec>>(value)
        } else {
            serde_json::from_value::<FaultSpec>(value).map(|fault| vec![fault])
        };
        parsed.map_err(|e| FaultError(format!("invalid fault: {e}")))
    }

    /// Replaces the whole fault set after checking every fault; calls left hanging by the old set
    /// are answered 503.
    pub fn replace(&self, faults: Vec<FaultSpec>) -> Result<(), FaultError> {
        for fault in &faults {
            self.check(fault)?;
        }
        let mut state = self.lock();
        state.faults = faults;
        state.release.cancel();
        state.release = CancellationToken::new();
        Ok(())
    }

    /// Clears the fault set; calls left hanging are answered 503.
    pub fn clear(&self) {
        let _ = self.replace(Vec::new());
    }

    /// The current fault set (with `failNext` as counted down so far).
    pub fn list(&self) -> Vec<FaultSpec> {
        self.lock().faults.clone()
    }

    fn check(&self, fault: &FaultSpec) -> Result<(), FaultError> {
        if !(0.0..=1.0).contains(&fault.error_rate) {
            return Err(FaultError(format!(
                "errorRate must be between 0 and 1, got {}",
                fault.error_rate
            )));
        }
        if !(400..=599).contains(&fault.fail_status) {
            return Err(FaultError(format!(
                "failStatus must be between 400 and 599, got {}",
                fault.fail_status
            )));
        }
        if fault.latency_ms > MAX_LATENCY_MS {
            return Err(FaultError(format!("latencyMs must be at most {MAX_LATENCY_MS}")));
        }
        if fault.retry_after_seconds > MAX_RETRY_AFTER_SECONDS {
            return Err(FaultError(format!(
                "retryAfterSeconds must be at most {MAX_RETRY_AFTER_SECONDS}"
            )));
        }
        if let Some(endpoint) = &fault.endpoint
            && !self.endpoints.contains(&endpoint.as_str())
        {
            return Err(FaultError(format!(
                "unknown endpoint {endpoint:?}; expected one of {:?}",
                self.endpoints
            )));
        }
        Ok(())
    }

    /// Applies the fault set to one call of `endpoint` (see the module docs for the order).
    pub async fn apply(&self, endpoint: &str) -> Verdict {
        let crash_at = self.crash_after.load(Ordering::SeqCst);
        if crash_at > 0 && self.calls.fetch_add(1, Ordering::SeqCst) + 1 >= crash_at {
            eprintln!("simulator: crashing on business call {crash_at} ({endpoint}), as --crash-after asked");
            std::process::exit(CRASH_EXIT_CODE);
        }
        let applies = |fault: &FaultSpec| fault.endpoint.as_deref().is_none_or(|e| e == endpoint);
        let (latency, hang) = {
            let state = self.lock();
            let latency: u64 = state
                .faults
                .iter()
                .filter(|f| applies(f))
                .map(|f| f.latency_ms)
                .sum();
            let hang = state
                .faults
                .iter()
                .any(|f| applies(f) && f.hang)
                .then(|| state.release.clone());
            (latency, hang)
        };
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        if let Some(release) = hang {
            release.cancelled().await;
            return Verdict::Answer(json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "hanging call released: faults were cleared",
            ));
        }
        let mut state = self.lock();
        if let Some(fault) = state.faults.iter_mut().find(|f| applies(f) && f.fail_next > 0) {
            fault.fail_next -= 1;
            return Verdict::Answer(injected(fault.fail_status, fault.retry_after_seconds));
        }
        let failed_by_rate = state
            .faults
            .iter()
            .filter(|f| applies(f) && f.error_rate > 0.0)
            .any(|f| rand::random::<f64>() < f.error_rate);
        if failed_by_rate {
            return Verdict::Answer(json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "injected fault: error rate",
            ));
        }
        let malformed = state.faults.iter().any(|f| applies(f) && f.malformed);
        if malformed {
            state.malformed_answers += 1;
            let how = if state.malformed_answers % 2 == 1 {
                Malformed::BadJson
            } else {
                Malformed::BadValue
            };
            return Verdict::Proceed { malformed: Some(how) };
        }
        Verdict::Proceed { malformed: None }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The answer of a `failNext` fault.
fn injected(status: u16, retry_after_seconds: u64) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut response = json_error(status, &format!("injected fault: status {}", status.as_u16()));
    if matches!(status.as_u16(), 429 | 503) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds));
    }
    response
}

/// A body that is not JSON, announced as JSON.
pub fn bad_json_answer(status: StatusCode, truncated_start: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{truncated_start}{{\"unterminated"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_fault_or_a_list_parses_with_defaults() {
        let one = Faults::parse(br#"{"failNext": 2}"#).unwrap();
        assert_eq!(
            one,
            vec![FaultSpec {
                fail_next: 2,
                ..FaultSpec::default()
            }]
        );
        let many = Faults::parse(
            br#"[{"latencyMs": 5, "endpoint": "reserve"}, {"malformed": true, "failStatus": 429}]"#,
        )
        .unwrap();
        assert_eq!(many.len(), 2);
        assert_eq!(many[0].endpoint.as_deref(), Some("reserve"));
        assert_eq!(many[1].fail_status, 429);
        assert_eq!(many[1].retry_after_seconds, 1);
    }

    #[test]
    fn unknown_fields_and_out_of_range_values_are_refused() {
        let faults = Faults::new(&["reserve", "release"]);
        assert!(Faults::parse(br#"{"failnext": 1}"#).is_err());
        for body in [
            &br#"{"errorRate": 1.5}"#[..],
            br#"{"failStatus": 200}"#,
            br#"{"endpoint": "create"}"#,
            br#"{"latencyMs": 700000}"#,
        ] {
            let parsed = Faults::parse(body).unwrap();
            assert!(
                faults.replace(parsed).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[tokio::test]
    async fn fail_next_counts_down_then_calls_proceed() {
        let faults = Faults::new(&["reserve", "release"]);
        faults
            .replace(vec![FaultSpec {
                fail_next: 1,
                fail_status: 429,
                retry_after_seconds: 4,
                ..FaultSpec::default()
            }])
            .unwrap();
        match faults.apply("reserve").await {
            Verdict::Answer(response) => {
                assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
                assert_eq!(response.headers()[header::RETRY_AFTER], "4");
            }
            other => panic!("expected an injected answer, got {other:?}"),
        }
        assert!(matches!(
            faults.apply("reserve").await,
            Verdict::Proceed { malformed: None }
        ));
    }

    #[tokio::test]
    async fn malformed_answers_alternate_between_bad_json_and_bad_values() {
        let faults = Faults::new(&["reserve", "release"]);
        faults
            .replace(vec![FaultSpec {
                malformed: true,
                endpoint: Some("reserve".into()),
                ..FaultSpec::default()
            }])
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            if let Verdict::Proceed { malformed } = faults.apply("reserve").await {
                seen.push(malformed);
            }
        }
        assert_eq!(
            seen,
            [
                Some(Malformed::BadJson),
                Some(Malformed::BadValue),
                Some(Malformed::BadJson)
            ]
        );
        assert!(matches!(
            faults.apply("release").await,
            Verdict::Proceed { malformed: None }
        ));
    }
}
