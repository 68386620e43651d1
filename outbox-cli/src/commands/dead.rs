//! `outbox dead list|show|requeue|delete`: dead letters by id, by topic, or all. Changes by
//! topic or of all dead letters need `--yes`; without it the command says what it would do
//! and exits 2, changing nothing.

use std::collections::BTreeMap;

use chrono::SecondsFormat;
use outbox::registry::OutboxStore;
use outbox::{DeadLetter, MessageId};
use serde::Serialize;

use crate::backend;
use crate::cli::{DeadCommand, DeadListArgs, DeadSelection, DeadShowArgs};
use crate::error::Failure;
use crate::output::{self, Table};
use crate::settings::Common;

/// Dead letters deleted per call when deleting by topic or all.
const DELETE_PAGE: usize = 1000;

/// `dead show` looks for the id among this many oldest dead letters (the store lists dead
/// letters oldest first and has no lookup by id).
const SHOW_SCAN: usize = 100_000;

/// Run a `dead` subcommand.
pub(crate) async fn run(common: &Common, command: DeadCommand) -> Result<(), Failure> {
    let store = backend::store(common, &common.store_options).await?;
    let store = store.as_ref();
    match command {
        DeadCommand::List(args) => list(store, &args).await,
        DeadCommand::Show(args) => show(store, &args).await,
        DeadCommand::Requeue(selection) => {
            requeue(store, &target(&selection)?, selection.yes).await
        }
        DeadCommand::Delete(selection) => delete(store, &target(&selection)?, selection.yes).await,
    }
}

/// A dead letter as `--json` shows it. The field names are part of the interface.
#[derive(Debug, Serialize)]
struct DeadJson {
    id: String,
    topic: String,
    key: String,
    partition: u32,
    attempts: u32,
    created_at: String,
    dead_at: String,
    held_back: u64,
    last_error: Option<String>,
    headers: BTreeMap<String, String>,
    payload_bytes: usize,
    /// The payload as text, when it is UTF-8 (`dead show` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    /// The payload in hex, when it is not UTF-8 (`dead show` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_hex: Option<String>,
}

impl DeadJson {
    fn of(d: &DeadLetter, with_payload: bool) -> DeadJson {
        let m = &d.message;
        let text = std::str::from_utf8(&m.payload).ok();
        DeadJson {
            id: m.id.to_string(),
            topic: m.topic.clone(),
            key: m.key.clone(),
            partition: m.partition,
            attempts: m.attempts,
            created_at: m.created_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            dead_at: d.dead_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            held_back: d.held_back,
            last_error: m.last_error.clone(),
            headers: m.headers.clone(),
            payload_bytes: m.payload.len(),
            payload: text.filter(|_| with_payload).map(str::to_string),
            payload_hex: (with_payload && text.is_none())
                .then(|| m.payload.iter().map(|b| format!("{b:02x}")).collect()),
        }
    }
}

async fn list(store: &dyn OutboxStore, args: &DeadListArgs) -> Result<(), Failure> {
    let dead = store
        .list_dead(args.topic.as_deref(), args.limit)
        .await
        .map_err(|e| Failure::call("list dead letters", &e))?;
    if args.json {
        output::json(
            &dead
                .iter()
                .map(|d| DeadJson::of(d, false))
                .collect::<Vec<_>>(),
        );
        return Ok(());
    }
    if dead.is_empty() {
        output::line("no dead letters");
        return Ok(());
    }
    let mut table = Table::new(&[
        "ID",
        "TOPIC",
        "KEY",
        "ATTEMPTS",
        "DEAD AT",
        "HELD BACK",
        "LAST ERROR",
    ]);
    for d in &dead {
        let m = &d.message;
        table.row(vec![
            m.id.to_string(),
            output::cell(&m.topic, 30),
            output::cell(&m.key, 30),
            m.attempts.to_string(),
            d.dead_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            d.held_back.to_string(),
            output::cell(m.last_error.as_deref().unwrap_or("-"), 60),
        ]);
    }
    table.print(0);
    if dead.len() == args.limit {
        output::note(&format!("(the oldest {}; --limit shows more)", args.limit));
    }
    Ok(())
}

async fn show(store: &dyn OutboxStore, args: &DeadShowArgs) -> Result<(), Failure> {
    let id = parse_id(&args.id)?;
    let dead = store
        .list_dead(None, SHOW_SCAN)
        .await
        .map_err(|e| Failure::call("list dead letters", &e))?;
    let Some(d) = dead.iter().find(|d| d.message.id == id) else {
        return Err(Failure::Failed(format!(
            "{id} is not a dead letter (among the oldest {SHOW_SCAN})"
        )));
    };
    let json = DeadJson::of(d, true);
    if args.json {
        output::json(&json);
        return Ok(());
    }
    for (name, value) in [
        ("id", json.id.clone()),
        ("topic", json.topic.clone()),
        ("key", json.key.clone()),
        ("partition", json.partition.to_string()),
        ("attempts", json.attempts.to_string()),
        ("created at", json.created_at.clone()),
        ("dead at", json.dead_at.clone()),
        ("held back", json.held_back.to_string()),
        (
            "last error",
            json.last_error.clone().unwrap_or_else(|| "-".into()),
        ),
    ] {
        output::line(&format!("{name:<11}{value}"));
    }
    for (name, value) in &json.headers {
        output::line(&format!("header     {name}: {value}"));
    }
    output::line(&format!("payload    {} bytes", json.payload_bytes));
    match (&json.payload, &json.payload_hex) {
        (Some(text), _) => output::line(text),
        (None, Some(hex)) => output::line(&format!("(not UTF-8; hex) {hex}")),
        (None, None) => {}
    }
    Ok(())
}

/// Which dead letters a change acts on.
enum Target {
    Ids(Vec<MessageId>),
    Topic(String),
    All,
}

fn target(selection: &DeadSelection) -> Result<Target, Failure> {
    if let Some(topic) = &selection.topic {
        Ok(Target::Topic(topic.clone()))
    } else if selection.all {
        Ok(Target::All)
    } else {
        selection
            .id
            .iter()
            .map(|id| parse_id(id))
            .collect::<Result<_, _>>()
            .map(Target::Ids)
    }
}

fn parse_id(text: &str) -> Result<MessageId, Failure> {
    text.trim()
        .parse()
        .map_err(|_| Failure::Usage(format!("--id {text:?} is not a message id (a UUID)")))
}

/// The dead letters of `target` by topic (all topics for [`Target::All`]), counted; refuses
/// without `yes` when there are any.
async fn confirm(
    store: &dyn OutboxStore,
    target: &Target,
    yes: bool,
    verb: &str,
) -> Result<Vec<(String, u64)>, Failure> {
    let topics: Vec<(String, u64)> = store
        .topic_stats()
        .await
        .map_err(|e| Failure::call("read the topics", &e))?
        .into_iter()
        .filter(|t| {
            t.dead > 0
                && match target {
                    Target::Topic(topic) => *topic == t.topic,
                    _ => true,
                }
        })
        .map(|t| (t.topic, t.dead))
        .collect();
    let total: u64 = topics.iter().map(|(_, n)| n).sum();
    let which = match target {
        Target::Topic(topic) => format!("of topic {topic:?}"),
        _ => "of every topic".to_string(),
    };
    if total > 0 && !yes {
        return Err(Failure::Usage(format!(
            "this would {verb} {total} dead letters {which}: add --yes to confirm"
        )));
    }
    Ok(topics)
}

async fn requeue(store: &dyn OutboxStore, target: &Target, yes: bool) -> Result<(), Failure> {
    let fail = |e: outbox::Error| Failure::call("requeue dead letters", &e);
    let n = match target {
        Target::Ids(ids) => {
            let n = store.requeue(ids).await.map_err(fail)?;
            note_missing(n, ids.len());
            n
        }
        _ => {
            let mut n = 0;
            for (topic, _) in confirm(store, target, yes, "requeue").await? {
                n += store.requeue_topic(&topic).await.map_err(fail)?;
            }
            n
        }
    };
    output::line(&format!("requeued {n} dead letters"));
    Ok(())
}

async fn delete(store: &dyn OutboxStore, target: &Target, yes: bool) -> Result<(), Failure> {
    let fail = |e: outbox::Error| Failure::call("delete dead letters", &e);
    let n = match target {
        Target::Ids(ids) => {
            let n = store.delete_dead(ids).await.map_err(fail)?;
            note_missing(n, ids.len());
            n
        }
        _ => {
            confirm(store, target, yes, "delete").await?;
            let topic = match target {
                Target::Topic(topic) => Some(topic.as_str()),
                _ => None,
            };
            let mut n = 0;
            loop {
                let page = store.list_dead(topic, DELETE_PAGE).await.map_err(fail)?;
                if page.is_empty() {
                    break;
                }
                let ids: Vec<MessageId> = page.iter().map(|d| d.message.id).collect();
                let deleted = store.delete_dead(&ids).await.map_err(fail)?;
                n += deleted;
                if deleted == 0 {
                    break;
                }
            }
            n
        }
    };
    output::line(&format!("deleted {n} dead letters"));
    Ok(())
}

fn note_missing(done: u64, asked: usize) {
    let asked = asked as u64;
    if done < asked {
        output::note(&format!(
            "{} of the {asked} ids were not dead letters (unknown, pending or published): left alone",
            asked - done
        ));
    }
}
