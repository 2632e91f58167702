//! `courier dlq …` (SPEC §9, R3): list a dead-letter topic and re-drive its letters
//! to their original topics.

use anyhow::bail;
use courier::{Client, DeadLetter, LetterFilter, Selection};
use serde_json::json;

use crate::consume::{bytes_json, headers_json};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// One line per letter: id, original topic/partition/offset, group, retries, error.
    Table,
    /// One JSON object per line, with key, value and headers.
    Json,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Letters of a dead-letter topic (e.g. `orders.dlq`) not re-driven yet.
    List {
        dlq_topic: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Publish letters back to their original topics and mark them re-driven.
    /// Needs `--all`, `--id` or a filter, so nothing is re-driven by accident.
    Redrive {
        dlq_topic: String,
        /// Every letter of the topic.
        #[arg(long, conflicts_with_all = ["id", "original_topic", "group", "error_contains"])]
        all: bool,
        /// A letter id, as `list` prints it (repeatable).
        #[arg(long)]
        id: Vec<String>,
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many letters per second (0 = no limit).
        #[arg(long, default_value_t = 100)]
        rate: u32,
    },
}

/// Fields a letter must match (all given ones).
#[derive(clap::Args)]
pub struct FilterArgs {
    /// Only letters from this original topic.
    #[arg(long)]
    original_topic: Option<String>,
    /// Only letters given up by this consumer group.
    #[arg(long)]
    group: Option<String>,
    /// Only letters whose error message contains this text.
    #[arg(long)]
    error_contains: Option<String>,
}

impl FilterArgs {
    fn into_filter(self) -> LetterFilter {
        LetterFilter {
            original_topic: self.original_topic,
            group: self.group,
            error_contains: self.error_contains,
        }
    }
}

fn render(l: &DeadLetter, format: Format) -> String {
    match format {
        Format::Table => format!(
            "{}\t{}[{}]@{}\tgroup={}\tretries={}\terror={}",
            l.id,
            l.original_topic,
            l.original_partition
                .map_or_else(|| "?".to_string(), |p| p.to_string()),
            l.original_offset
                .map_or_else(|| "?".to_string(), |o| o.to_string()),
            l.group,
            l.retry_count,
            l.error.replace(['\n', '\t'], " "),
        ),
        Format::Json => json!({
                "id": l.id,
                "dlqTopic": l.dlq_topic,
                "dlqPartition": l.dlq_partition,
                "dlqOffset": l.dlq_offset,
                "originalTopic": l.original_topic,
                "originalPartition": l.original_partition,
                "originalOffset": l.original_offset,
                "originalId": l.original_id,
                "group": l.group,
                "retryCount": l.retry_count,
                "failedAt": l.failed_at,
                "error": l.error,
                "key": l.key.as_ref().map(bytes_json),
                "headers": headers_json(&l.headers),
                "value": bytes_json(&l.value),
        })
        .to_string(),
    }
}

pub async fn run(client: &Client, cmd: Command) -> anyhow::Result<()> {
    let letters = client.dead_letters();
    match cmd {
        Command::List {
            dlq_topic,
            format,
            filter,
        } => {
            let filter = filter.into_filter();
            let listed = letters.list(&dlq_topic).await?;
            let mut shown = 0usize;
            for l in listed.iter().filter(|l| filter.matches(l)) {
                println!("{}", render(l, format));
                shown += 1;
            }
            eprintln!("{shown} dead letter(s) in {dlq_topic}");
        }
        Command::Redrive {
            dlq_topic,
            all,
            id,
            filter,
            rate,
        } => {
            let filter = filter.into_filter();
            let selection = if all {
                Selection::All
            } else if !id.is_empty() {
                if filter != LetterFilter::default() {
                    bail!("--id and filters can't be combined: pick letters one way");
                }
                Selection::Ids(id)
            } else if filter != LetterFilter::default() {
                Selection::Matching(filter)
            } else {
                bail!("say which letters: --all, --id ID or a filter (--original-topic, --group, --error-contains)");
            };
            let report = letters.redrive(&dlq_topic, &selection, rate).await?;
            for (id, err) in &report.failed {
                eprintln!("failed {id}: {err}");
            }
            eprintln!(
                "re-drove {} letter(s), {} failed",
                report.redriven.len(),
                report.failed.len()
            );
            if !report.failed.is_empty() {
                bail!("{} letter(s) could not be re-driven", report.failed.len());
            }
        }
    }
    Ok(())
}
