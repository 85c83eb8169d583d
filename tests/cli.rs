//! The binary's subcommands, run as a user would: `--help` everywhere, `users create`, `migrate`,
//! the refusal of insecure settings, and a short `bench` run.

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
    }
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
    let db = format!("{}/cli_{}", server_url(), uuid::Uuid::new_v4().simple());
    let out = bin()
        .args(["migrate", "--create-database", "--database-url", &db])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = bin()
        .args([
            "users",
            "create",
            "--email",
            "cli@example.com",
            "--password",
            "long-enough",
            "--role",
            "admin",
            "--database-url",
            &db,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id: i32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .expect("prints the new user's id");
    assert!(id > 0);
    // The same email again is refused with a clear message.
    let out = bin()
        .args([
            "users",
            "create",
            "--email",
            "CLI@example.com",
            "--password",
            "long-enough",
            "--database-url",
            &db,
        ])
        .output()
        .unwrap();
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
    let out = bin()
        .args([
            "users",
            "create",
            "--email",
            "cli@example.com",
            "--password",
            "long-enough",
        ])
        .args(["--database-url", &db])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop_db(&db);
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
fn a_short_bench_run_reports_orders_per_second_as_json() {
    let db = format!("{}/bench_{}", server_url(), uuid::Uuid::new_v4().simple());
    let out = bin()
        .args([
            "bench",
            "--concurrency",
            "2",
            "--duration-secs",
            "2",
            "--warmup-secs",
            "0",
            "--json",
            "--database-url",
            &db,
        ])
        .output()
        .unwrap();
    drop_db(&format!("{db}_bench"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = stdout
        .lines()
        .rfind(|l| l.starts_with('{'))
        .expect("a JSON report line");
    let report: serde_json::Value = serde_json::from_str(line).unwrap();
    assert!(report["outcomes"]["created"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["outcomes"]["errors"], 0);
    assert!(report["ordersPerSecond"].as_f64().unwrap() > 0.0);
    assert!(report["latencyMs"]["p99"].as_f64().unwrap() >= report["latencyMs"]["p50"].as_f64().unwrap());
    // The service ran in its own process: its RSS was read.
    assert!(report["rssMbPeak"].as_f64().unwrap() > 1.0, "{report}");
    // The half-rate phase was paced at half the peak.
    let half = &report["half"];
    assert!(
        (half["targetPerSecond"].as_f64().unwrap() - report["ordersPerSecond"].as_f64().unwrap() / 2.0).abs()
            < 1e-6,
        "{report}"
    );
    assert!(half["outcomes"]["created"].as_u64().unwrap() > 0, "{report}");
    // pgbench ran the saga's write set against the same server, and the ratio is theirs.
    let tps = report["pgbench"]["tps"].as_f64().unwrap();
    assert!(tps > 0.0, "{report}");
    let ratio = report["ratios"]["ordersVsPgbench"].as_f64().unwrap();
    assert!(
        (ratio - report["ordersPerSecond"].as_f64().unwrap() / tps).abs() < 1e-9,
        "{report}"
    );
    assert!(
        report["ratios"]["halfRateP99VsPgbenchLatency"].as_f64().unwrap() > 0.0,
        "{report}"
    );
}

/// `kafka mock` prints its address first, serves a broker that `SIGUSR1` takes down and `SIGUSR2`
/// brings back with its records, and ends on `SIGTERM`; `kafka dump` reads what was produced.
#[tokio::test]
async fn kafka_mock_goes_down_and_up_on_signals_keeping_its_records_and_kafka_dump_reads_them() {
    use std::io::{BufRead as _, BufReader};
    use std::time::Duration;

    use rdkafka::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let mut mock = bin()
        .args(["kafka", "mock"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = i32::try_from(mock.id()).unwrap();
    let mut first = String::new();
    BufReader::new(mock.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr = first.trim().to_string();
    assert!(addr.starts_with("127.0.0.1:"), "first line: {first:?}");

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &addr)
        .create()
        .unwrap();
    for i in 0..3 {
        let key = format!("{i}");
        let value = format!("{{\"eventID\":\"e{i}\"}}");
        producer
            .send(
                FutureRecord::to("orders.events").key(&key).payload(&value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let dump = |addr: &str| {
        let out = bin()
            .args([
                "kafka",
                "dump",
                "--topic",
                "orders.events",
                "--timeout-secs",
                "20",
            ])
            .args(["--bootstrap-servers", addr])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut ids: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(v["topic"], "orders.events");
                let value: serde_json::Value = serde_json::from_str(v["value"].as_str().unwrap()).unwrap();
                format!(
                    "{}:{}",
                    v["key"].as_str().unwrap(),
                    value["eventID"].as_str().unwrap()
                )
            })
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(dump(&addr), ["0:e0", "1:e1", "2:e2"]);

    let connects = |addr: &str| std::net::TcpStream::connect(addr).is_ok();
    let wait_until = |want: bool| {
        for _ in 0..100 {
            if connects(&addr) == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the mock broker's port never became {}",
            if want { "open" } else { "closed" }
        );
    };
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    wait_until(false);
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR2) }, 0);
    wait_until(true);
    assert_eq!(
        dump(&addr),
        ["0:e0", "1:e1", "2:e2"],
        "records kept across the outage"
    );

    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = mock.wait().unwrap();
    assert!(status.success(), "{status:?}");
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
    let mut answered = false;
    for _ in 0..100 {
        let r = client
            .get(format!("http://127.0.0.1:{port}/livez"))
            .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
            .send();
        if r.is_ok_and(|r| r.status() == 200) {
            answered = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
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
    let finished = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["fields"]["message"] == "request finished")
        .unwrap_or_else(|| panic!("no request log line in\n{stdout}"));
    assert_eq!(finished["openTelemetry"]["traceId"], trace_id, "{finished}");
    assert!(in_span >= 1);
    assert!(
        stdout.contains("effective configuration"),
        "the settings are logged as JSON:\n{stdout}"
    );
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
