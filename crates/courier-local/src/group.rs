//! In-process consumer-group coordination: membership, partition assignment and the
//! hand-over of partitions between members.
//!
//! A partition is fetched by at most one member at a time: a member that loses a
//! partition finishes its in-flight deliveries, commits, and only then releases it; the
//! new owner waits for that release before it reads the committed position.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use courier_core::{MemberInfo, TopicPartition};
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

/// Member id within one group.
pub type MemberId = u64;

struct Member {
    topics: Vec<String>,
    assignment: watch::Sender<Vec<TopicPartition>>,
}

#[derive(Default)]
struct GroupInner {
    next_member: MemberId,
    members: BTreeMap<MemberId, Member>,
    owners: HashMap<TopicPartition, MemberId>,
}

/// One consumer group's live state.
pub struct Group {
    pub name: String,
    inner: Mutex<GroupInner>,
    /// Notified whenever a member releases a partition.
    pub released: Notify,
}

impl Group {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            inner: Mutex::new(GroupInner::default()),
            released: Notify::new(),
        }
    }

    /// Adds a member subscribed to `topics` and returns its id and assignment feed.
    /// The caller must call [`Group::rebalance`] afterwards.
    pub fn join(&self, topics: Vec<String>) -> (MemberId, watch::Receiver<Vec<TopicPartition>>) {
        let mut g = self.inner.lock();
        let id = g.next_member;
        g.next_member += 1;
        let (tx, rx) = watch::channel(Vec::new());
        g.members.insert(
            id,
            Member {
                topics,
                assignment: tx,
            },
        );
        (id, rx)
    }

    /// Removes a member and releases everything it owned.
    pub fn leave(&self, id: MemberId) {
        let mut g = self.inner.lock();
        g.members.remove(&id);
        g.owners.retain(|_, owner| *owner != id);
        drop(g);
        self.released.notify_waiters();
    }

    /// True when no member is live.
    pub fn is_empty(&self) -> bool {
        self.inner.lock().members.is_empty()
    }

    /// Recomputes every member's assignment: for each topic, its partitions are dealt
    /// round-robin over the members subscribed to it, in member-id order.
    /// `partitions_of` gives the current partition count of a topic.
    pub fn rebalance(&self, partitions_of: impl Fn(&str) -> u32) {
        let g = self.inner.lock();
        let mut topics: BTreeMap<&str, Vec<MemberId>> = BTreeMap::new();
        for (id, m) in &g.members {
            for t in &m.topics {
                topics.entry(t.as_str()).or_default().push(*id);
            }
        }
        let mut plan: BTreeMap<MemberId, Vec<TopicPartition>> =
            g.members.keys().map(|id| (*id, Vec::new())).collect();
        for (topic, members) in topics {
            for p in 0..partitions_of(topic) {
                let owner = members[p as usize % members.len()];
                if let Some(list) = plan.get_mut(&owner) {
                    list.push(TopicPartition::new(topic, p));
                }
            }
        }
        for (id, m) in &g.members {
            let new = plan.remove(id).unwrap_or_default();
            m.assignment.send_if_modified(|cur| {
                if *cur == new {
                    false
                } else {
                    *cur = new;
                    true
                }
            });
        }
    }

    /// Takes ownership of `tp` for `id` unless another member still holds it.
    pub fn try_acquire(&self, id: MemberId, tp: &TopicPartition) -> bool {
        let mut g = self.inner.lock();
        match g.owners.get(tp) {
            Some(owner) if *owner != id => false,
            _ => {
                g.owners.insert(tp.clone(), id);
                true
            }
        }
    }

    /// Gives up `tp` if `id` holds it.
    pub fn release(&self, id: MemberId, tp: &TopicPartition) {
        let mut g = self.inner.lock();
        if g.owners.get(tp) == Some(&id) {
            g.owners.remove(tp);
        }
        drop(g);
        self.released.notify_waiters();
    }

    /// Live members and their current assignments.
    pub fn members(&self) -> Vec<MemberInfo> {
        let g = self.inner.lock();
        g.members
            .iter()
            .map(|(id, m)| MemberInfo {
                member_id: format!("{}-{id}", self.name),
                assignment: m.assignment.borrow().clone(),
            })
            .collect()
    }
}

/// In-process group coordination state. It lives with the store, so every driver
/// (every client) over the same store shares one view of each group.
#[derive(Default)]
pub struct Coordinator {
    groups: Mutex<HashMap<String, Arc<Group>>>,
}

impl Coordinator {
    /// The live state of `name`, created on first use.
    pub(crate) fn get_or_create(&self, name: &str) -> Arc<Group> {
        self.groups
            .lock()
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(Group::new(name)))
            .clone()
    }

    /// The live state of `name`, if any member ever joined.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<Group>> {
        self.groups.lock().get(name).cloned()
    }

    /// Every group with live state.
    pub(crate) fn all(&self) -> Vec<Arc<Group>> {
        self.groups.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_dealt_evenly_and_handed_over() {
        let g = Group::new("g");
        let (a, ra) = g.join(vec!["t".into()]);
        g.rebalance(|_| 4);
        assert_eq!(ra.borrow().len(), 4);
        let (b, rb) = g.join(vec!["t".into()]);
        g.rebalance(|_| 4);
        assert_eq!(ra.borrow().len(), 2);
        assert_eq!(rb.borrow().len(), 2);
        let tp = rb.borrow()[0].clone();
        assert!(g.try_acquire(a, &tp));
        assert!(!g.try_acquire(b, &tp), "held by the previous owner");
        g.release(a, &tp);
        assert!(g.try_acquire(b, &tp));
        g.leave(b);
        g.rebalance(|_| 4);
        assert_eq!(ra.borrow().len(), 4);
        assert!(g.try_acquire(a, &tp));
    }
}
