//! Records what happened to messages (commits, rollbacks, claims, publishes, deliveries,
//! failures, dead letters, effects) and checks the guarantees on the record. A failure names
//! the guarantee, names the kind of violation ([`ViolationKind`]) where the checker knows it,
//! and prints the short history of the offending messages.
//!
//! Every event is stamped with the instant it was recorded, so the checker can tell a message
//! published before it was due (delayed, or backing off after a failure) from one published
//! out of order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::Hasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use outbox_core::{DeadLetter, Headers, Message, MessageId, NewMessage, Received};

/// How much earlier than its due time a claim or publish may be stamped before the checker
/// calls it early: room for stores that round timestamps to the millisecond. A store whose
/// clock runs ahead of the test process's by more than this shows delayed messages as early.
pub const DUE_SLACK: Duration = Duration::from_millis(5);

/// The guarantees the suites prove.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Guarantee {
    /// G1 no loss: every committed message is published (delivered) at least once, as it was
    /// committed.
    NoLoss,
    /// G2 no phantom: a rolled-back message is never published; nothing is visible before commit.
    NoPhantom,
    /// G3 effectively once: with the inbox, each message's effect is applied exactly once.
    EffectivelyOnce,
    /// G4 per-key order: for one key, first deliveries arrive in commit order.
    PerKeyOrder,
    /// G5 no needless duplicates: without faults, each message is published once.
    NoNeedlessDuplicates,
    /// G6 poison isolation: a failing message is retried with stored backoff, then
    /// dead-lettered, without blocking other keys.
    PoisonIsolation,
    /// G7 liveness: the backlog drains after faults heal; wake-ups are prompt.
    Liveness,
    /// A rule of the store/broker API itself (leases, fencing, validation, stats, delayed
    /// delivery).
    Contract,
}

impl Guarantee {
    /// The short code, `G1`..`G7`, or `contract`.
    pub fn code(self) -> &'static str {
        match self {
            Guarantee::NoLoss => "G1",
            Guarantee::NoPhantom => "G2",
            Guarantee::EffectivelyOnce => "G3",
            Guarantee::PerKeyOrder => "G4",
            Guarantee::NoNeedlessDuplicates => "G5",
            Guarantee::PoisonIsolation => "G6",
            Guarantee::Liveness => "G7",
            Guarantee::Contract => "contract",
        }
    }

    /// The plain-words name.
    pub fn name(self) -> &'static str {
        match self {
            Guarantee::NoLoss => "no loss",
            Guarantee::NoPhantom => "no phantom",
            Guarantee::EffectivelyOnce => "effectively once",
            Guarantee::PerKeyOrder => "per-key order",
            Guarantee::NoNeedlessDuplicates => "no needless duplicates",
            Guarantee::PoisonIsolation => "poison isolation",
            Guarantee::Liveness => "liveness",
            Guarantee::Contract => "store/broker contract",
        }
    }
}

impl fmt::Display for Guarantee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.name())
    }
}

/// The kind of a violation, where it has a name of its own beyond the guarantee it breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ViolationKind {
    /// A committed message was never delivered, and is neither a dead letter nor deleted by
    /// an operator (G1), whatever step lost it (publish, purge, dead-lettering, requeue).
    Lost,
    /// A message was published or delivered with a payload, headers or key other than those
    /// committed (G1: the committed message is not the one that arrived).
    ContentChanged,
    /// A message was published or delivered without a committed transaction (G2).
    Phantom,
    /// A message was claimed or published before it was due: a delayed message before its
    /// `available_at` (reported under the store contract), or a failed one before its retry
    /// delay ran out (reported under G6, whose retries are spaced by stored backoff).
    Early,
    /// A message the relay dead-lettered (after a permanent error or its last attempt) came
    /// back, or a message kept failing past the relay's `max_attempts` without being
    /// dead-lettered (G6).
    NotDeadLettered,
    /// A message's effect was applied more than once (G3).
    AppliedTwice,
    /// A delivered message's effect was never applied (G3).
    EffectMissing,
    /// First deliveries of one key arrived out of commit order (G4).
    OutOfOrder,
    /// A message was published or delivered more than once without any fault (G5).
    Duplicated,
}

impl ViolationKind {
    /// The plain-words name.
    pub fn name(self) -> &'static str {
        match self {
            ViolationKind::Lost => "lost message",
            ViolationKind::ContentChanged => "content changed",
            ViolationKind::Phantom => "phantom message",
            ViolationKind::Early => "early delivery",
            ViolationKind::NotDeadLettered => "not dead-lettered",
            ViolationKind::AppliedTwice => "effect applied twice",
            ViolationKind::EffectMissing => "effect missing",
            ViolationKind::OutOfOrder => "out of order",
            ViolationKind::Duplicated => "needless duplicate",
        }
    }
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A broken guarantee, with what was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which guarantee.
    pub guarantee: Guarantee,
    /// The kind of violation, where it has a name of its own.
    pub kind: Option<ViolationKind>,
    /// What went wrong, with the history of the messages involved.
    pub detail: String,
}

impl Violation {
    /// A violation of `guarantee`.
    pub fn new(guarantee: Guarantee, detail: impl Into<String>) -> Self {
        Violation {
            guarantee,
            kind: None,
            detail: detail.into(),
        }
    }

    /// A violation of `guarantee` of a named `kind`.
    pub fn named(guarantee: Guarantee, kind: ViolationKind, detail: impl Into<String>) -> Self {
        Violation {
            guarantee,
            kind: Some(kind),
            detail: detail.into(),
        }
    }

    /// Whether this violation is of `guarantee` and `kind`.
    pub fn is(&self, guarantee: Guarantee, kind: ViolationKind) -> bool {
        self.guarantee == guarantee && self.kind == Some(kind)
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Some(kind) => write!(f, "violated {} ({kind}): {}", self.guarantee, self.detail),
            None => write!(f, "violated {}: {}", self.guarantee, self.detail),
        }
    }
}

impl std::error::Error for Violation {}

/// What a message carries, as the checker compares it: the payload's length, fingerprint and
/// first bytes, and the headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    /// Payload length in bytes.
    pub len: usize,
    /// A 64-bit fingerprint of the payload bytes.
    pub fingerprint: u64,
    /// The first bytes of the payload, escaped, for reports.
    pub head: String,
    /// The headers.
    pub headers: Headers,
}

impl Content {
    /// The content of a payload with headers.
    pub fn new(payload: &[u8], headers: &Headers) -> Self {
        let mut hasher = std::hash::DefaultHasher::new();
        hasher.write(payload);
        let head = payload.iter().take(24).copied().collect::<Vec<u8>>();
        Content {
            len: payload.len(),
            fingerprint: hasher.finish(),
            head: format!(
                "{}{}",
                head.escape_ascii(),
                if payload.len() > 24 { "…" } else { "" }
            ),
            headers: headers.clone(),
        }
    }

    /// The content of a message to enqueue.
    pub fn of_new(message: &NewMessage) -> Self {
        Self::new(&message.payload, &message.headers)
    }

    /// The content of a stored (claimed, published) message.
    pub fn of_message(message: &Message) -> Self {
        Self::new(&message.payload, &message.headers)
    }

    /// The content of a received message.
    pub fn of_received(received: &Received) -> Self {
        Self::new(&received.payload, &received.headers)
    }

    /// How `arrived` differs from this (committed) content, in words; `None` if it carries
    /// the same payload and every header unchanged. Headers a broker adds are not a change.
    pub fn changes(&self, arrived: &Content) -> Option<String> {
        let mut changes = Vec::new();
        if self.len != arrived.len || self.fingerprint != arrived.fingerprint {
            changes.push(format!(
                "payload {} bytes \"{}\" arrived as {} bytes \"{}\"",
                self.len, self.head, arrived.len, arrived.head
            ));
        }
        for (name, value) in &self.headers {
            match arrived.headers.get(name) {
                None => changes.push(format!("header {name:?} ({value:?}) missing")),
                Some(v) if v != value => {
                    changes.push(format!("header {name:?} {value:?} arrived as {v:?}"))
                }
                Some(_) => {}
            }
        }
        (!changes.is_empty()).then(|| changes.join("; "))
    }
}

impl fmt::Display for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes \"{}\", {} header(s)",
            self.len,
            self.head,
            self.headers.len()
        )
    }
}

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The transaction that enqueued the message committed.
    Committed {
        /// Message id.
        id: MessageId,
        /// Its key.
        key: String,
        /// What it carries, if known.
        content: Option<Content>,
        /// Not to be published before this (delayed delivery), if set.
        available_at: Option<DateTime<Utc>>,
    },
    /// The transaction that enqueued the message rolled back (or never committed).
    RolledBack {
        /// Message id.
        id: MessageId,
        /// Its key.
        key: String,
    },
    /// A store's claim handed the message to a relay.
    Claimed {
        /// Message id.
        id: MessageId,
        /// The failed attempts the store reported with it.
        attempts: u32,
    },
    /// The broker confirmed a publish of the message.
    Published {
        /// Message id.
        id: MessageId,
        /// What was published, if known.
        content: Option<Content>,
    },
    /// A consumer received the message.
    Delivered {
        /// Message id.
        id: MessageId,
        /// Its key, as received.
        key: String,
        /// What arrived, if known.
        content: Option<Content>,
    },
    /// The store accepted an ack of the message (marked it published).
    Acked {
        /// Message id.
        id: MessageId,
    },
    /// The store accepted a failed attempt of the message.
    Failed {
        /// Message id.
        id: MessageId,
        /// The error recorded.
        error: String,
        /// The retry delay the relay asked for; `None` dead-letters the message.
        retry_after: Option<Duration>,
    },
    /// An operator requeued the dead letter (the store said it did).
    Requeued {
        /// Message id.
        id: MessageId,
    },
    /// An operator deleted the dead letter (the store said it did).
    DeletedDead {
        /// Message id.
        id: MessageId,
    },
    /// The store listed these dead letters (id, attempts): every dead letter it has.
    DeadLettersListed {
        /// The listed messages with their attempts.
        listed: Vec<(MessageId, u32)>,
    },
    /// A fault was injected around this message.
    Fault {
        /// Message id, if the fault concerned one.
        id: Option<MessageId>,
        /// What was injected.
        what: String,
    },
}

impl Event {
    fn id(&self) -> Option<MessageId> {
        match self {
            Event::Committed { id, .. }
            | Event::RolledBack { id, .. }
            | Event::Claimed { id, .. }
            | Event::Published { id, .. }
            | Event::Delivered { id, .. }
            | Event::Acked { id }
            | Event::Failed { id, .. }
            | Event::Requeued { id }
            | Event::DeletedDead { id } => Some(*id),
            Event::Fault { id, .. } => *id,
            Event::DeadLettersListed { .. } => None,
        }
    }

    /// The line for `id` in a message's story, if this event concerns it.
    fn line_for(&self, id: MessageId) -> Option<String> {
        match self {
            Event::DeadLettersListed { listed } => listed
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, attempts)| format!("listed as a dead letter (attempts {attempts})")),
            e if e.id() == Some(id) => Some(e.to_string()),
            _ => None,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Committed {
                key,
                content,
                available_at,
                ..
            } => {
                write!(f, "committed (key {key:?}")?;
                if let Some(c) = content {
                    write!(f, ", {c}")?;
                }
                if let Some(at) = available_at {
                    write!(f, ", available at {}", at.format("%H:%M:%S%.3f"))?;
                }
                write!(f, ")")
            }
            Event::RolledBack { key, .. } => write!(f, "rolled back (key {key:?})"),
            Event::Claimed { attempts, .. } => write!(f, "claimed (attempts {attempts})"),
            Event::Published { content, .. } => match content {
                Some(c) => write!(f, "published ({c})"),
                None => write!(f, "published"),
            },
            Event::Delivered { key, content, .. } => match content {
                Some(c) => write!(f, "delivered (key {key:?}, {c})"),
                None => write!(f, "delivered (key {key:?})"),
            },
            Event::Acked { .. } => write!(f, "acked"),
            Event::Failed {
                error, retry_after, ..
            } => match retry_after {
                Some(d) => write!(f, "failed ({error}); retry in {d:?}"),
                None => write!(f, "failed ({error}); dead-lettered"),
            },
            Event::Requeued { .. } => write!(f, "requeued by an operator"),
            Event::DeletedDead { .. } => write!(f, "dead letter deleted by an operator"),
            Event::DeadLettersListed { listed } => {
                write!(f, "{} dead letter(s) listed", listed.len())
            }
            Event::Fault { what, .. } => write!(f, "fault: {what}"),
        }
    }
}

/// How strict the check is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// Faults were injected: duplicates are allowed (G5 is not checked).
    pub faults: bool,
    /// Deliveries came from one ordered consumer: check per-key order (G4).
    pub ordered: bool,
    /// Check deliveries (G1 against deliveries, not only publishes).
    pub deliveries: bool,
    /// The relay's `max_attempts`, if known: a message that failed more often without being
    /// dead-lettered is a G6 violation.
    pub max_attempts: Option<u32>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            faults: false,
            ordered: true,
            deliveries: true,
            max_attempts: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Stamped {
    at: Instant,
    utc: DateTime<Utc>,
    event: Event,
}

/// A thread-safe event log. Each event is stamped with the instant it was recorded.
#[derive(Debug)]
pub struct History {
    events: Mutex<Vec<Stamped>>,
    start: Instant,
}

impl Default for History {
    fn default() -> Self {
        History {
            events: Mutex::new(Vec::new()),
            start: Instant::now(),
        }
    }
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Stamped>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record an event, stamped now.
    pub fn record(&self, event: Event) {
        let (at, utc) = (Instant::now(), Utc::now());
        self.lock().push(Stamped { at, utc, event });
    }

    /// Record an event that took effect no earlier than `at` (the start of the call that
    /// caused it), stamped `at`.
    pub fn record_at(&self, at: Instant, event: Event) {
        let now = Instant::now();
        let utc = Utc::now() - chrono::TimeDelta::from_std(now - at).unwrap_or_default();
        self.lock().push(Stamped { at, utc, event });
    }

    /// Record that a transaction with these messages committed (without their content).
    pub fn committed(&self, messages: impl IntoIterator<Item = (MessageId, String)>) {
        let (at, utc) = (Instant::now(), Utc::now());
        self.lock()
            .extend(messages.into_iter().map(|(id, key)| Stamped {
                at,
                utc,
                event: Event::Committed {
                    id,
                    key,
                    content: None,
                    available_at: None,
                },
            }));
    }

    /// Record that a transaction with `messages`, enqueued as `ids`, committed: key, content
    /// and delay of each.
    pub fn committed_messages(&self, ids: &[MessageId], messages: &[NewMessage]) {
        let (at, utc) = (Instant::now(), Utc::now());
        self.lock()
            .extend(ids.iter().zip(messages).map(|(id, m)| Stamped {
                at,
                utc,
                event: Event::Committed {
                    id: *id,
                    key: m.key.clone(),
                    content: Some(Content::of_new(m)),
                    available_at: m.available_at,
                },
            }));
    }

    /// Record that a transaction with these messages rolled back.
    pub fn rolled_back(&self, messages: impl IntoIterator<Item = (MessageId, String)>) {
        let (at, utc) = (Instant::now(), Utc::now());
        self.lock()
            .extend(messages.into_iter().map(|(id, key)| Stamped {
                at,
                utc,
                event: Event::RolledBack { id, key },
            }));
    }

    /// Record a received message as delivered, with what arrived.
    pub fn delivered(&self, received: &Received) {
        self.record(Event::Delivered {
            id: received.id,
            key: received.key.clone(),
            content: Some(Content::of_received(received)),
        });
    }

    /// Record a listing of every dead letter the store has.
    pub fn dead_letters_listed(&self, dead: &[DeadLetter]) {
        self.record(Event::DeadLettersListed {
            listed: dead
                .iter()
                .map(|d| (d.message.id, d.message.attempts))
                .collect(),
        });
    }

    /// A copy of the events so far.
    pub fn events(&self) -> Vec<Event> {
        self.lock().iter().map(|s| s.event.clone()).collect()
    }

    /// Ids whose transaction committed.
    pub fn committed_ids(&self) -> HashSet<MessageId> {
        self.lock()
            .iter()
            .filter_map(|s| match &s.event {
                Event::Committed { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// Ids delivered at least once.
    pub fn delivered_ids(&self) -> HashSet<MessageId> {
        self.lock()
            .iter()
            .filter_map(|s| match &s.event {
                Event::Delivered { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// Ids whose first accepted ack (see [`FaultyStore::with_history`](crate::FaultyStore::with_history))
    /// was asked for at or after `since`: the store marked them published no earlier.
    pub fn first_acked_since(&self, since: Instant) -> HashSet<MessageId> {
        let mut first: HashMap<MessageId, Instant> = HashMap::new();
        for s in self.lock().iter() {
            if let Event::Acked { id } = &s.event {
                first.entry(*id).or_insert(s.at);
            }
        }
        first
            .into_iter()
            .filter(|(_, at)| *at >= since)
            .map(|(id, _)| id)
            .collect()
    }

    /// How many deliveries were duplicates (deliveries beyond the first of each id).
    pub fn duplicate_deliveries(&self) -> usize {
        let mut seen = HashSet::new();
        self.lock()
            .iter()
            .filter(|s| matches!(&s.event, Event::Delivered { id, .. } if !seen.insert(*id)))
            .count()
    }

    /// The events about `id`, one per line, for violation reports.
    pub fn story(&self, id: MessageId) -> String {
        story_of(&self.lock(), self.start, id)
    }

    /// Check G1–G6 on the record (G3 when `effects` is given: the committed effect rows of
    /// the consumer; G6 from the failures and claims a [`FaultyStore`](crate::FaultyStore)
    /// with this history recorded). Returns every violation found, the most basic first (a
    /// lost or changed message before an order or duplicate problem), each with the history
    /// of up to three offending messages.
    pub fn check(
        &self,
        options: CheckOptions,
        effects: Option<&[MessageId]>,
    ) -> Result<(), Vec<Violation>> {
        let events = self.lock();
        let violations = Analysis::run(&events, options)
            .violations(&events, self.start, options, effects, false);
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }

    /// Check only what can be judged while relays and writers are still running: changed
    /// content, early claims and publishes, and G6 (a dead-lettered message that came back,
    /// or one failing past `max_attempts` without being dead-lettered). For polling during a
    /// drain, so that a store that never dead-letters is named at once, not after a liveness
    /// timeout.
    pub fn check_so_far(&self, max_attempts: Option<u32>) -> Result<(), Violation> {
        let events = self.lock();
        let options = CheckOptions {
            faults: true,
            ordered: false,
            deliveries: false,
            max_attempts,
        };
        let mut violations =
            Analysis::run(&events, options).violations(&events, self.start, options, None, true);
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations.remove(0))
        }
    }
}

/// What the checker tracks per message.
#[derive(Default)]
struct Track<'a> {
    key: Option<&'a str>,
    content: Option<&'a Content>,
    commit_pos: Option<usize>,
    rolled_back: bool,
    /// `available_at` as an instant of the test process.
    due: Option<Instant>,
    /// The end of the last retry delay.
    retry_at: Option<(Instant, Duration)>,
    published: usize,
    delivered: usize,
    claimed: bool,
    /// Attempts the store reported in claims since the last requeue.
    claim_attempts: Vec<u32>,
    /// Failures recorded since the last requeue.
    failures: u32,
    /// Index of the dead-lettering failure since the last requeue.
    dead_at: Option<usize>,
    ever_dead: bool,
    requeued_at: Option<usize>,
    deleted: bool,
    /// Index of the last listing that showed it dead.
    listed_at: Option<usize>,
}

/// Offending messages of one violation, each with a note on what was seen.
#[derive(Default)]
struct Offenders {
    ids: Vec<MessageId>,
    notes: HashMap<MessageId, String>,
}

impl Offenders {
    fn add(&mut self, id: MessageId, note: impl FnOnce() -> String) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.notes.entry(id) {
            e.insert(note());
            self.ids.push(id);
        }
    }
}

#[derive(Default)]
struct Analysis<'a> {
    tracks: HashMap<MessageId, Track<'a>>,
    lost: Offenders,
    changed: Offenders,
    early_delayed: Offenders,
    early_retry: Offenders,
    not_dead: Offenders,
    first_deliveries: Vec<(MessageId, &'a str)>,
    last_listing: Option<usize>,
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

impl<'a> Analysis<'a> {
    fn run(events: &'a [Stamped], options: CheckOptions) -> Analysis<'a> {
        let mut a = Analysis::default();
        // First what was committed or rolled back, so that a claim, publish or delivery
        // recorded (by another task) before its commit is still compared with it.
        let mut commits = 0;
        for s in events {
            match &s.event {
                Event::Committed {
                    id,
                    key,
                    content,
                    available_at,
                } => {
                    let t = a.tracks.entry(*id).or_default();
                    t.key = Some(key);
                    t.content = content.as_ref();
                    t.commit_pos = Some(commits);
                    commits += 1;
                    t.due = available_at.and_then(|at| {
                        (at - s.utc)
                            .to_std()
                            .ok()
                            .map(|ahead| s.at + ahead)
                            .filter(|due| *due > s.at)
                    });
                }
                Event::RolledBack { id, key } => {
                    let t = a.tracks.entry(*id).or_default();
                    t.rolled_back = true;
                    t.key.get_or_insert(key);
                }
                _ => {}
            }
        }
        for (i, s) in events.iter().enumerate() {
            match &s.event {
                Event::Committed { .. } | Event::RolledBack { .. } => {}
                Event::Claimed { id, attempts } => {
                    a.early(*id, s.at, "claimed", true);
                    let t = a.tracks.entry(*id).or_default();
                    t.claimed = true;
                    t.claim_attempts.push(*attempts);
                    if let Some(dead) = t.dead_at {
                        let failures = t.failures;
                        a.not_dead.add(*id, || {
                            format!(
                                "dead-lettered at event #{dead} after {failures} failure(s), then \
                                 claimed again (the store reported attempts {attempts})"
                            )
                        });
                    }
                }
                Event::Published { id, content } => {
                    a.early(*id, s.at, "published", true);
                    let t = a.tracks.entry(*id).or_default();
                    t.published += 1;
                    if let (Some(sent), Some(got)) = (t.content, content)
                        && let Some(change) = sent.changes(got)
                    {
                        a.changed
                            .add(*id, || format!("published changed: {change}"));
                    }
                }
                Event::Delivered { id, key, content } => {
                    a.early(*id, s.at, "delivered", false);
                    let t = a.tracks.entry(*id).or_default();
                    t.delivered += 1;
                    if t.delivered == 1 {
                        a.first_deliveries.push((*id, key));
                    }
                    let mut changes = Vec::new();
                    if let Some(k) = t.key
                        && t.commit_pos.is_some()
                        && k != key
                    {
                        changes.push(format!("key {k:?} arrived as {key:?}"));
                    }
                    if let (Some(sent), Some(got)) = (t.content, content)
                        && let Some(change) = sent.changes(got)
                    {
                        changes.push(change);
                    }
                    if !changes.is_empty() {
                        a.changed
                            .add(*id, || format!("delivered changed: {}", changes.join("; ")));
                    }
                }
                Event::Acked { .. } | Event::Fault { .. } => {}
                Event::Failed {
                    id, retry_after, ..
                } => {
                    let t = a.tracks.entry(*id).or_default();
                    t.failures += 1;
                    match retry_after {
                        None => {
                            t.dead_at.get_or_insert(i);
                            t.ever_dead = true;
                            t.retry_at = None;
                        }
                        Some(d) => {
                            t.retry_at = Some((s.at + *d, *d));
                            if let Some(max) = options.max_attempts
                                && t.failures > max
                                && t.dead_at.is_none()
                            {
                                let (n, seen) = (t.failures, t.claim_attempts.clone());
                                a.not_dead.add(*id, || {
                                    format!(
                                        "failed {n} times, more than max_attempts {max}, and is \
                                         still retried; the claims that handed it out reported \
                                         attempts {seen:?}"
                                    )
                                });
                            }
                        }
                    }
                }
                Event::Requeued { id } => {
                    let t = a.tracks.entry(*id).or_default();
                    t.failures = 0;
                    t.dead_at = None;
                    t.retry_at = None;
                    t.claim_attempts.clear();
                    t.requeued_at = Some(i);
                }
                Event::DeletedDead { id } => a.tracks.entry(*id).or_default().deleted = true,
                Event::DeadLettersListed { listed } => {
                    a.last_listing = Some(i);
                    for (id, _) in listed {
                        a.tracks.entry(*id).or_default().listed_at = Some(i);
                    }
                }
            }
        }
        a.find_lost(options);
        a
    }

    /// Note `id` as early if `at` is before its due time (and, for claims and publishes,
    /// before the end of its retry delay).
    fn early(&mut self, id: MessageId, at: Instant, what: &str, retries: bool) {
        let Some(t) = self.tracks.get(&id) else {
            return;
        };
        if let Some(due) = t.due
            && at + DUE_SLACK < due
        {
            let by = due - at;
            self.early_delayed
                .add(id, || format!("{what} {} before its available_at", ms(by)));
        }
        if retries
            && let Some((end, delay)) = t.retry_at
            && at + DUE_SLACK < end
        {
            let by = end - at;
            self.early_retry.add(id, || {
                format!(
                    "{what} {} before its retry delay of {} had passed",
                    ms(by),
                    ms(delay)
                )
            });
        }
    }

    fn find_lost(&mut self, options: CheckOptions) {
        let last_listing = self.last_listing;
        let mut ids: Vec<(usize, MessageId)> = self
            .tracks
            .iter()
            .filter_map(|(id, t)| t.commit_pos.map(|p| (p, *id)))
            .collect();
        ids.sort_unstable();
        for (_, id) in ids {
            let t = &self.tracks[&id];
            let arrived = if options.deliveries {
                t.delivered > 0
            } else {
                t.published > 0 || t.delivered > 0
            };
            if arrived || t.deleted {
                continue;
            }
            let listed_after = |i: usize| t.listed_at.is_some_and(|l| l > i);
            let note = match (t.dead_at, t.requeued_at) {
                (Some(dead), _) => match last_listing {
                    Some(l) if l > dead && !listed_after(dead) => Some(format!(
                        "dead-lettered at event #{dead}, then gone: not among the dead letters \
                         listed at event #{l}, and never delivered"
                    )),
                    _ => None,
                },
                (None, Some(requeued)) if listed_after(requeued) => Some(format!(
                    "requeued at event #{requeued} (the store said so), yet still listed as a \
                     dead letter at event #{}, and never delivered",
                    t.listed_at.unwrap_or_default()
                )),
                _ => Some("committed, never delivered".to_string()),
            };
            if let Some(note) = note {
                self.lost.add(id, || note);
            }
        }
    }

    fn violations(
        &self,
        events: &[Stamped],
        start: Instant,
        options: CheckOptions,
        effects: Option<&[MessageId]>,
        so_far: bool,
    ) -> Vec<Violation> {
        let report = |g: Guarantee, kind: ViolationKind, what: &str, o: &Offenders| {
            let mut detail = format!("{what} ({} message(s))", o.ids.len());
            for id in o.ids.iter().take(3) {
                detail.push_str(&format!("\n  message {id}"));
                if let Some(note) = o.notes.get(id) {
                    detail.push_str(&format!(": {note}"));
                }
                detail.push_str(&format!(":\n{}", story_of(events, start, *id)));
            }
            Violation::named(g, kind, detail)
        };
        let plain = |ids: Vec<MessageId>| Offenders {
            ids,
            notes: HashMap::new(),
        };
        let mut violations = Vec::new();
        let mut push = |g, kind, what: &str, o: &Offenders| {
            if !o.ids.is_empty() {
                violations.push(report(g, kind, what, o));
            }
        };
        use ViolationKind as K;
        if !so_far {
            push(
                Guarantee::NoLoss,
                K::Lost,
                "committed messages never delivered",
                &self.lost,
            );
        }
        push(
            Guarantee::NoLoss,
            K::ContentChanged,
            "messages published or delivered with other content than committed",
            &self.changed,
        );
        // G2: published, delivered, or claimed after a rollback, without a commit. Not while
        // writers may still be running: a publish can be recorded before its commit is.
        if !so_far {
            let mut phantoms: Vec<MessageId> = self
                .tracks
                .iter()
                .filter(|(_, t)| {
                    t.commit_pos.is_none()
                        && (t.published > 0 || t.delivered > 0 || (t.claimed && t.rolled_back))
                })
                .map(|(id, _)| *id)
                .collect();
            phantoms.sort_unstable();
            let rb = phantoms
                .iter()
                .filter(|id| self.tracks[*id].rolled_back)
                .count();
            push(
                Guarantee::NoPhantom,
                K::Phantom,
                &format!(
                    "claimed, published or delivered without a committed transaction ({rb} \
                     rolled back)"
                ),
                &plain(phantoms),
            );
        }
        push(
            Guarantee::Contract,
            K::Early,
            "delayed messages handed out before their available_at",
            &self.early_delayed,
        );
        push(
            Guarantee::PoisonIsolation,
            K::Early,
            "failed messages handed out again before their retry delay passed",
            &self.early_retry,
        );
        push(
            Guarantee::PoisonIsolation,
            K::NotDeadLettered,
            "messages not dead-lettered",
            &self.not_dead,
        );
        if so_far {
            return violations;
        }
        // G3
        if let Some(effects) = effects {
            let mut counts: HashMap<MessageId, usize> = HashMap::new();
            for id in effects {
                *counts.entry(*id).or_default() += 1;
            }
            let mut twice: Vec<MessageId> = counts
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(id, _)| *id)
                .collect();
            twice.sort_unstable();
            push(
                Guarantee::EffectivelyOnce,
                K::AppliedTwice,
                "effect applied more than once",
                &plain(twice),
            );
            let mut missing: Vec<MessageId> = self
                .tracks
                .iter()
                .filter(|(id, t)| {
                    t.commit_pos.is_some() && t.delivered > 0 && !counts.contains_key(id)
                })
                .map(|(id, _)| *id)
                .collect();
            missing.sort_unstable();
            push(
                Guarantee::EffectivelyOnce,
                K::EffectMissing,
                "delivered but its effect was never applied (inbox recorded it without the effect)",
                &plain(missing),
            );
        }
        // G4: per key, first deliveries in commit order. A message that was dead-lettered left
        // its key's queue (later ones went on), so it is not compared.
        if options.ordered {
            let mut last: BTreeMap<&str, (usize, MessageId)> = BTreeMap::new();
            let mut out_of_order = Offenders::default();
            for (id, key) in &self.first_deliveries {
                let t = &self.tracks[id];
                let Some(pos) = t.commit_pos else { continue };
                if t.ever_dead {
                    continue;
                }
                if let Some((prev_pos, prev_id)) = last.get(key)
                    && pos < *prev_pos
                {
                    let prev = *prev_id;
                    out_of_order.add(*id, || {
                        format!("first delivered after {prev}, committed later with key {key:?}")
                    });
                    out_of_order.add(prev, || {
                        format!("committed after {id} with key {key:?}, first delivered before it")
                    });
                    continue;
                }
                last.insert(key, (pos, *id));
            }
            push(
                Guarantee::PerKeyOrder,
                K::OutOfOrder,
                "first deliveries of one key out of commit order",
                &out_of_order,
            );
        }
        // G5
        if !options.faults {
            let delivered = options.deliveries && self.tracks.values().any(|t| t.delivered > 0);
            let mut dups: Vec<MessageId> = self
                .tracks
                .iter()
                .filter(|(_, t)| {
                    if delivered {
                        t.delivered > 1
                    } else {
                        t.published > 1
                    }
                })
                .map(|(id, _)| *id)
                .collect();
            dups.sort_unstable();
            push(
                Guarantee::NoNeedlessDuplicates,
                K::Duplicated,
                "published more than once without any fault",
                &plain(dups),
            );
        }
        violations
    }
}

fn story_of(events: &[Stamped], start: Instant, id: MessageId) -> String {
    let lines: Vec<String> = events
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.event.line_for(id).map(|line| {
                let t = s.at.saturating_duration_since(start);
                format!("    #{i:<5} {:>10} {line}", format!("+{}", ms(t)))
            })
        })
        .collect();
    if lines.is_empty() {
        "    (no events)".to_string()
    } else {
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<MessageId> {
        (0..n).map(|_| MessageId::new()).collect()
    }

    fn delivered(h: &History, id: MessageId, key: &str) {
        h.record(Event::Delivered {
            id,
            key: key.into(),
            content: None,
        });
    }

    #[test]
    fn clean_history_passes() {
        let h = History::new();
        let i = ids(2);
        h.committed([(i[0], "k".into()), (i[1], "k".into())]);
        for id in &i {
            h.record(Event::Published {
                id: *id,
                content: None,
            });
            delivered(&h, *id, "k");
        }
        assert_eq!(h.check(CheckOptions::default(), Some(&i)), Ok(()));
    }

    #[test]
    fn each_guarantee_is_named_with_the_story() {
        let h = History::new();
        let i = ids(5);
        h.committed([(i[0], "k".into()), (i[1], "k".into()), (i[2], "x".into())]);
        h.rolled_back([(i[3], "k".into())]);
        // i[2] lost; i[3] phantom; i[1] before i[0]; i[0] twice
        for id in [i[1], i[0], i[0], i[3]] {
            h.record(Event::Published { id, content: None });
            delivered(&h, id, "k");
        }
        let v = h
            .check(CheckOptions::default(), Some(&[i[0], i[0], i[1]]))
            .unwrap_err();
        let codes: HashSet<Guarantee> = v.iter().map(|v| v.guarantee).collect();
        for g in [
            Guarantee::NoLoss,
            Guarantee::NoPhantom,
            Guarantee::EffectivelyOnce,
            Guarantee::PerKeyOrder,
            Guarantee::NoNeedlessDuplicates,
        ] {
            assert!(codes.contains(&g), "{g} not reported: {v:?}");
        }
        let lost = v.iter().find(|v| v.guarantee == Guarantee::NoLoss).unwrap();
        assert_eq!(lost.kind, Some(ViolationKind::Lost));
        assert!(lost.detail.contains(&i[2].to_string()));
        assert!(lost.detail.contains("committed (key \"x\")"));
    }

    #[test]
    fn duplicates_are_allowed_under_faults() {
        let h = History::new();
        let i = ids(1);
        h.committed([(i[0], "k".into())]);
        delivered(&h, i[0], "k");
        delivered(&h, i[0], "k");
        let faults = CheckOptions {
            faults: true,
            ..CheckOptions::default()
        };
        assert_eq!(h.check(faults, None), Ok(()));
        assert_eq!(h.duplicate_deliveries(), 1);
    }

    fn one_message(h: &History) -> (MessageId, NewMessage) {
        let m = NewMessage::new("t", "k", b"payload".to_vec()).header("h", "v");
        let id = MessageId::new();
        h.committed_messages(&[id], std::slice::from_ref(&m));
        (id, m)
    }

    #[test]
    fn a_changed_payload_or_header_is_named_content_changed_under_g1() {
        for (payload, header) in [("other", "v"), ("payload", "changed")] {
            let h = History::new();
            let (id, _) = one_message(&h);
            let got = Received {
                id,
                topic: "t".into(),
                key: "k".into(),
                payload: payload.as_bytes().to_vec().into(),
                headers: [("h".to_string(), header.to_string())].into(),
                redelivered: false,
            };
            h.delivered(&got);
            let v = h.check(CheckOptions::default(), None).unwrap_err();
            assert_eq!(v.len(), 1, "{v:?}");
            assert!(
                v[0].is(Guarantee::NoLoss, ViolationKind::ContentChanged),
                "{}",
                v[0]
            );
            assert!(v[0].detail.contains("arrived as"), "{}", v[0]);
        }
    }

    #[test]
    fn an_unchanged_delivery_with_an_extra_broker_header_passes() {
        let h = History::new();
        let (id, m) = one_message(&h);
        let mut r = Received {
            id,
            topic: "t".into(),
            key: "k".into(),
            payload: m.payload.clone(),
            headers: m.headers.clone(),
            redelivered: false,
        };
        r.headers.insert("x-delivery-count".into(), "1".into());
        h.delivered(&r);
        assert_eq!(h.check(CheckOptions::default(), None), Ok(()));
    }

    #[test]
    fn a_claim_before_available_at_is_early_not_out_of_order() {
        let h = History::new();
        let m = NewMessage::new("t", "k", b"x".to_vec())
            .available_at(Utc::now() + chrono::TimeDelta::milliseconds(500));
        let id = MessageId::new();
        h.committed_messages(&[id], &[m]);
        h.record(Event::Claimed { id, attempts: 0 });
        delivered(&h, id, "k");
        let v = h.check(CheckOptions::default(), None).unwrap_err();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].is(Guarantee::Contract, ViolationKind::Early),
            "{}",
            v[0]
        );
        assert!(v[0].detail.contains("before its available_at"), "{}", v[0]);
    }

    #[test]
    fn a_claim_before_the_retry_delay_is_early_under_g6() {
        let h = History::new();
        let (id, _) = one_message(&h);
        h.record(Event::Failed {
            id,
            error: "x".into(),
            retry_after: Some(Duration::from_secs(60)),
        });
        h.record(Event::Claimed { id, attempts: 1 });
        let v = h.check_so_far(None).unwrap_err();
        assert!(
            v.is(Guarantee::PoisonIsolation, ViolationKind::Early),
            "{v}"
        );
    }

    #[test]
    fn a_dead_letter_claimed_again_is_not_dead_lettered_under_g6() {
        let h = History::new();
        let (id, _) = one_message(&h);
        h.record(Event::Failed {
            id,
            error: "too large".into(),
            retry_after: None,
        });
        assert_eq!(h.check_so_far(Some(3)), Ok(()));
        h.record(Event::Claimed { id, attempts: 1 });
        let v = h.check_so_far(Some(3)).unwrap_err();
        assert!(
            v.is(Guarantee::PoisonIsolation, ViolationKind::NotDeadLettered),
            "{v}"
        );
        assert!(v.detail.contains("claimed again"), "{v}");
    }

    #[test]
    fn failing_past_max_attempts_without_dead_lettering_is_named_with_the_attempts_seen() {
        let h = History::new();
        let (id, _) = one_message(&h);
        for _ in 0..4 {
            h.record(Event::Claimed { id, attempts: 0 });
            h.record(Event::Failed {
                id,
                error: "x".into(),
                retry_after: Some(Duration::ZERO),
            });
        }
        let v = h.check_so_far(Some(3)).unwrap_err();
        assert!(
            v.is(Guarantee::PoisonIsolation, ViolationKind::NotDeadLettered),
            "{v}"
        );
        assert!(v.detail.contains("attempts [0, 0, 0, 0]"), "{v}");
    }

    #[test]
    fn a_dead_letter_missing_from_the_listing_is_lost_and_a_listed_one_is_not() {
        let h = History::new();
        let (gone, _) = one_message(&h);
        let (kept, _) = one_message(&h);
        for id in [gone, kept] {
            h.record(Event::Failed {
                id,
                error: "x".into(),
                retry_after: None,
            });
        }
        h.record(Event::DeadLettersListed {
            listed: vec![(kept, 1)],
        });
        let v = h.check(CheckOptions::default(), None).unwrap_err();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].is(Guarantee::NoLoss, ViolationKind::Lost), "{}", v[0]);
        assert!(v[0].detail.contains(&gone.to_string()));
        assert!(!v[0].detail.contains(&kept.to_string()));
        assert!(v[0].detail.contains("then gone"), "{}", v[0]);
    }

    #[test]
    fn a_requeued_message_still_listed_dead_is_lost() {
        let h = History::new();
        let (id, _) = one_message(&h);
        h.record(Event::Failed {
            id,
            error: "x".into(),
            retry_after: None,
        });
        h.record(Event::Requeued { id });
        h.record(Event::DeadLettersListed {
            listed: vec![(id, 1)],
        });
        let v = h.check(CheckOptions::default(), None).unwrap_err();
        assert!(v[0].is(Guarantee::NoLoss, ViolationKind::Lost), "{}", v[0]);
        assert!(
            v[0].detail.contains("still listed as a dead letter"),
            "{}",
            v[0]
        );
    }

    #[test]
    fn a_deleted_dead_letter_is_not_lost_and_a_requeued_one_is_not_compared_for_order() {
        let h = History::new();
        let (deleted, _) = one_message(&h);
        let (requeued, _) = one_message(&h);
        let (later, _) = one_message(&h);
        for id in [deleted, requeued] {
            h.record(Event::Failed {
                id,
                error: "x".into(),
                retry_after: None,
            });
        }
        h.record(Event::DeletedDead { id: deleted });
        delivered(&h, later, "k");
        h.record(Event::Requeued { id: requeued });
        delivered(&h, requeued, "k");
        h.record(Event::DeadLettersListed { listed: vec![] });
        assert_eq!(h.check(CheckOptions::default(), None), Ok(()));
    }
}
