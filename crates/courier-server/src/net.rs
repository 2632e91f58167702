//! The client address allowlist (SPEC S2, seed 004 §7.1 "IP白名单").

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;

use crate::envelope::ApiError;

/// Middleware: 403 for clients outside `allow` (an empty list allows everyone).
pub async fn allowlist(State(allow): State<Arc<Vec<IpNet>>>, req: Request, next: Next) -> Response {
    if !allow.is_empty() {
        let ip = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| canonical(c.0.ip()));
        let ok = ip.is_some_and(|ip| allow.iter().any(|n| n.contains(&ip)));
        if !ok {
            return ApiError::forbidden("client address is not allowed").into_response();
        }
    }
    next.run(req).await
}

/// IPv4-mapped IPv6 addresses (dual-stack sockets) compare as IPv4.
fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
