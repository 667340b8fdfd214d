//! The answer pipeline shared by every provider: upstream units (raw bytes plus the deltas they carry) in,
//! `ChatEvent`s out. Native output forwards the raw bytes (same protocol in and out); converted output
//! re-encodes the deltas in the client's protocol. Either way finish reasons and exact usage travel as side
//! events, and a stream that breaks or ends early ends in a typed error, never in a clean finish.
//!
//! Nothing goes unbilled: output tokens are counted as they pass (each chunk carries the running count,
//! its untokenized tail estimated; see [`OutputCount`]), and
//! an answer that ends without the provider's usage (cut, failed, or a provider that reports none) still
//! ends with a `Usage` event, its numbers counted by Relay and marked so.

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use relay_core::RelayError;
use relay_core::pb::adapter::v1::ChatEvent;
use relay_core::pb::common::v1::{Protocol, TokenUsage, UsageSource};

use crate::inbound::{self, AnswerCtx, StreamEncoder};
use crate::ir::{self, Delta, Response};
use crate::providers::{chunk_counted, error, finish, usage};
use crate::tokens::{OutputCount, Tokenizer};

/// Counts a request's input tokens when first asked.
type LazyCount = Box<dyn FnOnce(&Tokenizer) -> u64 + Send>;

/// Relay's own counting for one answer: the model's tokenizer and, lazily, the request's input tokens
/// (counted only when the provider does not report them).
pub struct Counting {
    tokenizer: Tokenizer,
    input: Option<LazyCount>,
    known_input: Option<u64>,
}

impl Counting {
    /// `body` in `protocol` is parsed and counted only if the input count is ever needed.
    pub fn new(tokenizer: Tokenizer, protocol: Protocol, body: Bytes) -> Self {
        let input = Box::new(move |t: &Tokenizer| match inbound::parse_request(protocol, &body) {
            Ok(ir) => t.count_request(&ir),
            // Unparseable here means the upstream got it verbatim: bound it by its bytes.
            Err(_) => (body.len() as u64).div_ceil(4),
        });
        Self { tokenizer, input: Some(input), known_input: None }
    }

    /// The input count now (and remembered).
    fn input_tokens(&mut self) -> u64 {
        if let Some(n) = self.known_input {
            return n;
        }
        let n = self.input.take().map_or(0, |f| f(&self.tokenizer));
        self.known_input = Some(n);
        n
    }

    pub fn source(&self) -> UsageSource {
        self.tokenizer.source()
    }

    /// The usage to bill: the provider's numbers where it reported them, Relay's counts where it did not.
    /// `complete`: the upstream finished the answer (its output count, if any, is final); otherwise the
    /// larger of its partial count and what was produced.
    fn bill(&mut self, provider: TokenUsage, output: &mut OutputCount, complete: bool) -> TokenUsage {
        let mut u = provider;
        u.input_source = UsageSource::Provider as i32;
        u.output_source = UsageSource::Provider as i32;
        if u.input_tokens == 0 {
            u.input_tokens = self.input_tokens();
            u.input_source = self.source() as i32;
        }
        let provider_final = complete && u.output_tokens > 0;
        if !provider_final {
            let counted_output = output.exact(&self.tokenizer);
            if counted_output > u.output_tokens {
                u.output_tokens = counted_output;
                u.output_source = self.source() as i32;
            }
        }
        u
    }
}

/// One thing an upstream said.
pub enum Unit {
    /// A protocol event: its exact bytes and what it means.
    Event {
        raw: Bytes,
        deltas: Vec<Delta>,
    },
    /// The upstream closed the answer; `complete` = it said the answer was finished.
    End {
        complete: bool,
    },
    Fail(RelayError),
}

/// How answers reach the client.
pub enum Output {
    /// Same protocol as the upstream: forward bytes. `drop_usage_only`: withhold events that carry only
    /// usage (the OpenAI usage chunk the relay asked for but the client did not). `fill_input`: Anthropic
    /// streams, whose `message_delta.usage` gets the input tokens of `message_start` when the upstream
    /// left them out (clients that read usage only there see the whole of it).
    Native { drop_usage_only: bool, fill_input: bool },
    /// Re-encode in `protocol`.
    Converted { protocol: Protocol, ctx: AnswerCtx },
}

struct Drive {
    encoder: Option<Box<dyn StreamEncoder>>,
    drop_usage_only: bool,
    fill_input: bool,
    usage: TokenUsage,
    saw_usage: bool,
    over: bool,
    counting: Counting,
    /// Output tokens produced so far (Relay's count).
    output: OutputCount,
}

/// Turns a stream of upstream units into client-ready events.
pub fn stream_answer(
    units: impl Stream<Item = Unit> + Send + 'static,
    output: Output,
    counting: Counting,
) -> impl Stream<Item = ChatEvent> + Send {
    let (encoder, drop_usage_only, fill_input) = match output {
        Output::Native { drop_usage_only, fill_input } => (None, drop_usage_only, fill_input),
        Output::Converted { protocol, ctx } => (Some(inbound::stream_encoder(protocol, ctx)), false, false),
    };
    let state = Drive {
        encoder,
        drop_usage_only,
        fill_input,
        usage: TokenUsage::default(),
        saw_usage: false,
        over: false,
        counting,
        output: OutputCount::default(),
    };
    units
        .scan(state, |st, unit| {
            if st.over {
                return std::future::ready(None);
            }
            let mut out = Vec::new();
            match unit {
                Unit::Event { raw, deltas } => {
                    let mut bytes = Vec::new();
                    for d in &deltas {
                        st.output.add(&st.counting.tokenizer, d);
                        match d {
                            Delta::Finish { choice, reason } => out.push(finish(*choice, reason.to_pb())),
                            Delta::Usage(u) => {
                                st.saw_usage = true;
                                ir::merge_usage(&mut st.usage, u);
                            }
                            _ => {}
                        }
                        if let Some(enc) = st.encoder.as_mut() {
                            enc.delta(d, &mut bytes);
                        }
                    }
                    let n = st.output.so_far();
                    match &st.encoder {
                        Some(_) => out.extend(bytes.into_iter().map(|b| chunk_counted(b, n))),
                        None => {
                            // Usage plus the id/model every chunk repeats, and nothing else.
                            let usage_only = deltas.iter().any(|d| matches!(d, Delta::Usage(_)))
                                && deltas.iter().all(|d| matches!(d, Delta::Usage(_) | Delta::Meta { .. }));
                            let raw = match st.fill_input {
                                true => with_input_tokens(raw, &st.usage),
                                false => raw,
                            };
                            if !(raw.is_empty() || usage_only && st.drop_usage_only) {
                                out.push(chunk_counted(raw, n));
                            }
                        }
                    }
                }
                Unit::End { complete: true } => {
                    st.over = true;
                    if let Some(enc) = st.encoder.as_mut() {
                        let mut bytes = Vec::new();
                        enc.finish(&mut bytes);
                        let n = st.output.so_far();
                        out.extend(bytes.into_iter().map(|b| chunk_counted(b, n)));
                    }
                    if !st.saw_usage {
                        metrics::counter!("relay_upstream_usage_missing_total").increment(1);
                        tracing::warn!("upstream answer reported no usage; billing Relay's count");
                    }
                    out.push(usage(st.counting.bill(st.usage, &mut st.output, true)));
                }
                Unit::End { complete: false } => {
                    st.over = true;
                    // The provider bills what it produced before the cut: so does Relay.
                    out.push(usage(st.counting.bill(st.usage, &mut st.output, false)));
                    out.push(error(&RelayError::new(
                        relay_core::ErrorCode::UpstreamServerError,
                        "the upstream ended the answer early",
                    )));
                }
                Unit::Fail(e) => {
                    st.over = true;
                    out.push(usage(st.counting.bill(st.usage, &mut st.output, false)));
                    out.push(error(&e));
                }
            }
            std::future::ready(Some(stream::iter(out)))
        })
        .flatten()
}

/// An Anthropic `message_delta` event with the input tokens known from `message_start` added to its
/// usage where the upstream left them out; any other event unchanged.
fn with_input_tokens(raw: Bytes, known: &TokenUsage) -> Bytes {
    if known.input_tokens == 0 || !raw.windows(15).any(|w| w == b"\"message_delta\"") {
        return raw;
    }
    let text = String::from_utf8_lossy(&raw);
    let Some(data) = text.lines().find_map(|l| l.strip_prefix("data:")).map(str::trim) else { return raw };
    let Ok(mut event) = serde_json::from_str::<serde_json::Value>(data) else { return raw };
    let Some(usage) = event.get_mut("usage").and_then(|u| u.as_object_mut()) else { return raw };
    if usage.get("input_tokens").is_some_and(|v| !v.is_null()) {
        return raw;
    }
    // Relay's input count includes cache reads and writes; Anthropic's `input_tokens` does not.
    let uncached = known.input_tokens.saturating_sub(known.cached_input_tokens + known.cache_write_tokens);
    usage.insert("input_tokens".into(), uncached.into());
    for (field, n) in [
        ("cache_read_input_tokens", known.cached_input_tokens),
        ("cache_creation_input_tokens", known.cache_write_tokens),
    ] {
        if n > 0 && usage.get(field).is_none_or(serde_json::Value::is_null) {
            usage.insert(field.into(), n.into());
        }
    }
    Bytes::from(format!("event: message_delta\ndata: {event}\n\n"))
}

/// A whole (non-streamed) answer: its bytes as the client gets them, with finish and usage side events.
pub fn whole_answer(
    raw: Bytes,
    deltas: Vec<Delta>,
    output: Output,
    mut counting: Counting,
) -> Vec<ChatEvent> {
    let mut resp = Response::default();
    let mut out = Vec::new();
    // Relay counts a whole answer only when the provider reported no output (tokenizing kilobytes of
    // answer for nothing would cost more than the rest of the request).
    let count = !deltas.iter().any(|d| matches!(d, Delta::Usage(u) if u.output_tokens > 0));
    let mut produced = OutputCount::default();
    for d in deltas {
        if count {
            produced.add(&counting.tokenizer, &d);
        }
        if let Delta::Finish { choice, reason } = &d {
            out.push(finish(*choice, reason.to_pb()));
        }
        resp.apply(d);
    }
    let body = match output {
        Output::Native { .. } => raw,
        Output::Converted { protocol, ctx } => inbound::encode_whole(protocol, &ctx, &resp),
    };
    let mut events = vec![chunk_counted(body, if count { produced.exact(&counting.tokenizer) } else { 0 })];
    events.extend(out);
    events.push(usage(counting.bill(resp.usage, &mut produced, true)));
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Finish;
    use relay_core::pb::adapter::v1::chat_event::Event;

    fn ctx() -> AnswerCtx {
        AnswerCtx { request_id: "r".into(), model: "m".into(), created: 1, include_usage: true }
    }

    fn counting() -> Counting {
        let body =
            Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"hello world"}]}"#);
        Counting::new(Tokenizer::for_model("gpt-4o"), Protocol::OpenaiChat, body)
    }

    async fn run(units: Vec<Unit>, output: Output) -> Vec<Event> {
        stream_answer(stream::iter(units), output, counting())
            .filter_map(|e| async move { e.event })
            .collect()
            .await
    }

    #[tokio::test]
    async fn native_output_forwards_bytes_and_can_hide_usage_only_events() {
        let units = vec![
            Unit::Event {
                raw: Bytes::from_static(b"a"),
                deltas: vec![Delta::Text { choice: 0, text: "x".into() }],
            },
            Unit::Event {
                raw: Bytes::from_static(b"u"),
                deltas: vec![
                    Delta::Meta { id: Some("c".into()), model: None },
                    Delta::Usage(TokenUsage { input_tokens: 4, ..Default::default() }),
                ],
            },
            Unit::End { complete: true },
        ];
        let evs = run(units, Output::Native { drop_usage_only: true, fill_input: false }).await;
        assert!(matches!(&evs[0], Event::Chunk(c) if &c.data[..] == b"a"));
        assert!(matches!(&evs[1], Event::Usage(u) if u.input_tokens == 4));
        assert_eq!(evs.len(), 2);
    }

    #[tokio::test]
    async fn anthropic_message_delta_gets_the_input_tokens_of_message_start() {
        let start = Bytes::from_static(b"event: message_start\ndata: {\"type\":\"message_start\"}\n\n");
        let delta = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\n";
        let units = vec![
            Unit::Event {
                raw: start.clone(),
                deltas: vec![Delta::Usage(TokenUsage {
                    input_tokens: 42,
                    cached_input_tokens: 40,
                    ..Default::default()
                })],
            },
            Unit::Event {
                raw: Bytes::from(delta),
                deltas: vec![Delta::Usage(TokenUsage { output_tokens: 7, ..Default::default() })],
            },
            Unit::End { complete: true },
        ];
        let evs = run(units, Output::Native { drop_usage_only: false, fill_input: true }).await;
        let chunks: Vec<String> = evs
            .iter()
            .filter_map(|e| match e {
                Event::Chunk(c) => Some(String::from_utf8_lossy(&c.data).into_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(chunks[0], String::from_utf8_lossy(&start), "other events pass untouched");
        let data: serde_json::Value =
            serde_json::from_str(chunks[1].lines().find_map(|l| l.strip_prefix("data: ")).unwrap()).unwrap();
        assert_eq!(data["usage"]["input_tokens"], 2, "Anthropic's input_tokens leave out cache reads");
        assert_eq!(data["usage"]["cache_read_input_tokens"], 40);
        assert_eq!(data["usage"]["output_tokens"], 7);
        assert!(chunks[1].starts_with("event: message_delta\n"));
    }

    #[tokio::test]
    async fn early_end_and_failures_become_errors() {
        let evs = run(
            vec![Unit::End { complete: false }],
            Output::Native { drop_usage_only: false, fill_input: false },
        )
        .await;
        assert!(matches!(&evs[1], Event::Error(_)));
        let e = RelayError::from_upstream_status(529, "overloaded");
        let evs = run(
            vec![Unit::Fail(e), Unit::End { complete: true }],
            Output::Native { drop_usage_only: false, fill_input: false },
        )
        .await;
        assert_eq!(evs.len(), 2, "usage, then the error, then nothing");
        assert!(matches!(&evs[1], Event::Error(_)));
    }

    #[tokio::test]
    async fn cut_answers_are_billed_what_was_produced() {
        let text = |t: &str| Unit::Event {
            raw: Bytes::from(format!("data: {t}\n\n")),
            deltas: vec![Delta::Text { choice: 0, text: t.into() }],
        };
        // The provider said its input (as Anthropic does at message_start), then the stream broke.
        let units = vec![
            Unit::Event {
                raw: Bytes::from_static(b"data: start\n\n"),
                deltas: vec![Delta::Usage(TokenUsage {
                    input_tokens: 42,
                    output_tokens: 1,
                    ..Default::default()
                })],
            },
            text("hello world"),
            text(" and more"),
            Unit::End { complete: false },
        ];
        let evs = run(units, Output::Native { drop_usage_only: false, fill_input: false }).await;
        let counts: Vec<u64> = evs
            .iter()
            .filter_map(|e| if let Event::Chunk(c) = e { Some(c.output_tokens) } else { None })
            .collect();
        // The running count on every chunk estimates text not tokenized yet (4 bytes a token: 11 and 20
        // bytes); what is billed is the exact count.
        assert_eq!(counts, vec![0, 3, 5], "running output count on every chunk");
        let Some(Event::Usage(u)) = evs.iter().find(|e| matches!(e, Event::Usage(_))) else {
            panic!("{evs:?}")
        };
        assert_eq!((u.input_tokens, u.input_source()), (42, UsageSource::Provider));
        assert_eq!((u.output_tokens, u.output_source()), (4, UsageSource::Counted));
        assert!(matches!(evs.last(), Some(Event::Error(_))));

        // No usage at all from a complete answer: input counted from the request, output from the text.
        let evs = run(
            vec![text("hello world"), Unit::End { complete: true }],
            Output::Native { drop_usage_only: false, fill_input: false },
        )
        .await;
        let Some(Event::Usage(u)) = evs.last() else { panic!("{evs:?}") };
        assert_eq!((u.input_tokens, u.output_tokens), (3 + 3 + 2, 2));
        assert_eq!(u.input_source(), UsageSource::Counted);
    }

    #[tokio::test]
    async fn converted_output_reencodes_deltas() {
        let units = vec![
            Unit::Event { raw: Bytes::new(), deltas: vec![Delta::Text { choice: 0, text: "hi".into() }] },
            Unit::Event {
                raw: Bytes::new(),
                deltas: vec![Delta::Finish { choice: 0, reason: Finish::Stop }],
            },
            Unit::End { complete: true },
        ];
        let evs = run(units, Output::Converted { protocol: Protocol::OpenaiChat, ctx: ctx() }).await;
        let text: String = evs
            .iter()
            .filter_map(|e| {
                if let Event::Chunk(c) = e {
                    Some(String::from_utf8_lossy(&c.data).into_owned())
                } else {
                    None
                }
            })
            .collect();
        assert!(text.contains("\"content\":\"hi\""), "{text}");
        assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert!(evs.iter().any(|e| matches!(e, Event::Finish(_))));
    }
}
