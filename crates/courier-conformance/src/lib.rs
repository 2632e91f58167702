//! The conformance suite: one set of behaviour tests, generic over a backend
//! [`Harness`], run against every driver (the model is Watermill's
//! `pubsub/tests/test_pubsub.go`).
//!
//! A backend's test file is one line:
//!
//! ```ignore
//! courier_conformance::conformance_tests!(courier_conformance::UrlHarness::memory());
//! ```
//!
//! Each test uses fresh topic and group names, so backends may share one server.
//! A test the backend cannot pass for a stated reason is skipped by
//! [`Harness::unsupported`], and the skip is printed with that reason.

pub mod capture;
pub mod harness;
pub mod restart;
mod schedule;
pub mod suite;

pub use harness::{unique, Harness, UrlHarness};

/// Expands to one `#[tokio::test]` per conformance test, each running against the
/// harness built by `$harness` (evaluated afresh for every test).
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@each $harness;
            round_trip_keeps_bytes_and_headers,
            receipts_and_batch_send,
            per_key_order_within_group,
            group_members_split_partitions,
            groups_each_get_every_message,
            redeliver_policy_brings_message_back,
            restart_resumes_after_last_commit,
            earliest_and_latest,
            reset_offsets_moves_the_group,
            concurrent_producers_lose_nothing,
            shutdown_finishes_in_flight_and_commits,
            member_leaving_hands_partitions_over,
            bad_input_gets_typed_errors,
            admin_topics_and_groups,
            retry_backs_off_then_commits_once,
            exhausted_message_is_dead_lettered_and_redriven,
            duplicate_id_is_handled_once,
            trace_context_reaches_handler_span,
            large_values_are_compressed_transparently,
            read_records_by_position,
            delayed_not_visible_early_then_on_time,
            delayed_order_follows_due_times,
            delayed_survive_restart,
            txn_commit_visible_once,
            txn_rollback_never_visible,
            txn_crash_check_back_commits,
            txn_unknown_until_limit_rolls_back
        );
    };
    (@each $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let harness = $harness;
                $crate::suite::run(stringify!($name), &harness, $crate::suite::$name).await;
            }
        )*
    };
}
