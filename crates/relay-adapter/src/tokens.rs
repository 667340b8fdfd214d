//! Relay's own token counts, for answers that end without the provider's usage (the client left, the
//! upstream died, the stream was cut) and for count-tokens on upstreams without a counting API.
//!
//! OpenAI-family models are counted with their real tokenizer (tiktoken's o200k / cl100k BPE, embedded in
//! the binary): source `counted`. Other models (Claude, Gemini, Llama, Qwen, ...) have tokenizers Relay does
//! not ship; they are counted with o200k, which lands within roughly ±20 % of theirs on English text and
//! code, and reported as `estimated`. Message framing follows OpenAI's published accounting (3 tokens per
//! message, 3 to prime the reply). What does not belong here: prices, or deciding who pays.

use relay_core::pb::common::v1::UsageSource;
use tiktoken_rs::CoreBPE;

use crate::ir::{Delta, Part, Request};

/// Tokens an image is assumed to cost when its size is unknown (OpenAI's 512×512 high-detail tile + base).
const IMAGE_TOKENS: u64 = 255;
/// Per-message framing (`<|start|>role ... <|end|>`), and the reply primer, as OpenAI documents them.
const MESSAGE_FRAMING: u64 = 3;
const REPLY_PRIMER: u64 = 3;

/// A tokenizer chosen for one upstream model. Its tables (tens of MB once loaded) are loaded on first
/// use, not when it is chosen: most answers carry the provider's usage and are never counted.
#[derive(Clone, Copy)]
pub struct Tokenizer {
    bpe: fn() -> &'static CoreBPE,
    source: UsageSource,
}

impl Tokenizer {
    /// The real tokenizer for OpenAI-family models; o200k as a documented estimate for everything else.
    pub fn for_model(model: &str) -> Self {
        let m = model.rsplit('/').next().unwrap_or(model).to_ascii_lowercase();
        let cl100k =
            m.starts_with("gpt-4-") || m == "gpt-4" || m.starts_with("gpt-3.5") || m.contains("ada-002");
        let o200k = ["gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-", "gpt-oss"]
            .iter()
            .any(|p| m.starts_with(p));
        if cl100k {
            Self { bpe: tiktoken_rs::cl100k_base_singleton, source: UsageSource::Counted }
        } else {
            let source = if o200k { UsageSource::Counted } else { UsageSource::Estimated };
            Self { bpe: tiktoken_rs::o200k_base_singleton, source }
        }
    }

    pub fn source(&self) -> UsageSource {
        self.source
    }

    pub fn count(&self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        (self.bpe)().encode_ordinary(text).len() as u64
    }

    /// Input tokens of a whole request: system, messages (with framing), tool definitions.
    pub fn count_request(&self, ir: &Request) -> u64 {
        let mut n = REPLY_PRIMER;
        for s in &ir.system {
            n += MESSAGE_FRAMING + self.count(s);
        }
        for m in &ir.messages {
            n += MESSAGE_FRAMING;
            for p in &m.parts {
                n += match p {
                    Part::Text(t) => self.count(t),
                    Part::Image(_) => IMAGE_TOKENS,
                    Part::ToolCall { name, arguments, .. } => self.count(name) + self.count(arguments),
                    Part::ToolResult { content, .. } => self.count(content),
                    Part::Thinking { text, .. } => self.count(text),
                    Part::RedactedThinking { data } => (data.len() as u64).div_ceil(4),
                };
            }
        }
        for t in &ir.tools {
            n += self.count(&t.name)
                + t.description.as_deref().map_or(0, |d| self.count(d))
                + self.count(&t.parameters.to_string());
        }
        n
    }

    /// Output tokens one streamed delta adds (text, reasoning, tool names and arguments).
    pub fn count_delta(&self, d: &Delta) -> u64 {
        match d {
            Delta::Text { text, .. } | Delta::Thinking { text, .. } => self.count(text),
            Delta::ToolCallStart { name, .. } => self.count(name),
            Delta::ToolCallArgs { fragment, .. } => self.count(fragment),
            Delta::RedactedThinking { data, .. } => (data.len() as u64).div_ceil(4),
            Delta::Meta { .. } | Delta::ThinkingSignature { .. } | Delta::Finish { .. } | Delta::Usage(_) => {
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Message, Role};

    #[test]
    fn openai_models_are_counted_and_others_estimated() {
        assert_eq!(Tokenizer::for_model("gpt-4o-mini").source(), UsageSource::Counted);
        assert_eq!(Tokenizer::for_model("openai/gpt-5").source(), UsageSource::Counted);
        assert_eq!(Tokenizer::for_model("gpt-3.5-turbo").source(), UsageSource::Counted);
        assert_eq!(Tokenizer::for_model("claude-sonnet-4-5").source(), UsageSource::Estimated);
        assert_eq!(Tokenizer::for_model("gemini-2.5-pro").source(), UsageSource::Estimated);
    }

    #[test]
    fn counts_match_the_tokenizer() {
        let t = Tokenizer::for_model("gpt-4o");
        assert_eq!(t.count("hello world"), 2);
        assert_eq!(t.count(""), 0);
        let ir = Request {
            messages: vec![Message { role: Role::User, parts: vec![Part::Text("hello world".into())] }],
            ..Default::default()
        };
        assert_eq!(t.count_request(&ir), REPLY_PRIMER + MESSAGE_FRAMING + 2);
        assert_eq!(t.count_delta(&Delta::Text { choice: 0, text: "hello world".into() }), 2);
        assert_eq!(t.count_delta(&Delta::Finish { choice: 0, reason: crate::ir::Finish::Stop }), 0);
    }
}
