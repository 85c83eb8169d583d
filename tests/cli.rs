//! The binary's subcommands, run as a user would: `--help` everywhere, `users create`, `migrate`,
//! the refusal of insecure settings. The tool subcommands (`bench`, `kafka …`) run `ostore-tools`
//! beside the binary (`--help` here goes through it: run with `--workspace`, which builds it); the
//! tools' own runs are tested in `benches/tools/tests/cli.rs`.

mod support;

use std::process::Command;

use support::{free_port, server_url};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ostore-orders"));
    c.env_remove("DATABASE_URL")
        .env_remove("JWT_SECRET")
        .env("RUST_LOG", "warn");
    c
}

/// Calls `ok` every 100 ms, at most `tries` times, until it holds; whether it did.
fn retry_until(tries: usize, mut ok: impl FnMut() -> bool) -> bool {
    for _ in 0..tries {
        if ok() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

#[test]
fn every_subcommand_has_help_naming_its_variables() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["dev", "--help"],
        vec!["migrate", "--help"],
        vec!["users", "create", "--help"],
        vec!["users", "disable", "--help"],
        vec!["users", "enable", "--help"],
        vec!["users", "delete", "--help"],
        vec!["sim", "catalog", "--help"],
        vec!["sim", "shipments", "--help"],
        vec!["bench", "--help"],
        vec!["kafka", "mock", "--help"],
        vec!["kafka", "dump", "--help"],
    ] {
        let out = bin().args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        if args.len() > 1 && args[0] != "users" {
            assert!(
                [
                    "LISTEN_ADDR",
                    "DATABASE_URL",
                    "KAFKA_BOOTSTRAP_SERVERS",
                    "TOPIC_ORDER_EVENTS"
                ]
                .iter()
                .any(|v| text.contains(v)),
                "{args:?} lists no variables:\n{text}"
            );
        }
        // The logging and OpenTelemetry settings are flags too, wherever the command logs.
        if ["serve", "dev", "migrate", "sim"].contains(&args[0]) && args.len() > 1 {
            for v in ["RUST_LOG", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"] {
                assert!(text.contains(v), "{args:?} does not list {v}:\n{text}");
            }
        }
    }
}

/// The tool subcommands hand over to `ostore-tools` beside the binary (or in PATH); without it,
/// they fail saying what is missing and how to build it.
#[test]
fn tool_subcommands_say_how_to_build_the_tools_when_they_are_missing() {
    let dir = std::env::temp_dir().join(format!("ostore-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let alone = dir.join("ostore-orders");
    std::fs::copy(env!("CARGO_BIN_EXE_ostore-orders"), &alone).unwrap();
    let out = Command::new(&alone)
        .args(["kafka", "dump", "--help"])
        .env("PATH", &dir)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ostore-tools") && err.contains("cargo build --workspace"),
        "{err}"
    );
}

#[test]
fn serve_refuses_to_start_without_a_safe_jwt_secret() {
    let out = bin().args(["serve"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("JWT_SECRET"));
    let out = bin()
        .args(["serve"])
        .env("JWT_SECRET", "too-short")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 32 bytes"));
}

#[test]
fn migrate_and_users_create_work_against_a_new_database() {
    let db = migrated_database();
    let out = create_user(&db, "cli@example.com", &["--role", "admin"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id: i32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .expect("prints the new user's id");
    assert!(id > 0);
    // The same email again is refused with a clear message.
    let out = create_user(&db, "CLI@example.com", &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    // The account lifecycle, by email or by id; each prints the account's new state.
    let id_arg = id.to_string();
    for (args, status) in [
        (
            vec!["users", "disable", "--email", "CLI@example.com"],
            Some("disabled"),
        ),
        (vec!["users", "disable", "--id", &id_arg], Some("disabled")),
        (vec!["users", "enable", "--id", &id_arg], Some("active")),
        (
            vec!["users", "delete", "--email", "cli@example.com"],
            Some("deleted"),
        ),
        // Deleted: found by id only, and not enabled again.
        (vec!["users", "enable", "--id", &id_arg], None),
        (vec!["users", "disable", "--email", "cli@example.com"], None),
        (vec!["users", "disable"], None),
    ] {
        let out = bin().args(&args).args(["--database-url", &db]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        match status {
            Some(status) => {
                assert!(out.status.success(), "{args:?}: {stderr}");
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(v["status"], status, "{args:?}");
                assert_eq!(v["userID"], id);
            }
            None => assert!(!out.status.success() && !stderr.is_empty(), "{args:?} succeeded"),
        }
    }
    // The deleted account's email may be given to a new user.
    let out = create_user(&db, "cli@example.com", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop_db(&db);
}

/// `users create` of `email` (password `long-enough`, plus `extra` arguments) in the database at `db`.
fn create_user(db: &str, email: &str, extra: &[&str]) -> std::process::Output {
    bin()
        .args(["users", "create", "--email", email, "--password", "long-enough"])
        .args(extra)
        .args(["--database-url", db])
        .output()
        .unwrap()
}

/// A new database, created and migrated by `migrate --create-database`; its URL.
fn migrated_database() -> String {
    let db = format!("{}/cli_{}", server_url(), uuid::Uuid::new_v4().simple());
    let out = bin()
        .args(["migrate", "--create-database", "--database-url", &db])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    db
}

fn drop_db(url: &str) {
    let name = url.rsplit_once('/').unwrap().1.to_string();
    let _ = Command::new("psql")
        .args([
            &format!("{}/postgres", server_url()),
            "-qc",
            &format!("drop database if exists {name} with (force)"),
        ])
        .output();
}

#[test]
fn json_logs_keep_stdout_json_and_put_trace_and_span_ids_on_lines_inside_spans() {
    let db = format!("{}/cli_{}", server_url(), uuid::Uuid::new_v4().simple());
    let out = bin()
        .args(["migrate", "--create-database", "--database-url", &db])
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let migrate_out = String::from_utf8(out.stdout).unwrap();
    let port = free_port();
    let child = bin()
        .args(["serve", "--roles", "api", "--database-url", &db])
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env("JWT_SECRET", "a-test-secret-that-is-long-enough-for-hs256")
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client = reqwest::blocking::Client::new();
    let answered = retry_until(100, || {
        client
            .get(format!("http://127.0.0.1:{port}/livez"))
            .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
            .send()
            .is_ok_and(|r| r.status() == 200)
    });
    // A request without a context starts a trace of its own, whose ids its lines carry.
    let untraced = answered
        && client
            .get(format!("http://127.0.0.1:{port}/livez"))
            .send()
            .is_ok_and(|r| r.status() == 200);
    // SIGTERM: a clean shutdown, which closes stdout.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    drop_db(&db);
    assert!(answered, "serve did not answer /livez");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut in_span = 0;
    for line in migrate_out.lines().chain(stdout.lines()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v.get("span").is_some() {
            in_span += 1;
            let ids = &v["openTelemetry"];
            let span_id = ids["spanId"]
                .as_str()
                .unwrap_or_else(|| panic!("no span id: {line}"));
            assert_eq!(span_id.len(), 16, "{line}");
            assert_ne!(span_id, "0000000000000000", "{line}");
            assert_eq!(ids["traceId"].as_str().unwrap().len(), 32, "{line}");
        }
    }
    let finished: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["fields"]["message"] == "request finished")
        .collect();
    assert!(untraced, "the request without a traceparent was not answered");
    let [traced, own] = &finished[finished.len().saturating_sub(2)..] else {
        panic!("two request log lines expected in\n{stdout}");
    };
    assert_eq!(traced["openTelemetry"]["traceId"], trace_id, "{traced}");
    let own_id = own["openTelemetry"]["traceId"].as_str().unwrap_or_default();
    assert_eq!(own_id.len(), 32, "{own}");
    assert!(own_id != trace_id && own_id != "0".repeat(32), "{own}");
    assert_eq!(own["span"]["trace_id"], own_id, "{own}");
    assert!(in_span >= 1);
    assert!(
        stdout.contains("effective configuration"),
        "the settings are logged as JSON:\n{stdout}"
    );
}

/// A process without the `api` role still serves its own metrics (and health) on LISTEN_ADDR; its
/// printed settings mask a password given in the database URL's query, spell the roles as ROLES
/// does, and show a logging or OpenTelemetry setting given as a flag.
#[test]
fn a_worker_alone_serves_its_metrics_and_prints_no_password() {
    let db = migrated_database();
    let port = free_port();
    let child = bin()
        .args([
            "serve",
            "--roles",
            "worker",
            "--otel-service-name",
            "ostore-worker-under-test",
        ])
        .args(["--database-url", &format!("{db}?password=hunter2-in-the-query")])
        .env("JWT_SECRET", "a-test-secret-that-is-long-enough-for-hs256")
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_SERVICE_NAME")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::blocking::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut metrics = None;
    retry_until(150, || {
        // The database-derived gauges appear once the process has read them.
        let Ok(r) = client.get(format!("{base}/metrics")).send() else {
            return false;
        };
        if r.status() != 200 {
            return false;
        }
        let kind = r.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .to_string();
        let text = r.text().unwrap_or_default();
        let done = text.contains("ostore_");
        metrics = Some((kind, text));
        done
    });
    let livez = client
        .get(format!("{base}/livez"))
        .send()
        .map(|r| r.status().as_u16());
    let orders = client
        .get(format!("{base}/orders"))
        .send()
        .map(|r| r.status().as_u16());
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    drop_db(&db);
    let (kind, text) = metrics.expect("the worker served no /metrics");
    assert!(kind.starts_with("text/plain"), "{kind}");
    assert!(text.contains("ostore_"), "{text}");
    assert_eq!(livez.ok(), Some(200));
    assert_eq!(orders.ok(), Some(404), "a worker serves no API");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(!stdout.contains("hunter2"), "{stdout}");
    assert!(stdout.contains("password=*****"), "{stdout}");
    let setting = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("{name} not printed:\n{stdout}"))
    };
    assert_eq!(setting("ROLES"), "worker");
    assert_eq!(setting("OTEL_SERVICE_NAME"), "ostore-worker-under-test");
}

/// `sim … --crash-after N`: the simulator serves N−1 business calls, then dies on the Nth without
/// answering it (its control API does not count), with exit status 70.
#[test]
fn a_simulator_crashes_on_the_business_call_its_flag_names() {
    let port = free_port();
    let mut child = bin()
        .args(["sim", "catalog", "--demo-products", "--crash-after", "2"])
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::blocking::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let up = retry_until(100, || {
        client
            .get(format!("{base}/sim/products/1"))
            .send()
            .is_ok_and(|r| r.status() == 200)
    });
    let reserve = |key: &str| {
        client
            .post(format!("{base}/inventory/reservations"))
            .header("Idempotency-Key", key)
            .json(&serde_json::json!({
                "reservationID": uuid::Uuid::new_v4(),
                "items": [{"productID": 1, "quantity": 1}]
            }))
            .send()
            .map(|r| r.status().as_u16())
    };
    let first = reserve("first");
    let second = reserve("second");
    let status = (0..100).find_map(|_| {
        let s = child.try_wait().unwrap();
        if s.is_none() {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        s
    });
    if status.is_none() {
        let _ = child.kill();
    }
    assert!(up, "the simulator did not come up");
    assert_eq!(first.ok(), Some(201));
    assert!(second.is_err(), "the second call was answered: {second:?}");
    assert_eq!(status.and_then(|s| s.code()), Some(70));
}

#[tokio::test]
async fn otlp_export_retries_a_batch_the_collector_refuses_with_503() {
    use std::sync::{Arc, Mutex};
    // A collector that refuses the first two exports with 503 and takes the rest.
    // (status answered, request body) of every export.
    type Exports = Arc<Mutex<Vec<(u16, Vec<u8>)>>>;
    let received: Exports = Arc::default();
    let r = received.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let r = r.clone();
            async move {
                let mut r = r.lock().unwrap();
                let status = if r.len() < 2 { 503 } else { 200 };
                r.push((status, body.to_vec()));
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let port = free_port();
    let mut child = bin()
        .args(["sim", "catalog"])
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_METRICS_EXPORTER", "none")
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // One request: one span, so one batch to export.
    let client = reqwest::Client::new();
    let mut answered = false;
    for _ in 0..100 {
        let r = client
            .delete(format!("http://127.0.0.1:{port}/inventory/reservations/none"))
            .send()
            .await;
        if r.is_ok() {
            answered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut delivered = false;
    for _ in 0..150 {
        if received.lock().unwrap().iter().any(|(s, _)| *s == 200) {
            delivered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(answered, "the simulator did not start");
    let received = received.lock().unwrap();
    assert!(
        delivered,
        "no export got through after the 503s: {} attempts",
        received.len()
    );
    let first_ok = received.iter().position(|(s, _)| *s == 200).unwrap();
    assert_eq!(first_ok, 2, "exports before the first accepted one: {first_ok}");
    assert_eq!(
        received[0].1, received[2].1,
        "the accepted export is the refused batch sent again"
    );
    assert!(!received[0].1.is_empty());
}
