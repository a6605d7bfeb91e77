//! The single-use secret that lets one data connection claim one pending client.

use std::fmt;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// A 128-bit random secret. It is compared in constant time and never printed: `Debug` shows
/// `Token(..)`, so a token cannot leak into a log line by accident.
#[derive(Clone, Copy, Serialize, Deserialize)]
pub struct Token([u8; 16]);

impl Token {
    /// A fresh token from the thread-local CSPRNG (ChaCha, seeded and reseeded from the OS).
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        Token(bytes)
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Token(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Token {}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_and_compare() {
        let a = Token::random();
        let b = Token::random();
        assert_ne!(a, b);
        assert_eq!(a, Token::from_bytes(*a.as_bytes()));
        assert_eq!(format!("{a:?}"), "Token(..)");
    }
}
