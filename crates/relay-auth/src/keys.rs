//! Key material: `rk_<id>_<secret>` generation, parsing, and HMAC-SHA256 hashing under the pepper.

use hmac::{Hmac, Mac};
use relay_core::Secret;
use sha2::Sha256;
use subtle::ConstantTimeEq;

pub const KEY_PREFIX: &str = "rk_";
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// HMAC-SHA256(pepper, secret).
pub fn digest(pepper: &Secret, secret: &str) -> [u8; 32] {
    // HMAC takes keys of any length, so `new_from_slice` cannot fail; the fallback only satisfies the type.
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(pepper.expose().as_bytes()) else {
        return [0; 32];
    };
    mac.update(secret.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Constant-time comparison of a presented secret against a stored hash.
pub fn verify(pepper: &Secret, secret: &str, stored: &[u8]) -> bool {
    stored.len() == 32 && bool::from(digest(pepper, secret).ct_eq(stored))
}

fn random_string(len: usize) -> anyhow::Result<String> {
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
    // 256 is a multiple of 62 * 4 + 8; the bias (8/256 on a few letters) is irrelevant at 190+ bits.
    Ok(bytes.iter().map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char).collect())
}

/// A new key: (public id, secret, the full key the caller sees once).
pub fn generate() -> anyhow::Result<(String, String, String)> {
    let id = random_string(12)?;
    let secret = random_string(40)?;
    let full = format!("{KEY_PREFIX}{id}_{secret}");
    Ok((id, secret, full))
}

/// `rk_<id>_<secret>` → (id, secret).
pub fn parse(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    (ok(id) && ok(secret)).then_some((id, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_back_and_verify() {
        let pepper = Secret::new("pepper-pepper-pepper");
        let (id, secret, full) = generate().unwrap();
        assert_eq!(parse(&full), Some((id.as_str(), secret.as_str())));
        assert_eq!((id.len(), secret.len()), (12, 40));
        let stored = digest(&pepper, &secret);
        assert!(verify(&pepper, &secret, &stored));
        assert!(!verify(&pepper, "wrong", &stored));
        assert!(!verify(&Secret::new("other-pepper-xxxxxx"), &secret, &stored));
        assert_ne!(generate().unwrap().2, full);
    }

    #[test]
    fn malformed_keys_do_not_parse() {
        for k in ["sk-abc", "rk_", "rk_abc", "rk__secret", "rk_id_", "rk_i d_secret", "rk_id_sec-ret"] {
            assert_eq!(parse(k), None, "{k}");
        }
    }
}
