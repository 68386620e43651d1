//! Feature `otel`: the trace context of the span a message is enqueued in reaches the
//! consumer's handler through the store, the relay and the broker, so one trace shows the
//! order placed and the message handled.

use std::sync::{Arc, Mutex};

use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanProcessor};
use outbox_core::memory::{MemoryBroker, MemoryStore};
use outbox_core::{Enqueue, NewMessage, Relay, Subscriber, Transactional, handle};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// Keeps every span that ends, for the test to look at.
#[derive(Debug, Clone, Default)]
struct Collect(Arc<Mutex<Vec<SpanData>>>);

impl SpanProcessor for Collect {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}
    fn on_end(&self, span: SpanData) {
        self.0.lock().unwrap().push(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _timeout: std::time::Duration) -> OTelSdkResult {
        Ok(())
    }
}

async fn enqueue(store: &MemoryStore, message: NewMessage) {
    let mut tx = store.begin().await.unwrap();
    store.enqueue(&mut tx, &[message]).await.unwrap();
    store.commit(tx).await.unwrap();
}

/// The span context the handler of the next delivery of `broker`'s "orders" runs in.
async fn handled_in(store: &MemoryStore, broker: &MemoryBroker, group: &str) -> SpanContext {
    let mut sub = broker.subscribe(group, &["orders"]);
    let delivery = sub.next().await.unwrap();
    let seen = Arc::new(Mutex::new(None));
    let record = seen.clone();
    handle(store, "billing", delivery, async move |_tx, _msg| {
        let context = tracing::Span::current().context();
        *record.lock().unwrap() = Some(context.span().span_context().clone());
        Ok::<_, std::io::Error>(())
    })
    .await
    .unwrap();
    seen.lock().unwrap().clone().expect("the handler ran")
}

#[tokio::test(flavor = "current_thread")]
async fn the_publish_and_the_handler_run_in_the_trace_of_the_span_that_enqueued_the_message() {
    let spans = Collect::default();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(spans.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-test"));
    let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone()))
        .build()
        .unwrap();

    let placed = tracing::info_span!("order placed");
    let producer = placed.context().span().span_context().clone();
    assert!(producer.is_valid());
    enqueue(&store, NewMessage::new("orders", "o-1", b"placed".to_vec()))
        .instrument(placed)
        .await;
    relay.run_once().await.unwrap();
    let published = &broker.published("orders")[0];
    assert_eq!(
        published.headers.get("traceparent"),
        Some(&format!(
            "00-{}-{}-01",
            producer.trace_id(),
            producer.span_id()
        ))
    );

    let handler = handled_in(&store, &broker, "g1").await;
    assert_eq!(handler.trace_id(), producer.trace_id());
    assert_ne!(
        handler.span_id(),
        producer.span_id(),
        "the handler has a span of its own"
    );

    // The relay's publish is a span of the same trace, child of the span that enqueued.
    let ended = spans.0.lock().unwrap().clone();
    let publish: Vec<&SpanData> = ended
        .iter()
        .filter(|s| s.name == "outbox.publish")
        .collect();
    assert_eq!(publish.len(), 1, "{ended:#?}");
    assert_eq!(publish[0].span_context.trace_id(), producer.trace_id());
    assert_eq!(publish[0].parent_span_id, producer.span_id());
    assert!(
        publish[0]
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "outcome" && kv.value.as_str() == "published"),
        "{:?}",
        publish[0].attributes
    );
}

#[tokio::test(flavor = "current_thread")]
async fn outside_a_span_nothing_is_added_and_a_callers_traceparent_is_kept() {
    let provider = SdkTracerProvider::builder().build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-test"));
    let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone()))
        .build()
        .unwrap();

    enqueue(&store, NewMessage::new("orders", "bare", b"x".to_vec())).await;
    let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let message = NewMessage::new("orders", "own", b"x".to_vec()).header("traceparent", own);
    enqueue(&store, message)
        .instrument(tracing::info_span!("another trace"))
        .await;
    relay.run_once().await.unwrap();
    let published = broker.published("orders");
    let by_key = |key: &str| published.iter().find(|m| m.key == key).unwrap();
    assert!(by_key("bare").headers.is_empty());
    assert_eq!(
        by_key("own").headers.get("traceparent").map(String::as_str),
        Some(own)
    );
}
