//! The generator's side of a turn: claiming it under a lease (or taking over a lapsed one and
//! fencing the old holder out), writing its chunks in sequence, extending the lease, and
//! committing the reply only while the lease holds.

use super::transition::{TransitionWrite, WriteResult};
use super::{
    key, ms, number, session_key, string, AppendOutcome, ClaimOutcome, Lease, LeaseStatus, Outcome, Read,
    Reply, Store, Written,
};
use crate::error::StoreError;
use crate::fsm::{self, Event, State};
use crate::ids::{Role, SessionId, Turn};
use crate::record::{attr, Chunk, Session, Usage};
use crate::table::{self, DUE_AT, PK, TTL_ATTRIBUTE};
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use std::time::Duration;

/// How a chunk put ended.
enum ChunkPut {
    /// Stored (or found already stored by this very put, retried by the SDK).
    Stored,
    /// Another writer's chunk holds the slot (`None`: it did not come back readable).
    Taken(Option<Chunk>),
}

impl Store {
    /// Claims `turn` for generation under lease `owner` for `lease_for`: `GenerationClaimed` from
    /// `user_committed`, or `LeaseTakeover` of an expired lease while attempts remain (then
    /// `LeaseExpired` into `timeout` once they are spent). A takeover fences the previous holder
    /// out of the chunk sequence before it returns.
    pub async fn claim_generation(
        &self,
        session: SessionId,
        turn: Turn,
        owner: &str,
        lease_for: Duration,
        max_generation_attempts: u32,
    ) -> Result<ClaimOutcome, StoreError> {
        for _ in 0..self.options.max_write_attempts {
            let Some(current) = self.get_session(session, Read::Consistent).await? else {
                return Ok(ClaimOutcome::Skipped { current: None });
            };
            let now = self.now_ms();
            let lease_expired = current.lease.as_ref().is_none_or(|l| l.expires_at <= now);
            let retryable = fsm::retryable(current.state, current.attempts, max_generation_attempts);
            let event = match current.state {
                _ if current.turn != turn => None,
                State::UserCommitted => Some(Event::GenerationClaimed),
                State::AiGenerating if lease_expired && retryable => Some(Event::LeaseTakeover),
                State::AiGenerating if lease_expired => {
                    let (event, reason) = fsm::expiry(current.state).expect("ai_generating has a deadline");
                    let ended = self.end_turn(&current, event, reason, owner).await?;
                    let current = self.get_session(session, Read::Consistent).await?;
                    return Ok(match ended {
                        Outcome::Applied(_) => ClaimOutcome::Ended { current },
                        // Another writer ended or moved the turn first.
                        Outcome::Conflict(_) => ClaimOutcome::Skipped { current },
                    });
                }
                _ => None,
            };
            let Some(event) = event else { return Ok(ClaimOutcome::Skipped { current: Some(current) }) };
            let expires_at = now + ms(lease_for);
            let write = TransitionWrite {
                session,
                expected: Some((current.state, current.version)),
                event,
                turn,
                by: owner.to_owned(),
                set: vec![
                    (attr::LEASE_OWNER, string(owner)),
                    (attr::LEASE_EXPIRES_AT, number(expires_at)),
                    (attr::ATTEMPTS, number(current.attempts + 1)),
                    (DUE_AT, number(expires_at)),
                ],
                remove: vec![],
                extra_condition: Some(("#turn = :turn", vec![(":turn", number(turn.get()))])),
                extra_items: vec![],
                feed: Some(current.user_id.clone()),
            };
            let version = match self.write_transition(write).await? {
                WriteResult::Applied { version } => version,
                WriteResult::Rejected(_) => continue,
            };
            let mut lease = Lease {
                session_id: session,
                turn,
                owner: owner.to_owned(),
                version,
                expires_at,
                cancel_requested: current.cancel_requested,
                next_seq: 0,
                resumed_tokens: Vec::new(),
                summary: current.summary.clone(),
                user: current.user_id.clone(),
            };
            if event == Event::LeaseTakeover {
                match self.fence(&mut lease).await? {
                    AppendOutcome::Appended => {}
                    AppendOutcome::Fenced => continue,
                }
            }
            return Ok(ClaimOutcome::Claimed(lease));
        }
        Err(StoreError::Contention { attempts: self.options.max_write_attempts })
    }

    /// After a takeover: fences the previous holder out of the chunk sequence. It writes in
    /// order and learns of the takeover only when a put finds its slot taken, so an empty chunk
    /// placed ahead of it stops it there. The fence goes right after the last chunk if that
    /// slot is free, else ever further ahead of the old holder; the slots it skipped are then
    /// filled in order (each either takes an empty chunk or holds the old holder's), so the
    /// sequence stays gap-free and what the old holder wrote becomes the start of this reply.
    async fn fence(&self, lease: &mut Lease) -> Result<AppendOutcome, StoreError> {
        const MAX_TRIES: u32 = 64;
        let (session, turn) = (lease.session_id, lease.turn);
        let chunks = self.read_chunks(session, turn, None, Read::Consistent).await?;
        let first_open = chunks.last().map_or(0, |c| c.seq + 1);
        let mut stride = 0u32;
        let mut tries = 0;
        let fence_slot = loop {
            let written =
                self.read_chunks(session, turn, first_open.checked_sub(1), Read::Consistent).await?;
            let slot = written.last().map_or(first_open, |c| c.seq + 1) + stride;
            if let ChunkPut::Stored = self.put_chunk(lease, slot, 0, &[], None).await? {
                break slot;
            }
            tries += 1;
            if tries >= MAX_TRIES {
                return Err(StoreError::Contention { attempts: tries });
            }
            if self.lease_status(lease, Read::Consistent).await? == LeaseStatus::Lost {
                return Ok(AppendOutcome::Fenced);
            }
            stride = (stride * 2).max(4);
        };
        // Fill the skipped slots in order; each fill that lands stops the old holder there.
        let mut end = match first_open.checked_sub(1) {
            Some(seq) => self
                .read_chunks(session, turn, seq.checked_sub(1), Read::Consistent)
                .await?
                .first()
                .map_or(0, Chunk::end),
            None => 0,
        };
        for slot in first_open..fence_slot {
            match self.put_chunk(lease, slot, end, &[], None).await? {
                ChunkPut::Stored => {}
                ChunkPut::Taken(Some(occupant)) if occupant.owner != lease.owner => end = occupant.end(),
                ChunkPut::Taken(_) => {
                    return Err(StoreError::corrupt(table::chunk_sk(turn, slot), "unreadable chunk"))
                }
            }
        }
        self.set_chunk_start(lease, fence_slot, end).await?;
        let chunks = self.read_chunks(session, turn, None, Read::Consistent).await?;
        let mut tokens = Vec::new();
        for (expected_seq, chunk) in chunks.iter().take(fence_slot as usize).enumerate() {
            if chunk.seq as usize != expected_seq {
                return Err(StoreError::corrupt(
                    table::chunk_sk(turn, expected_seq as u32),
                    "gap in the chunk sequence",
                ));
            }
            tokens.extend(chunk.tokens.iter().cloned());
        }
        lease.next_seq = fence_slot + 1;
        lease.resumed_tokens = tokens;
        Ok(AppendOutcome::Appended)
    }

    /// Sets the token index of this lease's own (empty) fence chunk once it is known.
    async fn set_chunk_start(&self, lease: &Lease, seq: u32, start: u64) -> Result<(), StoreError> {
        let request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(key(table::session_pk(lease.session_id), table::chunk_sk(lease.turn, seq))))
            .update_expression("SET #start = :start")
            .condition_expression("#owner = :owner")
            .expression_attribute_names("#start", attr::START)
            .expression_attribute_names("#owner", attr::OWNER)
            .expression_attribute_values(":start", number(start))
            .expression_attribute_values(":owner", string(lease.owner.clone()));
        self.send(request).await?;
        Ok(())
    }

    /// Writes chunk `seq` of the lease's turn. Sequence numbers are the fence: a position
    /// already taken means another holder wrote there, unless it is this lease's own retry.
    pub async fn append_chunk(
        &self,
        lease: &Lease,
        seq: u32,
        start: u64,
        tokens: &[String],
    ) -> Result<AppendOutcome, StoreError> {
        self.append_chunk_expecting(lease, seq, start, tokens, None).await
    }

    /// [`Store::append_chunk`], telling relays when the next chunk is expected
    /// (`next_at`, epoch ms), so they poll for it then.
    pub async fn append_chunk_expecting(
        &self,
        lease: &Lease,
        seq: u32,
        start: u64,
        tokens: &[String],
        next_at: Option<u64>,
    ) -> Result<AppendOutcome, StoreError> {
        Ok(match self.put_chunk(lease, seq, start, tokens, next_at).await? {
            ChunkPut::Stored => AppendOutcome::Appended,
            ChunkPut::Taken(_) => AppendOutcome::Fenced,
        })
    }

    /// Puts a chunk into a free slot.
    async fn put_chunk(
        &self,
        lease: &Lease,
        seq: u32,
        start: u64,
        tokens: &[String],
        next_at: Option<u64>,
    ) -> Result<ChunkPut, StoreError> {
        let mut item = key(table::session_pk(lease.session_id), table::chunk_sk(lease.turn, seq));
        item.extend([
            (attr::KIND.to_owned(), string("chunk")),
            (attr::TURN.to_owned(), number(lease.turn.get())),
            (attr::SEQ.to_owned(), number(seq)),
            (attr::START.to_owned(), number(start)),
            (attr::TOKENS.to_owned(), AttributeValue::L(tokens.iter().cloned().map(string).collect())),
            (attr::OWNER.to_owned(), string(lease.owner.clone())),
            (attr::AT.to_owned(), number(self.now_ms())),
        ]);
        if let Some(next_at) = next_at {
            item.insert(attr::NEXT_AT.to_owned(), number(next_at));
        }
        if let Some(ttl) = self.ttl_for(Some(self.options.chunk_retention)) {
            item.insert(TTL_ATTRIBUTE.to_owned(), ttl);
        }
        let request = self
            .client
            .put_item()
            .table_name(&*self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        Ok(match self.send_conditional(request).await? {
            Written::Applied(_) => ChunkPut::Stored,
            Written::Refused(item) => match item.as_ref().map(Chunk::from_item).transpose()? {
                // The SDK may have retried a put that had landed: that is our own chunk.
                Some(c) if c.owner == lease.owner && c.start == start && c.tokens == tokens => {
                    ChunkPut::Stored
                }
                other => ChunkPut::Taken(other),
            },
        })
    }

    /// Whether `lease` still holds the turn and whether a cancel was requested.
    pub async fn lease_status(&self, lease: &Lease, read: Read) -> Result<LeaseStatus, StoreError> {
        let current = self.get_session(lease.session_id, read).await?;
        Ok(lease_status_of(lease, current.as_ref()))
    }

    /// Extends the lease to `now + lease_for` if it still holds.
    pub async fn extend_lease(
        &self,
        lease: &mut Lease,
        lease_for: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        let expires_at = self.now_ms() + ms(lease_for);
        let request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(session_key(lease.session_id)))
            .update_expression("SET #expires = :expires, #due = :expires")
            .condition_expression("#state = :gen AND #version = :v AND #owner = :owner")
            .expression_attribute_names("#expires", attr::LEASE_EXPIRES_AT)
            .expression_attribute_names("#due", DUE_AT)
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#version", attr::VERSION)
            .expression_attribute_names("#owner", attr::LEASE_OWNER)
            .expression_attribute_values(":expires", number(expires_at))
            .expression_attribute_values(":gen", string(State::AiGenerating.as_str()))
            .expression_attribute_values(":v", number(lease.version))
            .expression_attribute_values(":owner", string(lease.owner.clone()))
            .return_values(ReturnValue::AllNew);
        Ok(match self.send_conditional(request).await? {
            Written::Applied(out) => {
                lease.expires_at = expires_at;
                let session = out.attributes().map(Session::from_item).transpose()?;
                lease_status_of(lease, session.as_ref())
            }
            Written::Refused(_) => LeaseStatus::Lost,
        })
    }

    /// `ReplyCommitted`: stores `reply` as the assistant message, only while `lease` still holds
    /// the turn, and charges what its model calls consumed to the user's day, in the same
    /// transaction.
    pub async fn commit_reply(&self, lease: &Lease, reply: &Reply) -> Result<Outcome<u64>, StoreError> {
        let mut message =
            self.message_item(lease.session_id, lease.turn, Role::Assistant, &reply.text, reply.stopped);
        if let Some(routing) = &reply.routing {
            message.insert(attr::ROUTE.to_owned(), string(routing.route.clone()));
            message.insert(attr::MODEL.to_owned(), string(routing.model.clone()));
        }
        if !reply.tool_uses.is_empty() {
            let json = serde_json::to_string(&reply.tool_uses).expect("tool uses serialise");
            message.insert(attr::TOOL_USES.to_owned(), string(json));
        }
        // What the reply consumed (and cost) lands with it: a reply is never stored without it.
        let usage = reply.usage;
        message.extend([
            (attr::INPUT_TOKENS.to_owned(), number(usage.input)),
            (attr::OUTPUT_TOKENS.to_owned(), number(usage.output)),
            (attr::CACHE_READ_TOKENS.to_owned(), number(usage.cache_read)),
            (attr::CACHE_WRITE_TOKENS.to_owned(), number(usage.cache_write)),
        ]);
        if let Some(cost) = reply.cost_usd.filter(|c| c.is_finite() && *c >= 0.0) {
            message.insert(attr::COST_USD.to_owned(), number(cost));
        }
        let (mut set, remove) = self.turn_ended_deadline(lease.session_id);
        set.push((attr::CANCEL_REQUESTED, AttributeValue::Bool(false)));
        let write = TransitionWrite {
            session: lease.session_id,
            expected: Some((State::AiGenerating, lease.version)),
            event: Event::ReplyCommitted,
            turn: lease.turn,
            by: lease.owner.clone(),
            set,
            remove,
            extra_condition: Some((
                "#lease_owner = :owner AND #turn = :turn",
                vec![(":owner", string(lease.owner.clone())), (":turn", number(lease.turn.get()))],
            )),
            extra_items: [self.put_new(message)]
                .into_iter()
                .chain(self.charge(&lease.user, reply.usage.total()))
                .collect(),
            feed: Some(lease.user.clone()),
        };
        self.outcome(write).await
    }

    /// `GenerationFailed`: ends the turn of `current` (as `lease` left it) in `error` with
    /// `reason`, charging what the lease's model calls consumed (`spent`) in the same transaction.
    pub async fn fail_generation(
        &self,
        lease: &Lease,
        current: &Session,
        reason: &str,
        spent: Usage,
    ) -> Result<Outcome<u64>, StoreError> {
        let charge = self.charge(&lease.user, spent.total()).into_iter().collect();
        self.end_turn_with(current, Event::GenerationFailed, reason, &lease.owner, charge).await
    }
}

fn lease_status_of(lease: &Lease, current: Option<&Session>) -> LeaseStatus {
    match current {
        Some(c)
            if c.state == State::AiGenerating
                && c.version == lease.version
                && c.lease.as_ref().is_some_and(|l| l.owner == lease.owner) =>
        {
            LeaseStatus::Held { cancel_requested: c.cancel_requested }
        }
        _ => LeaseStatus::Lost,
    }
}
