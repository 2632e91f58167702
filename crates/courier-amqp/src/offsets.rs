//! Committed offsets: one durable classic queue per group and partition holding at
//! most one message (`x-max-length: 1`, oldest dropped), the last committed offset.
//! Only the member holding the partition's lease writes it; readers peek (get, then
//! requeue).

use courier_core::{Error, Result, TopicPartition};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, BasicRejectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

use crate::conn::err;
use crate::{names, BACKEND};

fn args() -> FieldTable {
    let mut a = FieldTable::default();
    a.insert("x-max-length".into(), AMQPValue::LongInt(1));
    a
}

/// Declares the offset queue of `group` on `tp`.
pub async fn declare(ch: &Channel, group: &str, tp: &TopicPartition) -> Result<()> {
    ch.queue_declare(
        names::offset(group, tp).as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args(),
    )
    .await
    .map_err(err)?;
    Ok(())
}

/// The committed offset of `group` on `tp`, if any (declares the queue).
pub async fn read(ch: &Channel, group: &str, tp: &TopicPartition) -> Result<Option<u64>> {
    declare(ch, group, tp).await?;
    let got = ch
        .basic_get(
            names::offset(group, tp).as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .map_err(err)?;
    let Some(m) = got else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&m.delivery.data).into_owned();
    m.delivery
        .acker
        .reject(BasicRejectOptions { requeue: true })
        .await
        .map_err(err)?;
    text.trim()
        .parse()
        .map(Some)
        .map_err(|_| Error::backend(BACKEND, format!("bad committed offset {text:?} for {tp}")))
}

/// Stores `offset` as the committed offset of `group` on `tp`; `ch` must be in
/// confirm mode.
pub async fn write(ch: &Channel, group: &str, tp: &TopicPartition, offset: u64) -> Result<()> {
    let c = ch
        .basic_publish(
            "".into(),
            names::offset(group, tp).as_str().into(),
            BasicPublishOptions::default(),
            offset.to_string().as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .map_err(err)?
        .await
        .map_err(err)?;
    if c.is_nack() {
        return Err(Error::backend(
            BACKEND,
            format!("commit of {tp} was not confirmed"),
        ));
    }
    Ok(())
}
