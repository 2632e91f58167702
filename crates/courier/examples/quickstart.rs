//! Quickstart: produce a few messages and consume them in a group.
//!
//! Run with `cargo run -p courier --example quickstart` (uses `COURIER_URL`, default
//! `memory://quickstart` here so the example leaves nothing behind).

use std::time::Duration;

use courier::{Client, Delivery, Message};
use tokio::sync::mpsc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("COURIER_URL").unwrap_or_else(|_| "memory://quickstart".into());
    let client = Client::connect(&url).await?;
    println!("connected to {} backend", client.backend());

    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = client
        .consumer("quickstart.printer.group")
        .from_earliest()
        .start(["user.events"], move |msg: Delivery| {
            let tx = tx.clone();
            async move {
                let text = msg.value_str()?.to_string();
                println!(
                    "handled {} (partition {}, offset {})",
                    text, msg.partition, msg.offset
                );
                let _ = tx.send(text);
                Ok::<(), courier::Error>(()) // Ok → committed
            }
        })
        .await?;

    let producer = client.producer();
    for i in 0..5 {
        let receipt = producer
            .send(Message::new("user.events", format!("signup #{i}")).key(format!("user-{i}")))
            .await?;
        println!(
            "sent to {}/{} at offset {}",
            receipt.topic, receipt.partition, receipt.offset
        );
    }
    for _ in 0..5 {
        tokio::time::timeout(Duration::from_secs(10), rx.recv()).await?;
    }
    consumer.stop().await?;
    client.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}
