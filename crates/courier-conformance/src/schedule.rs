//! Delayed and transactional messages (SPEC P3, P4): the same behaviour on every
//! backend. Each test uses its own scheduler scope, so tests sharing a server never
//! see each other's pending messages.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier::{
    now_millis, Client, Error, HalfMessage, Message, OffsetReset, ScheduleOptions, TxnDecision,
    HEADER_DELAY_UNTIL,
};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::harness::{unique, Harness};
use crate::suite::{boxed, collect, expect_silence, ready, recv_n, shutdown, topic};

fn options(scope: &str) -> ScheduleOptions {
    ScheduleOptions {
        scope: scope.to_string(),
        partitions: 2,
        check_after: Duration::from_millis(400),
        check_interval: Duration::from_millis(200),
        max_checks: 3,
        ..ScheduleOptions::default()
    }
}

/// A client whose scheduler member for `opts.scope` owns the whole schedule log.
async fn scheduled(h: &dyn Harness, opts: ScheduleOptions) -> Client {
    let client = h.client().await.expect("connect");
    client.set_schedule_options(opts).expect("schedule options");
    client
        .scheduler_ready(h.patience())
        .await
        .unwrap_or_else(|e| panic!("{}: scheduler never ready: {e}", h.name()));
    client
}

/// A delayed message is not delivered before its due time, then promptly after, with
/// its id and the `x-delay-until` header; an undelayed message overtakes it.
pub fn delayed_not_visible_early_then_on_time(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = scheduled(h, options(&unique("sched"))).await;
        let t = topic(&client, "delay", 1).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &unique("g"), &[&t], OffsetReset::Earliest, 0, tx).await;
        ready(h, &c, 1).await;
        let p = client.producer();
        let due = now_millis() + 1000;
        let r = p
            .send(Message::new(&t, "later").deliver_at(due))
            .await
            .expect("delayed send");
        p.send(Message::new(&t, "now")).await.expect("send");
        let first = recv_n(h, &mut rx, 1).await;
        assert_eq!(first[0].text(), "now");
        let second = recv_n(h, &mut rx, 1).await;
        let at = now_millis();
        assert_eq!(second[0].text(), "later");
        assert!(at >= due, "{}: delivered {} ms early", h.name(), due - at);
        assert!(
            at - due < 3000,
            "{}: delivered {} ms after due",
            h.name(),
            at - due
        );
        assert_eq!(second[0].id, r.id, "the delayed message keeps its id");
        assert_eq!(
            second[0].headers.get_str(HEADER_DELAY_UNTIL),
            Some(due.to_string().as_str())
        );
        expect_silence(&mut rx, Duration::from_millis(500)).await;
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// Delayed messages arrive in the order of their due times, not their send order; a
/// due time in the past sends at once.
pub fn delayed_order_follows_due_times(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = scheduled(h, options(&unique("sched"))).await;
        let t = topic(&client, "delay-order", 1).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &unique("g"), &[&t], OffsetReset::Earliest, 0, tx).await;
        ready(h, &c, 1).await;
        let p = client.producer();
        let now = now_millis();
        let sent = p
            .send_batch(vec![
                Message::new(&t, "c").deliver_at(now + 1500),
                Message::new(&t, "a").deliver_at(now + 500),
                Message::new(&t, "b").deliver_at(now + 1000),
                Message::new(&t, "past").deliver_at(now - 1000),
            ])
            .await
            .expect("batch");
        assert_eq!(sent.len(), 4);
        let got: Vec<String> = recv_n(h, &mut rx, 4)
            .await
            .iter()
            .map(|g| g.text())
            .collect();
        assert_eq!(got, ["past", "a", "b", "c"]);
        expect_silence(&mut rx, Duration::from_millis(500)).await;
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// Delayed messages pending at shutdown are delivered by the next process, each once.
pub fn delayed_survive_restart(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let scope = unique("sched");
        let client = scheduled(h, options(&scope)).await;
        let t = topic(&client, "delay-restart", 2).await;
        let due = now_millis() + 1500;
        let msgs = (0..20)
            .map(|i| {
                Message::new(&t, format!("{i}"))
                    .key(format!("{i}"))
                    .deliver_at(due)
            })
            .collect();
        let receipts = client.producer().send_batch(msgs).await.expect("batch");
        let want: HashSet<String> = receipts.into_iter().map(|r| r.id).collect();
        shutdown(client).await;

        let client = scheduled(h, options(&scope)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &unique("g"), &[&t], OffsetReset::Earliest, 0, tx).await;
        let got = recv_n(h, &mut rx, 20).await;
        assert!(now_millis() >= due, "delivered before due");
        let ids: HashSet<String> = got.iter().map(|g| g.id.clone()).collect();
        assert_eq!(ids, want, "every pending message, each once");
        expect_silence(&mut rx, Duration::from_millis(500)).await;
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// prepare → invisible; commit → delivered once, with the half's id.
pub fn txn_commit_visible_once(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let mut opts = options(&unique("sched"));
        opts.check_after = Duration::from_secs(120);
        let client = scheduled(h, opts).await;
        let t = topic(&client, "txn-commit", 1).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &unique("g"), &[&t], OffsetReset::Earliest, 0, tx).await;
        ready(h, &c, 1).await;
        let half = client
            .producer()
            .prepare(Message::new(&t, "order-1").key("k"))
            .await
            .expect("prepare");
        let id = half.id().to_string();
        expect_silence(&mut rx, Duration::from_millis(500)).await;
        half.commit().await.expect("commit");
        let got = recv_n(h, &mut rx, 1).await;
        assert_eq!(
            (got[0].id.as_str(), got[0].text()),
            (id.as_str(), "order-1".into())
        );
        assert_eq!(got[0].key.as_deref(), Some(&b"k"[..]));
        // Deciding again is refused (this member owns the half and knows it is
        // decided) and changes nothing.
        let again = client.transactions().commit(&id).await;
        assert!(
            matches!(again, Err(Error::TxnNotFound(ref x)) if *x == id),
            "{}: second commit: {again:?}",
            h.name()
        );
        let unknown = client.transactions().rollback("no-such-half").await;
        assert!(
            matches!(unknown, Err(Error::TxnNotFound(_))),
            "{}: rollback of an unknown id: {unknown:?}",
            h.name()
        );
        expect_silence(&mut rx, Duration::from_millis(800)).await;
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// A rolled-back half is never delivered, even when a check-back would commit it.
pub fn txn_rollback_never_visible(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        // The decision must reach the member before the check time (Kafka fetches
        // can take a few hundred ms), so give it 2 s.
        let mut opts = options(&unique("sched"));
        opts.check_after = Duration::from_secs(2);
        let client = scheduled(h, opts).await;
        client
            .transactions()
            .set_checker(|_: &HalfMessage| TxnDecision::Commit);
        let t = topic(&client, "txn-rollback", 1).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &unique("g"), &[&t], OffsetReset::Earliest, 0, tx).await;
        ready(h, &c, 1).await;
        let p = client.producer();
        let a = p.prepare(Message::new(&t, "a")).await.expect("prepare a");
        let b = p.prepare(Message::new(&t, "b")).await.expect("prepare b");
        client
            .transactions()
            .rollback(a.id())
            .await
            .expect("rollback by id");
        b.commit().await.expect("commit b");
        let got = recv_n(h, &mut rx, 1).await;
        assert_eq!(got[0].text(), "b");
        // Past a's check time: a check-back would have committed it.
        expect_silence(&mut rx, Duration::from_millis(2500)).await;
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// A half whose producer died undecided is checked back by the next process, whose
/// checker commits it.
pub fn txn_crash_check_back_commits(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let scope = unique("sched");
        let client = scheduled(h, options(&scope)).await;
        let t = topic(&client, "txn-check", 1).await;
        let half = client
            .producer()
            .prepare(Message::new(&t, "paid"))
            .await
            .expect("prepare");
        let id = half.id().to_string();
        // The producer goes away without deciding. Its client is shut down rather than
        // dropped: a dropped client's scheduler member keeps running in this process,
        // and with no checker registered it answers Unknown until the half is rolled
        // back — before the next member has even joined (seen on kafka, where joins
        // take seconds). A crashed process runs nothing; a shut-down client neither.
        drop(half);
        shutdown(client).await;

        let client = h.client().await.expect("connect");
        client
            .set_schedule_options(options(&scope))
            .expect("options");
        let checks = Arc::new(AtomicUsize::new(0));
        let (want, seen) = (id.clone(), checks.clone());
        client.transactions().set_checker(move |m: &HalfMessage| {
            seen.fetch_add(1, Ordering::SeqCst);
            if m.id == want {
                TxnDecision::Commit
            } else {
                TxnDecision::Unknown
            }
        });
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &unique("g"), &[&t], OffsetReset::Earliest, 0, tx).await;
        client.start_scheduler().await.expect("start scheduler");
        let got = recv_n(h, &mut rx, 1).await;
        assert_eq!(
            (got[0].id.as_str(), got[0].text()),
            (id.as_str(), "paid".into())
        );
        assert!(checks.load(Ordering::SeqCst) >= 1);
        expect_silence(&mut rx, Duration::from_millis(500)).await;
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}

/// A half answered Unknown is asked again up to the limit, then rolled back.
pub fn txn_unknown_until_limit_rolls_back(h: &dyn Harness) -> BoxFuture<'_, ()> {
    boxed(async move {
        let client = scheduled(h, options(&unique("sched"))).await;
        let checks = Arc::new(AtomicUsize::new(0));
        let seen = checks.clone();
        client.transactions().set_checker(move |_: &HalfMessage| {
            seen.fetch_add(1, Ordering::SeqCst);
            TxnDecision::Unknown
        });
        let t = topic(&client, "txn-unknown", 1).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = collect(&client, &unique("g"), &[&t], OffsetReset::Earliest, 0, tx).await;
        let half = client
            .producer()
            .prepare(Message::new(&t, "never"))
            .await
            .expect("prepare");
        let deadline = tokio::time::Instant::now() + h.patience();
        while checks.load(Ordering::SeqCst) < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: only {} check-backs",
                h.name(),
                checks.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Rolled back after the third: a late commit finds nothing to deliver (it
        // may still be accepted when it races the last check-back).
        let late = half.commit().await;
        assert!(
            matches!(late, Ok(()) | Err(Error::TxnNotFound(_))),
            "{}: late commit: {late:?}",
            h.name()
        );
        expect_silence(&mut rx, Duration::from_millis(1000)).await;
        assert_eq!(
            checks.load(Ordering::SeqCst),
            3,
            "asked again after the limit"
        );
        c.stop().await.expect("stop");
        shutdown(client).await;
    })
}
