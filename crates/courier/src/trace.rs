//! Trace propagation (SPEC R1): W3C `traceparent` plus the seeds' `X-Trace-ID`,
//! `x-trace-id`, `x-span-id`, `x-parent-span-id` and `x-sampled` headers.
//!
//! The context travels in a task-local: the consumer pipeline sets it around the
//! handler, so a message sent from inside a handler continues the consumed message's
//! trace; code outside a handler can set one with [`TraceContext::scope`]. W3C
//! `traceparent` is what OpenTelemetry SDKs read and write, so a message produced by an
//! OTel-instrumented service continues the same trace id here, and the other way round.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use courier_core::Headers;

/// W3C trace context header.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// Seed 000's trace header.
pub const HEADER_X_TRACE_ID: &str = "X-Trace-ID";
/// Seed 002's trace id header.
pub const HEADER_TRACE_ID: &str = "x-trace-id";
/// Seed 002's span id header.
pub const HEADER_SPAN_ID: &str = "x-span-id";
/// Seed 002's parent span id header.
pub const HEADER_PARENT_SPAN_ID: &str = "x-parent-span-id";
/// Seed 002's sampling flag header (`1` or `0`).
pub const HEADER_SAMPLED: &str = "x-sampled";

thread_local! {
    // Set only while a `TraceScope` polls its future, so it follows the task across
    // worker threads the way a tokio task-local does, at the cost of two cell swaps
    // per poll instead of a `RefCell` dance (this runs for every traced message).
    static CURRENT: Cell<Option<Ambient>> = const { Cell::new(None) };
}

/// What a scope makes current: a context, or a consumed message's headers whose child
/// context is made (extracted, given a span id) only when somebody asks — most
/// handlers never do, and extracting (finding and parsing `traceparent`) cost about
/// 550 instructions per traced message.
enum Ambient {
    Ready(TraceContext),
    ChildOf(Headers),
}

impl Ambient {
    fn resolve(&self) -> Option<TraceContext> {
        match self {
            Ambient::Ready(t) => Some(*t),
            Ambient::ChildOf(h) => TraceContext::extract(h).map(|p| p.child()),
        }
    }
}

/// A consumed message's trace context as the handler's: a child of the producer's,
/// i.e. `TraceContext::extract(headers).map(|p| p.child())`, worked out on first use.
pub(crate) struct Inherited(Ambient);

impl Inherited {
    /// `None` when there are no headers (so certainly no context).
    pub(crate) fn from_headers(headers: &Headers) -> Option<Self> {
        (!headers.is_empty()).then(|| Self(Ambient::ChildOf(headers.clone())))
    }
}

/// One span's position in a distributed trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// 128-bit trace id (never zero).
    pub trace_id: u128,
    /// 64-bit id of this span (never zero).
    pub span_id: u64,
    /// The span this one is a child of, if known.
    pub parent_span_id: Option<u64>,
    /// Whether the trace is sampled (W3C flag `01`).
    pub sampled: bool,
}

fn nonzero_u64() -> u64 {
    loop {
        let v = fastrand::u64(..);
        if v != 0 {
            return v;
        }
    }
}

fn nonzero_u128() -> u128 {
    loop {
        let v = fastrand::u128(..);
        if v != 0 {
            return v;
        }
    }
}

impl TraceContext {
    /// A new trace (fresh ids, sampled, no parent).
    pub fn new_root() -> Self {
        Self {
            trace_id: nonzero_u128(),
            span_id: nonzero_u64(),
            parent_span_id: None,
            sampled: true,
        }
    }

    /// A new span in the same trace whose parent is `self`.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            span_id: nonzero_u64(),
            parent_span_id: Some(self.span_id),
            sampled: self.sampled,
        }
    }

    /// The context the current task runs in (inside a handler: the consumed
    /// message's, as a child span), if any.
    pub fn current() -> Option<Self> {
        CURRENT
            .try_with(|c| {
                let ambient = c.take()?;
                let ctx = ambient.resolve();
                // Resolved once: the scope keeps the result, so the span id stays the
                // same for the rest of the handler.
                c.set(match ambient {
                    Ambient::Ready(_) => Some(ambient),
                    Ambient::ChildOf(_) => ctx.map(Ambient::Ready),
                });
                ctx
            })
            .ok()
            .flatten()
    }

    /// Runs `fut` with `self` as the current context, so sends inside it continue
    /// this trace.
    pub fn scope<F: Future>(self, fut: F) -> TraceScope<F> {
        scoped(Some(self), fut)
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// The W3C `traceparent` value (`00-trace-span-flags`).
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }

    /// Parses a W3C `traceparent`; `None` when malformed or all-zero ids (the spec
    /// says such a header must be ignored).
    pub fn parse_traceparent(v: &str) -> Option<Self> {
        Self::parse_traceparent_bytes(v.as_bytes())
    }

    /// [`parse_traceparent`](Self::parse_traceparent) of raw header bytes.
    fn parse_traceparent_bytes(v: &[u8]) -> Option<Self> {
        // `vv-<32 hex>-<16 hex>-ff`: fixed positions, read in one pass (this runs for
        // every consumed traced message).
        let b = v.trim_ascii();
        if b.len() < TRACEPARENT_LEN || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex_u64(&b[..2])?;
        // Version 00 has exactly four fields; later versions may append `-…`.
        if version == 0xff
            || (version == 0 && b.len() != TRACEPARENT_LEN)
            || (b.len() > TRACEPARENT_LEN && b[TRACEPARENT_LEN] != b'-')
        {
            return None;
        }
        let trace_id = (u128::from(hex_u64(&b[3..19])?) << 64) | u128::from(hex_u64(&b[19..35])?);
        let span_id = hex_u64(&b[36..52])?;
        let flags = hex_u64(&b[53..55])?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            parent_span_id: None,
            sampled: flags & 1 == 1,
        })
    }

    /// Reads the context a producer injected: `traceparent` first (W3C / OTel), then
    /// the seeds' `x-trace-id` / `X-Trace-ID` with `x-span-id` and `x-sampled`.
    pub fn extract(headers: &Headers) -> Option<Self> {
        if headers.is_empty() {
            return None;
        }
        if let Some(tp) = headers
            .get_ignore_case(HEADER_TRACEPARENT)
            .and_then(|v| Self::parse_traceparent_bytes(v))
        {
            return Some(tp);
        }
        let trace = headers
            .get_ignore_case(HEADER_TRACE_ID)
            .and_then(|v| parse_hex_u128(v.trim_ascii()))
            .filter(|t| *t != 0)?;
        let span = headers
            .get_ignore_case(HEADER_SPAN_ID)
            .and_then(|v| hex_u64(v.trim_ascii()))
            .filter(|s| *s != 0)
            .unwrap_or_else(nonzero_u64);
        let sampled = headers
            .get_ignore_case(HEADER_SAMPLED)
            .is_none_or(|v| v.as_ref() != b"0" && v.as_ref() != b"false");
        Some(Self {
            trace_id: trace,
            span_id: span,
            parent_span_id: None,
            sampled,
        })
    }

    /// Writes every propagation header for `self` (replacing earlier values).
    pub fn inject(&self, headers: &mut Headers) {
        let trace = self.trace_id_hex();
        headers.insert(HEADER_TRACEPARENT, self.traceparent());
        headers.insert(HEADER_X_TRACE_ID, trace.clone());
        headers.insert(HEADER_TRACE_ID, trace);
        headers.insert(HEADER_SPAN_ID, self.span_id_hex());
        if let Some(p) = self.parent_span_id {
            headers.insert(HEADER_PARENT_SPAN_ID, format!("{p:016x}"));
        }
        headers.insert(HEADER_SAMPLED, if self.sampled { "1" } else { "0" });
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

/// Length of a version-00 `traceparent`.
const TRACEPARENT_LEN: usize = 55;

/// Hex digit values, `INVALID` for every other byte.
const HEX: [u8; 256] = {
    let mut t = [INVALID; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};
const INVALID: u8 = 0xff;

/// The value of 1–16 hex digits; `None` for any other byte or length.
fn hex_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    // No branch per digit: invalid digits (`INVALID` has the high bit) are collected
    // in `bad` and checked once.
    let (mut v, mut bad) = (0u64, 0u8);
    for &d in digits {
        let x = HEX[d as usize];
        bad |= x;
        v = (v << 4) | u64::from(x & 0x0f);
    }
    (bad & 0x80 == 0).then_some(v)
}

/// The value of 1–32 hex digits; `None` for any other byte or length.
fn parse_hex_u128(digits: &[u8]) -> Option<u128> {
    match digits.len() {
        0..=16 => hex_u64(digits).map(u128::from),
        17..=32 => {
            let (high, low) = digits.split_at(digits.len() - 16);
            Some((u128::from(hex_u64(high)?) << 64) | u128::from(hex_u64(low)?))
        }
        _ => None,
    }
}

/// Runs `fut` with `ctx` (or none) as the current context.
pub(crate) fn scoped<F: Future>(ctx: Option<TraceContext>, fut: F) -> TraceScope<F> {
    TraceScope {
        ctx: ctx.map(Ambient::Ready),
        fut,
    }
}

/// Runs `fut` with a consumed message's context as the current one.
pub(crate) fn inherit<F: Future>(ctx: Inherited, fut: F) -> TraceScope<F> {
    TraceScope {
        ctx: Some(ctx.0),
        fut,
    }
}

pin_project_lite::pin_project! {
    /// A future that runs with a [`TraceContext`] as the current one (from
    /// [`TraceContext::scope`]): [`TraceContext::current`] inside it returns that
    /// context; outside, the one around it again.
    pub struct TraceScope<F> {
        ctx: Option<Ambient>,
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for TraceScope<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        /// Puts the outer context back, also when the inner poll panics, and keeps
        /// this scope's (resolved by `current` meanwhile, perhaps) for the next poll.
        struct Restore<'a> {
            outer: Option<Ambient>,
            ours: &'a mut Option<Ambient>,
        }
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                if let Ok(ours) = CURRENT.try_with(|c| c.replace(self.outer.take())) {
                    *self.ours = ours;
                }
            }
        }
        let this = self.project();
        let outer = CURRENT
            .try_with(|c| c.replace(this.ctx.take()))
            .ok()
            .flatten();
        let _restore = Restore {
            outer,
            ours: this.ctx,
        };
        this.fut.poll(cx)
    }
}

/// The producer side: gives a message without trace headers the context to carry —
/// a child of the current one, or (when a `tracing` subscriber listens) a new trace.
/// A message that already names a trace (`traceparent` or `X-Trace-ID`) keeps it.
pub(crate) fn inject_on_send(headers: &mut Headers) {
    if !headers.is_empty()
        && (headers.get_ignore_case(HEADER_TRACEPARENT).is_some()
            || headers.get_ignore_case(HEADER_TRACE_ID).is_some())
    {
        return;
    }
    let ctx = match TraceContext::current() {
        Some(c) => c.child(),
        // Without a current trace and nobody listening there is nothing to continue;
        // skipping keeps the no-tracing hot path free of id generation and headers.
        None if tracing::enabled!(tracing::Level::INFO) => TraceContext::new_root(),
        None => return,
    };
    ctx.inject(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_garbage() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse_traceparent(v).expect("valid");
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.span_id_hex(), "00f067aa0ba902b7");
        assert!(c.sampled);
        assert_eq!(c.traceparent(), v);
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-xbf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert!(TraceContext::parse_traceparent(bad).is_none(), "{bad}");
        }
        // Later versions may append fields; upper-case hex and padding are tolerated.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra";
        let c = TraceContext::parse_traceparent(later).expect("future version");
        assert!(!c.sampled);
        let upper = " 00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01 ";
        assert_eq!(
            TraceContext::parse_traceparent(upper).map(|c| c.trace_id_hex()),
            Some("4bf92f3577b34da6a3ce929d0e0e4736".to_string())
        );
    }

    #[tokio::test]
    async fn scopes_nest_and_do_not_leak_into_other_futures() {
        let a = TraceContext::new_root();
        let b = a.child();
        assert_eq!(TraceContext::current(), None);
        let inside = a.scope(async move {
            assert_eq!(TraceContext::current(), Some(a));
            b.scope(async move {
                tokio::task::yield_now().await;
                assert_eq!(TraceContext::current(), Some(b));
            })
            .await;
            assert_eq!(TraceContext::current(), Some(a));
        });
        let outside = async {
            for _ in 0..3 {
                assert_eq!(TraceContext::current(), None);
                tokio::task::yield_now().await;
            }
        };
        tokio::join!(inside, outside);
        assert_eq!(TraceContext::current(), None);
    }

    #[test]
    fn inject_then_extract_keeps_trace_and_span() {
        let root = TraceContext::new_root();
        let child = root.child();
        let mut h = Headers::new();
        child.inject(&mut h);
        assert_eq!(h.get_str("x-parent-span-id"), Some(&*root.span_id_hex()));
        assert_eq!(h.get_str("X-Trace-ID"), Some(&*root.trace_id_hex()));
        let got = TraceContext::extract(&h).expect("extract");
        assert_eq!((got.trace_id, got.span_id), (child.trace_id, child.span_id));
        // The seeds' headers alone are enough.
        h.remove("traceparent");
        let got = TraceContext::extract(&h).expect("extract");
        assert_eq!((got.trace_id, got.span_id), (child.trace_id, child.span_id));
    }

    #[tokio::test]
    async fn inherited_context_resolves_once_and_stays_across_polls() {
        let parent = TraceContext::new_root();
        let mut h = Headers::new();
        parent.inject(&mut h);
        let ctx = Inherited::from_headers(&h).expect("traced");
        inherit(ctx, async {
            let first = TraceContext::current().expect("current");
            assert_eq!(first.trace_id, parent.trace_id);
            assert_eq!(first.parent_span_id, Some(parent.span_id));
            assert_ne!(first.span_id, parent.span_id);
            tokio::task::yield_now().await;
            assert_eq!(
                TraceContext::current(),
                Some(first),
                "same span after a poll"
            );
        })
        .await;
        assert_eq!(TraceContext::current(), None);
        assert!(Inherited::from_headers(&Headers::new()).is_none());
    }

    #[test]
    fn inherited_context_falls_back_like_extract() {
        let root = TraceContext::new_root();
        let mut h = Headers::new();
        root.inject(&mut h);
        h.insert(
            "traceparent",
            "00-zz000000000000000000000000000000-00f067aa0ba902b7-01",
        );
        let eager = TraceContext::extract(&h).expect("x-trace-id fallback");
        let lazy = Inherited::from_headers(&h).expect("headers").0.resolve();
        assert_eq!(eager.trace_id, root.trace_id);
        assert_eq!(
            lazy.map(|c| (c.trace_id, c.parent_span_id)),
            Some((root.trace_id, Some(eager.span_id)))
        );
        let plain: Headers = [("x-user", "1")].into_iter().collect();
        assert_eq!(
            Inherited::from_headers(&plain)
                .expect("headers")
                .0
                .resolve(),
            None
        );
    }
}
