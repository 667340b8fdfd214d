//! The provider-neutral form every conversion goes through: a request, a whole answer, and the deltas a
//! streamed answer is made of. Inbound protocols parse into it and encode out of it; providers do the same on
//! the upstream side. Same protocol in and out never comes here: those bytes are forwarded.

use relay_core::pb::common::v1::TokenUsage;
use serde_json::Value;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    pub model: String,
    /// System prompt pieces, in order (mid-conversation system turns are appended here for upstreams
    /// that have no such thing).
    pub system: Vec<String>,
    pub messages: Vec<Message>,
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub stop: Vec<String>,
    pub n: Option<u32>,
    pub response_format: Option<ResponseFormat>,
    pub reasoning: Option<Reasoning>,
    pub parallel_tool_calls: Option<bool>,
    /// Further sampling controls, where the upstream has them.
    pub top_k: Option<u64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    /// End-user id (OpenAI `user`, Anthropic `metadata.user_id`).
    pub user: Option<String>,
    pub stream: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Image(Image),
    /// `arguments` is JSON text, exactly as the model produced it.
    ToolCall {
        id: String,
        name: String,
        arguments: String,
    },
    ToolResult {
        id: String,
        content: String,
        is_error: bool,
    },
    Thinking {
        text: String,
        signature: Option<String>,
    },
    RedactedThinking {
        data: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Image {
    Base64 { media_type: String, data: String },
    Url(String),
}

impl Image {
    /// `data:` URLs become base64 images; anything else stays a URL.
    pub fn from_url(url: &str) -> Self {
        if let Some(rest) = url.strip_prefix("data:")
            && let Some((meta, data)) = rest.split_once(',')
            && let Some(media_type) = meta.strip_suffix(";base64")
        {
            return Self::Base64 { media_type: media_type.to_owned(), data: data.to_owned() };
        }
        Self::Url(url.to_owned())
    }

    pub fn to_url(&self) -> String {
        match self {
            Self::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
            Self::Url(u) => u.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Value,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum ToolChoice {
    #[default]
    Auto,
    None,
    Required,
    Function(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    JsonObject,
    JsonSchema { name: String, schema: Value, strict: Option<bool> },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reasoning {
    /// `low` | `medium` | `high` (OpenAI effort).
    pub effort: Option<String>,
    /// Token budget (Anthropic `budget_tokens`, Gemini `thinkingBudget`).
    pub budget_tokens: Option<u64>,
}

impl Reasoning {
    /// A budget for providers that need one, from the effort when only that was given.
    pub fn budget(&self) -> u64 {
        self.budget_tokens.unwrap_or(match self.effort.as_deref() {
            Some("minimal") => 1024,
            Some("low") => 2048,
            Some("high") => 16_384,
            _ => 8192,
        })
    }
}

impl Request {
    /// The name of the tool a call id belongs to (providers that key results by name need it).
    pub fn tool_name_for(&self, id: &str) -> Option<&str> {
        self.messages.iter().flat_map(|m| &m.parts).find_map(|p| match p {
            Part::ToolCall { id: i, name, .. } if i == id => Some(name.as_str()),
            _ => None,
        })
    }
}

// === answers ===

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Finish {
    #[default]
    Stop,
    StopSequence,
    Length,
    ToolCalls,
    ContentFilter,
}

impl Finish {
    pub fn to_pb(self) -> relay_core::pb::adapter::v1::FinishReason {
        use relay_core::pb::adapter::v1::FinishReason as F;
        match self {
            Self::Stop | Self::StopSequence => F::Stop,
            Self::Length => F::Length,
            Self::ToolCalls => F::ToolCalls,
            Self::ContentFilter => F::ContentFilter,
        }
    }
}

/// One piece of a streamed answer, in upstream order.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    /// Upstream's id and model, when it says.
    Meta {
        id: Option<String>,
        model: Option<String>,
    },
    Text {
        choice: u32,
        text: String,
    },
    Thinking {
        choice: u32,
        text: String,
    },
    ThinkingSignature {
        choice: u32,
        signature: String,
    },
    RedactedThinking {
        choice: u32,
        data: String,
    },
    /// A new tool call; `index` counts tool calls within the choice from 0.
    ToolCallStart {
        choice: u32,
        index: u32,
        id: String,
        name: String,
    },
    ToolCallArgs {
        choice: u32,
        index: u32,
        fragment: String,
    },
    Finish {
        choice: u32,
        reason: Finish,
    },
    /// Usage so far; later values replace earlier non-zero fields.
    Usage(TokenUsage),
}

/// Folds usage reports: providers send input early and output late, or cumulative counts.
pub fn merge_usage(into: &mut TokenUsage, u: &TokenUsage) {
    let pick = |a: &mut u64, b: u64| {
        if b != 0 {
            *a = b;
        }
    };
    pick(&mut into.input_tokens, u.input_tokens);
    pick(&mut into.output_tokens, u.output_tokens);
    pick(&mut into.cached_input_tokens, u.cached_input_tokens);
    pick(&mut into.cache_write_tokens, u.cache_write_tokens);
    pick(&mut into.reasoning_tokens, u.reasoning_tokens);
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Choice {
    /// Text, Thinking, RedactedThinking and ToolCall parts, in the order they were produced.
    pub parts: Vec<Part>,
    pub finish: Option<Finish>,
}

/// A whole answer, assembled from deltas.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Response {
    pub id: Option<String>,
    pub model: Option<String>,
    pub choices: Vec<Choice>,
    pub usage: TokenUsage,
}

impl Response {
    fn choice(&mut self, i: u32) -> &mut Choice {
        let i = i as usize;
        if self.choices.len() <= i {
            self.choices.resize_with(i + 1, Choice::default);
        }
        &mut self.choices[i]
    }

    /// Applies one delta: consecutive text (or thinking) merges into one part; tool arguments append to
    /// their call.
    pub fn apply(&mut self, d: Delta) {
        match d {
            Delta::Meta { id, model } => {
                self.id = self.id.take().or(id);
                self.model = self.model.take().or(model);
            }
            Delta::Text { choice, text } => match self.choice(choice).parts.last_mut() {
                Some(Part::Text(t)) => t.push_str(&text),
                _ => self.choice(choice).parts.push(Part::Text(text)),
            },
            Delta::Thinking { choice, text } => match self.choice(choice).parts.last_mut() {
                Some(Part::Thinking { text: t, .. }) => t.push_str(&text),
                _ => self.choice(choice).parts.push(Part::Thinking { text, signature: None }),
            },
            Delta::ThinkingSignature { choice, signature } => {
                let parts = &mut self.choice(choice).parts;
                match parts.iter_mut().rev().find(|p| matches!(p, Part::Thinking { .. })) {
                    Some(Part::Thinking { signature: s, .. }) => *s = Some(signature),
                    _ => parts.push(Part::Thinking { text: String::new(), signature: Some(signature) }),
                }
            }
            Delta::RedactedThinking { choice, data } => {
                self.choice(choice).parts.push(Part::RedactedThinking { data })
            }
            Delta::ToolCallStart { choice, id, name, .. } => {
                self.choice(choice).parts.push(Part::ToolCall { id, name, arguments: String::new() })
            }
            Delta::ToolCallArgs { choice, index, fragment } => {
                let call = self
                    .choice(choice)
                    .parts
                    .iter_mut()
                    .filter(|p| matches!(p, Part::ToolCall { .. }))
                    .nth(index as usize);
                if let Some(Part::ToolCall { arguments, .. }) = call {
                    arguments.push_str(&fragment);
                }
            }
            Delta::Finish { choice, reason } => self.choice(choice).finish = Some(reason),
            Delta::Usage(u) => merge_usage(&mut self.usage, &u),
        }
    }
}

/// Text content of parts (text parts only), joined.
pub fn text_of(parts: &[Part]) -> String {
    parts.iter().filter_map(|p| if let Part::Text(t) = p { Some(t.as_str()) } else { None }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_assemble_into_an_answer() {
        let mut r = Response::default();
        for d in [
            Delta::Meta { id: Some("x".into()), model: Some("m".into()) },
            Delta::Thinking { choice: 0, text: "hm".into() },
            Delta::ThinkingSignature { choice: 0, signature: "sig".into() },
            Delta::Text { choice: 0, text: "Hel".into() },
            Delta::Text { choice: 0, text: "lo".into() },
            Delta::ToolCallStart { choice: 0, index: 0, id: "c1".into(), name: "f".into() },
            Delta::ToolCallArgs { choice: 0, index: 0, fragment: "{\"a\":".into() },
            Delta::ToolCallArgs { choice: 0, index: 0, fragment: "1}".into() },
            Delta::Finish { choice: 0, reason: Finish::ToolCalls },
            Delta::Usage(TokenUsage { input_tokens: 5, ..Default::default() }),
            Delta::Usage(TokenUsage { output_tokens: 3, ..Default::default() }),
        ] {
            r.apply(d);
        }
        assert_eq!(
            r.choices[0].parts,
            vec![
                Part::Thinking { text: "hm".into(), signature: Some("sig".into()) },
                Part::Text("Hello".into()),
                Part::ToolCall { id: "c1".into(), name: "f".into(), arguments: "{\"a\":1}".into() },
            ]
        );
        assert_eq!(r.choices[0].finish, Some(Finish::ToolCalls));
        assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (5, 3));
    }

    #[test]
    fn data_urls_round_trip() {
        let i = Image::from_url("data:image/png;base64,AAAA");
        assert_eq!(i, Image::Base64 { media_type: "image/png".into(), data: "AAAA".into() });
        assert_eq!(i.to_url(), "data:image/png;base64,AAAA");
        assert_eq!(Image::from_url("https://x/y.png"), Image::Url("https://x/y.png".into()));
    }
}
