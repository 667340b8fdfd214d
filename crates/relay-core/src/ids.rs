//! Request ids and the clock (UTC unix time). Every request gets a Relay-generated UUIDv7: its billing id.
//! A client's `x-request-id` is kept beside it for correlation only, never as a key.

/// Now, as UTC unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A fresh time-ordered id.
pub fn new_request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The client's `x-request-id` if it is safe to echo and store (1..=128 visible ASCII characters).
pub fn client_request_id(client: Option<&str>) -> Option<String> {
    client.filter(|id| is_valid_client_id(id)).map(str::to_owned)
}

fn is_valid_client_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_uuid_v7() {
        let id = new_request_id();
        let parsed = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
    }

    #[test]
    fn client_ids_are_kept_only_when_safe() {
        assert_eq!(client_request_id(Some("abc-123")).as_deref(), Some("abc-123"));
        assert_eq!(client_request_id(Some("has space")), None);
        assert_eq!(client_request_id(Some("")), None);
        assert_eq!(client_request_id(Some(&"x".repeat(129))), None);
        assert_eq!(client_request_id(Some("bad\nline")), None);
        assert_eq!(client_request_id(None), None);
    }
}
