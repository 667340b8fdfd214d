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
}

/// Untokenized streamed text is counted once it reaches this many bytes (and at the end, when needed).
const COUNT_EVERY_BYTES: usize = 4096;

/// Relay's running count of a streamed answer's output without a tokenizer call per delta (a few
/// thousand instructions each, most of a stream's cost): text is gathered and tokenized a few kilobytes at
/// a time; the tail not tokenized yet counts as one token per 4 bytes until it is. The exact count is
/// taken only when it is billed, i.e. when the provider reported no output of its own, so most streams
/// never load a tokenizer at all.
#[derive(Default)]
pub struct OutputCount {
    counted: u64,
    pending: String,
}

impl OutputCount {
    pub fn add(&mut self, t: &Tokenizer, d: &Delta) {
        match d {
            Delta::Text { text, .. } | Delta::Thinking { text, .. } => self.pending.push_str(text),
            Delta::ToolCallStart { name, .. } => self.pending.push_str(name),
            Delta::ToolCallArgs { fragment, .. } => self.pending.push_str(fragment),
            Delta::RedactedThinking { data, .. } => self.counted += (data.len() as u64).div_ceil(4),
            Delta::Meta { .. } | Delta::ThinkingSignature { .. } | Delta::Finish { .. } | Delta::Usage(_) => {
            }
        }
        if self.pending.len() >= COUNT_EVERY_BYTES {
            self.flush(t);
        }
    }

    /// The count so far, the untokenized tail estimated.
    pub fn so_far(&self) -> u64 {
        self.counted + (self.pending.len() as u64).div_ceil(4)
    }

    /// The exact count (tokenizes what is pending).
    pub fn exact(&mut self, t: &Tokenizer) -> u64 {
        self.flush(t);
        self.counted
    }

    fn flush(&mut self, t: &Tokenizer) {
        self.counted += t.count(&self.pending);
        self.pending.clear();
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
    }

    #[test]
    fn streamed_output_is_counted_in_chunks_and_exactly_at_the_end() {
        let t = Tokenizer::for_model("gpt-4o");
        let mut c = OutputCount::default();
        c.add(&t, &Delta::Text { choice: 0, text: "hello".into() });
        c.add(&t, &Delta::Finish { choice: 0, reason: crate::ir::Finish::Stop });
        c.add(&t, &Delta::Text { choice: 0, text: " world".into() });
        assert_eq!(c.so_far(), 3, "11 bytes not tokenized yet: one token per 4 bytes");
        assert_eq!(c.exact(&t), 2);
        assert_eq!(c.so_far(), 2);
        // Past the threshold the text is tokenized as it arrives, and the estimate is exact again.
        let word = "tokens ".repeat(COUNT_EVERY_BYTES / 7 + 1);
        c.add(&t, &Delta::Text { choice: 0, text: word.clone() });
        assert_eq!(c.so_far(), 2 + t.count(&word));
        c.add(&t, &Delta::RedactedThinking { choice: 0, data: "x".repeat(8) });
        assert_eq!(c.exact(&t), 2 + t.count(&word) + 2);
    }
}
