//! Offset history for rates (seed 004 §5.2.3): the server samples every partition's
//! end offset periodically; a rate is the growth over the requested window.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use courier::Client;
use parking_lot::Mutex;

/// End offsets of every partition at one instant.
pub struct Sample {
    /// When it was taken.
    pub at: Instant,
    /// Topic → end offset per partition.
    pub ends: BTreeMap<String, Vec<u64>>,
}

/// The last hour of samples.
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
    keep: Duration,
}

/// How often the sampler runs.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

impl Default for History {
    fn default() -> Self {
        Self {
            samples: Mutex::new(VecDeque::new()),
            keep: MAX_WINDOW + SAMPLE_EVERY,
        }
    }
}

/// Longest `timeRange` answered.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);

impl History {
    /// Takes one sample of all topics (and refreshes the lag gauges).
    pub async fn sample(&self, client: &Client) -> courier::Result<()> {
        let admin = client.admin();
        let mut ends = BTreeMap::new();
        for name in admin.list_topics().await? {
            match admin.describe_topic(&name).await {
                Ok(info) => {
                    metrics::gauge!("courier_topic_messages", "topic" => name.clone())
                        .set(info.message_count() as f64);
                    ends.insert(name, info.partitions.iter().map(|p| p.end_offset).collect());
                }
                Err(courier::Error::TopicNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        for g in admin.list_groups().await? {
            if let Ok(info) = admin.describe_group(&g).await {
                let mut per_topic: BTreeMap<&str, u64> = BTreeMap::new();
                for o in &info.offsets {
                    *per_topic.entry(&o.topic).or_default() += o.lag;
                }
                for (t, lag) in per_topic {
                    metrics::gauge!("courier_group_lag", "group" => g.clone(), "topic" => t.to_string())
                        .set(lag as f64);
                }
            }
        }
        let now = Instant::now();
        let mut s = self.samples.lock();
        s.push_back(Sample { at: now, ends });
        while s
            .front()
            .is_some_and(|f| now.duration_since(f.at) > self.keep)
        {
            s.pop_front();
        }
        Ok(())
    }

    /// The oldest sample no older than `window`, as (age, end offsets of `topic`).
    pub fn baseline(&self, topic: &str, window: Duration) -> Option<(Duration, Vec<u64>)> {
        let now = Instant::now();
        let s = self.samples.lock();
        s.iter()
            .find(|x| now.duration_since(x.at) <= window)
            .and_then(|x| {
                x.ends
                    .get(topic)
                    .map(|e| (now.duration_since(x.at), e.clone()))
            })
    }
}
