//! Trace context from the producer to the consumer (feature `otel`).
//!
//! With the feature, every store's `enqueue` stores the current `tracing` span's W3C trace
//! context ([`TRACEPARENT`], and [`TRACESTATE`] when not empty) as message headers, unless
//! the message already carries a `traceparent`; brokers carry them like any user header; and
//! [`handle`](crate::handle) runs the handler in an `outbox.handle` span whose parent is that
//! context. The relay's broker call for a message runs under an `outbox.publish` span, child
//! of the same context (field `outcome`: `published`, `failed` or `abandoned`). With a
//! `tracing-opentelemetry` layer installed, one trace then shows the order placed, the message
//! published, and the message handled. The current span's context is read through
//! `tracing-opentelemetry`: without its layer, or outside any span, nothing is added.
//!
//! Without the feature every function here is a pass-through: no dependency, no header, no
//! span.

use std::borrow::Cow;
use std::future::Future;

use crate::{Message, NewMessage, Received, Result};

/// The W3C Trace Context header with the trace id, the parent span id and the flags:
/// `00-<32 hex>-<16 hex>-<2 hex>`.
pub const TRACEPARENT: &str = "traceparent";

/// The W3C Trace Context header with vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// `messages` with the current span's trace context added to each one that has no
/// `traceparent` yet (feature `otel`; without it, or with no context, `messages` as they
/// are). Stores call it first thing in `enqueue`, so the headers are validated and stored
/// with the rest.
#[inline]
pub fn with_current_context(messages: &[NewMessage]) -> Cow<'_, [NewMessage]> {
    #[cfg(feature = "otel")]
    {
        match otel::current() {
            Some(context)
                if messages
                    .iter()
                    .any(|m| !m.headers.contains_key(TRACEPARENT)) =>
            {
                Cow::Owned(
                    messages
                        .iter()
                        .cloned()
                        .map(|mut m| {
                            context.add_to(&mut m);
                            m
                        })
                        .collect(),
                )
            }
            _ => Cow::Borrowed(messages),
        }
    }
    #[cfg(not(feature = "otel"))]
    {
        Cow::Borrowed(messages)
    }
}

/// Add the current span's trace context to `message` unless it has a `traceparent` already
/// (feature `otel`; without it, nothing).
#[inline]
pub fn inject(message: &mut NewMessage) {
    #[cfg(feature = "otel")]
    if let Some(context) = otel::current() {
        context.add_to(message);
    }
    #[cfg(not(feature = "otel"))]
    let _ = message;
}

/// The OpenTelemetry context `message` was enqueued in, from its `traceparent` and
/// `tracestate` headers; `None` if it has none or they are malformed.
#[cfg(feature = "otel")]
pub fn extract(message: &Received) -> Option<opentelemetry::Context> {
    otel::extract(message)
}

/// Run `handler` (the consumer's work on `message`) in an `outbox.handle` span whose parent
/// is the message's trace context (feature `otel`; without it, `handler` as it is).
#[inline]
pub fn instrument_handler<F: Future>(
    handler: F,
    consumer: &str,
    message: &Received,
) -> impl Future<Output = F::Output> {
    #[cfg(feature = "otel")]
    {
        use tracing::Instrument;
        handler.instrument(otel::handler_span(consumer, message))
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = (consumer, message);
        handler
    }
}

/// The `outbox.publish` spans of one broker call (feature `otel`; without it, nothing): one per
/// message that carries a trace context, child of that context, open until
/// [`finish`](PublishSpans::finish).
pub(crate) struct PublishSpans {
    #[cfg(feature = "otel")]
    spans: Vec<(usize, tracing::Span)>,
}

/// Open the `outbox.publish` spans of a broker call for `messages`.
#[inline]
pub(crate) fn publish_spans(messages: &[Message]) -> PublishSpans {
    #[cfg(feature = "otel")]
    {
        PublishSpans {
            spans: messages
                .iter()
                .enumerate()
                .filter_map(|(i, m)| otel::publish_span(m).map(|span| (i, span)))
                .collect(),
        }
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = messages;
        PublishSpans {}
    }
}

impl PublishSpans {
    /// Record each message's outcome (`None`: the call was abandoned) and close the spans.
    #[inline]
    pub(crate) fn finish(self, outcomes: Option<&[Result<()>]>) {
        #[cfg(feature = "otel")]
        for (i, span) in self.spans {
            let outcome = match outcomes.map(|o| o.get(i)) {
                None => "abandoned",
                Some(Some(Ok(()))) => "published",
                Some(_) => "failed",
            };
            span.record("outcome", outcome);
        }
        #[cfg(not(feature = "otel"))]
        let _ = outcomes;
    }
}

#[cfg(feature = "otel")]
mod otel {
    use std::str::FromStr;

    use opentelemetry::Context;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{TRACEPARENT, TRACESTATE};
    use crate::{Message, NewMessage, Received};

    /// A trace context as headers.
    pub(super) struct Headers {
        traceparent: String,
        tracestate: Option<String>,
    }

    impl Headers {
        /// Add to `message`, unless it carries a `traceparent` of its own.
        pub(super) fn add_to(&self, message: &mut NewMessage) {
            if message.headers.contains_key(TRACEPARENT) {
                return;
            }
            message
                .headers
                .insert(TRACEPARENT.to_string(), self.traceparent.clone());
            if let Some(state) = &self.tracestate {
                message
                    .headers
                    .insert(TRACESTATE.to_string(), state.clone());
            }
        }
    }

    /// The current `tracing` span's context, if it has a valid one.
    pub(super) fn current() -> Option<Headers> {
        let context = tracing::Span::current().context();
        let span = context.span();
        let sc = span.span_context();
        sc.is_valid().then(|| format(sc))
    }

    pub(super) fn format(sc: &SpanContext) -> Headers {
        let state = sc.trace_state().header();
        Headers {
            traceparent: format!(
                "00-{}-{}-{:02x}",
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags().to_u8()
            ),
            tracestate: (!state.is_empty()).then_some(state),
        }
    }

    pub(super) fn extract(message: &Received) -> Option<Context> {
        from_headers(&message.headers)
    }

    /// The context in `headers`' `traceparent` and `tracestate`.
    fn from_headers(headers: &crate::Headers) -> Option<Context> {
        let sc = parse(
            headers.get(TRACEPARENT)?,
            headers.get(TRACESTATE).map(String::as_str),
        )?;
        Some(Context::new().with_remote_span_context(sc))
    }

    /// `outbox.publish` for `message`, child of its context; `None` when it carries none.
    pub(super) fn publish_span(message: &Message) -> Option<tracing::Span> {
        let parent = from_headers(&message.headers)?;
        let span = tracing::info_span!(
            "outbox.publish",
            message_id = %message.id,
            topic = %message.topic,
            outcome = tracing::field::Empty,
        );
        // Fails only when the span is disabled: then there is nothing to parent.
        let _ = span.set_parent(parent);
        Some(span)
    }

    /// Parse a W3C `traceparent` (and `tracestate`): version 00 exactly, later versions by
    /// their first four fields, as the specification asks; all-zero ids are invalid.
    pub(super) fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
        let fields: Vec<&str> = traceparent.trim().split('-').collect();
        let [version, trace, span, flags, ..] = fields[..] else {
            return None;
        };
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex(version, 2) || version == "ff" || (version == "00" && fields.len() != 4) {
            return None;
        }
        if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
            return None;
        }
        let trace_id = TraceId::from_hex(trace).ok()?;
        let span_id = SpanId::from_hex(span).ok()?;
        if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()? & TraceFlags::SAMPLED.to_u8();
        let state = tracestate
            .and_then(|s| TraceState::from_str(s).ok())
            .unwrap_or_default();
        Some(SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::new(flags),
            true,
            state,
        ))
    }

    /// The span a handler runs in: `outbox.handle`, child of the message's context.
    pub(super) fn handler_span(consumer: &str, message: &Received) -> tracing::Span {
        let span = tracing::info_span!(
            "outbox.handle",
            consumer,
            message_id = %message.id,
            topic = %message.topic,
        );
        if let Some(parent) = extract(message) {
            // Fails only when the span is disabled or already started: then it has no
            // parent to set.
            let _ = span.set_parent(parent);
        }
        span
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_traceparent_round_trips_with_its_state() {
            let header = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
            let sc = parse(header, Some("vendor=abc,other=1")).unwrap();
            assert!(sc.is_remote() && sc.is_sampled());
            let back = format(&sc);
            assert_eq!(back.traceparent, header);
            assert_eq!(back.tracestate.as_deref(), Some("vendor=abc,other=1"));
        }

        #[test]
        fn malformed_traceparents_are_ignored() {
            for bad in [
                "",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
                "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
                "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
                "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
            ] {
                assert!(parse(bad, None).is_none(), "{bad:?} accepted");
            }
            // A later version: its first four fields count.
            assert!(
                parse(
                    "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-x",
                    None
                )
                .is_some()
            );
        }
    }
}
