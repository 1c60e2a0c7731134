//! Identifiers that parse at the edge, so an invalid one cannot exist past it.

use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// Why an identifier was rejected; the message tells a client what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(pub String);

/// A session id: a UUID, stored in its lowercase hyphenated form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SessionId(Uuid);

impl SessionId {
    /// A fresh random session id.
    pub fn new() -> Self {
        SessionId(Uuid::new_v4())
    }

    /// Parses a client-supplied session id.
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        Uuid::try_parse(raw)
            .map(SessionId)
            .map_err(|_| InvalidId(format!("session id {raw:?} is not a UUID")))
    }
}

impl Default for SessionId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl TryFrom<String> for SessionId {
    type Error = InvalidId;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        SessionId::parse(&raw)
    }
}

impl From<SessionId> for String {
    fn from(id: SessionId) -> String {
        id.to_string()
    }
}

/// Characters allowed in user ids and idempotency keys: free of the key separator (`#`) and of
/// path separators. `|` is in identity providers' subjects (Auth0's `auth0|64f1c2…`,
/// `google-oauth2|1098…`); a client percent-encodes it in a path.
fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '+' | '=' | '|')
}

fn parse_key(kind: &str, raw: &str, max: usize) -> Result<String, InvalidId> {
    if raw.is_empty() {
        return Err(InvalidId(format!("{kind} must not be empty")));
    }
    if raw.len() > max {
        return Err(InvalidId(format!("{kind} is longer than {max} characters")));
    }
    if let Some(bad) = raw.chars().find(|c| !is_key_char(*c)) {
        return Err(InvalidId(format!("{kind} contains {bad:?}; use letters, digits and - _ . @ + = |")));
    }
    Ok(raw.to_owned())
}

macro_rules! key_newtype {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            #[doc = concat!("Parses a ", $kind, ": 1 to ", $max, " URL-safe characters.")]
            pub fn parse(raw: &str) -> Result<Self, InvalidId> {
                parse_key($kind, raw, $max).map($name)
            }

            /// The id as stored.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(raw: String) -> Result<Self, Self::Error> {
                $name::parse(&raw)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

key_newtype!(
    /// The owner of sessions, as the caller names it.
    UserId,
    "user id",
    128
);
key_newtype!(
    /// A client's idempotency key for one send, scoped to its user.
    ClientMessageId,
    "client_message_id",
    128
);

/// A turn number within a session; the first turn is 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct Turn(u32);

impl Turn {
    /// The first turn of a session.
    pub const FIRST: Turn = Turn(1);

    /// Accepts 1 and up.
    pub fn new(n: u64) -> Result<Self, InvalidId> {
        match u32::try_from(n) {
            Ok(n) if n >= 1 => Ok(Turn(n)),
            _ => Err(InvalidId(format!("turn {n} is out of range (1 and up)"))),
        }
    }

    /// Parses a decimal turn number.
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        raw.parse::<u64>()
            .map_err(|_| InvalidId(format!("turn {raw:?} is not a positive number")))
            .and_then(Turn::new)
    }

    /// The turn after this one.
    pub fn next(self) -> Turn {
        Turn(self.0 + 1)
    }

    /// The number itself.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Turn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl TryFrom<u64> for Turn {
    type Error = InvalidId;
    fn try_from(n: u64) -> Result<Self, Self::Error> {
        Turn::new(n)
    }
}

impl From<Turn> for u64 {
    fn from(t: Turn) -> u64 {
        t.0.into()
    }
}

/// Whose message it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The person chatting.
    User,
    /// The model's reply.
    Assistant,
}

impl Role {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// A message's id: its session, turn and role, so each turn has at most one of each role.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageId {
    /// The session the message belongs to.
    pub session: SessionId,
    /// The turn it belongs to.
    pub turn: Turn,
    /// User or assistant.
    pub role: Role,
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.session, self.turn, self.role.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_must_be_uuids() {
        let id = SessionId::new();
        assert_eq!(SessionId::parse(&id.to_string()), Ok(id));
        assert!(SessionId::parse("abc").is_err());
        assert!(SessionId::parse("").is_err());
    }

    #[test]
    fn user_ids_reject_separators_and_empties() {
        assert!(UserId::parse("alice@example.com").is_ok());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a#b").is_err());
        assert!(UserId::parse("a/b").is_err());
        assert!(UserId::parse(&"x".repeat(129)).is_err());
        assert!(UserId::parse(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn identity_providers_subjects_are_user_ids() {
        for sub in ["auth0|64f1c2", "google-oauth2|1098", "samlp|corp|user@corp.example", "abc@clients"] {
            assert_eq!(UserId::parse(sub).map(|u| u.as_str().to_owned()), Ok(sub.to_owned()));
        }
        for bad in ["a#b", "a/b", "a b", "a%7Cb", "a?b"] {
            assert!(UserId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn turns_start_at_one() {
        assert!(Turn::new(0).is_err());
        assert_eq!(Turn::parse("3").map(Turn::get), Ok(3));
        assert!(Turn::parse("-1").is_err());
        assert_eq!(Turn::FIRST.next().get(), 2);
    }

    #[test]
    fn message_ids_name_session_turn_and_role() {
        let session = SessionId::parse("6f1c1a1e-8c1b-4c53-9b8e-2f6a3f1d2c10").unwrap();
        let id = MessageId { session, turn: Turn::FIRST, role: Role::Assistant };
        assert_eq!(id.to_string(), "6f1c1a1e-8c1b-4c53-9b8e-2f6a3f1d2c10:1:assistant");
    }
}
