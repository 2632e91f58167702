//! `courier topics …` (SPEC A1, A3).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use courier::{Client, Error, TopicSpec};
use serde::Deserialize;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Create a topic.
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        #[arg(long, default_value_t = 1)]
        replication_factor: u16,
        /// Retention: milliseconds or a duration such as 7d, 12h.
        #[arg(long)]
        retention: Option<String>,
        /// Largest accepted message in bytes.
        #[arg(long)]
        max_message_size: Option<usize>,
        /// Extra setting KEY=VALUE (repeatable), e.g. cleanup.policy=compact.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
    },
    /// List topics.
    List,
    /// Show partitions, offsets and settings of a topic (JSON).
    Describe { name: String },
    /// Delete a topic and its data.
    Delete { name: String },
    /// Create every topic a file declares that is missing; report drift of the others.
    Apply { file: PathBuf },
}

/// Milliseconds from `7d`, `12h`, `30m` or a plain number of milliseconds.
pub fn parse_retention(s: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let d = humantime::parse_duration(s)
        .with_context(|| format!("retention {s:?}: expected milliseconds or e.g. 7d, 12h"))?;
    Ok(d.as_millis() as i64)
}

fn parse_kv(items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{kv:?}: expected KEY=VALUE"))
        })
        .collect()
}

/// The declarative topic file (`topics apply`): TOML or JSON, `[[topics]]` entries in
/// the seed's field names.
#[derive(Deserialize)]
struct TopicsFile {
    topics: Vec<TopicSpec>,
}

pub async fn run(client: &Client, cmd: Command) -> anyhow::Result<()> {
    let admin = client.admin();
    match cmd {
        Command::Create {
            name,
            partitions,
            replication_factor,
            retention,
            max_message_size,
            config,
        } => {
            let spec = TopicSpec {
                name: name.clone(),
                partitions,
                replication_factor,
                retention_ms: retention.as_deref().map(parse_retention).transpose()?,
                retention_bytes: None,
                max_message_size,
                config: parse_kv(&config)?,
            };
            admin.create_topic(spec).await?;
            eprintln!("created topic {name} with {partitions} partition(s)");
        }
        Command::List => {
            for t in admin.list_topics().await? {
                println!("{t}");
            }
        }
        Command::Describe { name } => {
            let info = admin.describe_topic(&name).await?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        Command::Delete { name } => {
            admin.delete_topic(&name).await?;
            eprintln!("deleted topic {name}");
        }
        Command::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let declared: TopicsFile = if text.trim_start().starts_with('{') {
                serde_json::from_str(&text)?
            } else {
                toml::from_str(&text)?
            };
            let mut drift = 0;
            for spec in declared.topics {
                let name = spec.name.clone();
                match admin.create_topic(spec.clone()).await {
                    Ok(()) => println!("created {name} ({} partitions)", spec.partitions),
                    Err(Error::TopicExists(_)) => {
                        let info = admin.describe_topic(&name).await?;
                        let have = info.partitions.len() as u32;
                        if have != spec.partitions {
                            drift += 1;
                            println!(
                                "drift {name}: partitions declared {} found {have}",
                                spec.partitions
                            );
                        } else {
                            println!("ok {name}");
                        }
                    }
                    Err(e) => return Err(e).with_context(|| format!("creating {name}")),
                }
            }
            if drift > 0 {
                bail!("{drift} topic(s) differ from the declaration");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_units() {
        assert_eq!(parse_retention("1000").unwrap(), 1000);
        assert_eq!(parse_retention("7d").unwrap(), 7 * 24 * 3600 * 1000);
        assert!(parse_retention("soon").is_err());
    }
}
