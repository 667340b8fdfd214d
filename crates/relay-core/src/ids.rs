//! Request ids (UUIDv7 unless the client supplied a usable `x-request-id`) and the clock: UTC unix time.

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

/// The client's `x-request-id` if it is safe to echo and store (1..=128 visible ASCII characters), else a new id.
pub fn request_id_from_client(client: Option<&str>) -> String {
    match client {
        Some(id) if is_valid_client_id(id) => id.to_owned(),
        _ => new_request_id(),
    }
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
    fn client_ids_are_echoed_only_when_safe() {
        assert_eq!(request_id_from_client(Some("abc-123")), "abc-123");
        assert_ne!(request_id_from_client(Some("has space")), "has space");
        assert_ne!(request_id_from_client(Some("")), "");
        let long = "x".repeat(129);
        assert_ne!(request_id_from_client(Some(&long)), long);
        assert_ne!(request_id_from_client(Some("bad\nline")), "bad\nline");
    }
}
