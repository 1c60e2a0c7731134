//! Reads: sessions, messages, chunks and transitions of a session, a user's sessions page by
//! page, and the turns whose deadline has passed.

use super::{backoff, key, number, prefix_end, session_key, string, InvalidCursor, SessionPage, Store};
use crate::error::StoreError;
use crate::ids::{Role, SessionId, Turn, UserId};
use crate::record::{Chunk, FeedEvent, Fields, Item, Message, Session, TransitionRecord};
use crate::table::{self, DUE_AT, DUE_SHARD, GSI1_PK, GSI1_SK, PK, SK};
use aws_sdk_dynamodb::types::KeysAndAttributes;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use std::collections::HashMap;

/// Where a page of a user's sessions starts: a cursor the service issued, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionCursor(Item);

impl SessionCursor {
    /// Decodes a `next_cursor` this service issued to `user`.
    pub fn decode(user: &UserId, cursor: &str) -> Result<SessionCursor, InvalidCursor> {
        let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| InvalidCursor)?;
        let gsi_sk = String::from_utf8(raw).map_err(|_| InvalidCursor)?;
        let (created, id) = gsi_sk.split_once('#').ok_or(InvalidCursor)?;
        created.parse::<u64>().map_err(|_| InvalidCursor)?;
        let session = SessionId::parse(id).map_err(|_| InvalidCursor)?;
        let mut start = session_key(session);
        start.insert(GSI1_PK.to_owned(), string(table::user_pk(user)));
        start.insert(GSI1_SK.to_owned(), string(gsi_sk));
        Ok(SessionCursor(start))
    }
}

/// Whether a read must see the latest write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Sees every write acknowledged before it: for a decision that must not act on a stale state
    /// (twice the read capacity of an eventual read).
    Consistent,
    /// May miss the newest writes (by about a second): for polling, where the next poll catches up.
    Eventual,
}

impl Read {
    /// DynamoDB's `ConsistentRead`.
    pub(super) fn consistent(self) -> bool {
        self == Read::Consistent
    }
}

impl Store {
    /// Reads a session item.
    pub async fn get_session(&self, id: SessionId, read: Read) -> Result<Option<Session>, StoreError> {
        let request = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(session_key(id)))
            .consistent_read(read.consistent());
        let session = self.send(request).await?.item().map(Session::from_item).transpose()?;
        Ok(session.filter(|s| self.retained(s)))
    }

    /// Whether a session is within its retention. DynamoDB removes an expired item only
    /// eventually (within days): past its TTL, a session is gone, whether or not the item is.
    fn retained(&self, session: &Session) -> bool {
        session.retained_until.is_none_or(|until| until * 1000 > self.now_ms())
    }

    /// Queries one partition's items whose sort key lies in `[from, to]`, all pages.
    pub(super) async fn query_range(
        &self,
        pk: String,
        from: String,
        to: String,
        read: Read,
    ) -> Result<Vec<Item>, StoreError> {
        let query = self
            .client
            .query()
            .table_name(&*self.table)
            .key_condition_expression("#pk = :pk AND #sk BETWEEN :from AND :to")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#sk", SK)
            .expression_attribute_values(":pk", string(pk))
            .expression_attribute_values(":from", string(from))
            .expression_attribute_values(":to", string(to))
            .consistent_read(read.consistent());
        self.query_all(query).await
    }

    /// `user`'s feed events at or after `from_ms` (epoch ms), oldest first: a query of the user's
    /// partition, eventually consistent (half a read unit when nothing happened).
    pub async fn feed_since(&self, user: &UserId, from_ms: u64) -> Result<Vec<FeedEvent>, StoreError> {
        let prefix = table::FEED_PREFIX;
        let query = self
            .client
            .query()
            .table_name(&*self.table)
            .key_condition_expression("#pk = :pk AND #sk BETWEEN :from AND :to")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#sk", SK)
            .expression_attribute_values(":pk", string(table::user_pk(user)))
            .expression_attribute_values(":from", string(format!("{prefix}{from_ms:013}")))
            .expression_attribute_values(":to", string(prefix_end(prefix)))
            .consistent_read(Read::Eventual.consistent());
        self.query_all(query).await?.iter().map(FeedEvent::from_item).collect()
    }

    /// Reads one message of a turn (one `GetItem`), if it exists.
    pub async fn get_message(
        &self,
        session: SessionId,
        turn: Turn,
        role: Role,
        read: Read,
    ) -> Result<Option<Message>, StoreError> {
        let request = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(key(table::session_pk(session), table::message_sk(turn, role))))
            .consistent_read(read.consistent());
        self.send(request).await?.item().map(Message::from_item).transpose()
    }

    /// The messages of the `max_turns` turns up to and including `through`'s user message, oldest
    /// first: one strongly consistent range query, whose cost does not grow with the session.
    pub async fn recent_messages(
        &self,
        session: SessionId,
        through: Turn,
        max_turns: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let first = u64::from(through.get()).saturating_sub(max_turns.max(1) as u64 - 1).max(1);
        let first = Turn::new(first).unwrap_or(through);
        let items = self
            .query_range(
                table::session_pk(session),
                table::message_sk(first, Role::User),
                table::message_sk(through, Role::User),
                Read::Consistent,
            )
            .await?;
        items.iter().map(Message::from_item).collect()
    }

    /// The messages of turns `first..=through`, oldest first: one range query.
    pub async fn messages_between(
        &self,
        session: SessionId,
        first: Turn,
        through: Turn,
    ) -> Result<Vec<Message>, StoreError> {
        if first > through {
            return Ok(Vec::new());
        }
        let items = self
            .query_range(
                table::session_pk(session),
                table::message_sk(first, Role::User),
                table::message_sk(through, Role::Assistant),
                Read::Consistent,
            )
            .await?;
        items.iter().map(Message::from_item).collect()
    }

    /// Reads a session and all its messages, oldest first.
    pub async fn get_conversation(
        &self,
        id: SessionId,
    ) -> Result<Option<(Session, Vec<Message>)>, StoreError> {
        let Some(session) = self.get_session(id, Read::Consistent).await? else { return Ok(None) };
        let prefix = table::MESSAGE_PREFIX;
        let items = self
            .query_range(table::session_pk(id), prefix.to_owned(), prefix_end(prefix), Read::Consistent)
            .await?;
        let messages = items.iter().map(Message::from_item).collect::<Result<_, _>>()?;
        Ok(Some((session, messages)))
    }

    /// Reads a turn's chunks with a sequence number after `after_seq` (all of them for `None`).
    pub async fn read_chunks(
        &self,
        session: SessionId,
        turn: Turn,
        after_seq: Option<u32>,
        read: Read,
    ) -> Result<Vec<Chunk>, StoreError> {
        let first = match after_seq {
            Some(seq) => seq.saturating_add(1),
            None => 0,
        };
        let items = self
            .query_range(
                table::session_pk(session),
                table::chunk_sk(turn, first),
                prefix_end(&table::chunk_turn_prefix(turn)),
                read,
            )
            .await?;
        items.iter().map(Chunk::from_item).collect()
    }

    /// The session's recorded transitions, oldest first.
    pub async fn transitions(&self, session: SessionId) -> Result<Vec<TransitionRecord>, StoreError> {
        let prefix = table::TRANSITION_PREFIX;
        let items = self
            .query_range(table::session_pk(session), prefix.to_owned(), prefix_end(prefix), Read::Consistent)
            .await?;
        items.iter().map(TransitionRecord::from_item).collect()
    }

    /// A user's sessions, newest first, `limit` per page, from `start` (a decoded `next_cursor`).
    pub async fn list_user_sessions(
        &self,
        user: &UserId,
        limit: u32,
        start: Option<SessionCursor>,
    ) -> Result<SessionPage, StoreError> {
        let query = self
            .client
            .query()
            .table_name(&*self.table)
            .index_name(table::BY_USER_INDEX)
            .key_condition_expression("#g = :g")
            .expression_attribute_names("#g", GSI1_PK)
            .expression_attribute_values(":g", string(table::user_pk(user)))
            .scan_index_forward(false)
            .limit(limit.clamp(1, 100) as i32)
            .set_exclusive_start_key(start.map(|cursor| cursor.0));
        let out = self.send(query).await?;
        let keys: Vec<Item> = out
            .items()
            .iter()
            .map(|item| Ok(key(Fields::new(item).string(PK)?.to_owned(), table::SESSION_SK)))
            .collect::<Result<_, StoreError>>()?;
        let sessions = self.batch_get_sessions(keys).await?;
        let next_cursor = match out.last_evaluated_key() {
            Some(last) if !last.is_empty() => {
                Some(URL_SAFE_NO_PAD.encode(Fields::new(last).string(GSI1_SK)?))
            }
            _ => None,
        };
        Ok(SessionPage { sessions, next_cursor })
    }

    /// Reads sessions by id, consistently, a hundred to a `BatchGetItem` call; a session that is
    /// gone is left out.
    pub async fn get_sessions(&self, ids: &[SessionId]) -> Result<Vec<Session>, StoreError> {
        let mut sessions = Vec::with_capacity(ids.len());
        for batch in ids.chunks(100) {
            let keys = batch.iter().map(|id| session_key(*id)).collect();
            sessions.extend(self.batch_get_sessions(keys).await?);
        }
        Ok(sessions)
    }

    /// Reads session items by key, in the order given (a session deleted meanwhile is left out).
    async fn batch_get_sessions(&self, keys: Vec<Item>) -> Result<Vec<Session>, StoreError> {
        let mut found: HashMap<String, Session> = HashMap::new();
        let order: Vec<String> =
            keys.iter().filter_map(|k| k.get(PK).and_then(|v| v.as_s().ok()).cloned()).collect();
        let mut pending = keys;
        let mut attempt = 0;
        while !pending.is_empty() {
            attempt += 1;
            if attempt > self.options.max_write_attempts {
                return Err(StoreError::Contention { attempts: attempt - 1 });
            }
            let request = KeysAndAttributes::builder()
                .set_keys(Some(pending))
                .consistent_read(Read::Consistent.consistent())
                .build()
                .expect("keys are set");
            let out = self.send(self.client.batch_get_item().request_items(&*self.table, request)).await?;
            for item in out.responses().and_then(|r| r.get(&*self.table)).into_iter().flatten() {
                let session = Session::from_item(item)?;
                if self.retained(&session) {
                    found.insert(table::session_pk(session.id), session);
                }
            }
            pending = out
                .unprocessed_keys()
                .and_then(|u| u.get(&*self.table))
                .map(|k| k.keys().to_vec())
                .unwrap_or_default();
            if !pending.is_empty() {
                backoff(attempt).await;
            }
        }
        Ok(order.into_iter().filter_map(|pk| found.remove(&pk)).collect())
    }

    /// Sessions whose deadline is at or before `now`, oldest deadline first in each `due` shard,
    /// at most `per_shard` of each. The shards are read at once; a key condition picks the due
    /// entries, so a read costs what it returns, however many sessions wait for a later deadline.
    pub async fn overdue_sessions(&self, now: u64, per_shard: u32) -> Result<Vec<SessionId>, StoreError> {
        let reads = table::due_shards().map(|shard| {
            let query = self
                .client
                .query()
                .table_name(&*self.table)
                .index_name(table::DUE_INDEX)
                .key_condition_expression("#shard = :shard AND #due <= :now")
                .expression_attribute_names("#shard", DUE_SHARD)
                .expression_attribute_names("#due", DUE_AT)
                .expression_attribute_values(":shard", string(shard))
                .expression_attribute_values(":now", number(now))
                .limit(per_shard as i32);
            self.query_at_least(query, per_shard as usize)
        });
        let mut ids = Vec::new();
        for item in futures::future::try_join_all(reads).await?.into_iter().flatten() {
            let pk = Fields::new(&item).string(PK)?;
            let id = pk
                .strip_prefix("S#")
                .and_then(|raw| SessionId::parse(raw).ok())
                .ok_or_else(|| StoreError::corrupt(pk, "due index entry is not a session"))?;
            ids.push(id);
        }
        Ok(ids)
    }
}
