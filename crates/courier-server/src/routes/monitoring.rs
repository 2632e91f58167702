//! `GET /monitoring` (seed 004 §5.2.3). Admin only.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::envelope::{ok, ApiError, ApiResult, Envelope, ErrorEnvelope};
use crate::extract::ApiQuery;
use crate::monitor::MAX_WINDOW;
use crate::routes::groups::collect;
use crate::state::AppState;
use crate::time::rfc3339;

/// Filters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct MonitoringQuery {
    /// Only this topic.
    pub topic_name: Option<String>,
    /// Window for rates: `30s`, `5m`, `1h` … (1s to 1h, default 1h).
    pub time_range: Option<String>,
    /// Accepted for compatibility with seed 004; every metric is returned.
    #[allow(dead_code)]
    pub metrics: Option<String>,
}

/// One partition.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionStats {
    /// Partition number.
    pub partition: u32,
    /// End offset (next to be written).
    pub offset: u64,
    /// Messages per second over the window.
    pub message_rate: f64,
}

/// One topic.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicStats {
    /// Topic.
    pub name: String,
    /// Messages stored.
    pub message_count: u64,
    /// Messages per second over the window.
    pub message_rate: f64,
    /// Sum of every group's lag on this topic.
    pub consumer_lag: u64,
    /// Per partition.
    pub partitions: Vec<PartitionStats>,
}

/// One group on one topic.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupStats {
    /// Group id.
    pub group_id: String,
    /// Topic.
    pub topic_name: String,
    /// Members of the group.
    pub consumer_count: usize,
    /// Lag on this topic.
    pub total_lag: u64,
    /// `active` or `inactive`.
    pub status: String,
}

/// The monitoring snapshot.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Monitoring {
    /// Topics.
    pub topics: Vec<TopicStats>,
    /// Groups per topic.
    pub consumers: Vec<GroupStats>,
    /// Seconds the rates were actually computed over (shorter than `timeRange`
    /// while the server has not run that long).
    pub window_seconds: f64,
    /// RFC 3339.
    pub timestamp: String,
}

/// Parses `30s`, `5m`, `1h`, `1h30m`, `90` (seconds).
pub fn parse_range(s: &str) -> Result<Duration, ApiError> {
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime_like(s)
            .ok_or_else(|| ApiError::bad_request("timeRange: expected e.g. 30s, 5m, 1h"))?,
    };
    if d < Duration::from_secs(1) || d > MAX_WINDOW {
        return Err(ApiError::bad_request("timeRange must be between 1s and 1h"));
    }
    Ok(d)
}

fn humantime_like(s: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        total = total.checked_add(n.checked_mul(match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return None,
        })?)?;
    }
    if !num.is_empty() {
        return None;
    }
    Some(Duration::from_secs(total))
}

/// Topic and group statistics with rates over `timeRange`.
#[utoipa::path(
    get, path = "/api/v1/mq/monitoring", tag = "monitoring", security(("bearer" = [])),
    params(MonitoringQuery),
    responses(
        (status = 200, description = "snapshot", body = Envelope<Monitoring>),
        (status = 400, description = "invalid filter", body = ErrorEnvelope),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "not an admin token", body = ErrorEnvelope),
        (status = 404, description = "topicName does not exist", body = ErrorEnvelope),
        (status = 429, description = "rate limit", body = ErrorEnvelope),
        (status = 500, description = "backend failure", body = ErrorEnvelope),
    )
)]
pub async fn monitoring(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<MonitoringQuery>,
) -> ApiResult<Json<Envelope<Monitoring>>> {
    let window = match q.time_range.as_deref() {
        Some(r) => parse_range(r)?,
        None => MAX_WINDOW,
    };
    let admin = state.client.admin();
    let names = match &q.topic_name {
        Some(t) => {
            courier::validate_topic(t)?;
            vec![t.clone()]
        }
        None => admin.list_topics().await?,
    };
    let groups = collect(&state, None).await?;
    let mut lag_by_topic: BTreeMap<&str, u64> = BTreeMap::new();
    let mut consumers = Vec::new();
    for g in &groups {
        let mut per_topic: BTreeMap<&str, u64> = BTreeMap::new();
        for p in &g.partitions {
            *per_topic.entry(p.topic_name.as_str()).or_default() += p.lag;
        }
        for (t, lag) in per_topic {
            if !names.iter().any(|n| n == t) {
                continue;
            }
            *lag_by_topic.entry(t).or_default() += lag;
            consumers.push(GroupStats {
                group_id: g.group_id.clone(),
                topic_name: t.to_string(),
                consumer_count: g.members.len(),
                total_lag: lag,
                status: g.status.clone(),
            });
        }
    }
    let mut topics = Vec::new();
    let mut window_seconds = 0.0f64;
    for name in &names {
        let info = match admin.describe_topic(name).await {
            Ok(i) => i,
            Err(courier::Error::TopicNotFound(_)) if q.topic_name.is_none() => continue,
            Err(e) => return Err(e.into()),
        };
        let base = state.history.baseline(name, window);
        let secs = base.as_ref().map_or(0.0, |(age, _)| age.as_secs_f64());
        window_seconds = window_seconds.max(secs);
        let rate = |p: usize, end: u64| -> f64 {
            match &base {
                Some((age, ends)) if age.as_secs_f64() >= 1.0 => {
                    let before = ends.get(p).copied().unwrap_or(0);
                    end.saturating_sub(before) as f64 / age.as_secs_f64()
                }
                _ => 0.0,
            }
        };
        let partitions: Vec<PartitionStats> = info
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| PartitionStats {
                partition: p.partition,
                offset: p.end_offset,
                message_rate: rate(i, p.end_offset),
            })
            .collect();
        topics.push(TopicStats {
            message_count: info.message_count(),
            message_rate: partitions.iter().map(|p| p.message_rate).sum(),
            consumer_lag: lag_by_topic.get(name.as_str()).copied().unwrap_or(0),
            name: name.clone(),
            partitions,
        });
    }
    Ok(ok(
        "ok",
        Monitoring {
            topics,
            consumers,
            window_seconds,
            timestamp: rfc3339(courier::now_millis()),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn ranges() {
        assert_eq!(parse_range("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_range("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_range("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_range("90").unwrap(), Duration::from_secs(90));
        assert!(parse_range("2h").is_err());
        assert!(parse_range("0s").is_err());
        assert!(parse_range("5x").is_err());
        assert!(parse_range("5").is_ok());
        assert!(parse_range("m").is_err());
    }
}
