//! The tracking consumer group's lag: per partition of the tracking topic, the high watermark
//! minus the group's committed offset, asked of the Kafka cluster when the page is drawn.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

/// One partition's position.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionLag {
    /// Partition.
    pub partition: i32,
    /// The group's committed offset (null when it committed none yet).
    pub committed: Option<i64>,
    /// The partition's high watermark (the next offset to be written).
    pub high_watermark: i64,
    /// Records written and not yet consumed by the group.
    pub lag: i64,
}

/// The lag of `group` on `topic`, per partition. Blocking; call it off the async runtime.
pub fn group_lag(
    bootstrap: &str,
    group: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<PartitionLag>, String> {
    // Never subscribes: fetching committed offsets and watermarks does not join the group.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("client.id", "ostore-orders-console")
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| format!("creating a Kafka client: {e}"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("fetching the metadata of {topic}: {e}"))?;
    let t = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| format!("topic {topic} does not exist"))?;
    let mut tpl = TopicPartitionList::new();
    for p in t.partitions() {
        tpl.add_partition(topic, p.id());
    }
    let committed = consumer
        .committed_offsets(tpl, timeout)
        .map_err(|e| format!("fetching the committed offsets of group {group}: {e}"))?;
    let mut out = Vec::new();
    for p in t.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), timeout)
            .map_err(|e| format!("fetching the watermarks of {topic}/{}: {e}", p.id()))?;
        let c = committed
            .find_partition(topic, p.id())
            .and_then(|e| match e.offset() {
                Offset::Offset(n) => Some(n),
                _ => None,
            });
        out.push(PartitionLag {
            partition: p.id(),
            committed: c,
            high_watermark: high,
            lag: (high - c.unwrap_or(low)).max(0),
        });
    }
    out.sort_by_key(|p| p.partition);
    Ok(out)
}
