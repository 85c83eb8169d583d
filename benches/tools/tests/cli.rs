//! `ostore-tools` run as a user would: `--help` of every subcommand, a short `bench` run, and
//! `kafka mock` / `kafka dump`. The bench starts the `ostore-orders` beside this binary as the
//! service: run these with `--workspace` (which builds both), as `scripts/test` does.

use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ostore-tools"));
    c.env_remove("DATABASE_URL").env("RUST_LOG", "warn");
    c
}

/// The test PostgreSQL server, without a database (TEST_DATABASE_URL's, as every test binary).
fn server_url() -> String {
    let url = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    url.rsplit_once('/')
        .map_or(url.clone(), |(server, _)| server.to_string())
}

fn drop_db(url: &str) {
    let (server, name) = url.rsplit_once('/').unwrap();
    let _ = Command::new("dropdb")
        .args([
            "--if-exists",
            "--force",
            "--maintenance-db",
            &format!("{server}/postgres"),
            name,
        ])
        .output();
}

#[test]
fn every_tool_subcommand_has_help_naming_its_variables() {
    for args in [
        vec!["--help"],
        vec!["bench", "--help"],
        vec!["bench-relay", "--help"],
        vec!["bench-consumer", "--help"],
        vec!["kafka", "mock", "--help"],
        vec!["kafka", "dump", "--help"],
        vec!["verify", "--help"],
    ] {
        let out = bin().args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        if args.len() > 1 {
            assert!(
                ["DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "TOPIC_ORDER_EVENTS"]
                    .iter()
                    .any(|v| text.contains(v)),
                "{args:?} lists no variables:\n{text}"
            );
        }
    }
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
