//! `ostore-tools kafka …`: two small Kafka tools for development, tests and operators.
//!
//! - **`kafka mock`** serves librdkafka's mock cluster (the broker `dev` embeds) as a process of its
//!   own on a random loopback port, with the service's topics created, and prints its bootstrap
//!   address as the first line of its standard output. `SIGUSR1` takes the broker down (connections
//!   closed, new ones refused: an outage) and `SIGUSR2` brings it back with its records; `SIGTERM`
//!   or `SIGINT` ends it. Multi-process tests (`scripts/chaos --broker mock`) use it as a broker whose
//!   group coordinator behaves as Kafka's does (it evicts a member that stops heartbeating after
//!   `session.timeout.ms` and rebalances), which Tansu 0.6.0 does not (docs/reliability.md).
//! - **`kafka dump`** reads topics of any Kafka-protocol cluster from their first offset up to the
//!   high watermark each partition had when the dump started, and writes one JSON line per record
//!   (`topic`, `partition`, `offset`, `key`, `headers`, `value`; bytes as UTF-8, lossy). It joins no
//!   consumer group and commits nothing, so it disturbs no consumer.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Map, Value, json};

use ostore_orders::kafka::{DEFAULT_PARTITIONS, EmbeddedBroker};
use ostore_orders::outbox::Topics;

/// `kafka` subcommands.
#[derive(Debug, Subcommand)]
pub enum KafkaCommand {
    /// Serve librdkafka's mock Kafka cluster as a process on 127.0.0.1 (random port, printed as the
    /// first line of standard output) with the service's topics; SIGUSR1 takes it down (an outage),
    /// SIGUSR2 brings it back with its records.
    Mock(MockArgs),
    /// Write every record of topics (from their first offset to their high watermark at the start)
    /// as JSON lines on standard output; joins no group and commits nothing.
    Dump(DumpArgs),
}

/// `kafka mock` options.
#[derive(Debug, Args)]
pub struct MockArgs {
    /// Partitions of each topic created.
    #[arg(long, default_value_t = DEFAULT_PARTITIONS)]
    pub partitions: i32,
    #[command(flatten)]
    pub topics: Topics,
}

/// `kafka dump` options.
#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Kafka cluster to read.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: String,
    /// Topic to dump (repeat for several); every topic not starting with `__` when none is given.
    #[arg(long = "topic")]
    pub topics: Vec<String>,
    /// Give up (exit non-zero) when the records up to the high watermarks are not all read by then.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

/// Runs a `kafka` subcommand.
pub async fn run(command: KafkaCommand) -> anyhow::Result<()> {
    match command {
        KafkaCommand::Mock(args) => serve_mock(args).await,
        KafkaCommand::Dump(args) => {
            let timeout = Duration::from_secs(args.timeout_secs);
            let n = tokio::task::spawn_blocking(move || {
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                let n = dump(&args.bootstrap_servers, &args.topics, timeout, &mut out)?;
                out.flush().context("writing standard output")?;
                Ok::<_, anyhow::Error>(n)
            })
            .await
            .context("the dump task")??;
            eprintln!("kafka dump: {n} records");
            Ok(())
        }
    }
}

async fn serve_mock(args: MockArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    anyhow::ensure!(args.partitions >= 1, "--partitions must be at least 1");
    let t = &args.topics;
    let broker = EmbeddedBroker::start_with(&t.all(), args.partitions)?;
    let mut down = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    let mut up = signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", broker.bootstrap_servers())?;
        out.flush()?;
    }
    eprintln!(
        "kafka mock: serving on {} (pid {}); SIGUSR1 takes it down, SIGUSR2 brings it back",
        broker.bootstrap_servers(),
        std::process::id()
    );
    loop {
        tokio::select! {
            _ = down.recv() => {
                broker.down()?;
                eprintln!("kafka mock: down");
            }
            _ = up.recv() => {
                broker.up()?;
                eprintln!("kafka mock: up");
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    eprintln!("kafka mock: stopping");
    Ok(())
}

/// Writes every record of `topics` (all but internal ones when empty) of the cluster at
/// `bootstrap`, from each partition's low watermark to the high watermark it had when the dump
/// started, as JSON lines to `out`; returns how many. Fails when a topic is unknown or the records
/// are not all read within `timeout`.
pub fn dump(
    bootstrap: &str,
    topics: &[String],
    timeout: Duration,
    out: &mut impl Write,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + timeout;
    let mut config = ostore_orders::kafka::base_config(bootstrap, "ostore-orders-dump");
    config
        // Required by librdkafka for a consumer; with `assign` no group is joined.
        .set("group.id", "ostore-orders-dump")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = ostore_orders::kafka::finish(config)
        .create()
        .with_context(|| format!("creating a Kafka consumer for {bootstrap}"))?;
    let metadata = consumer
        .fetch_metadata(None, timeout)
        .with_context(|| format!("fetching the topics of {bootstrap}"))?;
    let wanted: Vec<String> = if topics.is_empty() {
        let mut all: Vec<String> = metadata
            .topics()
            .iter()
            .map(|t| t.name().to_string())
            .filter(|n| !n.starts_with("__"))
            .collect();
        all.sort();
        all
    } else {
        topics.to_vec()
    };
    let mut assignment = TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for name in &wanted {
        let topic = metadata
            .topics()
            .iter()
            .find(|t| t.name() == name)
            .with_context(|| format!("topic {name} does not exist on {bootstrap}"))?;
        for p in topic.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(name, p.id(), timeout)
                .with_context(|| format!("fetching the watermarks of {name}/{}", p.id()))?;
            if high > low {
                assignment
                    .add_partition_offset(name, p.id(), Offset::Offset(low))
                    .context("building the assignment")?;
                ends.insert((name.clone(), p.id()), high);
            }
        }
    }
    if ends.is_empty() {
        return Ok(0);
    }
    consumer.assign(&assignment).context("assigning the partitions")?;
    let mut written = 0u64;
    while !ends.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let mut missing: Vec<String> = ends.keys().map(|(t, p)| format!("{t}/{p}")).collect();
            missing.sort();
            anyhow::bail!(
                "timed out after {} records; partitions not read to their end: {}",
                written,
                missing.join(", ")
            );
        }
        let Some(result) = consumer.poll(left.min(Duration::from_millis(500))) else {
            continue;
        };
        let msg = match result {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "kafka dump: consumer error (retrying)");
                continue;
            }
        };
        let key = (msg.topic().to_string(), msg.partition());
        let Some(&end) = ends.get(&key) else { continue };
        if msg.offset() < end {
            let mut headers = Map::new();
            if let Some(hs) = msg.headers() {
                for h in hs.iter() {
                    let v = h
                        .value
                        .map(|v| Value::String(String::from_utf8_lossy(v).into_owned()));
                    headers.insert(h.key.to_string(), v.unwrap_or(Value::Null));
                }
            }
            let line = json!({
                "topic": msg.topic(),
                "partition": msg.partition(),
                "offset": msg.offset(),
                "key": msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                "headers": headers,
                "value": msg.payload().map(|v| String::from_utf8_lossy(v).into_owned()),
            });
            serde_json::to_writer(&mut *out, &line).context("writing a record")?;
            out.write_all(b"\n").context("writing a record")?;
            written += 1;
        }
        if msg.offset() + 1 >= end {
            ends.remove(&key);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    #[tokio::test]
    async fn dump_writes_every_record_up_to_the_high_watermark_with_key_headers_and_value() {
        let broker = EmbeddedBroker::start_with(&["a", "b"], 3).unwrap();
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap_servers())
            .create()
            .unwrap();
        for i in 0..20 {
            let key = format!("k{i}");
            let value = format!("{{\"eventID\":\"e{i}\"}}");
            let topic = if i % 4 == 0 { "b" } else { "a" };
            let headers = OwnedHeaders::new().insert(Header {
                key: "eventType",
                value: Some("T"),
            });
            producer
                .send(
                    FutureRecord::to(topic).key(&key).payload(&value).headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
        let bootstrap = broker.bootstrap_servers().to_string();
        let (n, text) = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            let n = dump(&bootstrap, &["a".to_string()], Duration::from_secs(30), &mut buf).unwrap();
            (n, String::from_utf8(buf).unwrap())
        })
        .await
        .unwrap();
        assert_eq!(n, 15);
        let mut seen: Vec<(String, String)> = text
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                assert_eq!(v["topic"], "a");
                assert_eq!(v["headers"]["eventType"], "T");
                let value: Value = serde_json::from_str(v["value"].as_str().unwrap()).unwrap();
                (
                    v["key"].as_str().unwrap().to_string(),
                    value["eventID"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        seen.sort();
        let mut want: Vec<(String, String)> = (0..20)
            .filter(|i| i % 4 != 0)
            .map(|i| (format!("k{i}"), format!("e{i}")))
            .collect();
        want.sort();
        assert_eq!(seen, want);

        // Every topic when none is named; an unknown topic is an error, not an empty dump.
        let bootstrap = broker.bootstrap_servers().to_string();
        let (all, unknown) = tokio::task::spawn_blocking(move || {
            let all = dump(&bootstrap, &[], Duration::from_secs(30), &mut std::io::sink()).unwrap();
            let unknown = dump(
                &bootstrap,
                &["nope".to_string()],
                Duration::from_secs(10),
                &mut std::io::sink(),
            );
            (all, unknown)
        })
        .await
        .unwrap();
        assert_eq!(all, 20);
        let err = format!("{:#}", unknown.unwrap_err());
        assert!(err.contains("topic nope does not exist"), "{err}");
    }
}
