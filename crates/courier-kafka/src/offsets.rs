//! Partition extents. The end offset is confirmed by reading the partition's last
//! batch, so it is exact on brokers whose ListOffsets(latest) answers with the last
//! batch's base offset + 1 (tansu 0.6); on Kafka the read finds exactly the reported
//! end.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// `(start, end)` of each of `partitions` of `topic` (blocking).
pub fn extents(
    config: &ClientConfig,
    topic: &str,
    partitions: &[i32],
) -> KafkaResult<Vec<(i64, i64)>> {
    let mut c = config.clone();
    c.set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .set("group.id", "courier-offset-lookup")
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = c.create()?;
    let mut out = Vec::with_capacity(partitions.len());
    let mut probe = TopicPartitionList::new();
    for &p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, LOOKUP_TIMEOUT)?;
        out.push((low, high));
        if high > low {
            probe.add_partition_offset(topic, p, Offset::Offset(high - 1))?;
        }
    }
    if probe.count() == 0 {
        return Ok(out);
    }
    consumer.assign(&probe)?;
    let mut pending = probe.count();
    let deadline = Instant::now() + LOOKUP_TIMEOUT;
    while pending > 0 && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                use rdkafka::Message as _;
                if let Some(i) = partitions.iter().position(|p| *p == m.partition()) {
                    out[i].1 = out[i].1.max(m.offset() + 1);
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => pending -= 1,
            Some(Err(e)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) => {
                pending -= 1
            }
            Some(Err(e)) => return Err(e),
        }
    }
    Ok(out)
}

/// The offset the next message of `topic`/`partition` will get (blocking).
pub fn true_end(config: &ClientConfig, topic: &str, partition: i32) -> KafkaResult<i64> {
    Ok(extents(config, topic, &[partition])?[0].1)
}
