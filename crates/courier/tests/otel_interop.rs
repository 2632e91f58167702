//! OpenTelemetry interop (SPEC R1): a service instrumented with `opentelemetry` and
//! `tracing-opentelemetry` injects its span's context with the W3C propagator; the
//! Courier handler runs in that trace, and what the handler sends continues it.

use std::time::Duration;

use courier::{Client, Delivery, Error, Headers, Message, TopicPartition, TraceContext};
use opentelemetry::propagation::{Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

struct HeaderInjector<'a>(&'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

// One thread: the OTel subscriber is the thread's default, and every task runs here.
#[tokio::test(flavor = "current_thread")]
async fn otel_span_context_continues_in_the_handler() {
    let provider = SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("courier-test")));
    let _default = tracing::subscriber::set_default(subscriber);

    let client = Client::connect("memory://otel").await.expect("connect");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let echo = client.producer();
    let c = client
        .consumer("otel.group")
        .from_earliest()
        .start(["otel.in"], move |d: Delivery| {
            let (tx, echo) = (tx.clone(), echo.clone());
            async move {
                let current = TraceContext::current();
                // A send from the handler carries the trace on.
                let receipt = echo.send(Message::new("otel.out", d.value.clone())).await?;
                let _ = tx.send((current, receipt));
                Ok::<(), Error>(())
            }
        })
        .await
        .expect("start");

    // The "other service": an OTel span, its context injected by the W3C propagator.
    let span = tracing::info_span!("checkout");
    let otel = span.context();
    let trace_id = u128::from_be_bytes(otel.span().span_context().trace_id().to_bytes());
    let span_id = u64::from_be_bytes(otel.span().span_context().span_id().to_bytes());
    assert_ne!(trace_id, 0, "the OTel layer gave the span a real context");
    let mut msg = Message::new("otel.in", "order-1");
    TraceContextPropagator::new().inject_context(&otel, &mut HeaderInjector(&mut msg.headers));
    assert!(msg.headers.get_str("traceparent").is_some());
    client.producer().send(msg).await.expect("send");

    let (current, receipt) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("handled in time")
        .expect("open");
    let current = current.expect("the handler runs in a trace context");
    assert_eq!(current.trace_id, trace_id, "same trace id as the OTel span");
    assert_eq!(
        current.parent_span_id,
        Some(span_id),
        "a child of the OTel span"
    );

    let tp = TopicPartition::new("otel.out", receipt.partition);
    let out = client
        .driver()
        .read_records(&tp, receipt.offset, 1)
        .await
        .expect("read");
    let (_, record) = out.first().expect("echoed record");
    let continued = TraceContext::extract(&record.headers).expect("trace headers");
    assert_eq!(
        continued.trace_id, trace_id,
        "the handler's send continues the trace"
    );
    c.stop().await.expect("stop");
    client
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    drop(span);
}
