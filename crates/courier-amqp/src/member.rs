//! Group membership and partition leases.
//!
//! Members announce themselves on the group's fanout exchange (heartbeats every
//! session timeout / 4, an immediate reply to a newcomer, a goodbye on close); each
//! keeps the set of members heard within the session timeout. The partitions of the
//! subscribed topics, sorted, are dealt round-robin over the sorted member ids, so
//! every member computes the same split. Ownership itself is a lease: an exclusive
//! queue per group and partition, which RabbitMQ grants to one connection only and
//! deletes when that connection ends — two members never read one partition at once,
//! even while their views of the group differ, and a crashed member's partitions are
//! free as soon as RabbitMQ notices the dead connection (at once for a closed socket,
//! after the heartbeat timeout for a silent peer).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier_core::{Delivery, Error, OffsetReset, Result, TopicPartition};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ExchangeKind;
use crate::conn::{self, declare_exchange, err, is_reply, StreamStart};
use crate::part::{self, Part};
use crate::{names, offsets, BACKEND};

const TICK: Duration = Duration::from_millis(200);
/// Wait after joining before taking partitions, so the member first hears the group.
const JOIN_GRACE: Duration = Duration::from_millis(400);
/// Longest wait for a partition's stream consumer to attach.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// A membership announcement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Beat {
    /// Member id.
    pub member: String,
    /// `alive`, `leave` or `probe` (an admin asking who is there).
    pub state: String,
    /// Partitions the member owns.
    #[serde(default)]
    pub assignment: Vec<TopicPartition>,
}

/// What a member needs to know.
pub struct MemberConfig {
    /// AMQP URI.
    pub uri: String,
    /// Group id.
    pub group: String,
    /// Topics with their partition counts.
    pub topics: Vec<(String, u32)>,
    /// Start of a partition without a committed offset.
    pub reset: OffsetReset,
    /// Liveness timeout.
    pub session_timeout: Duration,
    /// Commit interval.
    pub commit_interval: Duration,
    /// Stream consumer prefetch.
    pub prefetch: u16,
    /// Prefix of the connection's name.
    pub connection_name: String,
}

/// A member's state shared with its subscription.
pub struct Member {
    /// Settings.
    pub cfg: MemberConfig,
    /// This member's id.
    pub id: String,
    tx: mpsc::Sender<Delivery>,
    parts: Mutex<BTreeMap<TopicPartition, Arc<Part>>>,
    /// Owned partitions, bumped on every change.
    pub assigned: watch::Sender<Vec<TopicPartition>>,
    /// True while connected.
    pub connected: AtomicBool,
}

impl Member {
    /// A member that will hand deliveries to `tx`.
    pub fn new(cfg: MemberConfig, tx: mpsc::Sender<Delivery>) -> Arc<Self> {
        Arc::new(Self {
            id: format!(
                "{}-{}",
                cfg.group,
                ulid::Ulid::new().to_string().to_lowercase()
            ),
            cfg,
            tx,
            parts: Mutex::new(BTreeMap::new()),
            assigned: watch::channel(Vec::new()).0,
            connected: AtomicBool::new(false),
        })
    }

    fn all_partitions(&self) -> Vec<TopicPartition> {
        let mut v: Vec<TopicPartition> = self
            .cfg
            .topics
            .iter()
            .flat_map(|(t, n)| (0..*n).map(move |p| TopicPartition::new(t.clone(), p)))
            .collect();
        v.sort();
        v
    }

    fn publish_assignment(&self) {
        let now: Vec<TopicPartition> = self.parts.lock().keys().cloned().collect();
        self.assigned.send_if_modified(|cur| {
            if *cur == now {
                false
            } else {
                *cur = now;
                true
            }
        });
    }

    /// Every owned partition is lost at once (connection gone): nothing delivered can
    /// be committed any more.
    fn lose_all(&self) {
        let parts = std::mem::take(&mut *self.parts.lock());
        for p in parts.values() {
            p.stop();
        }
        self.publish_assignment();
    }
}

/// Runs the member until `stop`, reconnecting after connection losses.
pub async fn run(member: Arc<Member>, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        match session(&member, &stop).await {
            Ok(()) => break,
            Err(e) => {
                member.connected.store(false, Ordering::Release);
                member.lose_all();
                failures = failures.saturating_add(1);
                let wait = Duration::from_millis(250 * u64::from(failures.min(20)));
                tracing::warn!(group = %member.cfg.group, error = %e, ?wait, "group member lost its connection; rejoining");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    member.connected.store(false, Ordering::Release);
}

struct Session {
    conn: Arc<Connection>,
    ctl: Channel,
    lock: Option<Channel>,
    members: HashMap<String, Instant>,
}

async fn session(member: &Arc<Member>, stop: &CancellationToken) -> Result<()> {
    let name = format!("{} member {}", member.cfg.connection_name, member.id);
    let conn = Arc::new(conn::open(&member.cfg.uri, &name).await?);
    let ctl = conn.create_channel().await.map_err(err)?;
    ctl.confirm_select(Default::default()).await.map_err(err)?;
    let exchange = names::members(&member.cfg.group);
    declare_exchange(&ctl, &exchange, ExchangeKind::Fanout).await?;
    let q = ctl
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(err)?;
    ctl.queue_bind(
        q.name().clone(),
        exchange.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(err)?;
    let mut beats = ctl
        .basic_consume(
            q.name().clone(),
            "courier-beats".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(err)?;
    let mut s = Session {
        conn,
        ctl,
        lock: None,
        members: HashMap::new(),
    };
    s.members.insert(member.id.clone(), Instant::now());
    beat(member, &s.ctl, "alive").await?;
    member.connected.store(true, Ordering::Release);
    let beat_every = (member.cfg.session_timeout / 4).max(Duration::from_millis(100));
    let join_at = Instant::now() + JOIN_GRACE;
    let mut last_beat = Instant::now();
    let mut last_commit = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                leave(member, &mut s).await;
                return Ok(());
            }
            b = beats.next() => {
                let Some(b) = b else {
                    return Err(Error::connection(BACKEND, "membership consumer ended"));
                };
                let b = b.map_err(err)?;
                if let Ok(b) = serde_json::from_slice::<Beat>(&b.data) {
                    if b.member != member.id {
                        match b.state.as_str() {
                            "leave" => { s.members.remove(&b.member); }
                            "probe" => beat(member, &s.ctl, "alive").await?,
                            _ => {
                                if s.members.insert(b.member, Instant::now()).is_none() {
                                    beat(member, &s.ctl, "alive").await?;
                                }
                            }
                        }
                    }
                }
            }
            _ = tick.tick() => {}
        }
        if !s.conn.status().connected() {
            return Err(Error::connection(BACKEND, "connection lost"));
        }
        let now = Instant::now();
        if now.duration_since(last_beat) >= beat_every {
            beat(member, &s.ctl, "alive").await?;
            last_beat = now;
        }
        let timeout = member.cfg.session_timeout;
        s.members
            .retain(|id, seen| *id == member.id || now.duration_since(*seen) < timeout);
        if let Some(me) = s.members.get_mut(&member.id) {
            *me = now;
        }
        if now >= join_at {
            rebalance(member, &mut s).await?;
        }
        if now.duration_since(last_commit) >= member.cfg.commit_interval {
            commit_all(member, &s.ctl).await?;
            last_commit = now;
        }
    }
}

async fn beat(member: &Member, ch: &Channel, state: &str) -> Result<()> {
    let b = Beat {
        member: member.id.clone(),
        state: state.to_string(),
        assignment: member.parts.lock().keys().cloned().collect(),
    };
    ch.basic_publish(
        names::members(&member.cfg.group).as_str().into(),
        "".into(),
        BasicPublishOptions::default(),
        &serde_json::to_vec(&b)?,
        BasicProperties::default(),
    )
    .await
    .map_err(err)?;
    Ok(())
}

/// The partitions `me` should own among `members`.
pub fn target(all: &[TopicPartition], members: &[String], me: &str) -> Vec<TopicPartition> {
    let mut ids: Vec<&String> = members.iter().collect();
    ids.sort();
    let Some(i) = ids.iter().position(|m| *m == me) else {
        return Vec::new();
    };
    all.iter()
        .enumerate()
        .filter(|(k, _)| k % ids.len() == i)
        .map(|(_, tp)| tp.clone())
        .collect()
}

async fn rebalance(member: &Arc<Member>, s: &mut Session) -> Result<()> {
    let ids: Vec<String> = s.members.keys().cloned().collect();
    let want = target(&member.all_partitions(), &ids, &member.id);
    let owned: Vec<TopicPartition> = member.parts.lock().keys().cloned().collect();
    for tp in owned.iter().filter(|tp| !want.contains(tp)) {
        release(member, s, tp).await?;
    }
    for tp in want.iter().filter(|tp| !owned.contains(tp)) {
        if !acquire(member, s, tp).await? {
            continue;
        }
        let committed = offsets::read(&s.ctl, &member.cfg.group, tp).await?;
        let part = Part::new(tp.clone(), committed);
        let initial = match member.cfg.reset {
            OffsetReset::Earliest => StreamStart::First,
            OffsetReset::Latest => StreamStart::Next,
        };
        let (attached, on_attach) = oneshot::channel();
        tokio::spawn(part::run(
            part.clone(),
            s.conn.clone(),
            member.tx.clone(),
            member.cfg.prefetch,
            initial,
            Some(attached),
        ));
        // Owned = reading: a `latest` member must not report the partition before
        // its consumer is attached, or messages sent meanwhile would be skipped.
        let _ = tokio::time::timeout(ATTACH_TIMEOUT, on_attach).await;
        tracing::debug!(group = %member.cfg.group, partition = %tp, ?committed, "partition acquired");
        member.parts.lock().insert(tp.clone(), part);
    }
    member.publish_assignment();
    Ok(())
}

/// Takes the lease on `tp`; false when another member holds it.
async fn acquire(member: &Member, s: &mut Session, tp: &TopicPartition) -> Result<bool> {
    let ch = match &s.lock {
        Some(ch) if ch.status().connected() => ch.clone(),
        _ => {
            let ch = s.conn.create_channel().await.map_err(err)?;
            s.lock = Some(ch.clone());
            ch
        }
    };
    match ch
        .queue_declare(
            names::lock(&member.cfg.group, tp).as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if is_reply(&e, 405) => {
            s.lock = None;
            Ok(false)
        }
        Err(e) => Err(err(e)),
    }
}

/// Hands `tp` over: stop fetching, let in-flight handlers settle (bounded), commit,
/// then drop the lease.
async fn release(member: &Member, s: &mut Session, tp: &TopicPartition) -> Result<()> {
    let Some(part) = member.parts.lock().get(tp).cloned() else {
        return Ok(());
    };
    part.drain();
    let deadline = Instant::now() + (member.cfg.session_timeout / 2).max(Duration::from_secs(1));
    while !part.state.lock().pending.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    commit(member, &s.ctl, &part).await?;
    part.stop();
    member.parts.lock().remove(tp);
    member.publish_assignment();
    s.ctl
        .queue_delete(
            names::lock(&member.cfg.group, tp).as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .map_err(err)?;
    tracing::debug!(group = %member.cfg.group, partition = %tp, "partition released");
    Ok(())
}

async fn commit(member: &Member, ch: &Channel, part: &Part) -> Result<()> {
    let point = {
        let s = part.state.lock();
        if s.stopped {
            return Ok(());
        }
        match s.commit_point() {
            Some(p) if Some(p) != s.committed => p,
            _ => return Ok(()),
        }
    };
    offsets::write(ch, &member.cfg.group, &part.tp, point).await?;
    part.state.lock().committed = Some(point);
    Ok(())
}

async fn commit_all(member: &Member, ch: &Channel) -> Result<()> {
    let parts: Vec<Arc<Part>> = member.parts.lock().values().cloned().collect();
    for p in parts {
        commit(member, ch, &p).await?;
    }
    Ok(())
}

/// Leaves cleanly: every partition is drained and committed, then the goodbye.
async fn leave(member: &Arc<Member>, s: &mut Session) {
    let owned: Vec<TopicPartition> = member.parts.lock().keys().cloned().collect();
    for tp in &owned {
        if let Err(e) = release(member, s, tp).await {
            tracing::warn!(partition = %tp, error = %e, "commit on leave failed");
        }
    }
    let _ = beat(member, &s.ctl, "leave").await;
    member.lose_all();
    let _ = s.conn.close(200, "courier member leaving".into()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_split_partitions_evenly_and_identically() {
        let all: Vec<TopicPartition> = (0..5).map(|p| TopicPartition::new("t", p)).collect();
        let ids = vec!["b".to_string(), "a".to_string()];
        let a = target(&all, &ids, "a");
        let b = target(&all, &ids, "b");
        assert_eq!(
            a.iter().map(|t| t.partition).collect::<Vec<_>>(),
            vec![0, 2, 4]
        );
        assert_eq!(
            b.iter().map(|t| t.partition).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert!(target(&all, &ids, "c").is_empty());
        assert_eq!(target(&all, &["a".to_string()], "a").len(), 5);
    }
}
