//! The answer pipeline shared by every provider: upstream units (raw bytes plus the deltas they carry) in,
//! `ChatEvent`s out. Native output forwards the raw bytes (same protocol in and out); converted output
//! re-encodes the deltas in the client's protocol. Either way finish reasons and exact usage travel as side
//! events, and a stream that breaks or ends early ends in a typed error, never in a clean finish.

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use relay_core::RelayError;
use relay_core::pb::adapter::v1::ChatEvent;
use relay_core::pb::common::v1::{Protocol, TokenUsage};

use crate::inbound::{self, AnswerCtx, StreamEncoder};
use crate::ir::{self, Delta, Response};
use crate::providers::{chunk, error, finish, usage};

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
    /// usage (the OpenAI usage chunk the relay asked for but the client did not).
    Native { drop_usage_only: bool },
    /// Re-encode in `protocol`.
    Converted { protocol: Protocol, ctx: AnswerCtx },
}

struct Drive {
    encoder: Option<Box<dyn StreamEncoder>>,
    drop_usage_only: bool,
    usage: TokenUsage,
    saw_usage: bool,
    over: bool,
}

/// Turns a stream of upstream units into client-ready events.
pub fn stream_answer(
    units: impl Stream<Item = Unit> + Send + 'static,
    output: Output,
) -> impl Stream<Item = ChatEvent> + Send {
    let (encoder, drop_usage_only) = match output {
        Output::Native { drop_usage_only } => (None, drop_usage_only),
        Output::Converted { protocol, ctx } => (Some(inbound::stream_encoder(protocol, ctx)), false),
    };
    let state =
        Drive { encoder, drop_usage_only, usage: TokenUsage::default(), saw_usage: false, over: false };
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
                    match &st.encoder {
                        Some(_) => out.extend(bytes.into_iter().map(chunk)),
                        None => {
                            // Usage plus the id/model every chunk repeats, and nothing else.
                            let usage_only = deltas.iter().any(|d| matches!(d, Delta::Usage(_)))
                                && deltas.iter().all(|d| matches!(d, Delta::Usage(_) | Delta::Meta { .. }));
                            if !(raw.is_empty() || usage_only && st.drop_usage_only) {
                                out.push(chunk(raw));
                            }
                        }
                    }
                }
                Unit::End { complete: true } => {
                    st.over = true;
                    if let Some(enc) = st.encoder.as_mut() {
                        let mut bytes = Vec::new();
                        enc.finish(&mut bytes);
                        out.extend(bytes.into_iter().map(chunk));
                    }
                    if !st.saw_usage {
                        metrics::counter!("relay_upstream_usage_missing_total").increment(1);
                        tracing::warn!("upstream answer reported no usage");
                    }
                    out.push(usage(st.usage));
                }
                Unit::End { complete: false } => {
                    st.over = true;
                    out.push(error(&RelayError::new(
                        relay_core::ErrorCode::UpstreamServerError,
                        "the upstream ended the answer early",
                    )));
                }
                Unit::Fail(e) => {
                    st.over = true;
                    out.push(error(&e));
                }
            }
            std::future::ready(Some(stream::iter(out)))
        })
        .flatten()
}

/// A whole (non-streamed) answer: its bytes as the client gets them, with finish and usage side events.
pub fn whole_answer(raw: Bytes, deltas: Vec<Delta>, output: Output) -> Vec<ChatEvent> {
    let mut resp = Response::default();
    let mut out = Vec::new();
    for d in deltas {
        if let Delta::Finish { choice, reason } = &d {
            out.push(finish(*choice, reason.to_pb()));
        }
        resp.apply(d);
    }
    let body = match output {
        Output::Native { .. } => raw,
        Output::Converted { protocol, ctx } => inbound::encode_whole(protocol, &ctx, &resp),
    };
    let mut events = vec![chunk(body)];
    events.extend(out);
    events.push(usage(resp.usage));
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

    async fn run(units: Vec<Unit>, output: Output) -> Vec<Event> {
        stream_answer(stream::iter(units), output).filter_map(|e| async move { e.event }).collect().await
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
        let evs = run(units, Output::Native { drop_usage_only: true }).await;
        assert!(matches!(&evs[0], Event::Chunk(c) if &c.data[..] == b"a"));
        assert!(matches!(&evs[1], Event::Usage(u) if u.input_tokens == 4));
        assert_eq!(evs.len(), 2);
    }

    #[tokio::test]
    async fn early_end_and_failures_become_errors() {
        let evs = run(vec![Unit::End { complete: false }], Output::Native { drop_usage_only: false }).await;
        assert!(matches!(&evs[0], Event::Error(_)));
        let e = RelayError::from_upstream_status(529, "overloaded");
        let evs =
            run(vec![Unit::Fail(e), Unit::End { complete: true }], Output::Native { drop_usage_only: false })
                .await;
        assert_eq!(evs.len(), 1, "nothing after a failure");
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
