//! Kafka plumbing shared by the roles that talk to Kafka: the idempotent producer the outbox relay
//! publishes with, consumers for the tracking consumer group, topic creation at startup, the
//! producer-connected flag `/readyz` reads, and the embedded broker (`dev` and tests).
//!
//! Nothing here depends on a particular broker: the same settings work against Apache Kafka,
//! Redpanda, Tansu and librdkafka's mock cluster. The mock cannot create topics through the Admin
//! API, so [`EmbeddedBroker`] creates them itself and [`ensure_topics`] only logs when creation is
//! impossible.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;

/// Prefix of the environment variables that pass librdkafka properties through to every Kafka
/// client of the service: `KAFKA_CLIENT_SECURITY_PROTOCOL=SASL_SSL` sets `security.protocol`.
pub const CLIENT_PROPERTY_PREFIX: &str = "KAFKA_CLIENT_";

/// Properties the service sets itself and a pass-through may not change, with the reason.
const RESERVED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "set KAFKA_BOOTSTRAP_SERVERS instead"),
    (
        "group.id",
        "the tracking consumer's group is part of its contract",
    ),
    (
        "enable.idempotence",
        "the relay's no-duplicate, in-order delivery depends on the idempotent producer",
    ),
    ("acks", "the relay deletes outbox rows only after acks=all"),
    (
        "enable.auto.commit",
        "the consumer commits an offset only after the event is applied",
    ),
    (
        "enable.auto.offset.store",
        "the consumer stores an offset only after the event is applied",
    ),
];

/// librdkafka properties passed through from the environment (`KAFKA_CLIENT_*`) to every Kafka
/// client the service builds (producer, consumer group members, admin client, `kafka dump`, the
/// shipments simulator): TLS (`security.protocol`, `ssl.*`), SASL (`sasl.mechanism`,
/// `sasl.username`, `sasl.password`), compression and any other client property. A pass-through
/// value wins over the service's own default for the same property (`compression.type`,
/// `client.id`, …) except for the [reserved](RESERVED_PROPERTIES) ones, which are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientProperties(Vec<(String, String)>);

/// Why a pass-through property cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientPropertyError {
    #[error("{var}: the service sets `{property}` itself ({why})")]
    Reserved {
        var: String,
        property: String,
        why: &'static str,
    },
    #[error("{var}: {reason}")]
    Rejected { var: String, reason: String },
    #[error("{0}: the property name is empty")]
    Empty(String),
}

impl ClientProperties {
    /// The properties named by `KAFKA_CLIENT_*` variables of this process, checked.
    pub fn from_env() -> Result<Self, ClientPropertyError> {
        Self::from_vars(std::env::vars())
    }

    /// The properties named by the `KAFKA_CLIENT_*` entries of `vars` (others are ignored),
    /// checked: each name is lower-cased with `_` turned into `.`, and librdkafka itself must accept
    /// every name and value (`KAFKA_CLIENT_SASL_MECHANISM=SCRAM-SHA-512` → `sasl.mechanism`).
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, ClientPropertyError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let mut props = Vec::new();
        for (k, v) in vars {
            let var = k.as_ref();
            let Some(rest) = var.strip_prefix(CLIENT_PROPERTY_PREFIX) else {
                continue;
            };
            if rest.is_empty() {
                return Err(ClientPropertyError::Empty(var.to_string()));
            }
            let name = rest.to_ascii_lowercase().replace('_', ".");
            props.push((var.to_string(), name, v.into()));
        }
        props.sort();
        let mut checked = Vec::new();
        for (var, name, value) in props {
            if let Some((_, why)) = RESERVED_PROPERTIES.iter().find(|(r, _)| *r == name) {
                return Err(ClientPropertyError::Reserved {
                    var,
                    property: name,
                    why,
                });
            }
            // librdkafka checks the name and the value when the native configuration is built.
            let mut one = ClientConfig::new();
            one.set(&name, &value);
            if let Err(e) = one.create_native_config() {
                return Err(ClientPropertyError::Rejected {
                    var,
                    reason: e.to_string(),
                });
            }
            checked.push((name, value));
        }
        let props = ClientProperties(checked);
        if !props.is_empty() {
            // Some properties only fail together (SASL_SSL without a compiled-in mechanism, a
            // certificate file that cannot be read): librdkafka checks them when a client is made.
            let mut config = base_config("127.0.0.1:9", "ostore-orders-config-check");
            props.apply(&mut config);
            if let Err(e) = config.create::<rdkafka::producer::BaseProducer>() {
                return Err(ClientPropertyError::Rejected {
                    var: format!("{CLIENT_PROPERTY_PREFIX}*"),
                    reason: e.to_string(),
                });
            }
        }
        Ok(props)
    }

    /// True when no property is passed through.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets every property on `config` (over the values already there).
    pub fn apply(&self, config: &mut ClientConfig) {
        for (k, v) in &self.0 {
            config.set(k, v);
        }
    }

    /// `name=value` pairs for the startup print, with the value of every password, secret, key,
    /// token or JAAS configuration replaced by `*****`.
    pub fn describe(&self) -> String {
        if self.0.is_empty() {
            return "(none)".into();
        }
        self.0
            .iter()
            .map(|(k, v)| {
                if is_secret_property(k) {
                    format!("{k}=*****")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn is_secret_property(name: &str) -> bool {
    [
        "password",
        "secret",
        "key",
        "token",
        "jaas",
        "sasl.oauthbearer.config",
    ]
    .iter()
    .any(|w| name.contains(w))
        && !name.ends_with(".location")
}

static CLIENT_PROPERTIES: OnceLock<ClientProperties> = OnceLock::new();

/// Makes `props` the pass-through of every Kafka client this process builds from now on. Called
/// once at startup (a later call is ignored and returns false).
pub fn set_client_properties(props: ClientProperties) -> bool {
    CLIENT_PROPERTIES.set(props).is_ok()
}

/// Reads, checks and installs the `KAFKA_CLIENT_*` pass-through of this process (startup of every
/// command that talks to Kafka). A bad variable is an error naming it.
pub fn install_client_properties_from_env() -> anyhow::Result<()> {
    let props = ClientProperties::from_env()?;
    set_client_properties(props);
    Ok(())
}

/// The pass-through in effect (none unless [`set_client_properties`] was called).
pub fn client_properties() -> &'static ClientProperties {
    static NONE: ClientProperties = ClientProperties(Vec::new());
    CLIENT_PROPERTIES.get().unwrap_or(&NONE)
}

/// A client configuration for `bootstrap` with the pass-through properties applied last by
/// [`finish`]: the service's clients start from this.
pub fn base_config(bootstrap: &str, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("client.id", client_id);
    config
}

/// Applies the pass-through properties to a configuration built by the service.
pub fn finish(mut config: ClientConfig) -> ClientConfig {
    client_properties().apply(&mut config);
    config
}

/// How many partitions the service's topics get when it creates them.
pub const DEFAULT_PARTITIONS: i32 = 6;

/// Settings of the idempotent producer.
#[derive(Debug, Clone)]
pub struct ProducerSettings {
    /// How long librdkafka keeps trying to deliver a message before it reports a failure
    /// (`message.timeout.ms`). The relay keeps the row and tries again later, so this bounds how
    /// long one batch waits during an outage, not whether the event is delivered.
    pub message_timeout: Duration,
    /// How long the producer waits to fill a batch (`linger.ms`).
    pub linger: Duration,
    /// Most messages in one batch (`batch.num.messages`).
    pub batch_num_messages: u32,
    /// Most bytes in one batch (`batch.size`).
    pub batch_size_bytes: u32,
    /// `compression.type` (`none`, `gzip`, `lz4`, `zstd`, all compiled in; not `snappy`, which some
    /// Kafka-protocol brokers accept and then cannot serve). `KAFKA_CLIENT_COMPRESSION_TYPE`
    /// overrides it.
    pub compression: String,
    /// How often librdkafka reports broker states, which keeps the connected flag current.
    pub statistics_interval: Duration,
}

impl Default for ProducerSettings {
    fn default() -> Self {
        ProducerSettings {
            message_timeout: Duration::from_secs(30),
            linger: Duration::from_millis(5),
            batch_num_messages: 10_000,
            batch_size_bytes: 1_000_000,
            compression: "lz4".into(),
            statistics_interval: Duration::from_secs(3),
        }
    }
}

/// Whether a Kafka client currently has a live connection to at least one broker. Cheap to clone;
/// every clone reads the same flag.
#[derive(Debug, Clone, Default)]
pub struct Connectivity(Arc<AtomicBool>);

impl Connectivity {
    /// True while a broker connection is up.
    pub fn is_connected(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `Ok` while connected, otherwise the reason (the shape of a readiness check).
    pub fn check(&self) -> Result<(), String> {
        if self.is_connected() {
            Ok(())
        } else {
            Err("Kafka producer not connected to any broker".into())
        }
    }

    fn set(&self, connected: bool) {
        let was = self.0.swap(connected, Ordering::Relaxed);
        if was != connected {
            if connected {
                tracing::info!("Kafka producer connected");
            } else {
                tracing::warn!("Kafka producer lost every broker connection");
            }
        }
    }
}

/// Client context of the service's producers: librdkafka's errors go to the log, and its periodic
/// statistics keep a [`Connectivity`] flag current (a broker in state `UP` means connected).
pub struct KafkaContext {
    connectivity: Connectivity,
}

impl ClientContext for KafkaContext {
    fn stats(&self, statistics: Statistics) {
        let up = statistics
            .brokers
            .values()
            .any(|b| b.state == "UP" && b.source != "internal");
        self.connectivity.set(up);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.connectivity.set(false);
        }
        tracing::warn!(target: "rdkafka", error = %error, "librdkafka: {reason}");
    }
}

/// The producer the service publishes with.
pub type Producer = FutureProducer<KafkaContext>;

/// Builds the idempotent producer (`enable.idempotence=true`, `acks=all`): retries never duplicate
/// or reorder messages within a partition. Returns it with its connected flag, for `/readyz`.
///
/// librdkafka connects lazily and reconnects by itself, so this succeeds while Kafka is down.
pub fn producer(bootstrap: &str, settings: &ProducerSettings) -> anyhow::Result<(Producer, Connectivity)> {
    let connectivity = Connectivity::default();
    let context = KafkaContext {
        connectivity: connectivity.clone(),
    };
    let producer = finish(producer_config(bootstrap, settings))
        .create_with_context(context)
        .with_context(|| format!("creating a Kafka producer for {bootstrap}"))?;
    Ok((producer, connectivity))
}

/// The configuration [`producer`] uses (before the pass-through properties, which [`finish`]
/// adds), for callers that need another client context.
pub fn producer_config(bootstrap: &str, settings: &ProducerSettings) -> ClientConfig {
    let mut config = base_config(bootstrap, "ostore-orders");
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("message.timeout.ms", millis(settings.message_timeout))
        .set("linger.ms", millis(settings.linger))
        .set("batch.num.messages", settings.batch_num_messages.to_string())
        .set("batch.size", settings.batch_size_bytes.to_string())
        .set("compression.type", &settings.compression)
        .set("statistics.interval.ms", millis(settings.statistics_interval));
    config
}

/// Settings of a consumer-group member.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// The consumer group.
    pub group_id: String,
    /// `session.timeout.ms`: how long the group waits for a silent member before reassigning its
    /// partitions (librdkafka's mock cluster needs ≥ 6 s to stabilise).
    pub session_timeout: Duration,
    /// `heartbeat.interval.ms`.
    pub heartbeat_interval: Duration,
    /// Where a group without a committed offset starts: `earliest` or `latest`.
    pub auto_offset_reset: String,
}

impl ConsumerSettings {
    /// Settings for `group_id` with production defaults (45 s session, 3 s heartbeat, earliest).
    pub fn new(group_id: &str) -> Self {
        ConsumerSettings {
            group_id: group_id.to_string(),
            session_timeout: Duration::from_secs(45),
            heartbeat_interval: Duration::from_secs(3),
            auto_offset_reset: "earliest".into(),
        }
    }
}

/// A group member's lag from librdkafka's statistics, given each partition's (id, lag): the
/// messages on the broker beyond its position, summed over the partitions whose lag it knows; -1
/// when it knows none, as while the member is out of its group (after a broker outage, in a
/// rebalance) or consumes no partition. A sum of nothing read 0, "caught up", just when the
/// events were waiting.
pub fn member_lag(partitions: impl Iterator<Item = (i32, i64)>) -> i64 {
    partitions
        .filter(|&(partition, lag)| partition >= 0 && lag >= 0)
        .fold(None, |sum, (_, lag)| Some(sum.unwrap_or(0) + lag))
        .unwrap_or(-1)
}

/// Client context of the service's group members: librdkafka's errors go to the log, and offsets
/// the application stored are committed before its partitions are taken away in a rebalance, so
/// the next owner does not redo work already done.
pub struct GroupContext;

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        let lag = member_lag(
            statistics
                .topics
                .values()
                .flat_map(|t| t.partitions.values())
                .map(|p| (p.partition, p.consumer_lag)),
        );
        crate::metrics::get().set_consumer_lag(lag);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "rdkafka", error = %error, "librdkafka: {reason}");
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(_) = rebalance {
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => {}
                // Nothing stored since the last commit.
                Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {}
                Err(e) => tracing::warn!(error = %e, "committing offsets before a rebalance failed"),
            }
        }
    }
}

/// A member of a consumer group, as [`consumer`] builds it.
pub type GroupConsumer = StreamConsumer<GroupContext>;

/// Builds a group member with manual offset handling: nothing is committed automatically and no
/// offset is stored before the application stores it (`enable.auto.commit=false`,
/// `enable.auto.offset.store=false`). The caller stores a message's offset once the message is
/// fully handled and commits stored offsets itself (they are also committed before a rebalance
/// takes partitions away).
pub fn consumer(bootstrap: &str, settings: &ConsumerSettings) -> anyhow::Result<GroupConsumer> {
    let mut config = base_config(bootstrap, "ostore-orders");
    config
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &settings.auto_offset_reset)
        .set("session.timeout.ms", millis(settings.session_timeout))
        .set("heartbeat.interval.ms", millis(settings.heartbeat_interval))
        .set("enable.partition.eof", "false")
        // Feeds the consumer-lag gauge.
        .set("statistics.interval.ms", "5000");
    finish(config).create_with_context(GroupContext).with_context(|| {
        format!(
            "creating a Kafka consumer in group {} for {bootstrap}",
            settings.group_id
        )
    })
}

/// Creates the topics in `topics` that the cluster does not have yet, with [`DEFAULT_PARTITIONS`]
/// partitions and the broker's default replication factor.
///
/// Never fails: a broker that cannot be reached or cannot create topics (librdkafka's mock
/// cluster, a cluster without the permission) is logged, and the service goes on (the topics may
/// be auto-created or created by an operator).
pub async fn ensure_topics(bootstrap: &str, topics: &[&str]) {
    ensure_topics_with(bootstrap, topics, DEFAULT_PARTITIONS, Duration::from_secs(10)).await;
}

/// [`ensure_topics`] with an explicit partition count and time limit.
pub async fn ensure_topics_with(bootstrap: &str, topics: &[&str], partitions: i32, timeout: Duration) {
    match try_ensure_topics(bootstrap, topics, partitions, timeout).await {
        Ok(created) if created.is_empty() => tracing::debug!("Kafka topics present"),
        Ok(created) => tracing::info!(topics = ?created, "created Kafka topics"),
        Err(e) => tracing::warn!(
            error = %format!("{e:#}"),
            topics = ?topics,
            "could not make sure the Kafka topics exist; relying on the broker to have or auto-create them"
        ),
    }
}

async fn try_ensure_topics(
    bootstrap: &str,
    topics: &[&str],
    partitions: i32,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> = finish(base_config(bootstrap, "ostore-orders-admin"))
        .create()
        .context("creating a Kafka admin client")?;
    let admin = Arc::new(admin);
    let existing = {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || {
            admin.inner().fetch_metadata(None, timeout).map(|m| {
                m.topics()
                    .iter()
                    .map(|t| t.name().to_string())
                    .collect::<Vec<_>>()
            })
        })
        .await
        .context("metadata task")?
        .context("fetching the cluster's topics")?
    };
    let missing: Vec<&str> = topics
        .iter()
        .copied()
        .filter(|t| !existing.iter().any(|e| e == t))
        .collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let specs: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1)))
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = tokio::time::timeout(
        timeout + Duration::from_secs(1),
        admin.create_topics(&specs, &opts),
    )
    .await
    .context("CreateTopics timed out")?
    .context("CreateTopics")?;
    let mut created = Vec::new();
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok(name) => created.push(name),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic = %name, "topic exists")
            }
            Err((name, code)) => failed.push(format!("{name}: {code}")),
        }
    }
    if failed.is_empty() {
        Ok(created)
    } else {
        anyhow::bail!("could not create {}", failed.join(", "))
    }
}

fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

/// An in-process Kafka-protocol broker: librdkafka's mock cluster, for `dev` without
/// `KAFKA_BOOTSTRAP_SERVERS` and for tests. It listens on a random loopback port
/// ([`bootstrap_servers`](Self::bootstrap_servers)), so any Kafka client (kcat too) can attach.
///
/// The mock cluster lives on a thread of its own (its handle cannot move between threads); this
/// value only sends it commands, and stops it when dropped.
pub struct EmbeddedBroker {
    bootstrap: String,
    commands: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

enum Command {
    CreateTopic(String, i32, mpsc::Sender<anyhow::Result<()>>),
    SetUp(bool, mpsc::Sender<anyhow::Result<()>>),
}

impl EmbeddedBroker {
    /// Starts a one-broker mock cluster with `topics` created, [`DEFAULT_PARTITIONS`] each.
    pub fn start(topics: &[&str]) -> anyhow::Result<EmbeddedBroker> {
        Self::start_with(topics, DEFAULT_PARTITIONS)
    }

    /// Starts a one-broker mock cluster with `topics` created, `partitions` each.
    pub fn start_with(topics: &[&str], partitions: i32) -> anyhow::Result<EmbeddedBroker> {
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<String>>();
        let (commands, command_rx) = mpsc::channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("embedded-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ =
                            ready_tx.send(Err(anyhow::Error::new(e).context("starting the mock cluster")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Runs until every sender is gone (the broker was dropped).
                for command in command_rx {
                    match command {
                        Command::CreateTopic(name, partitions, reply) => {
                            let r = cluster
                                .create_topic(&name, partitions, 1)
                                .with_context(|| format!("creating topic {name}"));
                            let _ = reply.send(r);
                        }
                        Command::SetUp(up, reply) => {
                            // -1 addresses every broker of the cluster (their ids start at 1).
                            let r = if up {
                                cluster.broker_up(-1)
                            } else {
                                cluster.broker_down(-1)
                            };
                            let _ = reply.send(r.context("changing the mock broker's state"));
                        }
                    }
                }
            })
            .context("spawning the embedded broker's thread")?;
        let bootstrap = ready_rx
            .recv()
            .context("the embedded broker's thread stopped")??;
        let broker = EmbeddedBroker {
            bootstrap,
            commands,
            thread: Some(thread),
        };
        for topic in topics {
            broker.create_topic(topic, partitions)?;
        }
        Ok(broker)
    }

    /// The `host:port` list clients connect to.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Creates a topic (the mock cluster does not implement the Admin API's CreateTopics).
    pub fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        self.call(|reply| Command::CreateTopic(name.to_string(), partitions, reply))
    }

    /// Takes the broker down: connections are closed and new ones refused (an outage).
    pub fn down(&self) -> anyhow::Result<()> {
        self.call(|reply| Command::SetUp(false, reply))
    }

    /// Brings the broker back on the same port.
    pub fn up(&self) -> anyhow::Result<()> {
        self.call(|reply| Command::SetUp(true, reply))
    }

    fn call(&self, command: impl FnOnce(mpsc::Sender<anyhow::Result<()>>) -> Command) -> anyhow::Result<()> {
        let (reply, answer) = mpsc::channel();
        self.commands
            .send(command(reply))
            .map_err(|_| anyhow::anyhow!("the embedded broker has stopped"))?;
        answer
            .recv()
            .map_err(|_| anyhow::anyhow!("the embedded broker has stopped"))?
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        // Closing the command channel ends the thread, which destroys the cluster.
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.commands, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("bootstrap", &self.bootstrap)
            .finish()
    }
}

#[cfg(test)]
mod lag_tests {
    use super::member_lag;

    #[test]
    fn a_member_knowing_no_partitions_lag_reports_unknown_not_caught_up() {
        // Out of its group: librdkafka lists the partitions (and its internal -1 one) without a lag.
        assert_eq!(member_lag([(-1, -1), (0, -1), (1, -1)].into_iter()), -1);
        assert_eq!(member_lag(std::iter::empty()), -1);
        assert_eq!(member_lag([(-1, 9), (0, 3), (1, -1), (2, 4)].into_iter()), 7);
        assert_eq!(member_lag([(0, 0), (1, -1)].into_iter()), 0, "caught up");
    }
}

#[cfg(test)]
mod client_property_tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<ClientProperties, ClientPropertyError> {
        ClientProperties::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn kafka_client_variables_become_librdkafka_properties_and_others_are_ignored() {
        let p = parse(&[
            ("KAFKA_CLIENT_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_CLIENT_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("KAFKA_CLIENT_SASL_USERNAME", "orders"),
            ("KAFKA_CLIENT_SASL_PASSWORD", "hunter2-very-secret"),
            ("KAFKA_CLIENT_COMPRESSION_TYPE", "zstd"),
            ("KAFKA_BOOTSTRAP_SERVERS", "b:9092"),
            ("KAFKA_HEAP_OPTS", "-Xmx1g"),
            ("PATH", "/bin"),
        ])
        .unwrap();
        let mut config = ClientConfig::new();
        p.apply(&mut config);
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("compression.type"), Some("zstd"));
        assert_eq!(config.get("heap.opts"), None);
        let shown = p.describe();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("sasl.password=*****"), "{shown}");
        assert!(shown.contains("sasl.username=orders"), "{shown}");
    }

    #[test]
    fn every_compression_and_security_feature_is_compiled_in() {
        for set in [
            &[("KAFKA_CLIENT_COMPRESSION_TYPE", "zstd")][..],
            &[("KAFKA_CLIENT_COMPRESSION_TYPE", "lz4")],
            &[("KAFKA_CLIENT_COMPRESSION_TYPE", "gzip")],
            &[("KAFKA_CLIENT_SECURITY_PROTOCOL", "SSL")],
            &[
                ("KAFKA_CLIENT_SECURITY_PROTOCOL", "SASL_SSL"),
                ("KAFKA_CLIENT_SASL_MECHANISM", "PLAIN"),
                ("KAFKA_CLIENT_SASL_USERNAME", "u"),
                ("KAFKA_CLIENT_SASL_PASSWORD", "p"),
            ],
            &[
                ("KAFKA_CLIENT_SECURITY_PROTOCOL", "SASL_SSL"),
                ("KAFKA_CLIENT_SASL_MECHANISM", "SCRAM-SHA-256"),
                ("KAFKA_CLIENT_SASL_USERNAME", "u"),
                ("KAFKA_CLIENT_SASL_PASSWORD", "p"),
            ],
            &[
                ("KAFKA_CLIENT_SECURITY_PROTOCOL", "SASL_SSL"),
                ("KAFKA_CLIENT_SASL_MECHANISM", "SCRAM-SHA-512"),
                ("KAFKA_CLIENT_SASL_USERNAME", "u"),
                ("KAFKA_CLIENT_SASL_PASSWORD", "p"),
            ],
        ] {
            // Parsing creates a client with the set: librdkafka refuses what is not compiled in.
            parse(set).unwrap_or_else(|e| panic!("{set:?}: {e}"));
        }
    }

    #[test]
    fn a_combination_librdkafka_cannot_serve_is_refused_at_startup() {
        // SASL without a mechanism means GSSAPI (Kerberos), which is not compiled in.
        let e = parse(&[("KAFKA_CLIENT_SECURITY_PROTOCOL", "SASL_SSL")]).unwrap_err();
        assert!(e.to_string().contains("GSSAPI"), "{e}");
        let e = parse(&[
            ("KAFKA_CLIENT_SECURITY_PROTOCOL", "SSL"),
            ("KAFKA_CLIENT_SSL_CA_LOCATION", "/nonexistent/ca.pem"),
        ])
        .unwrap_err();
        assert!(e.to_string().starts_with("KAFKA_CLIENT_*"), "{e}");
    }

    #[test]
    fn unknown_reserved_and_invalid_properties_are_refused_with_the_variable_named() {
        let e = parse(&[("KAFKA_CLIENT_SASL_MECHANISMS_TYPO_X", "PLAIN")]).unwrap_err();
        assert!(
            e.to_string().starts_with("KAFKA_CLIENT_SASL_MECHANISMS_TYPO_X:"),
            "{e}"
        );
        let e = parse(&[("KAFKA_CLIENT_ENABLE_IDEMPOTENCE", "false")]).unwrap_err();
        assert!(matches!(e, ClientPropertyError::Reserved { .. }), "{e}");
        let e = parse(&[("KAFKA_CLIENT_BOOTSTRAP_SERVERS", "x:1")]).unwrap_err();
        assert!(e.to_string().contains("KAFKA_BOOTSTRAP_SERVERS"), "{e}");
        let e = parse(&[("KAFKA_CLIENT_SECURITY_PROTOCOL", "CARRIER_PIGEON")]).unwrap_err();
        assert!(matches!(e, ClientPropertyError::Rejected { .. }), "{e}");
        assert!(matches!(
            parse(&[("KAFKA_CLIENT_", "x")]),
            Err(ClientPropertyError::Empty(_))
        ));
    }
}
