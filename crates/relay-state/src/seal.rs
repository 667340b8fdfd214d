//! AES-256-GCM sealing of stored bodies. Layout: version byte, 12-byte random nonce, ciphertext and tag.
//! The associated data names the owner and the object, so a sealed body only opens where it was stored.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

const VERSION: u8 = 1;

#[derive(Clone)]
pub struct Sealer {
    key: std::sync::Arc<LessSafeKey>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

fn aad(parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(&(p.len() as u64).to_be_bytes());
        out.extend_from_slice(p.as_bytes());
    }
    out
}

impl Sealer {
    /// A key derived from `secret` (SHA-256 under a fixed label, so the same secret used elsewhere, e.g.
    /// the key-hashing pepper, does not yield the same key material).
    pub fn from_secret(secret: &str) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"relay-state-encryption-v1\0");
        ctx.update(secret.as_bytes());
        let digest = ctx.finish();
        // A 32-byte digest is always a valid AES-256 key.
        #[allow(clippy::expect_used)]
        let key = UnboundKey::new(&AES_256_GCM, digest.as_ref()).expect("32-byte key");
        Self { key: std::sync::Arc::new(LessSafeKey::new(key)), rng: SystemRandom::new() }
    }

    pub fn seal(&self, context: &[&str], body: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        // The system RNG does not fail on supported platforms; a zero nonce would only ever be used once.
        let _ = self.rng.fill(&mut nonce);
        let mut buf = body.to_vec();
        let tag = self.key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(context)),
            &mut buf,
        );
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len() + 16);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        if let Ok(tag) = tag {
            out.extend_from_slice(tag.as_ref());
        }
        out
    }

    /// The body, if `sealed` was sealed by this key under `context`.
    pub fn open(&self, context: &[&str], sealed: &[u8]) -> Option<Vec<u8>> {
        let (&version, rest) = sealed.split_first()?;
        if version != VERSION || rest.len() < NONCE_LEN + 16 {
            return None;
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = body.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::from(aad(context)), &mut buf).ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bodies_open_only_under_their_key_and_context() {
        let s = Sealer::from_secret("a-long-enough-secret");
        let sealed = s.seal(&["org-a", "response", "resp_1"], b"hello");
        assert!(!sealed.windows(5).any(|w| w == b"hello"), "ciphertext leaks the body");
        assert_eq!(s.open(&["org-a", "response", "resp_1"], &sealed).as_deref(), Some(&b"hello"[..]));
        assert_eq!(s.open(&["org-b", "response", "resp_1"], &sealed), None, "another org");
        assert_eq!(s.open(&["org-a", "response", "resp_2"], &sealed), None, "another id");
        assert_eq!(
            Sealer::from_secret("another-secret-entirely").open(&["org-a", "response", "resp_1"], &sealed),
            None
        );
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(s.open(&["org-a", "response", "resp_1"], &tampered), None);
    }
}
