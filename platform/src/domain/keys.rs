//! API keys: `dfk_<key id>_<secret>`. The key id (64 bits) is the lookup handle; the secret
//! (256 bits) is never stored, only its HMAC-SHA256 under the server secret, and it is
//! compared in constant time.

use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::Sha256;

const PREFIX: &str = "dfk_";
const KEY_ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// A freshly minted key: the full token is shown once, then only `key_id` and `hmac` remain.
pub struct NewKey {
    pub key_id: String,
    pub token: String,
    pub hmac: Vec<u8>,
}

/// A presented token split into its parts (not yet verified).
#[derive(Debug, PartialEq, Eq)]
pub struct PresentedKey<'a> {
    pub key_id: &'a str,
    secret: &'a str,
}

/// Hashes key secrets under the server secret.
#[derive(Clone)]
pub struct KeyHasher {
    server_secret: Vec<u8>,
}

impl KeyHasher {
    pub fn new(server_secret: &str) -> Self {
        Self {
            server_secret: server_secret.as_bytes().to_vec(),
        }
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        Hmac::<Sha256>::new_from_slice(&self.server_secret).expect("HMAC takes any key length")
    }

    pub fn generate(&self) -> NewKey {
        let mut rng = rand::rng();
        let mut id = [0u8; KEY_ID_BYTES];
        let mut secret = [0u8; SECRET_BYTES];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
        let key_id = hex::encode(id);
        let secret = hex::encode(secret);
        let hmac = self.hash(&secret);
        NewKey {
            token: format!("{PREFIX}{key_id}_{secret}"),
            key_id,
            hmac,
        }
    }

    /// The key a client's webhooks are signed with: derived from the server secret, so
    /// every process of a deployment signs alike and nothing extra is stored.
    pub fn webhook_key(&self, client_id: &str) -> Vec<u8> {
        self.hash(&format!("webhook-signing:{client_id}"))
    }

    fn hash(&self, secret: &str) -> Vec<u8> {
        let mut mac = self.mac();
        mac.update(secret.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// Constant-time check of a presented secret against the stored HMAC.
    pub fn verify(&self, presented: &PresentedKey<'_>, stored_hmac: &[u8]) -> bool {
        let mut mac = self.mac();
        mac.update(presented.secret.as_bytes());
        mac.verify_slice(stored_hmac).is_ok()
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `s` has the shape of a key id (16 hex digits).
pub fn is_key_id(s: &str) -> bool {
    is_hex(s, KEY_ID_BYTES * 2)
}

/// Splits `dfk_<16 hex>_<64 hex>`; anything else is `None`.
pub fn parse(token: &str) -> Option<PresentedKey<'_>> {
    let (key_id, secret) = token.strip_prefix(PREFIX)?.split_once('_')?;
    (is_hex(key_id, KEY_ID_BYTES * 2) && is_hex(secret, SECRET_BYTES * 2))
        .then_some(PresentedKey { key_id, secret })
}

/// Equality whose running time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A random token for operators or server secrets: 32 bytes, hex.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_verify_and_others_do_not() {
        let h = KeyHasher::new("server-secret");
        let k = h.generate();
        let p = parse(&k.token).unwrap();
        assert_eq!(p.key_id, k.key_id);
        assert!(h.verify(&p, &k.hmac));
        let other = h.generate();
        assert!(!h.verify(&parse(&other.token).unwrap(), &k.hmac));
        assert!(!KeyHasher::new("another-secret").verify(&p, &k.hmac));
    }

    #[test]
    fn malformed_tokens_do_not_parse() {
        let k = KeyHasher::new("s").generate();
        assert!(parse(&k.token[1..]).is_none());
        assert!(parse(&k.token[..k.token.len() - 1]).is_none());
        assert!(parse(&k.token.replace('_', "-")).is_none());
        assert!(parse("dfk_zzzzzzzzzzzzzzzz_00").is_none());
        assert!(parse("").is_none());
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
