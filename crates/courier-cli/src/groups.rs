//! `courier groups …` (SPEC A2).

use anyhow::bail;
use courier::{Client, ResetTo};

#[derive(clap::Subcommand)]
pub enum Command {
    /// List consumer groups.
    List,
    /// Members, committed offsets and lag of a group (JSON).
    Describe { group: String },
    /// Move a group's position on a topic (the group must be stopped).
    Reset {
        group: String,
        #[arg(long)]
        topic: String,
        /// earliest | latest | offset:N | a timestamp in ms since the epoch
        #[arg(long)]
        to: String,
    },
}

fn parse_to(s: &str) -> anyhow::Result<ResetTo> {
    Ok(match s {
        "earliest" => ResetTo::Earliest,
        "latest" => ResetTo::Latest,
        _ => match s.strip_prefix("offset:") {
            Some(n) => ResetTo::Offset(n.parse()?),
            None => match s.parse::<i64>() {
                Ok(ts) => ResetTo::Timestamp(ts),
                Err(_) => {
                    bail!("--to {s:?}: expected earliest, latest, offset:N or a timestamp (ms)")
                }
            },
        },
    })
}

pub async fn run(client: &Client, cmd: Command) -> anyhow::Result<()> {
    let admin = client.admin();
    match cmd {
        Command::List => {
            for g in admin.list_groups().await? {
                println!("{g}");
            }
        }
        Command::Describe { group } => {
            let info = admin.describe_group(&group).await?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        Command::Reset { group, topic, to } => {
            admin.reset_offsets(&group, &topic, parse_to(&to)?).await?;
            eprintln!("reset {group} on {topic} to {to}");
        }
    }
    Ok(())
}
