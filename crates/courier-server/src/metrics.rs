//! Prometheus exposition (SPEC O1): one process-wide recorder; every `metrics` call
//! in this process (the server's and `courier`'s) shows up at `/metrics`.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use parking_lot::RwLock;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder once per process. When the embedding program installed its
/// own recorder first, `/metrics` reports that nothing is recorded here.
pub fn install() {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        match metrics::set_global_recorder(recorder) {
            Ok(()) => Some(handle),
            Err(_) => {
                tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
                None
            }
        }
    });
}

/// The current exposition text.
pub fn render() -> String {
    match HANDLE.get() {
        Some(Some(h)) => {
            h.run_upkeep();
            h.render()
        }
        _ => String::new(),
    }
}

/// Metric handles of one route and method, resolved once: building a `metrics` key
/// from labels allocates and hashes three strings, which showed in the request path's
/// profile.
struct RouteHandles {
    duration: Histogram,
    by_status: Vec<(u16, Counter)>,
}

type HandleCache = RwLock<HashMap<Box<str>, HashMap<Method, RouteHandles>>>;

static HANDLES: OnceLock<HandleCache> = OnceLock::new();

/// Records one finished request with cached handles (registered on first use).
fn record(route: &str, method: &Method, status: u16, elapsed: f64) {
    let cache = HANDLES.get_or_init(Default::default);
    {
        let read = cache.read();
        if let Some(h) = read.get(route).and_then(|m| m.get(method)) {
            if let Some((_, c)) = h.by_status.iter().find(|(s, _)| *s == status) {
                h.duration.record(elapsed);
                c.increment(1);
                return;
            }
        }
    }
    let mut write = cache.write();
    let h = write
        .entry(route.into())
        .or_default()
        .entry(method.clone())
        .or_insert_with(|| RouteHandles {
            duration: metrics::histogram!("courier_http_request_duration_seconds",
                "route" => route.to_string(), "method" => method.as_str().to_string()),
            by_status: Vec::new(),
        });
    let at = match h.by_status.iter().position(|(s, _)| *s == status) {
        Some(at) => at,
        None => {
            h.by_status.push((
                status,
                metrics::counter!("courier_http_requests_total",
                "route" => route.to_string(), "method" => method.as_str().to_string(),
                "status" => status.to_string()),
            ));
            h.by_status.len() - 1
        }
    };
    h.duration.record(elapsed);
    h.by_status[at].1.increment(1);
}

/// Middleware: request count and latency per route and status.
pub async fn track(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().cloned();
    let method = req.method().clone();
    let start = Instant::now();
    let resp = next.run(req).await;
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    record(
        route,
        &method,
        resp.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    resp
}
