//! The calls a test makes over HTTP to a service at a base URL, whether it runs in the test's
//! process (`TestApp`) or as a child process.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Waits until `GET {base}/readyz` answers 200 (or fails the test after 30 s).
pub async fn wait_ready(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the service at {base} did not become ready");
}

/// `GET {url}` read as JSON (a simulator's state, for one).
pub async fn get_json<T: serde::de::DeserializeOwned>(http: &reqwest::Client, url: &str) -> T {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// Logs in and returns `(access, refresh)`.
pub async fn login(http: &reqwest::Client, base: &str, email: &str, password: &str) -> (String, String) {
    let r = http
        .post(format!("{base}/auth/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "login of {email} failed");
    let v: Value = r.json().await.unwrap();
    (
        v["token"].as_str().unwrap().to_string(),
        v["refreshToken"].as_str().unwrap().to_string(),
    )
}

/// Places an order of `items` with an idempotency key.
pub async fn place(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    key: &str,
    items: Value,
) -> reqwest::Response {
    place_traced(http, base, token, key, None, items).await
}

/// Places an order of `items` with an idempotency key and, when given, a W3C `traceparent`.
pub async fn place_traced(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    key: &str,
    traceparent: Option<&str>,
    items: Value,
) -> reqwest::Response {
    let mut rb = http
        .post(format!("{base}/orders"))
        .bearer_auth(token)
        .header("Idempotency-Key", key);
    if let Some(tp) = traceparent {
        rb = rb.header("traceparent", tp);
    }
    rb.json(&json!({"orderItems": items})).send().await.unwrap()
}

/// `PUT /sim/faults` on the simulator at `base`.
pub async fn put_faults(http: &reqwest::Client, base: &str, faults: Value) {
    let r = http
        .put(format!("{base}/sim/faults"))
        .json(&faults)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "faults refused by {base}: {}",
        r.text().await.unwrap()
    );
}
