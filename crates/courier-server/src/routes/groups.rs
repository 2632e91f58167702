//! `GET /consumers` (SPEC A2): groups, members, per-partition lag, status. Admin only.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::envelope::{ok, ApiResult, Envelope, ErrorEnvelope};
use crate::extract::ApiQuery;
use crate::state::AppState;

/// A group member.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberView {
    /// Member id (the HTTP consumerId for HTTP members).
    pub member_id: String,
    /// `native` (a backend member) or `http` (held by this server).
    pub kind: String,
    /// Partitions owned, as `topic/partition`.
    pub assignment: Vec<String>,
    /// Records fetched over HTTP and not committed yet.
    pub in_flight: Option<usize>,
    /// Milliseconds since the HTTP member last fetched or committed.
    pub idle_ms: Option<u64>,
}

/// A group's position in one partition.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupPartitionView {
    /// Topic.
    pub topic_name: String,
    /// Partition.
    pub partition: u32,
    /// Next offset the group reads, if it committed.
    pub committed_offset: Option<u64>,
    /// End of the partition.
    pub end_offset: u64,
    /// Messages not yet consumed.
    pub lag: u64,
}

/// One consumer group.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupView {
    /// Group id.
    pub group_id: String,
    /// `active` (has members) or `inactive`.
    pub status: String,
    /// Members as the backend reports them (HTTP consumers included, under the
    /// backend's member ids).
    pub members: Vec<MemberView>,
    /// The HTTP consumers this server holds for the group (each is also one of
    /// `members`).
    pub http_consumers: Vec<MemberView>,
    /// Positions.
    pub partitions: Vec<GroupPartitionView>,
    /// Sum of lag.
    pub total_lag: u64,
}

/// All groups.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupList {
    /// Groups, sorted by id.
    pub groups: Vec<GroupView>,
}

/// Filter.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct GroupQuery {
    /// Only this group.
    pub group_id: Option<String>,
}

/// Collects every group with members and lag.
pub async fn collect(state: &AppState, only: Option<&str>) -> courier::Result<Vec<GroupView>> {
    let admin = state.client.admin();
    let http: Vec<_> = state.members.list();
    let mut out = Vec::new();
    for g in admin.list_groups().await? {
        if only.is_some_and(|o| o != g) {
            continue;
        }
        let info = match admin.describe_group(&g).await {
            Ok(i) => i,
            Err(courier::Error::GroupNotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        let members: BTreeMap<String, MemberView> = info
            .members
            .iter()
            .map(|m| {
                (
                    m.member_id.clone(),
                    MemberView {
                        member_id: m.member_id.clone(),
                        kind: "native".into(),
                        assignment: m.assignment.iter().map(|tp| tp.to_string()).collect(),
                        in_flight: None,
                        idle_ms: None,
                    },
                )
            })
            .collect();
        let mut http_consumers = Vec::new();
        for m in http.iter().filter(|m| m.group == g) {
            http_consumers.push(MemberView {
                member_id: m.id.clone(),
                kind: "http".into(),
                assignment: m.assignment().iter().map(|tp| tp.to_string()).collect(),
                in_flight: Some(m.in_flight()),
                idle_ms: Some(m.idle().as_millis() as u64),
            });
        }
        let partitions: Vec<GroupPartitionView> = info
            .offsets
            .iter()
            .map(|o| GroupPartitionView {
                topic_name: o.topic.clone(),
                partition: o.partition,
                committed_offset: o.committed,
                end_offset: o.end_offset,
                lag: o.lag,
            })
            .collect();
        out.push(GroupView {
            status: if members.is_empty() && http_consumers.is_empty() {
                "inactive"
            } else {
                "active"
            }
            .into(),
            total_lag: info.total_lag(),
            group_id: g,
            members: members.into_values().collect(),
            http_consumers,
            partitions,
        });
    }
    Ok(out)
}

/// Lists consumer groups with members, positions and lag.
#[utoipa::path(
    get, path = "/api/v1/mq/consumers", tag = "consumers", security(("bearer" = [])),
    params(GroupQuery),
    responses(
        (status = 200, description = "groups", body = Envelope<GroupList>),
        (status = 400, description = "invalid query", body = ErrorEnvelope),
        (status = 401, description = "no or bad token", body = ErrorEnvelope),
        (status = 403, description = "not an admin token", body = ErrorEnvelope),
        (status = 429, description = "rate limit", body = ErrorEnvelope),
        (status = 500, description = "backend failure", body = ErrorEnvelope),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<GroupQuery>,
) -> ApiResult<Json<Envelope<GroupList>>> {
    let groups = collect(&state, q.group_id.as_deref()).await?;
    Ok(ok("ok", GroupList { groups }))
}
