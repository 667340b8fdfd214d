//! `multipart/form-data` bodies (file uploads): parsed from a body already read within the edge's size
//! limit, and written back (for forwarding a form with one field changed).

use bytes::Bytes;
use relay_core::RelayError;

/// One form field: its name, the file name and content type when it is a file, and its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub name: String,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Bytes,
}

fn bad(msg: &str) -> RelayError {
    RelayError::invalid_request(format!("the multipart/form-data body is malformed: {msg}"))
}

/// The boundary of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Result<String, RelayError> {
    let mut params = content_type.split(';').map(str::trim);
    let kind = params.next().unwrap_or_default();
    if !kind.eq_ignore_ascii_case("multipart/form-data") {
        return Err(RelayError::invalid_request("the body must be multipart/form-data"));
    }
    params
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        .filter(|b| !b.is_empty() && b.len() <= 200)
        .ok_or_else(|| bad("no boundary"))
}

/// `name="x"; filename="y"` values of a Content-Disposition header.
fn disposition_param(value: &str, key: &str) -> Option<String> {
    value.split(';').map(str::trim).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case(key).then(|| v.trim().trim_matches('"').to_owned())
    })
}

pub fn parse(body: &Bytes, boundary: &str) -> Result<Vec<Part>, RelayError> {
    let delimiter = format!("--{boundary}");
    // The first delimiter may open the body; every later one follows a line break (so content that
    // happens to hold `--boundary` mid-line is content).
    let first = memchr::memmem::find(body, delimiter.as_bytes()).ok_or_else(|| bad("no parts"))?;
    let inner = format!("\r\n{delimiter}");
    let finder = memchr::memmem::Finder::new(inner.as_bytes());
    let mut starts = vec![first];
    starts.extend(finder.find_iter(&body[first..]).map(|i| first + i + 2));
    if starts.len() < 2 {
        return Err(bad("no parts"));
    }
    let mut parts = Vec::new();
    for pair in starts.windows(2) {
        let (from, to) = (pair[0] + delimiter.len(), pair[1]);
        let chunk = &body[from..to];
        let chunk =
            chunk.strip_prefix(b"\r\n").ok_or_else(|| bad("a delimiter is not followed by a line break"))?;
        let head_end =
            memchr::memmem::find(chunk, b"\r\n\r\n").ok_or_else(|| bad("a part has no headers"))?;
        let head = std::str::from_utf8(&chunk[..head_end]).map_err(|_| bad("part headers are not UTF-8"))?;
        let data_start = from + 2 + head_end + 4;
        // The part's data ends before the line break that precedes the next delimiter.
        let data_end =
            to.checked_sub(2).filter(|e| *e >= data_start).ok_or_else(|| bad("a part is cut short"))?;
        let (mut name, mut filename, mut content_type) = (None, None, None);
        for line in head.split("\r\n") {
            let Some((k, v)) = line.split_once(':') else { continue };
            if k.trim().eq_ignore_ascii_case("content-disposition") {
                name = disposition_param(v, "name");
                filename = disposition_param(v, "filename");
            } else if k.trim().eq_ignore_ascii_case("content-type") {
                content_type = Some(v.trim().to_owned());
            }
        }
        let name = name.ok_or_else(|| bad("a part has no name"))?;
        parts.push(Part { name, filename, content_type, data: body.slice(data_start..data_end) });
    }
    if !body[starts[starts.len() - 1] + delimiter.len()..].starts_with(b"--") {
        return Err(bad("no closing delimiter"));
    }
    Ok(parts)
}

/// The text of a (non-file) field.
pub fn text<'a>(parts: &'a [Part], name: &str) -> Option<&'a str> {
    parts
        .iter()
        .find(|p| p.name == name && p.filename.is_none())
        .and_then(|p| std::str::from_utf8(&p.data).ok())
}

/// A form body from parts, with its boundary.
pub fn write(parts: &[Part], boundary: &str) -> Bytes {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"", p.name).as_bytes(),
        );
        if let Some(f) = &p.filename {
            out.extend_from_slice(format!("; filename=\"{}\"", f.replace('"', "")).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        if let Some(t) = &p.content_type {
            out.extend_from_slice(format!("Content-Type: {t}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&p.data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_parse_and_round_trip() {
        let body = Bytes::from_static(
            b"--xyz\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
              --xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n{\"a\":1}\r\n{\"b\":2}\r\n\r\n--xyz--\r\n",
        );
        let b = boundary("multipart/form-data; boundary=xyz").unwrap();
        let parts = parse(&body, &b).unwrap();
        assert_eq!(text(&parts, "purpose"), Some("batch"));
        assert_eq!(parts[1].filename.as_deref(), Some("in.jsonl"));
        assert_eq!(&parts[1].data[..], b"{\"a\":1}\r\n{\"b\":2}\r\n");
        assert_eq!(parse(&write(&parts, "other"), "other").unwrap(), parts);
    }

    #[test]
    fn malformed_forms_are_refused() {
        assert!(boundary("application/json").is_err());
        assert!(boundary("multipart/form-data").is_err());
        for body in [
            &b"no delimiters"[..],
            b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nv\r\n--x",
            b"--x\r\n\r\nv\r\n--x--",
        ] {
            assert!(parse(&Bytes::copy_from_slice(body), "x").is_err(), "{}", String::from_utf8_lossy(body));
        }
    }
}
