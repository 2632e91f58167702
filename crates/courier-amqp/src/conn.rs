//! Connections: one shared connection per driver (publishing, admin), re-opened on
//! demand after a loss, and helpers for the declarations Courier makes.

use std::sync::Arc;
use std::time::Duration;

use courier_core::{Error, Result};
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::config::ExchangeKind;
use crate::BACKEND;

/// A lapin error as a Courier error: connection-level failures become
/// [`Error::Connection`], everything else [`Error::Backend`].
pub fn err(e: lapin::Error) -> Error {
    if e.is_io_error()
        || e.is_amqp_hard_error()
        || matches!(e.kind(), lapin::ErrorKind::InvalidConnectionState(_))
    {
        Error::connection(BACKEND, e)
    } else {
        Error::backend(BACKEND, e)
    }
}

/// True when `e` is RabbitMQ's reply `code` (404 not found, 405 resource locked …).
pub fn is_reply(e: &lapin::Error, code: u16) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_id() == code,
        _ => false,
    }
}

/// Opens a connection named `name` (visible in `rabbitmqctl list_connections`).
pub async fn open(uri: &str, name: &str) -> Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    tokio::time::timeout(Duration::from_secs(10), Connection::connect(uri, props))
        .await
        .map_err(|_| Error::connection(BACKEND, "connect timed out after 10 s"))?
        .map_err(err)
}

/// The driver's shared connection with one publishing channel; replaced after a loss.
pub struct Shared {
    uri: String,
    name: String,
    state: Mutex<Option<(Arc<Connection>, Channel)>>,
    confirm: bool,
}

impl Shared {
    /// Connects now (so a bad URL fails `connect`).
    pub async fn connect(uri: &str, name: &str, confirm: bool) -> Result<Self> {
        let s = Self {
            uri: uri.to_string(),
            name: name.to_string(),
            state: Mutex::new(None),
            confirm,
        };
        s.publish_channel().await?;
        Ok(s)
    }

    /// The connection, re-opened if it was lost.
    pub async fn connection(&self) -> Result<Arc<Connection>> {
        let mut st = self.state.lock().await;
        self.ensure(&mut st).await?;
        match &*st {
            Some((c, _)) => Ok(c.clone()),
            None => Err(Error::connection(BACKEND, "not connected")),
        }
    }

    /// The publishing channel (in confirm mode when confirms are on).
    pub async fn publish_channel(&self) -> Result<Channel> {
        let mut st = self.state.lock().await;
        self.ensure(&mut st).await?;
        match &*st {
            Some((_, ch)) => Ok(ch.clone()),
            None => Err(Error::connection(BACKEND, "not connected")),
        }
    }

    /// A fresh channel (for work whose failures close the channel).
    pub async fn channel(&self) -> Result<Channel> {
        self.connection().await?.create_channel().await.map_err(err)
    }

    async fn ensure(&self, st: &mut Option<(Arc<Connection>, Channel)>) -> Result<()> {
        if let Some((c, ch)) = st.as_ref() {
            if c.status().connected() && ch.status().connected() {
                return Ok(());
            }
            if c.status().connected() {
                let ch = new_publish_channel(c, self.confirm).await?;
                if let Some(s) = st.as_mut() {
                    s.1 = ch;
                }
                return Ok(());
            }
            tracing::warn!("amqp connection lost; reconnecting");
        }
        *st = None;
        let c = open(&self.uri, &self.name).await?;
        let ch = new_publish_channel(&c, self.confirm).await?;
        *st = Some((Arc::new(c), ch));
        Ok(())
    }

    /// Closes the connection.
    pub async fn close(&self) {
        if let Some((c, _)) = self.state.lock().await.take() {
            let _ = c.close(200, "courier closing".into()).await;
        }
    }
}

async fn new_publish_channel(c: &Connection, confirm: bool) -> Result<Channel> {
    let ch = c.create_channel().await.map_err(err)?;
    if confirm {
        ch.confirm_select(Default::default()).await.map_err(err)?;
    }
    Ok(ch)
}

/// Arguments of a stream queue with optional retention.
pub fn stream_args(max_age_ms: Option<i64>, max_bytes: Option<u64>) -> FieldTable {
    let mut a = FieldTable::default();
    a.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    if let Some(ms) = max_age_ms.filter(|ms| *ms > 0) {
        let secs = (ms + 999) / 1000;
        a.insert(
            "x-max-age".into(),
            AMQPValue::LongString(format!("{secs}s").into()),
        );
    }
    if let Some(b) = max_bytes {
        a.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(b as i64),
        );
    }
    a
}

/// Declares a durable stream queue.
pub async fn declare_stream(ch: &Channel, name: &str, args: FieldTable) -> Result<()> {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .map_err(err)?;
    Ok(())
}

/// Declares a durable exchange.
pub async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) -> Result<()> {
    ch.exchange_declare(
        name.into(),
        kind.lapin(),
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(err)
}

/// Binds a partition's stream to its topic exchange.
pub async fn bind_partition(
    ch: &Channel,
    stream: &str,
    exchange: &str,
    kind: ExchangeKind,
    partition: u32,
) -> Result<()> {
    let mut args = FieldTable::default();
    if kind == ExchangeKind::Headers {
        args.insert("x-match".into(), AMQPValue::LongString("all".into()));
        args.insert(
            crate::codec::H_PARTITION.into(),
            AMQPValue::LongString(partition.to_string().into()),
        );
    }
    ch.queue_bind(
        stream.into(),
        exchange.into(),
        crate::names::routing_key(partition).as_str().into(),
        QueueBindOptions::default(),
        args,
    )
    .await
    .map_err(err)
}

/// A consumer of `stream` on `ch` from `start`, with QoS `prefetch` (a stream
/// consumer needs one) and a unique tag beginning with `tag`.
pub async fn attach(
    ch: &Channel,
    stream: &str,
    tag: &str,
    prefetch: u16,
    start: StreamStart,
) -> Result<lapin::Consumer> {
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(err)?;
    ch.basic_consume(
        stream.into(),
        format!("{tag}-{}", ulid::Ulid::new()).as_str().into(),
        BasicConsumeOptions::default(),
        stream_offset(start),
    )
    .await
    .map_err(err)
}

/// A consumer argument `x-stream-offset`.
pub fn stream_offset(value: StreamStart) -> FieldTable {
    let mut a = FieldTable::default();
    let v = match value {
        StreamStart::First => AMQPValue::LongString(LongString::from("first")),
        StreamStart::Last => AMQPValue::LongString(LongString::from("last")),
        StreamStart::Next => AMQPValue::LongString(LongString::from("next")),
        StreamStart::Offset(o) => AMQPValue::LongLongInt(o as i64),
    };
    a.insert(ShortString::from("x-stream-offset"), v);
    a
}

/// Where a stream consumer starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamStart {
    /// The oldest retained message.
    First,
    /// The last written chunk.
    Last,
    /// Only messages written after attaching.
    Next,
    /// This offset (the broker may start at the beginning of its chunk).
    Offset(u64),
}

/// Returns a stream consumer's credit once half its prefetch was delivered. On a
/// stream an ack removes nothing; it only lets the broker send more.
pub struct Credit {
    every: u32,
    uncredited: u32,
}

impl Credit {
    /// Credit for a consumer with QoS `prefetch`.
    pub fn new(prefetch: u16) -> Self {
        Self {
            every: u32::from(prefetch / 2).max(1),
            uncredited: 0,
        }
    }

    /// Counts delivery `d`, acking everything up to it when half the prefetch is used.
    pub async fn delivered(&mut self, d: &lapin::message::Delivery) -> courier_core::Result<()> {
        self.uncredited += 1;
        if self.uncredited >= self.every {
            d.acker
                .ack(lapin::options::BasicAckOptions { multiple: true })
                .await
                .map_err(err)?;
            self.uncredited = 0;
        }
        Ok(())
    }
}
