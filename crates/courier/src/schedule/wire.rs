//! How delayed messages, halves and transaction decisions are stored in the schedule
//! log: the original record plus a few `x-courier-*` headers, so every backend can
//! store them with its ordinary publish.

use bytes::Bytes;
use courier_core::{partition_for_key, Headers, Record};

/// Not visible before this time (ms since the epoch, decimal); kept on the delivered
/// message so consumers can see when it was due (DESIGN §6).
pub const HEADER_DELAY_UNTIL: &str = "x-delay-until";
/// What a schedule-log record is: `delay`, `half` or `op`.
pub(crate) const HEADER_KIND: &str = "x-courier-kind";
/// Destination topic of a delayed message or half.
pub(crate) const HEADER_TARGET: &str = "x-courier-target";
/// Destination partition, when the sender chose one.
pub(crate) const HEADER_TARGET_PARTITION: &str = "x-courier-target-partition";
/// When a half is first checked back (ms since the epoch).
pub(crate) const HEADER_CHECK_AT: &str = "x-courier-check-at";
/// The half an `op` record decides.
pub(crate) const HEADER_TXN_ID: &str = "x-courier-txn-id";
/// `commit` or `rollback`.
pub(crate) const HEADER_TXN_OP: &str = "x-courier-txn-op";

/// A decoded schedule-log record.
#[derive(Debug, PartialEq)]
pub(crate) enum Kind {
    /// Move to the target at `due`.
    Delay { due: i64 },
    /// Wait for a decision; ask the checker at `check_at`.
    Half { check_at: i64 },
    /// Decide the half `id`.
    Op { id: String, commit: bool },
    /// Offsets of this partition moved to their targets (listed in the value).
    Moved,
    /// Offsets of this partition about to be published to their targets (see
    /// [`Intent`]); a `Moved` marker for them follows unless the member crashed.
    Intent,
    /// Not ours (written by a newer version or by hand): acknowledged and skipped.
    Unknown,
}

/// The schedule-log partition for message `id`: halves and their decisions share it,
/// so one scheduler member sees both, in order.
pub(crate) fn partition_for(id: &str, partitions: u32) -> u32 {
    partition_for_key(id.as_bytes(), partitions.max(1))
}

fn wrap(mut r: Record, log: &str, partitions: u32, kind: &str) -> Record {
    r.headers.insert(HEADER_KIND, kind.to_string());
    r.headers.insert(HEADER_TARGET, r.topic.clone());
    if let Some(p) = r.partition {
        r.headers.insert(HEADER_TARGET_PARTITION, p.to_string());
    }
    r.partition = Some(partition_for(&r.id, partitions));
    r.topic = log.to_string();
    r
}

/// `r` (addressed to its target) as a delayed record of the schedule log `log`.
pub(crate) fn delay(mut r: Record, due: i64, log: &str, partitions: u32) -> Record {
    r.headers.insert(HEADER_DELAY_UNTIL, due.to_string());
    wrap(r, log, partitions, "delay")
}

/// `r` as a half of the schedule log `log`, checked back at `check_at`.
pub(crate) fn half(mut r: Record, check_at: i64, log: &str, partitions: u32) -> Record {
    r.headers.insert(HEADER_CHECK_AT, check_at.to_string());
    wrap(r, log, partitions, "half")
}

/// The decision `commit` (or rollback) for half `id`.
pub(crate) fn op(id: &str, commit: bool, log: &str, partitions: u32) -> Record {
    let mut headers = Headers::new();
    headers.insert(HEADER_KIND, "op");
    headers.insert(HEADER_TXN_ID, id.to_string());
    headers.insert(HEADER_TXN_OP, if commit { "commit" } else { "rollback" });
    Record {
        topic: log.to_string(),
        partition: Some(partition_for(id, partitions)),
        id: ulid::Ulid::new().to_string(),
        key: None,
        value: Bytes::new(),
        headers,
        timestamp: courier_core::now_millis(),
    }
}

/// The marker that `offsets` of schedule-log partition `partition` were moved: read
/// back after a crash, it stops them being moved twice.
pub(crate) fn moved(partition: u32, offsets: &[u64], log: &str) -> Record {
    let mut headers = Headers::new();
    headers.insert(HEADER_KIND, "moved");
    let value: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
    Record {
        topic: log.to_string(),
        partition: Some(partition),
        id: ulid::Ulid::new().to_string(),
        key: None,
        value: Bytes::from(value),
        headers,
        timestamp: courier_core::now_millis(),
    }
}

/// Written before a due batch is published: which schedule-log offsets go where
/// (message id, target partition) and how far each target partition reached just
/// before, so a member recovering from a crash between the publish and the `moved`
/// marker can look in the targets for what already arrived instead of publishing it
/// again.
#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Intent {
    /// Target partitions: topic, partition, end offset observed before the publish.
    pub(crate) targets: Vec<(String, u32, u64)>,
    /// Schedule-log offset, index into `targets`, message id.
    pub(crate) entries: Vec<(u64, u32, String)>,
}

/// `intent` as a record of schedule-log partition `partition`.
pub(crate) fn intent(partition: u32, intent: &Intent, log: &str) -> Record {
    let mut headers = Headers::new();
    headers.insert(HEADER_KIND, "intent");
    Record {
        topic: log.to_string(),
        partition: Some(partition),
        id: ulid::Ulid::new().to_string(),
        key: None,
        value: Bytes::from(serde_json::to_vec(intent).unwrap_or_default()),
        headers,
        timestamp: courier_core::now_millis(),
    }
}

/// The intent an `intent` record carries (`None` when unreadable).
pub(crate) fn parse_intent(value: &[u8]) -> Option<Intent> {
    serde_json::from_slice(value).ok()
}

/// The offsets a `moved` marker lists.
pub(crate) fn moved_offsets(value: &[u8]) -> Vec<u64> {
    value
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

fn num(h: &Headers, name: &str) -> Option<i64> {
    h.get_str(name)?.parse().ok()
}

/// What a schedule-log record asks for.
pub(crate) fn kind(h: &Headers) -> Kind {
    match h.get_str(HEADER_KIND) {
        Some("delay") => {
            num(h, HEADER_DELAY_UNTIL).map_or(Kind::Unknown, |due| Kind::Delay { due })
        }
        Some("half") => {
            num(h, HEADER_CHECK_AT).map_or(Kind::Unknown, |check_at| Kind::Half { check_at })
        }
        Some("moved") => Kind::Moved,
        Some("intent") => Kind::Intent,
        Some("op") => match (h.get_str(HEADER_TXN_ID), h.get_str(HEADER_TXN_OP)) {
            (Some(id), Some(op @ ("commit" | "rollback"))) => Kind::Op {
                id: id.to_string(),
                commit: op == "commit",
            },
            _ => Kind::Unknown,
        },
        _ => Kind::Unknown,
    }
}

/// The record as it goes to its target: same id, key, value, timestamp; Courier's
/// bookkeeping headers removed. `None` when the target header is missing.
pub(crate) fn unwrap(mut r: Record) -> Option<Record> {
    let target = r.headers.remove(HEADER_TARGET)?;
    r.topic = String::from_utf8_lossy(&target).into_owned();
    r.partition = r
        .headers
        .remove(HEADER_TARGET_PARTITION)
        .and_then(|p| std::str::from_utf8(&p).ok()?.parse().ok());
    r.headers.remove(HEADER_KIND);
    r.headers.remove(HEADER_CHECK_AT);
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_core::Message;

    #[test]
    fn delay_round_trips_to_the_original_record() {
        let orig = Record::from_message(
            Message::new("t", "v")
                .key("k")
                .header("a", "1")
                .partition(2),
        );
        let w = delay(orig.clone(), 77, "__courier.schedule.x", 4);
        assert_eq!(w.topic, "__courier.schedule.x");
        assert_eq!(w.partition, Some(partition_for(&orig.id, 4)));
        assert_eq!(kind(&w.headers), Kind::Delay { due: 77 });
        let back = unwrap(w).expect("target");
        assert_eq!(
            (back.topic.as_str(), back.partition, &back.id),
            ("t", Some(2), &orig.id)
        );
        assert_eq!(back.headers.get_str("a"), Some("1"));
        assert_eq!(back.headers.get_str(HEADER_DELAY_UNTIL), Some("77"));
        assert_eq!(back.headers.len(), 2);
    }

    #[test]
    fn ops_land_with_their_half() {
        let h = half(Record::from_message(Message::new("t", "v")), 5, "l", 8);
        let id = h.id.clone();
        let o = op(&id, true, "l", 8);
        assert_eq!(o.partition, h.partition);
        assert_eq!(kind(&o.headers), Kind::Op { id, commit: true });
        assert_eq!(kind(&h.headers), Kind::Half { check_at: 5 });
        assert_eq!(kind(&Headers::new()), Kind::Unknown);
        let m = moved(3, &[7, 1 << 40], "l");
        assert_eq!((kind(&m.headers), m.partition), (Kind::Moved, Some(3)));
        assert_eq!(moved_offsets(&m.value), vec![7, 1 << 40]);
        let want = Intent {
            targets: vec![("t".into(), 1, 40)],
            entries: vec![(7, 0, "id".into())],
        };
        let i = intent(3, &want, "l");
        assert_eq!((kind(&i.headers), i.partition), (Kind::Intent, Some(3)));
        assert_eq!(parse_intent(&i.value), Some(want));
    }
}
