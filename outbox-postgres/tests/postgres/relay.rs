//! The relay engine on the Postgres store: exactly-once publishing without faults, prompt
//! wake-ups, and no loss / per-key order with connections cut under the relays.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::memory::MemoryBroker;
use outbox_core::{MessageId, NewMessage, Relay, Store};
use outbox_postgres::PgStore;
use outbox_testkit::proxy::FaultProxy;
use tokio::sync::oneshot;

use crate::common::{Db, msg, pool, put};

/// Start `relay` until the returned sender fires (or drops).
fn spawn_relay(
    relay: Relay,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<outbox_core::RelayStats>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    (stop, task)
}

async fn wait_until_drained(store: &PgStore, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = store.stats().await.unwrap();
        if stats.pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the backlog did not drain: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_relays_publish_two_thousand_messages_exactly_once() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(64).await;
    let broker = MemoryBroker::new();
    let mut relays = Vec::new();
    for r in 0..4 {
        let relay_pool = pool(&db.url, 4, "outbox-relay").await;
        let relay_store = PgStore::builder(relay_pool)
            .schema(&db.schema)
            .build()
            .await
            .unwrap();
        let relay = Relay::builder(Arc::new(relay_store), Arc::new(broker.clone()))
            .relay_id(format!("relay-{r}"))
            .batch_size(50)
            .concurrency(2)
            .partitions_per_claim(4)
            .poll_interval(Duration::from_millis(200))
            .build()
            .unwrap();
        relays.push((relay.clone(), spawn_relay(relay)));
    }
    // Writers enqueue while the relays run: 20 keys, in batches of 10 per transaction.
    let started = Instant::now();
    let mut expected: HashMap<String, Vec<MessageId>> = HashMap::new();
    let mut writers = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut mine: HashMap<String, Vec<MessageId>> = HashMap::new();
            for batch in 0..50 {
                let msgs: Vec<NewMessage> = (0..10)
                    .map(|i| {
                        let key = format!("w{w}-k{}", (batch * 10 + i) % 5);
                        msg("orders", &key, &format!("{batch}-{i}"))
                    })
                    .collect();
                let ids = put(&store, &msgs).await;
                for (m, id) in msgs.iter().zip(ids) {
                    mine.entry(m.key.clone()).or_default().push(id);
                }
            }
            mine
        }));
    }
    for w in writers {
        expected.extend(w.await.unwrap());
    }
    wait_until_drained(&store, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    let mut total = outbox_core::RelayStats::default();
    for (_, (stop, task)) in relays {
        let _ = stop.send(());
        let s = task.await.unwrap();
        total.published += s.published;
        total.leases_lost += s.leases_lost;
        total.errors += s.errors;
    }
    let published = broker.published("orders");
    eprintln!(
        "4 relays: 2000 messages published in {elapsed:?} ({} deliveries, {} leases lost, {} errors)",
        published.len(),
        total.leases_lost,
        total.errors
    );
    let mut seen = HashSet::new();
    for r in &published {
        assert!(seen.insert(r.id), "message {} published twice", r.id);
    }
    assert_eq!(published.len(), 2000);
    assert_eq!(total.published, 2000);
    // Per-key order.
    let mut delivered: HashMap<String, Vec<MessageId>> = HashMap::new();
    for r in &published {
        delivered.entry(r.key.clone()).or_default().push(r.id);
    }
    assert_eq!(delivered, expected);
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.published), (0, 2000));
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_an_idle_relay_within_milliseconds() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    let broker = MemoryBroker::new();
    // A poll interval far longer than the test: only NOTIFY can make it fast.
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone()))
        .poll_interval(Duration::from_secs(60))
        .build()
        .unwrap();
    let (stop, task) = spawn_relay(relay);
    // Let the relay go idle and its listener connect.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::new();
    for round in 0..5 {
        let committed = Instant::now();
        put(&store, &[msg("orders", &format!("k{round}"), "x")]).await;
        while broker.published("orders").len() <= round {
            assert!(
                committed.elapsed() < Duration::from_secs(5),
                "not published after a commit"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        latencies.push(committed.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    task.await.unwrap();
    latencies.sort();
    eprintln!("commit-to-publish latency with NOTIFY (idle relay, 60 s poll): {latencies:?}");
    assert!(
        latencies[2] < Duration::from_millis(250),
        "median {:?}",
        latencies[2]
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_after_a_cut() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let proxy = FaultProxy::start(&url_parts::Url::parse(&db.url).host_port)
        .await
        .unwrap();
    let url = proxied_url(&db.url, &proxy);
    let proxied = PgStore::builder(pool(&url, 2, "outbox-proxied").await)
        .schema(&db.schema)
        .partitions(4)
        .build()
        .await
        .unwrap();
    let mut wake = proxied.wake_ups().unwrap();
    tokio::time::timeout(Duration::from_secs(10), wake.changed())
        .await
        .unwrap()
        .unwrap();
    for _ in 0..3 {
        wake.borrow_and_update();
        proxy.cut();
        // The reconnect itself wakes (notifications may have been missed) ...
        tokio::time::timeout(Duration::from_secs(10), wake.changed())
            .await
            .expect("woken after the reconnect")
            .unwrap();
        // ... and notifications flow again once it is listening.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            wake.borrow_and_update();
            put(&store, &[msg("t", "k", "x")]).await;
            if tokio::time::timeout(Duration::from_millis(300), wake.changed())
                .await
                .is_ok()
            {
                break;
            }
            assert!(Instant::now() < deadline, "no notification after the cut");
        }
    }
    db.drop().await;
}

fn proxied_url(url: &str, proxy: &FaultProxy) -> String {
    let mut parts = url_parts::Url::parse(url);
    parts.host_port = proxy.addr().to_string();
    parts.to_string()
}

/// Just enough URL handling to swap the host and port of a `postgres://` URL.
mod url_parts {
    pub(crate) struct Url {
        pub(crate) scheme_and_user: String,
        pub(crate) host_port: String,
        pub(crate) rest: String,
    }

    impl Url {
        pub(crate) fn parse(url: &str) -> Url {
            let (scheme, after) = url.split_once("://").expect("a URL with a scheme");
            let (authority, rest) = match after.find('/') {
                Some(i) => (&after[..i], &after[i..]),
                None => (after, ""),
            };
            let (user, host_port) = match authority.rsplit_once('@') {
                Some((user, host)) => (format!("{user}@"), host),
                None => (String::new(), authority),
            };
            Url {
                scheme_and_user: format!("{scheme}://{user}"),
                host_port: host_port.to_string(),
                rest: rest.to_string(),
            }
        }
    }

    impl std::fmt::Display for Url {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}{}{}", self.scheme_and_user, self.host_port, self.rest)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_lose_nothing_and_keep_per_key_order() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(16).await;
    let upstream = url_parts::Url::parse(&db.url).host_port;
    let proxy = Arc::new(FaultProxy::start(&upstream).await.unwrap());
    let url = proxied_url(&db.url, &proxy);
    let broker = MemoryBroker::new();
    let mut relays = Vec::new();
    for r in 0..3 {
        let relay_store = PgStore::builder(pool(&url, 3, "outbox-relay-proxied").await)
            .schema(&db.schema)
            .partitions(16)
            .build()
            .await
            .unwrap();
        let relay = Relay::builder(Arc::new(relay_store), Arc::new(broker.clone()))
            .relay_id(format!("relay-{r}"))
            .batch_size(20)
            .concurrency(2)
            .partitions_per_claim(2)
            .lease(Duration::from_secs(1))
            .poll_interval(Duration::from_millis(50))
            .build()
            .unwrap();
        relays.push(spawn_relay(relay));
    }
    // Cut every connection through the proxy every 60 ms while the writers run.
    let (stop_cutting, mut cutting) = oneshot::channel::<()>();
    let cutter = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut cuts = 0u32;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(60)) => {
                        proxy.cut();
                        cuts += 1;
                    }
                    _ = &mut cutting => return cuts,
                }
            }
        })
    };
    // Writers (directly connected) commit one key's messages in sequence.
    let mut writers = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut mine: HashMap<String, Vec<MessageId>> = HashMap::new();
            for round in 0..100 {
                let msgs: Vec<NewMessage> = (0..5)
                    .map(|k| msg("orders", &format!("w{w}-k{k}"), &format!("{round}")))
                    .collect();
                let ids = put(&store, &msgs).await;
                for (m, id) in msgs.iter().zip(ids) {
                    mine.entry(m.key.clone()).or_default().push(id);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            mine
        }));
    }
    let mut committed: HashMap<String, Vec<MessageId>> = HashMap::new();
    for w in writers {
        committed.extend(w.await.unwrap());
    }
    // Keep cutting a little longer, then heal and let the backlog drain.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_cutting.send(());
    let cuts = cutter.await.unwrap();
    wait_until_drained(&store, Duration::from_secs(60)).await;
    let mut errors = 0;
    let mut leases_lost = 0;
    for (stop, task) in relays {
        let _ = stop.send(());
        let s = task.await.unwrap();
        errors += s.errors;
        leases_lost += s.leases_lost;
    }

    let published = broker.published("orders");
    let total: usize = committed.values().map(Vec::len).sum();
    let mut first: HashMap<String, Vec<MessageId>> = HashMap::new();
    let mut seen = HashSet::new();
    for r in &published {
        if seen.insert(r.id) {
            first.entry(r.key.clone()).or_default().push(r.id);
        }
    }
    eprintln!(
        "{cuts} cuts: {total} messages, {} deliveries ({} duplicates), {errors} relay errors, \
         {leases_lost} leases lost, {} proxy connections",
        published.len(),
        published.len() - seen.len(),
        proxy.accepted()
    );
    assert!(cuts >= 10, "the test did not cut enough ({cuts})");
    // G1: every committed message was published.
    for ids in committed.values() {
        for id in ids {
            assert!(
                seen.contains(id),
                "G1: committed message {id} was never published"
            );
        }
    }
    assert_eq!(seen.len(), total);
    // G4: per key, first deliveries in commit order.
    for (key, ids) in &committed {
        assert_eq!(
            first.get(key),
            Some(ids),
            "G4: key {key} first delivered out of order"
        );
    }
    db.drop().await;
}
