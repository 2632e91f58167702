//! The SPEC §9 contract of `courier produce` / `consume` / `topics`, run as a real
//! process against the default `file://` backend.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn courier(dir: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(args)
        .env("COURIER_URL", format!("file://{dir}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn courier");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().expect("wait")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn produce_then_consume_commits_what_it_printed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    let out = courier(
        d,
        &[
            "topics",
            "create",
            "cli.events",
            "--partitions",
            "2",
            "--retention",
            "7d",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = courier(
        d,
        &[
            "produce",
            "--topic",
            "cli.events",
            "--key-separator",
            ":",
            "--header",
            "source=cli",
        ],
        Some("u1:one\nu2:two\nu1:three\nfour\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("produced 4 messages"),
        "{}",
        text(&out.stderr)
    );

    let out = courier(
        d,
        &[
            "consume",
            "--topic",
            "cli.events",
            "--group",
            "cli.g",
            "--from",
            "earliest",
            "--max",
            "2",
            "--idle-timeout",
            "5",
            "--format",
            "json",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert_eq!(l["topic"], "cli.events");
        assert_eq!(l["headers"]["source"], "cli");
        assert!(l["partition"].is_u64() && l["offset"].is_u64() && l["timestamp"].is_i64());
    }
    // The two printed messages were committed: the group continues with the rest.
    let out = courier(
        d,
        &[
            "consume",
            "--topic",
            "cli.events",
            "--group",
            "cli.g",
            // A partition the first run never settled anything of (the keyless
            // "four" may sit alone in partition 1, unprinted) has no committed
            // position, and the default `latest` would start it at its end.
            "--from",
            "earliest",
            "--idle-timeout",
            "2",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rest = text(&out.stdout);
    let mut all: Vec<String> = lines
        .iter()
        .map(|l| l["value"].as_str().unwrap_or("").to_string())
        .collect();
    all.extend(rest.lines().map(String::from));
    all.sort();
    assert_eq!(all, vec!["four", "one", "three", "two"]);

    let out = courier(d, &["topics", "list"], None);
    assert_eq!(text(&out.stdout).trim(), "cli.events");
    let out = courier(d, &["topics", "describe", "cli.events"], None);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("describe json");
    assert_eq!(info["partitions"].as_array().map(|a| a.len()), Some(2));
    let out = courier(d, &["groups", "describe", "cli.g"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let g: serde_json::Value = serde_json::from_slice(&out.stdout).expect("group json");
    let lag: u64 = g["offsets"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| o["lag"].as_u64().unwrap_or(99))
        .sum();
    assert_eq!(lag, 0);
    let out = courier(d, &["topics", "delete", "cli.events"], None);
    assert!(out.status.success());
}

#[test]
fn bad_input_fails_clearly_with_nonzero_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    let out = courier(d, &["produce", "--topic", ""], Some("x\n"));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("topic must not be empty"),
        "{}",
        text(&out.stderr)
    );

    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["--url", "bogus://x", "topics", "list"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("unsupported backend"),
        "{}",
        text(&out.stderr)
    );

    let out = courier(d, &["topics", "describe", "missing"], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn apply_creates_missing_topics_and_reports_drift() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    let file = dir.path().join("topics.toml");
    std::fs::write(
        &file,
        "[[topics]]\nname = \"im-upstream-topic\"\npartitions = 10\n\n[[topics]]\nname = \"im-task-topic\"\npartitions = 5\nretentionMs = 86400000\n",
    )
    .expect("write");
    let f = file.to_str().expect("utf8");
    let out = courier(d, &["topics", "apply", f], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("created im-upstream-topic"));
    let out = courier(d, &["topics", "apply", f], None);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("ok im-task-topic"));
    std::fs::write(
        &file,
        "[[topics]]\nname = \"im-task-topic\"\npartitions = 6\n",
    )
    .expect("write");
    let out = courier(d, &["topics", "apply", f], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("drift im-task-topic"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn dlq_list_and_redrive_bring_letters_back_to_their_topic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    for t in ["orders", "orders.dlq"] {
        let out = courier(d, &["topics", "create", t, "--partitions", "1"], None);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    // A letter is a message in the dead-letter topic carrying the R3 headers; write
    // two the way the dead-letter layer would.
    let mut args = vec!["produce", "--topic", "orders.dlq"];
    for h in [
        "x-original-topic=orders",
        "x-original-partition=0",
        "x-original-offset=7",
        "x-consumer-group=billing",
        "x-error-message=card declined",
        "x-retry-count=3",
        "x-failed-at=1700000000000",
    ] {
        args.extend(["--header", h]);
    }
    let out = courier(d, &args, Some("first\nsecond\n"));
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = courier(d, &["dlq", "list", "orders.dlq", "--format", "json"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let letters: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(letters.len(), 2, "{}", text(&out.stdout));
    assert_eq!(letters[0]["originalTopic"], "orders");
    assert_eq!(letters[0]["originalOffset"], 7);
    assert_eq!(letters[0]["group"], "billing");
    assert_eq!(letters[0]["retryCount"], 3);
    assert_eq!(letters[0]["error"], "card declined");
    assert_eq!(letters[0]["value"], "first");

    let filtered = courier(d, &["dlq", "list", "orders.dlq", "--group", "other"], None);
    assert!(filtered.status.success(), "{}", text(&filtered.stderr));
    assert_eq!(text(&filtered.stdout), "");

    // Re-driving needs an explicit selection.
    let out = courier(d, &["dlq", "redrive", "orders.dlq"], None);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--all"), "{}", text(&out.stderr));

    let first_id = letters[0]["id"].as_str().expect("id").to_string();
    // Each selection re-drives exactly the one letter still listed.
    for selection in [&["--id", first_id.as_str()][..], &["--all", "--rate", "0"]] {
        let mut args = vec!["dlq", "redrive", "orders.dlq"];
        args.extend_from_slice(selection);
        let out = courier(d, &args, None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("re-drove 1"),
            "{}",
            text(&out.stderr)
        );
    }

    let out = courier(d, &["dlq", "list", "orders.dlq"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "",
        "re-driven letters are not listed again"
    );

    let out = courier(
        d,
        &[
            "consume",
            "--topic",
            "orders",
            "--group",
            "g",
            "--from",
            "earliest",
            "--max",
            "2",
            "--idle-timeout",
            "10",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "first\nsecond\n");
}
