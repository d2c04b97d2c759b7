//! The two tiers: the hot tier's budget, moving a subject's oldest hot
//! messages into a segment (plan, read, swap), dead-lettering messages that
//! live in segments, and the numbers behind the tiering gauges.

use super::*;

use crate::segment::{BlockIndex, Sealed};

/// The hot tier's budget, as the configuration gives it (0 = derived from
/// Tarantool's memtx_memory, in Lua).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotBudget {
    /// Most bytes of hot rows; 0 = a quarter of memtx_memory.
    pub max_bytes: u64,
    /// Most hot rows; 0 = one per 2 KiB of memtx_memory.
    pub max_messages: u64,
    /// The discard policy of subjects without their own.
    pub discard: Discard,
}

impl HotBudget {
    /// The budget of `config`.
    pub fn from_config(config: &mts_config::Tiering) -> Self {
        Self {
            max_bytes: config.hot_tier_max_bytes,
            max_messages: config.hot_tier_max_messages,
            discard: Discard::from_name(&config.hot_tier_discard).unwrap_or(Discard::New),
        }
    }

    pub(super) fn to_lua_map(&self) -> tarant::Value {
        use tarant::Value;
        Value::Map(vec![
            (Value::from("max_bytes"), Value::from(self.max_bytes)),
            (Value::from("max_rows"), Value::from(self.max_messages)),
            (Value::from("discard"), Value::from(self.discard.as_str())),
        ])
    }
}

/// When a subject's hot messages are due to move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TieringOptions {
    /// Once they hold this many payload bytes.
    pub segment_bytes: u64,
    /// Or this many messages.
    pub segment_messages: u64,
    /// Or once the oldest is this old.
    pub seal_age: Duration,
}

/// A row of mts_messages: one message, or a block row (see the Lua).
#[derive(Deserialize)]
struct HotRow {
    subject: String,
    seq: u64,
    ts_ns: u64,
    headers: HashMap<String, String>,
    data: Option<bytes::Bytes>,
    object_key: Option<String>,
    size: u64,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    last_seq: Option<u64>,
    #[serde(default)]
    batch: Option<serde_bytes::ByteBuf>,
}

/// A block row's message: headers, payload, hex SHA-256.
type BlockItem = (
    HashMap<String, String>,
    serde_bytes::ByteBuf,
    Option<String>,
);

impl HotRow {
    /// Its messages after `after`.
    fn messages_after(self, after: u64) -> Result<Vec<StoredMessage>, Error> {
        let Some(batch) = self.batch else {
            let message = StoredMessage {
                subject: self.subject,
                seq: self.seq,
                ts_ns: self.ts_ns,
                headers: self.headers,
                data: self.data,
                object_key: self.object_key,
                size: self.size,
                sha256: self.sha256,
                segment: None,
            };
            return Ok(if message.seq > after {
                vec![message]
            } else {
                Vec::new()
            });
        };
        let items: Vec<BlockItem> = rmp_serde::from_slice(&batch)
            .map_err(|err| Error::protocol(format!("block row {}: {err}", self.seq)))?;
        let last = self.last_seq.unwrap_or(self.seq);
        if last.checked_sub(self.seq).map(|n| n + 1) != Some(items.len() as u64) {
            return Err(Error::protocol(format!(
                "block row {}..{last} of {} holds {} messages",
                self.seq,
                self.subject,
                items.len()
            )));
        }
        Ok((self.seq..)
            .zip(items)
            .filter(|(seq, _)| *seq > after)
            .map(|(seq, (headers, data, sha256))| StoredMessage {
                subject: self.subject.clone(),
                seq,
                ts_ns: self.ts_ns,
                headers,
                size: data.len() as u64,
                data: Some(data.into_vec().into()),
                object_key: None,
                sha256,
                segment: None,
            })
            .collect())
    }
}

/// A subject with hot messages due to move.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SegmentPlan {
    /// The subject.
    pub subject: String,
    /// Its oldest hot sequence.
    pub first_seq: u64,
    /// Its hot messages.
    pub hot_messages: u64,
    /// Their payload bytes.
    pub hot_bytes: u64,
}

/// What became of a swap of hot rows for a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierCommit {
    /// The segment now holds the messages.
    Committed,
    /// The rows were no longer all hot (moved or removed meanwhile): nothing
    /// changed, and the segment object is nobody's.
    Gone,
    /// The orphan sweep gave the object up: nothing changed.
    Abandoned,
}

/// The two tiers at a glance.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct StorageStats {
    /// The hot tier against its budget.
    #[serde(flatten)]
    pub hot: HotTier,
    /// Tarantool's memtx arena in use.
    pub arena_used: u64,
    /// Tarantool's memtx quota.
    pub quota_size: u64,
    /// Of which taken by slabs.
    pub quota_used: u64,
    /// Age of the oldest message not yet in a segment.
    pub oldest_untiered_age_ms: u64,
    /// Segments.
    pub segments: u64,
    /// Their object bytes.
    pub segment_bytes: u64,
}

/// The hot tier's use and budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct HotTier {
    /// Bytes of hot rows and remembered message ids.
    pub hot_bytes: u64,
    /// Their rows.
    pub hot_messages: u64,
    /// The budget in bytes.
    pub budget_bytes: u64,
    /// And in rows.
    pub budget_messages: u64,
    /// Whether it is over its budget, so that publishes meet the subjects'
    /// discard policies (as Tarantool decides it for each publish).
    pub full: bool,
}

impl std::fmt::Display for HotTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} bytes, {} of {} rows",
            self.hot_bytes, self.budget_bytes, self.hot_messages, self.budget_messages
        )
    }
}

/// A Lua map of `fields` (the procedures read their arguments by name).
fn lua_map(fields: Vec<(&str, tarant::Value)>) -> tarant::Value {
    tarant::Value::Map(
        fields
            .into_iter()
            .map(|(k, v)| (tarant::Value::from(k), v))
            .collect(),
    )
}

fn optional(value: Option<&str>) -> tarant::Value {
    value.map_or(tarant::Value::Nil, tarant::Value::from)
}

impl Store {
    /// The options `mts_publish` takes: the message id and its window, and
    /// the hot tier's budget.
    pub(super) fn publish_options(
        &self,
        message_id: Option<&str>,
        window_ms: u64,
    ) -> tarant::Value {
        let mut fields = vec![("hot", (*self.hot).clone())];
        if let Some(id) = message_id {
            fields.push(("message_id", id.into()));
            fields.push(("window_ms", window_ms.into()));
        }
        lua_map(fields)
    }

    /// Up to `limit` subjects with hot messages due to move, most bytes first.
    pub async fn tier_plan(
        &self,
        options: TieringOptions,
        limit: u32,
    ) -> Result<Vec<SegmentPlan>, Error> {
        use tarant::Value;
        let opts = Value::Map(vec![
            (
                Value::from("segment_bytes"),
                Value::from(options.segment_bytes),
            ),
            (
                Value::from("segment_messages"),
                Value::from(options.segment_messages),
            ),
            (
                Value::from("seal_age_ms"),
                Value::from(millis(options.seal_age)),
            ),
            (Value::from("hot"), (*self.hot).clone()),
        ]);
        let (plans,): (Vec<SegmentPlan>,) = self
            .call("mts_tier_plan", (opts, limit), self.timeout)
            .await?;
        Ok(plans)
    }

    /// The hot messages of `subject` after `after`, in order, as the hot
    /// rows hold them (a run per row, so that a segment can end where a row
    /// ends): whole rows until they hold `max_messages` or `max_bytes` of
    /// payload (but at least one).
    pub async fn tier_read(
        &self,
        subject: &str,
        after: u64,
        max_messages: u32,
        max_bytes: u64,
    ) -> Result<Vec<Vec<StoredMessage>>, Error> {
        let (rows,): (Vec<HotRow>,) = self
            .call(
                "mts_tier_read",
                (subject, after, max_messages, max_bytes, true),
                self.timeout,
            )
            .await?;
        rows.into_iter()
            .map(|row| row.messages_after(after))
            .collect()
    }

    /// Swaps the hot rows that `sealed` holds for its segment row, in one
    /// transaction; the object must already be stored under `object_key`.
    pub async fn tier_commit(
        &self,
        subject: &str,
        object_key: &str,
        sealed: &Sealed,
    ) -> Result<TierCommit, Error> {
        use tarant::Value;
        let blocks = sealed
            .blocks
            .iter()
            .map(|b: &BlockIndex| {
                Value::Array(vec![
                    b.first_seq.into(),
                    b.first_ts_ns.into(),
                    b.offset.into(),
                    b.length.into(),
                ])
            })
            .collect();
        let row = lua_map(vec![
            ("subject", subject.into()),
            ("first_seq", sealed.first_seq.into()),
            ("last_seq", sealed.last_seq.into()),
            ("first_ts_ns", sealed.first_ts_ns.into()),
            ("last_ts_ns", sealed.last_ts_ns.into()),
            ("count", sealed.count.into()),
            ("bytes", sealed.bytes.into()),
            ("object_key", object_key.into()),
            ("object_size", (sealed.body.len() as u64).into()),
            ("blocks", Value::Array(blocks)),
        ]);
        let (outcome,): (String,) = self.call("mts_tier_commit", (row,), self.timeout).await?;
        match outcome.as_str() {
            "ok" => Ok(TierCommit::Committed),
            "gone" => Ok(TierCommit::Gone),
            "abandoned" => Ok(TierCommit::Abandoned),
            other => Err(Error::protocol(format!(
                "mts_tier_commit answered {other:?}"
            ))),
        }
    }

    /// When the first message of `subject` committed at or after
    /// `time_ns` lies in a segment: a reference to the first message of the
    /// block that holds it (or that it follows). `None` when the hot tier
    /// answers exactly.
    pub async fn locate_time(
        &self,
        subject: &str,
        time_ns: u64,
    ) -> Result<Option<StoredMessage>, Error> {
        let (at,): (Option<StoredMessage>,) = self
            .call("mts_locate_time", (subject, time_ns), self.timeout)
            .await?;
        Ok(at)
    }

    /// The first block of the segment after the one stored as object `key`
    /// (of the same subject), for reading ahead; `None` when there is none
    /// yet.
    pub async fn segment_next(&self, key: &str) -> Result<Option<SegmentRef>, Error> {
        let (next,): (Option<SegmentRef>,) =
            self.call("mts_segment_next", (key,), self.timeout).await?;
        Ok(next)
    }

    /// The hot tier against its budget.
    pub async fn hot_tier(&self) -> Result<HotTier, Error> {
        let (hot,): (HotTier,) = self
            .call("mts_hot_tier", (&*self.hot,), self.timeout)
            .await?;
        Ok(hot)
    }

    /// The two tiers at a glance.
    pub async fn storage_stats(&self) -> Result<StorageStats, Error> {
        let (stats,): (StorageStats,) = self
            .call("mts_storage_stats", (&*self.hot,), self.timeout)
            .await?;
        Ok(stats)
    }

    /// Dead-letters `message` (read from its segment), which the consumer
    /// holds due after `deliveries` deliveries; true if it did (false when
    /// the consumer no longer holds it so, e.g. another fetcher did it).
    pub async fn dead_letter(
        &self,
        durable: &str,
        message: &StoredMessage,
        deliveries: u32,
    ) -> Result<bool, Error> {
        let (done,): (bool,) = self
            .call(
                "mts_dead_letter",
                (
                    &message.subject,
                    durable,
                    message.seq,
                    deliveries,
                    message_copy(message),
                ),
                self.timeout,
            )
            .await?;
        Ok(done)
    }
}

/// What a dead-letter copy takes of `message`, for the Lua.
pub(super) fn message_copy(message: &StoredMessage) -> tarant::Value {
    use tarant::Value;
    let headers = message
        .headers
        .iter()
        .map(|(k, v)| (Value::from(k.as_str()), Value::from(v.as_str())))
        .collect();
    lua_map(vec![
        ("headers", Value::Map(headers)),
        (
            "data",
            message
                .data
                .as_ref()
                .map_or(Value::Nil, |d| Value::Binary(d.to_vec())),
        ),
        ("object_key", optional(message.object_key.as_deref())),
        ("size", message.size.into()),
        ("sha256", optional(message.sha256.as_deref())),
    ])
}
