//! The one DynamoDB table: its keys, indexes and TTL attribute, and the item keys built on them.
//!
//! Local bootstrap creates the table from [`create_table`]; `template.yaml` must describe the same
//! table (a test compares them).
//!
//! | item | `pk` | `sk` |
//! |---|---|---|
//! | session | `S#{session}` | `SESSION` |
//! | message | `S#{session}` | `MSG#{turn:08}#1` (user), `MSG#{turn:08}#2` (assistant) |
//! | token chunk | `S#{session}` | `CHUNK#{turn:08}#{seq:08}` |
//! | transition | `S#{session}` | `TRANS#{version:010}` |
//! | idempotency key | `U#{user}` | `IDEM#{client_message_id}` |
//! | expired-session marker | `U#{user}` | `EXPIRED#{session}` |
//! | feed event | `U#{user}` | `FEED#{at:013}#{session}#{version}` (kept an hour) |
//!
//! Index `by_user` (`gsi1pk` = `U#{user}`, `gsi1sk` = `{created_at:013}#{session}`, keys only) lists a
//! user's sessions newest first; its keys never change, so session updates do not write to it.
//! Index `due_by_time` (`due_shard`, `due_at`, keys only) is sparse: only sessions with a deadline
//! (a turn in flight, or a turn ended and not yet idle-expired) carry `due_shard`, and a sweep's
//! key condition `due_at <= now` reads exactly the sessions it has to act on, however many wait
//! for a later deadline. Moving a deadline moves the entry (two index writes). The sessions are
//! spread over [`DUE_SHARDS`] shards by the first hex digit of their id, so no index partition
//! takes more than a sixteenth of the deadline writes (DynamoDB allows 1,000 a second each).

use crate::ids::{ClientMessageId, Role, SessionId, Turn, UserId};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType, StreamSpecification, StreamViewType, TimeToLiveSpecification,
};
use aws_sdk_dynamodb::Client;

/// Partition key attribute.
pub const PK: &str = "pk";
/// Sort key attribute.
pub const SK: &str = "sk";
/// TTL attribute (epoch seconds); DynamoDB deletes the item some time after it passes.
pub const TTL_ATTRIBUTE: &str = "expires_at";
/// The user-sessions index.
pub const BY_USER_INDEX: &str = "by_user";
/// Partition key of [`BY_USER_INDEX`].
pub const GSI1_PK: &str = "gsi1pk";
/// Sort key of [`BY_USER_INDEX`].
pub const GSI1_SK: &str = "gsi1sk";
/// The sparse index of sessions by deadline.
pub const DUE_INDEX: &str = "due_by_time";
/// Partition key of [`DUE_INDEX`]: one of [`DUE_SHARDS`] shards, so no single partition is hot.
pub const DUE_SHARD: &str = "due_shard";
/// When the session's deadline passes (epoch ms): its turn's, its lease's, or its idle expiry;
/// the sort key of [`DUE_INDEX`].
pub const DUE_AT: &str = "due_at";
/// How many shards [`DUE_INDEX`] spreads sessions over: one per hex digit a session id starts
/// with.
pub const DUE_SHARDS: u32 = 16;

/// Sort key of the session item.
pub const SESSION_SK: &str = "SESSION";
/// Sort key prefix of message items.
pub const MESSAGE_PREFIX: &str = "MSG#";
/// Sort key prefix of token chunk items.
pub const CHUNK_PREFIX: &str = "CHUNK#";
/// Sort key prefix of transition records.
pub const TRANSITION_PREFIX: &str = "TRANS#";
/// Sort key prefix of idempotency records.
pub const IDEMPOTENCY_PREFIX: &str = "IDEM#";
/// Sort key prefix of the markers that a session removed by its TTL was counted off.
pub const EXPIRED_PREFIX: &str = "EXPIRED#";
/// Sort key prefix of a user's feed: what happened to their sessions, by time.
pub const FEED_PREFIX: &str = "FEED#";

/// Partition key of everything in a session.
pub fn session_pk(session: SessionId) -> String {
    format!("S#{session}")
}

/// Partition key of a user's idempotency records, and the `by_user` index key.
pub fn user_pk(user: &UserId) -> String {
    format!("U#{user}")
}

/// Sort key of a message: the user's message sorts before the reply of the same turn.
pub fn message_sk(turn: Turn, role: Role) -> String {
    let rank = match role {
        Role::User => 1,
        Role::Assistant => 2,
    };
    format!("{MESSAGE_PREFIX}{:08}#{rank}", turn.get())
}

/// Sort key prefix of one turn's chunks.
pub fn chunk_turn_prefix(turn: Turn) -> String {
    format!("{CHUNK_PREFIX}{:08}#", turn.get())
}

/// Sort key of a chunk.
pub fn chunk_sk(turn: Turn, seq: u32) -> String {
    format!("{}{seq:08}", chunk_turn_prefix(turn))
}

/// Sort key of the transition record that produced `version`.
pub fn transition_sk(version: u64) -> String {
    format!("{TRANSITION_PREFIX}{version:010}")
}

/// Sort key of a feed event: when (epoch ms), then the session and its version (or, for an event
/// that is no transition, a unique suffix), so ids sort by time and never collide.
pub fn feed_sk(at_ms: u64, session: SessionId, unique: &str) -> String {
    format!("{FEED_PREFIX}{at_ms:013}#{session}#{unique}")
}

/// Sort key of an idempotency record.
pub fn idempotency_sk(key: &ClientMessageId) -> String {
    format!("{IDEMPOTENCY_PREFIX}{key}")
}

/// Sort key of the marker that session `session`, removed by its TTL, was counted off its
/// user's sessions.
pub fn expired_sk(session: SessionId) -> String {
    format!("{EXPIRED_PREFIX}{session}")
}

/// `by_user` sort key: creation time then id, so newest-first is a reverse query.
pub fn by_user_sk(created_at_ms: u64, session: SessionId) -> String {
    format!("{created_at_ms:013}#{session}")
}

/// The `due` shard a session belongs to: stable, spread by the id's randomness (the first hex
/// digit of a random UUID is uniform).
pub fn due_shard(session: SessionId) -> String {
    let digit = session.to_string().chars().next().and_then(|c| c.to_digit(16)).unwrap_or(0);
    format!("DUE#{}", digit % DUE_SHARDS)
}

/// Every `due` shard name.
pub fn due_shards() -> impl Iterator<Item = String> {
    (0..DUE_SHARDS).map(|n| format!("DUE#{n}"))
}

/// Every key attribute of the table and its indexes, with its DynamoDB type (`S` or `N`).
pub const KEY_ATTRIBUTES: [(&str, &str); 6] =
    [(PK, "S"), (SK, "S"), (GSI1_PK, "S"), (GSI1_SK, "S"), (DUE_SHARD, "S"), (DUE_AT, "N")];

/// A global secondary index, as data (local bootstrap and the template drift test read it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexDefinition {
    /// Index name.
    pub name: &'static str,
    /// Partition key attribute.
    pub hash_key: &'static str,
    /// Sort key attribute.
    pub range_key: &'static str,
    /// `KEYS_ONLY`, `INCLUDE` or `ALL`.
    pub projection: &'static str,
    /// Projected non-key attributes (for `INCLUDE`).
    pub non_key_attributes: &'static [&'static str],
}

/// The table's indexes.
pub const INDEXES: [IndexDefinition; 2] = [
    IndexDefinition {
        name: BY_USER_INDEX,
        hash_key: GSI1_PK,
        range_key: GSI1_SK,
        projection: "KEYS_ONLY",
        non_key_attributes: &[],
    },
    IndexDefinition {
        name: DUE_INDEX,
        hash_key: DUE_SHARD,
        range_key: DUE_AT,
        projection: "KEYS_ONLY",
        non_key_attributes: &[],
    },
];

fn key(name: &str, key_type: KeyType) -> KeySchemaElement {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(key_type)
        .build()
        .expect("key schema fields are set")
}

fn index(def: &IndexDefinition) -> GlobalSecondaryIndex {
    let mut projection = Projection::builder().projection_type(ProjectionType::from(def.projection));
    for attribute in def.non_key_attributes {
        projection = projection.non_key_attributes(*attribute);
    }
    GlobalSecondaryIndex::builder()
        .index_name(def.name)
        .key_schema(key(def.hash_key, KeyType::Hash))
        .key_schema(key(def.range_key, KeyType::Range))
        .projection(projection.build())
        .build()
        .expect("index fields are set")
}

/// Creates the table (on-demand, both indexes, a stream of old images) and enables TTL. For local emulators and tests;
/// in AWS, `template.yaml` creates it.
pub async fn create_table(client: &Client, table: &str) -> Result<(), aws_sdk_dynamodb::Error> {
    let mut request = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(key(PK, KeyType::Hash))
        .key_schema(key(SK, KeyType::Range));
    for (name, kind) in KEY_ATTRIBUTES {
        let definition = AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::from(kind))
            .build()
            .expect("attribute definition fields are set");
        request = request.attribute_definitions(definition);
    }
    for def in &INDEXES {
        request = request.global_secondary_indexes(index(def));
    }
    // The sweeper learns of sessions removed by TTL from the stream, and needs their owner.
    let stream = StreamSpecification::builder()
        .stream_enabled(true)
        .stream_view_type(StreamViewType::OldImage)
        .build()
        .expect("stream fields are set");
    request = request.stream_specification(stream);
    request.send().await?;
    client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .attribute_name(TTL_ATTRIBUTE)
                .enabled(true)
                .build()
                .expect("ttl fields are set"),
        )
        .send()
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_keys_order_by_turn_then_sequence() {
        let t2 = Turn::new(2).unwrap();
        let t10 = Turn::new(10).unwrap();
        assert!(chunk_sk(t2, 9) < chunk_sk(t2, 10));
        assert!(chunk_sk(t2, 99_999) < chunk_sk(t10, 0));
        assert!(message_sk(t2, Role::User) < message_sk(t10, Role::User));
        assert!(message_sk(t2, Role::User) < message_sk(t2, Role::Assistant));
        assert!(transition_sk(9) < transition_sk(10));
        assert!(chunk_sk(t2, 0).starts_with(&chunk_turn_prefix(t2)));
    }

    #[test]
    fn each_first_hex_digit_of_a_session_id_has_a_shard_of_its_own() {
        let shards: std::collections::BTreeSet<String> = "0123456789abcdef"
            .chars()
            .map(|c| {
                let id = SessionId::parse(&format!("{c}0000000-0000-4000-8000-000000000000")).unwrap();
                due_shard(id)
            })
            .collect();
        assert_eq!(shards.len(), DUE_SHARDS as usize);
        assert_eq!(shards, due_shards().collect());
    }

    #[test]
    fn due_shards_cover_every_session() {
        let shards: Vec<String> = due_shards().collect();
        for _ in 0..100 {
            assert!(shards.contains(&due_shard(SessionId::new())));
        }
    }
}
