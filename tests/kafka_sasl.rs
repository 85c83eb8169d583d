//! The service's Kafka clients against Apache Kafka over SASL_SSL: a private broker
//! (`TEST_KAFKA_BROKER_SCRIPT`, that is scripts/kafka-broker with `KAFKA_BROKER_SASL_SSL_PORT`)
//! with a throwaway CA, TLS on loopback and SCRAM/PLAIN users. The clients get their settings the
//! way an operator gives them, as `KAFKA_CLIENT_*` variables.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ostore_orders::kafka::{self, ClientProperties, ConsumerSettings, ProducerSettings};
use rdkafka::Message as _;
use rdkafka::consumer::Consumer as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::free_port_for_later;
use uuid::Uuid;

struct SaslKafka {
    script: String,
    port: u16,
    sasl_port: u16,
    dir: PathBuf,
}

impl SaslKafka {
    fn start() -> SaslKafka {
        let script = std::env::var("TEST_KAFKA_BROKER_SCRIPT")
            .expect("TEST_KAFKA_BROKER_SCRIPT is not set: run scripts/test (it names scripts/kafka-broker)");
        let b = SaslKafka {
            script,
            port: free_port_for_later(),
            sasl_port: free_port_for_later(),
            dir: std::env::temp_dir().join(format!("ostore-test-kafka-sasl-{}", Uuid::new_v4().simple())),
        };
        let ok = b.command("start").status().unwrap().success();
        assert!(
            ok,
            "kafka-broker start failed (log: {})",
            b.dir.join("log").display()
        );
        b
    }

    fn command(&self, cmd: &str) -> std::process::Command {
        let mut c = std::process::Command::new(&self.script);
        c.arg(cmd)
            .env("KAFKA_BROKER_PORT", self.port.to_string())
            .env("KAFKA_BROKER_SASL_SSL_PORT", self.sasl_port.to_string())
            .env("KAFKA_BROKER_SASL_USER", "orders")
            .env("KAFKA_BROKER_SASL_PASSWORD", "orders-secret")
            .env("KAFKA_BROKER_DIR", &self.dir)
            .stdout(std::process::Stdio::null());
        c
    }

    fn sasl_bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.sasl_port)
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("tls").join("ca.pem")
    }
}

impl Drop for SaslKafka {
    fn drop(&mut self) {
        let _ = self.command("stop").stderr(std::process::Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn props(ca: &Path, mechanism: &str, password: &str) -> ClientProperties {
    ClientProperties::from_vars([
        ("KAFKA_CLIENT_SECURITY_PROTOCOL", "SASL_SSL".to_string()),
        ("KAFKA_CLIENT_SSL_CA_LOCATION", ca.display().to_string()),
        ("KAFKA_CLIENT_SASL_MECHANISM", mechanism.to_string()),
        ("KAFKA_CLIENT_SASL_USERNAME", "orders".to_string()),
        ("KAFKA_CLIENT_SASL_PASSWORD", password.to_string()),
        ("KAFKA_CLIENT_COMPRESSION_TYPE", "zstd".to_string()),
    ])
    .unwrap()
}

/// A short-lived producer with `props` (not the process-wide pass-through).
fn producer_with(bootstrap: &str, props: &ClientProperties) -> FutureProducer {
    let mut config = kafka::producer_config(
        bootstrap,
        &ProducerSettings {
            message_timeout: Duration::from_secs(8),
            ..ProducerSettings::default()
        },
    );
    props.apply(&mut config);
    config.create().unwrap()
}

async fn send<C: rdkafka::client::ClientContext + 'static>(
    producer: &FutureProducer<C>,
    topic: &str,
    value: &str,
) -> Result<(), String> {
    producer
        .send(
            FutureRecord::to(topic).key("k").payload(value),
            Duration::from_secs(10),
        )
        .await
        .map(|_| ())
        .map_err(|(e, _)| e.to_string())
}

#[tokio::test]
async fn the_service_clients_publish_and_consume_over_sasl_ssl_with_scram_and_plain() {
    let broker = tokio::task::spawn_blocking(SaslKafka::start).await.unwrap();
    let bootstrap = broker.sasl_bootstrap();
    // As `serve` does at startup with KAFKA_CLIENT_* set: every client of the process uses them.
    assert!(kafka::set_client_properties(props(
        &broker.ca(),
        "SCRAM-SHA-512",
        "orders-secret"
    )));
    let topic = format!("sasl-{}", Uuid::new_v4().simple());

    // The admin client creates the topic over SASL_SSL (it would only log a failure).
    kafka::ensure_topics_with(&bootstrap, &[&topic], 2, Duration::from_secs(20)).await;
    // The relay's producer, zstd-compressed.
    let (producer, connectivity) = kafka::producer(
        &bootstrap,
        &ProducerSettings {
            message_timeout: Duration::from_secs(20),
            statistics_interval: Duration::from_millis(200),
            ..ProducerSettings::default()
        },
    )
    .unwrap();
    send(&producer, &topic, "over-scram").await.unwrap();
    assert!(
        connectivity.is_connected(),
        "the producer reports its SASL_SSL connection"
    );

    // PLAIN over the same TLS listener.
    let plain = producer_with(&bootstrap, &props(&broker.ca(), "PLAIN", "orders-secret"));
    send(&plain, &topic, "over-plain").await.unwrap();

    // The tracking consumer's builder (group member) reads both back over SCRAM.
    let consumer = kafka::consumer(&bootstrap, &ConsumerSettings::new(&format!("g-{topic}"))).unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < 2 {
        let m = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("read only {seen:?} over SASL_SSL"))
            .unwrap();
        seen.push(String::from_utf8_lossy(m.payload().unwrap()).into_owned());
    }
    seen.sort();
    assert_eq!(seen, ["over-plain", "over-scram"]);

    // A wrong password is refused by the broker: nothing is delivered.
    let wrong = producer_with(
        &bootstrap,
        &props(&broker.ca(), "SCRAM-SHA-512", "not-the-password"),
    );
    let err = send(&wrong, &topic, "never").await.unwrap_err();
    assert!(
        err.contains("Authentication") || err.contains("timed out"),
        "a wrong password failed with: {err}"
    );
    // A client that does not trust the throwaway CA does not get past TLS.
    let untrusted = ClientProperties::from_vars([
        ("KAFKA_CLIENT_SECURITY_PROTOCOL", "SASL_SSL"),
        ("KAFKA_CLIENT_SASL_MECHANISM", "PLAIN"),
        ("KAFKA_CLIENT_SASL_USERNAME", "orders"),
        ("KAFKA_CLIENT_SASL_PASSWORD", "orders-secret"),
    ])
    .unwrap();
    let err = send(&producer_with(&bootstrap, &untrusted), &topic, "never")
        .await
        .unwrap_err();
    assert!(!err.is_empty());
}
