//! The parts of a Chat Completions answer (whole or one stream chunk) Relay reads, deserialized straight
//! from the bytes with strings borrowed where they have no escapes: parsing every answer into a
//! `serde_json::Value` tree first cost more than the rest of the adapter's work on a request.
//!
//! As lenient as reading a `Value` with `v["field"].as_str()`: a field of an unexpected type reads as
//! absent, never as an error; unknown fields are skipped.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use relay_core::pb::common::v1::TokenUsage;

/// A whole answer or one stream chunk.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Answer<'a> {
    #[serde(borrow)]
    pub id: Str<'a>,
    #[serde(borrow)]
    pub model: Str<'a>,
    #[serde(borrow)]
    pub choices: List<Obj<Choice<'a>>>,
    pub usage: Obj<Usage>,
    /// An in-band error (a chunk with a non-null `error`).
    pub error: NonNull,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Choice<'a> {
    pub index: Num,
    /// A whole answer's message.
    #[serde(borrow)]
    pub message: Obj<Message<'a>>,
    /// A stream chunk's delta.
    #[serde(borrow)]
    pub delta: Obj<Message<'a>>,
    #[serde(borrow)]
    pub finish_reason: Str<'a>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Message<'a> {
    #[serde(borrow)]
    pub content: Str<'a>,
    #[serde(borrow)]
    pub reasoning_content: Str<'a>,
    #[serde(borrow)]
    pub tool_calls: List<Obj<ToolCall<'a>>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ToolCall<'a> {
    pub index: Num,
    #[serde(borrow)]
    pub id: Str<'a>,
    #[serde(borrow)]
    pub function: Obj<Function<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Function<'a> {
    #[serde(borrow)]
    pub name: Str<'a>,
    #[serde(borrow)]
    pub arguments: Str<'a>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Usage {
    pub prompt_tokens: Num,
    pub completion_tokens: Num,
    pub prompt_tokens_details: Obj<PromptDetails>,
    pub completion_tokens_details: Obj<CompletionDetails>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct PromptDetails {
    pub cached_tokens: Num,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct CompletionDetails {
    pub reasoning_tokens: Num,
}

impl Usage {
    pub fn to_usage(&self) -> TokenUsage {
        let n = |v: &Num| v.0.unwrap_or(0);
        TokenUsage {
            input_tokens: n(&self.prompt_tokens),
            output_tokens: n(&self.completion_tokens),
            cached_input_tokens: self.prompt_tokens_details.0.as_ref().map_or(0, |d| n(&d.cached_tokens)),
            cache_write_tokens: 0,
            reasoning_tokens: self.completion_tokens_details.0.as_ref().map_or(0, |d| n(&d.reasoning_tokens)),
            ..Default::default()
        }
    }
}

/// A string, or absent (any other type).
#[derive(Default, Debug, PartialEq)]
pub struct Str<'a>(pub Option<Cow<'a, str>>);

impl Str<'_> {
    pub fn as_str(&self) -> Option<&str> {
        self.0.as_deref()
    }
    pub fn owned(&self) -> Option<String> {
        self.0.as_deref().map(str::to_owned)
    }
}

/// A non-negative integer, or absent (any other type, as `Value::as_u64`).
#[derive(Default, Debug, PartialEq, Clone, Copy)]
pub struct Num(pub Option<u64>);

/// An object read as `T`, or absent (any other type).
#[derive(Default)]
pub struct Obj<T>(pub Option<T>);

/// An array's elements, or absent (any other type).
pub struct List<T>(pub Option<Vec<T>>);

impl<T> Default for List<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<T> List<T> {
    pub fn items(&self) -> &[T] {
        self.0.as_deref().unwrap_or_default()
    }
}

/// Present with a value other than `null`.
#[derive(Default)]
pub struct NonNull(pub bool);

/// Visitor methods for JSON types a lenient field does not take: each reads as the default (absent).
macro_rules! absent {
    (bool) => { fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> { Ok(Default::default()) } };
    (u64) => { fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> { Ok(Default::default()) } };
    (i64) => { fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> { Ok(Default::default()) } };
    (f64) => { fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> { Ok(Default::default()) } };
    (str) => { fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> { Ok(Default::default()) } };
    (unit) => { fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> { Ok(Default::default()) } };
    (none) => { fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> { Ok(Default::default()) } };
    ($($kind:ident),+) => { $(absent!($kind);)+ };
}

/// Accepts every JSON type, handing each to `on` (`None` = not the expected type: skipped).
macro_rules! lenient_visitor {
    ($name:ident, $out:ty, $expect:literal, { $($body:tt)* }) => {
        struct $name;
        impl<'de> Visitor<'de> for $name {
            type Value = $out;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str($expect)
            }
            absent!(bool, f64, unit, none);
            $($body)*
        }
    };
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lenient_visitor!(V, Option<Cow<'de, str>>, "a string", {
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Some(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Some(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Some(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                skip_seq(seq).map(|()| None)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                skip_map(map).map(|()| None)
            }
        });
        d.deserialize_any(V).map(Str)
    }
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lenient_visitor!(V, Option<u64>, "a non-negative integer", {
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Some(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(u64::try_from(v).ok())
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                skip_seq(seq).map(|()| None)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                skip_map(map).map(|()| None)
            }
        });
        d.deserialize_any(V).map(Num)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Option<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            absent!(bool, u64, i64, f64, str, unit, none);
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                skip_seq(seq).map(|()| None)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Some)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData)).map(Obj)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Option<Vec<T>>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array")
            }
            absent!(bool, u64, i64, f64, str, unit, none);
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                skip_map(map).map(|()| None)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(Some(out))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData)).map(List)
    }
}

impl<'de> Deserialize<'de> for NonNull {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(NonNull(!IgnoredAnyOrNull::deserialize(d)?.0))
    }
}

/// Skips any value; `true` when it was `null`.
struct IgnoredAnyOrNull(bool);

impl<'de> Deserialize<'de> for IgnoredAnyOrNull {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = bool;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any value")
            }
            absent!(bool, u64, i64, f64, str);
            fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
                Ok(true)
            }
            fn visit_none<E: de::Error>(self) -> Result<bool, E> {
                Ok(true)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<bool, A::Error> {
                skip_seq(seq).map(|()| false)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<bool, A::Error> {
                skip_map(map).map(|()| false)
            }
        }
        d.deserialize_any(V).map(IgnoredAnyOrNull)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_value_indexing_reads_and_skips_the_rest() {
        let body = br#"{"id":"c1","model":"m","extra":{"deep":[1,{"x":null}]},"choices":[
            {"index":1,"message":{"content":"a\"b","tool_calls":[{"id":"t","function":{"name":"f","arguments":"{}"}}]},
             "finish_reason":"tool_calls"}],
            "usage":{"prompt_tokens":3,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":2},
                     "completion_tokens_details":{"reasoning_tokens":1}}}"#;
        let a: Answer = serde_json::from_slice(body).unwrap();
        assert_eq!(a.id.as_str(), Some("c1"));
        let c = a.choices.items()[0].0.as_ref().unwrap();
        assert_eq!(c.index, Num(Some(1)));
        let m = c.message.0.as_ref().unwrap();
        assert_eq!(m.content.as_str(), Some("a\"b"), "escapes are unescaped");
        let tc = m.tool_calls.items()[0].0.as_ref().unwrap();
        assert_eq!(tc.function.0.as_ref().unwrap().name.as_str(), Some("f"));
        assert_eq!(c.finish_reason.as_str(), Some("tool_calls"));
        let u = a.usage.0.unwrap().to_usage();
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.cached_input_tokens, u.reasoning_tokens),
            (3, 4, 2, 1)
        );
        assert!(!a.error.0);
    }

    #[test]
    fn unexpected_types_read_as_absent() {
        let body = br#"{"id":7,"model":null,"choices":{"0":1},"usage":"many","error":null}"#;
        let a: Answer = serde_json::from_slice(body).unwrap();
        assert_eq!((a.id.0, a.model.0, a.choices.0.is_none()), (None, None, true));
        assert!(a.usage.0.is_none() && !a.error.0);
        let body = br#"{"choices":[5,{"index":-1,"delta":{"content":["x"],"tool_calls":"no"}}],"error":{"message":"x"}}"#;
        let a: Answer = serde_json::from_slice(body).unwrap();
        assert!(a.choices.items()[0].0.is_none());
        let c = a.choices.items()[1].0.as_ref().unwrap();
        assert_eq!(c.index, Num(None));
        let d = c.delta.0.as_ref().unwrap();
        assert!(d.content.0.is_none() && d.tool_calls.0.is_none());
        assert!(a.error.0);
    }

    #[test]
    fn broken_json_is_still_an_error() {
        assert!(serde_json::from_slice::<Answer>(br#"{"id":"x""#).is_err());
        // Not an object: nothing in it is read (a whole answer without `choices` is refused by its reader).
        assert!(serde_json::from_slice::<Answer>(b"[1,2]").unwrap().choices.0.is_none());
    }
}
