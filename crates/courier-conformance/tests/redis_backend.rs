//! redis:// specifics beyond the conformance suite: retention from topic config, group
//! lag and pending counts, offset resets, the stream layout.

use std::time::Duration;

use courier::{Client, Config, Delivery, Error, Message, ResetTo, TopicSpec};
use courier_conformance::unique;
use tokio::sync::mpsc;

async fn client() -> Client {
    let mut c: Config = courier_conformance::harness::fast_config();
    c.url = Some(
        std::env::var("COURIER_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    );
    Client::connect_with(c).await.expect("connect")
}

#[tokio::test]
async fn retention_by_count_and_by_age() {
    let client = client().await;
    let admin = client.admin();
    let by_count = unique("ret-n");
    let mut spec = TopicSpec::new(&by_count, 1);
    spec.config
        .insert("retention.messages".to_string(), "100".to_string());
    admin.create_topic(spec).await.expect("create");
    let msgs = (0..2000)
        .map(|i| Message::new(&by_count, format!("{i}")))
        .collect();
    client.producer().send_batch(msgs).await.expect("batch");
    let info = admin.describe_topic(&by_count).await.expect("describe");
    let kept = info.message_count();
    assert!((100..2000).contains(&kept), "MAXLEN ~ 100 kept {kept}");
    assert_eq!(info.partitions[0].end_offset, 2000, "offsets stay dense");
    assert_eq!(info.partitions[0].start_offset, 2000 - kept);

    let by_age = unique("ret-ms");
    let mut spec = TopicSpec::new(&by_age, 1);
    spec.retention_ms = Some(60_000);
    admin.create_topic(spec).await.expect("create");
    let now = courier::now_millis();
    let mut msgs: Vec<Message> = (0..10)
        .map(|i| Message::new(&by_age, format!("old{i}")).timestamp(now - 3_600_000 + i))
        .collect();
    msgs.extend((0..5).map(|i| Message::new(&by_age, format!("new{i}")).timestamp(now + i)));
    client.producer().send_batch(msgs).await.expect("batch");
    let info = admin.describe_topic(&by_age).await.expect("describe");
    assert_eq!(info.message_count(), 5, "{info:?}");
    assert_eq!(info.partitions[0].start_offset, 10);
    assert_eq!(info.partitions[0].end_offset, 15);
    for t in [&by_count, &by_age] {
        admin.delete_topic(t).await.expect("delete");
    }
    client
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_pending_and_reset() {
    let client = client().await;
    let admin = client.admin();
    let t = unique("lag");
    admin
        .create_topic(TopicSpec::new(&t, 2))
        .await
        .expect("create");
    let msgs = (0..20)
        .map(|i| Message::new(&t, format!("{i}")).key(format!("{i}")))
        .collect();
    client.producer().send_batch(msgs).await.expect("batch");
    let group = unique("g");
    // Handle 5 messages, then hold the next ones unsettled.
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let handled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = handled.clone();
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let c = client
        .consumer(&group)
        .from_earliest()
        .start([t.clone()], move |d: Delivery| {
            let (tx, h, mut release) = (tx.clone(), h.clone(), release_rx.clone());
            async move {
                if h.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 5 {
                    let _ = release.wait_for(|r| *r).await;
                }
                let _ = tx.send(d.value_str()?.to_string());
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("subscribe");
    for _ in 0..5 {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("handled")
            .expect("open");
    }
    // Acks go out with the next read (≤ 100 ms); wait for the group to show them.
    let mut g = admin.describe_group(&group).await.expect("describe");
    for _ in 0..50 {
        if g.total_lag() == 15 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        g = admin.describe_group(&group).await.expect("describe");
    }
    assert_eq!(g.total_lag(), 15, "{g:?}");
    let pending: u64 = g.offsets.iter().filter_map(|o| o.pending).sum();
    assert_eq!(
        pending, 15,
        "everything else was delivered and is unsettled: {g:?}"
    );
    assert_eq!(g.members.len(), 1);
    assert_eq!(g.members[0].assignment.len(), 2);
    assert!(matches!(
        admin.reset_offsets(&group, &t, ResetTo::Earliest).await,
        Err(Error::InvalidArgument(_))
    ));
    release_tx.send_replace(true);
    c.stop().await.expect("stop");
    // The stopped member left the group, so a reset is allowed now.
    admin
        .reset_offsets(&group, &t, ResetTo::Latest)
        .await
        .expect("reset to latest");
    let g = admin.describe_group(&group).await.expect("describe");
    assert_eq!(g.total_lag(), 0, "{g:?}");
    assert!(g.offsets.iter().all(|o| o.pending == Some(0)), "{g:?}");
    admin
        .reset_offsets(&group, &t, ResetTo::Offset(3))
        .await
        .expect("reset to 3");
    let g = admin.describe_group(&group).await.expect("describe");
    let p0 = g.offsets.iter().find(|o| o.partition == 0).expect("p0");
    assert_eq!(p0.committed, Some(3.min(p0.end_offset)));
    admin.delete_topic(&t).await.expect("delete");
    client
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}
