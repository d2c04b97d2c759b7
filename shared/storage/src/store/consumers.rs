//! Durable consumers: leases, acks (exact and cumulative), nacks and
//! releases, and each consumer's settings, state and lag.

use super::*;

/// Where a new consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliverPolicy {
    /// From the first message still stored.
    All,
    /// Only messages published after the consumer is created.
    New,
    /// From a given sequence.
    ByStartSequence,
    /// From the first message committed at or after a given time.
    ByStartTime,
}

impl DeliverPolicy {
    /// The name the stored procedures use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::New => "new",
            Self::ByStartSequence => "by_start_sequence",
            Self::ByStartTime => "by_start_time",
        }
    }

    /// The policy named `name` by the stored procedures.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::All,
            Self::New,
            Self::ByStartSequence,
            Self::ByStartTime,
        ]
        .into_iter()
        .find(|p| p.as_str() == name)
    }
}

/// Consumer settings to create or update with; `None` keeps the current
/// value, or takes the default on creation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerSettings {
    /// Lease length in milliseconds.
    pub ack_wait_ms: Option<u32>,
    /// Deliveries before dead-lettering; 0 = unlimited.
    pub max_deliver: Option<u32>,
    /// Most leased messages at once; 0 = unlimited.
    pub max_ack_pending: Option<u32>,
    /// Where a new consumer starts.
    pub deliver_policy: Option<DeliverPolicy>,
    /// With `ByStartSequence`.
    pub start_seq: Option<u64>,
    /// With `ByStartTime`, nanoseconds since the Unix epoch.
    pub start_time_ns: Option<u64>,
    /// Dead-letter subject; empty = none.
    pub dlq_subject: Option<String>,
    /// Where a new consumer starts, when the caller worked it out: everything
    /// up to and including it counts as acknowledged. Not a setting: only
    /// `ByStartTime` over messages in segments needs it.
    pub start_after: Option<u64>,
    /// Removed after this long unused; 0 = never.
    pub inactive_threshold_ms: Option<u64>,
}

impl ConsumerSettings {
    fn to_lua_map(&self) -> tarant::Value {
        use tarant::Value;
        let mut map: Vec<(Value, Value)> = Vec::new();
        let mut put = |key: &str, value: Value| map.push((Value::from(key), value));
        if let Some(v) = self.ack_wait_ms {
            put("ack_wait_ms", Value::from(v));
        }
        if let Some(v) = self.max_deliver {
            put("max_deliver", Value::from(v));
        }
        if let Some(v) = self.max_ack_pending {
            put("max_ack_pending", Value::from(v));
        }
        if let Some(v) = self.deliver_policy {
            put("deliver_policy", Value::from(v.as_str()));
        }
        if let Some(v) = self.start_seq {
            put("start_seq", Value::from(v));
        }
        if let Some(v) = self.start_time_ns {
            put("start_time_ns", Value::from(v));
        }
        if let Some(v) = &self.dlq_subject {
            put("dlq_subject", Value::from(v.as_str()));
        }
        if let Some(v) = self.start_after {
            put("start_after", Value::from(v));
        }
        if let Some(v) = self.inactive_threshold_ms {
            put("inactive_threshold_ms", Value::from(v));
        }
        Value::Map(map)
    }
}

/// A consumer's settings and state, read at one instant.
#[derive(Debug, Clone, Deserialize)]
pub struct ConsumerState {
    /// The subject.
    pub subject: String,
    /// The durable name.
    pub durable: String,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
    /// Lease length.
    pub ack_wait_ms: u64,
    /// Deliveries before dead-lettering; 0 = unlimited.
    pub max_deliver: u64,
    /// Most leased messages at once; 0 = unlimited.
    pub max_ack_pending: u64,
    /// The deliver policy's name.
    pub deliver_policy: String,
    /// Start sequence given at creation (0 if none).
    pub start_seq: u64,
    /// Start time given at creation (0 if none).
    pub start_time_ns: u64,
    /// Dead-letter subject; empty = none.
    pub dlq_subject: String,
    /// Everything up to and including it is acknowledged.
    pub ack_floor: u64,
    /// Highest sequence ever delivered.
    pub last_delivered: u64,
    /// Published, never delivered.
    pub num_pending: u64,
    /// Delivered, not acknowledged.
    pub num_ack_pending: u64,
    /// Of those, delivered more than once.
    pub num_redelivered: u64,
    /// Messages given up by terminal rejection, ever.
    #[serde(default)]
    pub num_rejected: u64,
    /// Age of the oldest unacknowledged message, in nanoseconds.
    pub oldest_unacked_age_ns: u64,
    /// The subject's last sequence.
    pub last_seq: u64,
    /// Removed after this long unused; 0 = never.
    #[serde(default)]
    pub inactive_threshold_ms: u64,
    /// Last use (a lease call, an ack, an open stream), to about 10 s;
    /// nanoseconds since the Unix epoch.
    #[serde(default)]
    pub active_ns: u64,
}

/// A page of a listing.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The entries, in order.
    pub entries: Vec<T>,
    /// Whether more may follow the last entry.
    pub more: bool,
}

/// What a rejection did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The consumer's ack floor after it.
    pub ack_floor: u64,
    /// Messages that live in segments, still held: the caller reads them and
    /// rejects them again with their copies.
    pub in_segments: Vec<u64>,
}

/// How far behind a consumer is.
#[derive(Debug, Clone, Deserialize)]
pub struct ConsumerLag {
    /// The subject.
    pub subject: String,
    /// The durable name.
    pub durable: String,
    /// Published, never delivered.
    pub pending: u64,
    /// Delivered, not acknowledged.
    pub ack_pending: u64,
    /// Age of the oldest unacknowledged message, in milliseconds.
    pub oldest_unacked_age_ms: u64,
}

/// A message handed out under a lease.
#[derive(Debug, Clone, Deserialize)]
pub struct Leased {
    /// The message.
    pub message: StoredMessage,
    /// Deliveries so far, this one included.
    pub deliveries: u32,
    /// When the lease runs out, nanoseconds since the Unix epoch.
    pub deadline_ns: u64,
}

/// A leased message as Tarantool hands it out; with `through` past its
/// sequence it stands for every message of a segment's block from it to
/// `through`, leased alike (one entry, not one per message).
#[derive(Deserialize)]
struct Handed {
    message: StoredMessage,
    deliveries: u32,
    deadline_ns: u64,
    #[serde(default)]
    through: u64,
}

/// One `Leased` per message of what Tarantool handed out.
fn expand(handed: Vec<Handed>) -> Vec<Leased> {
    let count = handed
        .iter()
        .map(|h| h.through.saturating_sub(h.message.seq) + 1)
        .sum::<u64>();
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or_default());
    for handed in handed {
        let Handed {
            message,
            deliveries,
            deadline_ns,
            through,
        } = handed;
        let (first, at) = (message.seq, out.len());
        out.push(Leased {
            message,
            deliveries,
            deadline_ns,
        });
        for seq in first + 1..=through {
            let mut message = out[at].message.clone();
            message.seq = seq;
            out.push(Leased {
                message,
                deliveries,
                deadline_ns,
            });
        }
    }
    out
}

/// What one `consume` call handed out.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Leased messages, redeliveries first, then in sequence order.
    pub messages: Vec<Leased>,
    /// Earliest lease deadline still ahead (0 if none): when redeliveries can
    /// next become due.
    pub next_deadline_ns: u64,
    /// Acks that came with the call naming sequences the consumer did not
    /// hold: left out, the others applied.
    pub not_held: Vec<u64>,
}

/// An ack or nack naming sequences the consumer does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotHeld(pub Vec<u64>);

/// The verdict on a cumulative ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The durable's position is now `position`.
    Acked {
        /// Everything up to and including this is acknowledged.
        position: u64,
    },
    /// The sequence is beyond the subject's last sequence.
    BeyondLast {
        /// The subject's last sequence.
        last: u64,
    },
}

impl Store {
    /// Registers a subscription: creates the durable on first use (starting
    /// at `start_seq - 1` when given) and returns the point after which the
    /// subscriber has not been notified, and the last sequence.
    pub async fn subscribe(
        &self,
        subject: &str,
        durable: &str,
        start_seq: u64,
    ) -> Result<(u64, u64), Error> {
        self.call("mts_subscribe", (subject, durable, start_seq), self.timeout)
            .await
    }

    /// Leases up to `limit` messages to the consumer (creating it with
    /// defaults on first use): due redeliveries first, then new messages.
    pub async fn fetch(&self, subject: &str, durable: &str, limit: u32) -> Result<Batch, Error> {
        let (handed, next_deadline_ns): (Vec<Handed>, u64) = self
            .call("mts_fetch", (subject, durable, limit, true), self.timeout)
            .await?;
        Ok(Batch {
            messages: expand(handed),
            next_deadline_ns,
            not_held: Vec::new(),
        })
    }

    /// Acknowledges `acks` and then leases up to `limit` messages, in one
    /// transaction: a consume stream's acks ride along with its next lease.
    /// Acks of sequences the consumer does not hold are left out (and named
    /// in the batch), the others apply. With nothing to lease, waits up to
    /// `wait` for a commit (or a redelivery falling due) and looks again.
    pub async fn consume(
        &self,
        subject: &str,
        durable: &str,
        acks: &[u64],
        limit: u32,
        wait: Duration,
    ) -> Result<Batch, Error> {
        let wait_ms = millis(wait);
        let (_status, handed, next_deadline_ns, not_held): (String, Vec<Handed>, u64, Vec<u64>) =
            self.call(
                "mts_consume",
                (subject, durable, acks, limit, wait_ms, true, true),
                self.timeout + wait,
            )
            .await?;
        Ok(Batch {
            messages: expand(handed),
            next_deadline_ns,
            not_held,
        })
    }

    /// Acknowledges exactly `seqs`; all must be held, or none is acked.
    /// Returns the new ack floor.
    pub async fn ack_sequences(
        &self,
        subject: &str,
        durable: &str,
        seqs: &[u64],
    ) -> Result<Result<u64, NotHeld>, Error> {
        let (status, detail): (String, tarant::Value) = self
            .call("mts_ack_sequences", (subject, durable, seqs), self.timeout)
            .await?;
        Ok(held_verdict(&status, &detail, |floor| {
            floor.as_u64().unwrap_or_default()
        }))
    }

    /// Makes `seqs` deliverable again after `delay_ms`; all must be held.
    pub async fn nack(
        &self,
        subject: &str,
        durable: &str,
        seqs: &[u64],
        delay_ms: u32,
    ) -> Result<Result<(), NotHeld>, Error> {
        let (status, missing): (String, tarant::Value) = self
            .call("mts_nack", (subject, durable, seqs, delay_ms), self.timeout)
            .await?;
        Ok(held_verdict(&status, &missing, |_| ()))
    }

    /// Pushes the leases of `seqs` forward, for a worker still at them: they
    /// run out `extend_ms` from now (`None`: the consumer's ack_wait). All
    /// must be held. Returns when they now run out (ns since the Unix epoch).
    pub async fn extend_leases(
        &self,
        subject: &str,
        durable: &str,
        seqs: &[u64],
        extend_ms: Option<u32>,
    ) -> Result<Result<u64, NotHeld>, Error> {
        let (status, detail): (String, tarant::Value) = self
            .call(
                "mts_extend_lease",
                (subject, durable, seqs, extend_ms.unwrap_or(0)),
                self.timeout,
            )
            .await?;
        Ok(held_verdict(&status, &detail, |deadline| {
            deadline.as_u64().unwrap_or_default()
        }))
    }

    /// Gives held `seqs` up for good (see mts_reject): each is dead-lettered
    /// with `reason`, or dropped when the consumer has no dead-letter
    /// subject. Those in segments are left to the caller, to read and pass
    /// here again as `copies` (in `seqs`' order).
    pub async fn reject(
        &self,
        subject: &str,
        durable: &str,
        seqs: &[u64],
        reason: &str,
        copies: &[StoredMessage],
    ) -> Result<Result<Rejected, NotHeld>, Error> {
        let copies: Vec<tarant::Value> = copies.iter().map(super::tiering::message_copy).collect();
        let copies = (!copies.is_empty()).then_some(copies);
        let (status, detail, left): (String, tarant::Value, Vec<u64>) = self
            .call(
                "mts_reject",
                (subject, durable, seqs, reason, copies),
                self.timeout,
            )
            .await?;
        Ok(held_verdict(&status, &detail, |floor| Rejected {
            ack_floor: floor.as_u64().unwrap_or_default(),
            in_segments: left,
        }))
    }

    /// Gives leases back at once (best effort, for a stream that ended).
    pub async fn release(&self, subject: &str, durable: &str, seqs: &[u64]) -> Result<(), Error> {
        let _: (bool,) = self
            .call("mts_release", (subject, durable, seqs), self.timeout)
            .await?;
        Ok(())
    }

    /// The original cumulative ack: everything up to `seq`, never back.
    pub async fn ack_message(
        &self,
        subject: &str,
        durable: &str,
        seq: u64,
    ) -> Result<AckOutcome, Error> {
        let (status, value): (String, u64) = self
            .call("mts_ack_message", (subject, durable, seq), self.timeout)
            .await?;
        Ok(if status == "ok" {
            AckOutcome::Acked { position: value }
        } else {
            AckOutcome::BeyondLast { last: value }
        })
    }

    /// Creates the consumer or updates its settings; true when created.
    pub async fn create_or_update_consumer(
        &self,
        subject: &str,
        durable: &str,
        settings: &ConsumerSettings,
    ) -> Result<bool, Error> {
        let (outcome,): (String,) = self
            .call(
                "mts_create_or_update_consumer",
                (subject, durable, settings.to_lua_map()),
                self.timeout,
            )
            .await?;
        Ok(outcome == "created")
    }

    /// The consumer's settings and state, if it exists.
    pub async fn consumer_info(
        &self,
        subject: &str,
        durable: &str,
    ) -> Result<Option<ConsumerState>, Error> {
        let (state,): (Option<ConsumerState>,) = self
            .call("mts_consumer_info", (subject, durable), self.timeout)
            .await?;
        Ok(state)
    }

    /// Lag of up to `limit` consumers after `after` (subject, durable) in
    /// (subject, durable) order; from the first without it.
    pub async fn consumers_lag(
        &self,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<ConsumerLag>, Error> {
        let (after_subject, after_durable) = after.unwrap_or_default();
        let (lag,): (Vec<ConsumerLag>,) = self
            .call(
                "mts_consumers_lag",
                (limit, after_subject, after_durable),
                self.timeout,
            )
            .await?;
        Ok(lag)
    }

    /// Up to `limit` consumers after `after` (subject, durable) in (subject,
    /// durable) order, of `subject` only unless it is empty.
    pub async fn list_consumers(
        &self,
        subject: &str,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Page<ConsumerState>, Error> {
        let (after_subject, after_durable) = after.unwrap_or_default();
        let (entries, more): (Vec<ConsumerState>, bool) = self
            .call(
                "mts_list_consumers",
                (subject, after_subject, after_durable, limit),
                self.timeout,
            )
            .await?;
        Ok(Page { entries, more })
    }

    /// Records that these (subject, durable) consumers are in use: a stream
    /// of theirs is open.
    pub async fn touch_consumers(&self, consumers: &[(String, String)]) -> Result<(), Error> {
        let _: (bool,) = self
            .call("mts_touch_consumers", (consumers,), self.timeout)
            .await?;
        Ok(())
    }

    /// Removes up to `limit` consumers unused for longer than their
    /// inactivity threshold; returns their (subject, durable).
    pub async fn expire_consumers(&self, limit: u32) -> Result<Vec<(String, String)>, Error> {
        let (gone,): (Vec<(String, String)>,) = self
            .call("mts_expire_consumers", (limit,), self.timeout)
            .await?;
        Ok(gone)
    }

    /// Deletes the consumer and its leases; true if it existed.
    pub async fn delete_consumer(&self, subject: &str, durable: &str) -> Result<bool, Error> {
        let (existed,): (bool,) = self
            .call("mts_delete_consumer", (subject, durable), self.timeout)
            .await?;
        Ok(existed)
    }

    /// Moves an existing consumer to `to`, dropping every lease it holds:
    /// later messages are delivered anew, earlier ones never again. Returns
    /// its new ack floor, or `None` when it does not exist.
    pub async fn seek(&self, subject: &str, durable: &str, to: Seek) -> Result<Option<u64>, Error> {
        use tarant::Value;
        let to = match to {
            Seek::After(after) => Value::Map(vec![(Value::from("after"), Value::from(after))]),
            Seek::Time(time_ns) => Value::Map(vec![(Value::from("time_ns"), Value::from(time_ns))]),
        };
        let (floor,): (Option<u64>,) = self
            .call("mts_seek", (subject, durable, to), self.timeout)
            .await?;
        Ok(floor)
    }
}

/// A procedure's answer on held sequences: 'ok' and what `ok` makes of its
/// detail, or 'not_held' and the sequences the consumer does not hold.
fn held_verdict<T>(
    status: &str,
    detail: &tarant::Value,
    ok: impl FnOnce(&tarant::Value) -> T,
) -> Result<T, NotHeld> {
    if status == "ok" {
        Ok(ok(detail))
    } else {
        Err(NotHeld(sequences(detail)))
    }
}

/// Where a consumer seeks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seek {
    /// Delivery goes on after this sequence.
    After(u64),
    /// From the first message committed at or after this time (ns since the
    /// Unix epoch); in a segment, from the first of its block.
    Time(u64),
}
