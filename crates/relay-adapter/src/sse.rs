//! Incremental Server-Sent Events framing: bytes in, whole events out, each with its exact raw bytes (so a
//! pass-through forwards what the upstream sent) and its joined `data:` payload (so usage can be read).

use bytes::{Bytes, BytesMut};

/// One complete event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The event exactly as received, terminating blank line included.
    pub raw: Bytes,
    /// `event:` field, if any.
    pub event: Option<String>,
    /// All `data:` lines joined with `\n`.
    pub data: String,
}

/// Splits a byte stream into events. Feed chunks with [`SseParser::push`], then call [`SseParser::next_event`]
/// until it returns `None`.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: BytesMut,
    /// Bytes of `buf` already scanned without finding an event end.
    scanned: usize,
}

impl SseParser {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes received that do not (yet) form a whole event.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn next_event(&mut self) -> Option<SseEvent> {
        let end = self.find_event_end()?;
        let raw = self.buf.split_to(end).freeze();
        self.scanned = 0;
        Some(parse_event(raw))
    }

    /// Index just past the blank line ending the first event (`\n\n`, `\r\n\r\n` or `\r\r`).
    fn find_event_end(&mut self) -> Option<usize> {
        let b = &self.buf[..];
        let start = self.scanned.saturating_sub(3);
        // Only a line break can end an event: jump from one to the next (a byte-by-byte scan was the
        // largest item of a streamed answer's CPU profile).
        for i in memchr::memchr2_iter(b'\n', b'\r', &b[start..]).map(|i| i + start) {
            if b[i] == b'\n' && i >= 1 && b[i - 1] == b'\n' {
                return Some(i + 1);
            }
            if b[i] == b'\n' && i >= 3 && &b[i - 3..i] == b"\r\n\r" {
                return Some(i + 1);
            }
            if b[i] == b'\r' && i >= 1 && b[i - 1] == b'\r' && b.get(i + 1) != Some(&b'\n') {
                return Some(i + 1);
            }
        }
        self.scanned = b.len();
        None
    }
}

fn parse_event(raw: Bytes) -> SseEvent {
    // Valid UTF-8 (nearly always) is checked by the fast path; the lossy decoder only for the rest.
    let text = match std::str::from_utf8(&raw) {
        Ok(t) => std::borrow::Cow::Borrowed(t),
        Err(_) => String::from_utf8_lossy(&raw),
    };
    let mut event = None;
    let (mut data, mut lines) = (String::new(), 0);
    for line in text.split(['\n', '\r']) {
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if lines > 0 {
                    data.push('\n');
                }
                data.push_str(value);
                lines += 1;
            }
            "event" => event = Some(value.to_owned()),
            _ => {}
        }
    }
    SseEvent { raw, event, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut SseParser) -> Vec<SseEvent> {
        std::iter::from_fn(|| p.next_event()).collect()
    }

    #[test]
    fn splits_events_across_arbitrary_chunk_boundaries() {
        let input = b"data: {\"a\":1}\n\nevent: ping\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        for split in 1..input.len() {
            let mut p = SseParser::default();
            p.push(&input[..split]);
            let mut got = all(&mut p);
            p.push(&input[split..]);
            got.extend(all(&mut p));
            assert_eq!(got.len(), 3, "split at {split}");
            assert_eq!(got[0].data, "{\"a\":1}");
            assert_eq!(&got[0].raw[..], b"data: {\"a\":1}\n\n");
            assert_eq!(got[1].event.as_deref(), Some("ping"));
            assert_eq!(got[1].data, "x\ny");
            assert_eq!(got[2].data, "[DONE]");
            assert_eq!(p.buffered(), 0);
        }
    }

    #[test]
    fn handles_crlf_and_keeps_partial_tail() {
        let mut p = SseParser::default();
        p.push(b"data: one\r\n\r\ndata: tw");
        let got = all(&mut p);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data, "one");
        assert_eq!(p.buffered(), 8);
        p.push(b"o\n\n");
        assert_eq!(p.next_event().unwrap().data, "two");
    }

    #[test]
    fn comments_are_events_without_data() {
        let mut p = SseParser::default();
        p.push(b": keep-alive\n\n");
        let e = p.next_event().unwrap();
        assert_eq!(e.data, "");
        assert_eq!(e.event, None);
    }
}
