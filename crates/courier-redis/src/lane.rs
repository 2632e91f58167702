//! The publish lane: one task owns the publishing connection and keeps up to
//! [`WINDOW`] pipelines in flight on it, so the server works on one batch while the
//! client builds the next, instead of idling one round trip per batch.
//!
//! Order is what makes this safe. Every `publish` call takes a [`Ticket`] before its
//! first await (the producer starts calls in send order), and the lane writes pipelines
//! to the socket strictly in ticket order. Redis answers one connection in order, so a
//! broken connection fails the failed batch and everything after it. Those batches are
//! sent again, in ticket order, before any later batch: a failed batch never lets a
//! later one overtake it, and per-key order survives retries (a batch whose reply was
//! lost may be stored twice, as with any retry).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisResult, Value};
use tokio::sync::{mpsc, oneshot};

/// Most pipelines (of up to 1000 commands) in flight on the publishing connection.
/// A few keep the server busy; more only add memory and latency under load.
pub(crate) const WINDOW: usize = 8;

/// Wait before resending after the n-th failed attempt (× n).
const BACKOFF: Duration = Duration::from_millis(100);

type Reply = RedisResult<Vec<Value>>;
type Sending = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// One pipeline to send, with where its replies go.
struct Job {
    pipe: Arc<redis::Pipeline>,
    reply: oneshot::Sender<Reply>,
    /// Failed attempts so far.
    failures: u32,
}

/// A submission: `None` releases a ticket whose call sent nothing.
struct Submission {
    ticket: u64,
    job: Option<Job>,
}

/// The handle publish calls use; cheap to share.
pub(crate) struct Lane {
    next: AtomicU64,
    tx: mpsc::UnboundedSender<Submission>,
}

/// A place in the lane's order. Dropped unused (an error before sending, or a
/// cancelled call), it lets the batches behind it go.
pub(crate) struct Ticket<'a> {
    lane: &'a Lane,
    n: u64,
    used: bool,
}

impl Lane {
    /// Starts the lane's task; it connects on the first batch and reconnects after a
    /// failure. `retry_max` bounds the resends of one batch.
    pub(crate) fn start(
        client: redis::Client,
        config: AsyncConnectionConfig,
        retry_max: u32,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            client,
            // The connection's queue must take a whole window without waiting, so that
            // queueing a pipeline never has to wait (see `Writer::send`).
            config: config.set_pipeline_buffer_size(4 * WINDOW),
            conn: None,
            rx,
            closed: false,
            waiting: BTreeMap::new(),
            next: 0,
            redo: VecDeque::new(),
            in_flight: VecDeque::new(),
            retry_max,
        };
        tokio::spawn(writer.run());
        Self {
            next: AtomicU64::new(0),
            tx,
        }
    }

    /// Takes the next `n` places in order. Call before the first await of a publish.
    pub(crate) fn tickets(&self, n: usize) -> VecDeque<Ticket<'_>> {
        let first = self.next.fetch_add(n as u64, Ordering::Relaxed);
        (first..first + n as u64)
            .map(|n| Ticket {
                lane: self,
                n,
                used: false,
            })
            .collect()
    }
}

impl Ticket<'_> {
    /// Queues `pipe` in this ticket's place; the receiver gets the replies (or the
    /// error of the last attempt).
    pub(crate) fn send(mut self, pipe: redis::Pipeline) -> oneshot::Receiver<Reply> {
        self.used = true;
        let (reply, rx) = oneshot::channel();
        let job = Job {
            pipe: Arc::new(pipe),
            reply,
            failures: 0,
        };
        // A closed lane drops the job, and with it `reply`: the caller sees an error.
        let _ = self.lane.tx.send(Submission {
            ticket: self.n,
            job: Some(job),
        });
        rx
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.used {
            let _ = self.lane.tx.send(Submission {
                ticket: self.n,
                job: None,
            });
        }
    }
}

enum Event {
    Reply(Reply),
    Submitted(Option<Submission>),
}

struct InFlight {
    job: Job,
    sending: Sending,
}

struct Writer {
    client: redis::Client,
    config: AsyncConnectionConfig,
    conn: Option<MultiplexedConnection>,
    rx: mpsc::UnboundedReceiver<Submission>,
    closed: bool,
    /// Submissions that arrived ahead of their turn.
    waiting: BTreeMap<u64, Option<Job>>,
    /// The next ticket to send.
    next: u64,
    /// Failed batches to send again, oldest first, before anything new.
    redo: VecDeque<Job>,
    in_flight: VecDeque<InFlight>,
    retry_max: u32,
}

impl Writer {
    async fn run(mut self) {
        loop {
            self.fill().await;
            if self.in_flight.is_empty() {
                if self.closed {
                    return;
                }
                match self.rx.recv().await {
                    Some(s) => self.accept(s),
                    None => self.closed = true,
                }
                continue;
            }
            let event = tokio::select! {
                biased;
                reply = front(&mut self.in_flight) => Event::Reply(reply),
                s = self.rx.recv(), if !self.closed => Event::Submitted(s),
            };
            match event {
                Event::Reply(reply) => self.finish(reply).await,
                Event::Submitted(Some(s)) => self.accept(s),
                Event::Submitted(None) => self.closed = true,
            }
        }
    }

    fn accept(&mut self, s: Submission) {
        self.waiting.insert(s.ticket, s.job);
        // Take whatever else is already queued, so one wake-up admits a burst.
        while let Ok(s) = self.rx.try_recv() {
            self.waiting.insert(s.ticket, s.job);
        }
    }

    /// Sends batches in order while the window has room: resends first, then the
    /// waiting submissions whose turn it is.
    async fn fill(&mut self) {
        while self.in_flight.len() < WINDOW {
            let job = match self.redo.pop_front() {
                Some(job) => job,
                None => match self.waiting.remove(&self.next) {
                    Some(job) => {
                        self.next += 1;
                        match job {
                            Some(job) => job,
                            None => continue,
                        }
                    }
                    None => return,
                },
            };
            self.send(job).await;
        }
    }

    /// Writes one pipeline to the connection (connecting first if needed).
    async fn send(&mut self, mut job: Job) {
        let mut conn = loop {
            if let Some(c) = &self.conn {
                break c.clone();
            }
            match self
                .client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
            {
                Ok(c) => self.conn = Some(c),
                Err(e) => {
                    job.failures += 1;
                    if !retryable(&e) || job.failures > self.retry_max {
                        // Later batches still go: this one is reported as failed, so no
                        // acknowledged message is out of order.
                        let _ = job.reply.send(Err(e));
                        return;
                    }
                    tracing::warn!(error = %e, attempt = job.failures, "redis connect failed; retrying");
                    tokio::time::sleep(BACKOFF * job.failures).await;
                }
            }
        };
        let pipe = job.pipe.clone();
        let mut sending: Sending = Box::pin(async move { pipe.query_async(&mut conn).await });
        // Polled once now: that puts the pipeline in the connection's queue (which has
        // room for the whole window), so pipelines reach the socket in ticket order
        // however the futures are polled later.
        if let Poll::Ready(reply) =
            std::future::poll_fn(|cx| Poll::Ready(sending.as_mut().poll(cx))).await
        {
            sending = Box::pin(std::future::ready(reply));
        }
        self.in_flight.push_back(InFlight { job, sending });
    }

    /// Handles the reply of the oldest batch in flight.
    async fn finish(&mut self, reply: Reply) {
        let Some(first) = self.in_flight.pop_front() else {
            return;
        };
        let err = match reply {
            Ok(v) => {
                let _ = first.job.reply.send(Ok(v));
                return;
            }
            Err(e) => e,
        };
        if err.is_unrecoverable_error() || retryable(&err) {
            self.conn = None;
        }
        if !retryable(&err) {
            let _ = first.job.reply.send(Err(err));
            return;
        }
        // The connection is gone (or timed out): everything sent after this batch
        // shares its fate. Collect those results, then send the failed ones again in
        // their order before anything new.
        let mut failed = vec![(first.job, err)];
        while let Some(next) = self.in_flight.pop_front() {
            match next.sending.await {
                Ok(v) => {
                    let _ = next.job.reply.send(Ok(v));
                }
                Err(e) => failed.push((next.job, e)),
            }
        }
        let mut wait = 0;
        for (mut job, e) in failed {
            job.failures += 1;
            if !retryable(&e) || job.failures > self.retry_max {
                let _ = job.reply.send(Err(e));
            } else {
                tracing::warn!(error = %e, attempt = job.failures, "publish failed; resending in order");
                wait = wait.max(job.failures);
                self.redo.push_back(job);
            }
        }
        if wait > 0 {
            tokio::time::sleep(BACKOFF * wait).await;
        }
    }
}

/// The reply of the oldest batch in flight (pending while there is none).
async fn front(in_flight: &mut VecDeque<InFlight>) -> Reply {
    std::future::poll_fn(|cx| match in_flight.front_mut() {
        Some(f) => f.sending.as_mut().poll(cx),
        None => Poll::Pending,
    })
    .await
}

/// Errors after which sending again may succeed.
pub(crate) fn retryable(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.code() == Some("LOADING")
}
