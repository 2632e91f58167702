//! A `tracing` subscriber for the trace tests: remembers the `trace_id` field of every
//! open `courier.consume` span, so a handler can prove which trace its span carries.

use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

use parking_lot::Mutex;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

static SPANS: OnceLock<Mutex<HashMap<u64, String>>> = OnceLock::new();

fn spans() -> &'static Mutex<HashMap<u64, String>> {
    SPANS.get_or_init(|| Mutex::new(HashMap::new()))
}

struct Capture;

struct TraceIdVisitor(Option<String>);

impl Visit for TraceIdVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "trace_id" {
            self.0 = Some(format!("{value:?}"));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "trace_id" {
            self.0 = Some(value.to_string());
        }
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _ctx: Context<'_, S>) {
        if attrs.metadata().name() != "courier.consume" {
            return;
        }
        let mut v = TraceIdVisitor(None);
        attrs.record(&mut v);
        if let Some(t) = v.0 {
            spans().lock().insert(id.into_u64(), t);
        }
    }

    fn on_close(&self, id: Id, _ctx: Context<'_, S>) {
        spans().lock().remove(&id.into_u64());
    }
}

/// Installs the capturing subscriber as the global default (once per process;
/// returns quietly if another global subscriber is already installed).
pub fn install() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ =
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Capture));
    });
}

/// The `trace_id` of the span the caller runs in, if it is a `courier.consume` span.
pub fn current_trace_id() -> Option<String> {
    let id = tracing::Span::current().id()?;
    spans().lock().get(&id.into_u64()).cloned()
}
