//! Subjects: their retention limits and what is stored for them.

use super::*;

/// What a publish meets while the hot tier is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Discard {
    /// The publish is refused (RESOURCE_EXHAUSTED).
    New,
    /// The subject's oldest hot message is evicted to make room.
    Old,
}

impl Discard {
    /// The name the stored procedures and the configuration use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Old => "old",
        }
    }

    /// The policy called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::New, Self::Old]
            .into_iter()
            .find(|d| d.as_str() == name)
    }
}

/// Retention limits and the discard policy; `None` = the service default,
/// `Some(0)` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Limits {
    /// Longest a message is kept, in milliseconds.
    pub max_age_ms: Option<u64>,
    /// Most messages kept.
    pub max_messages: Option<u64>,
    /// Most payload bytes kept.
    pub max_bytes: Option<u64>,
    /// What a publish meets while the hot tier is full.
    #[serde(default)]
    pub discard: Option<Discard>,
}

impl Limits {
    pub(super) fn to_lua_map(self) -> tarant::Value {
        use tarant::Value;
        let fields = [
            ("max_age_ms", self.max_age_ms),
            ("max_messages", self.max_messages),
            ("max_bytes", self.max_bytes),
        ];
        let mut map: Vec<(Value, Value)> = fields
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (Value::from(k), Value::from(v))))
            .collect();
        if let Some(discard) = self.discard {
            map.push((Value::from("discard"), Value::from(discard.as_str())));
        }
        Value::Map(map)
    }
}

/// What is stored for a subject.
#[derive(Debug, Clone, Deserialize)]
pub struct SubjectState {
    /// The subject.
    pub subject: String,
    /// Oldest sequence still stored; 0 if none.
    pub first_seq: u64,
    /// Highest sequence ever assigned.
    pub last_seq: u64,
    /// Messages stored.
    pub count: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Of those messages, how many are in segments (the cold tier).
    #[serde(default)]
    pub cold_count: u64,
    /// And their payload bytes.
    #[serde(default)]
    pub cold_bytes: u64,
    /// The subject's own limits.
    #[serde(flatten)]
    pub limits: Limits,
    /// How many consumers it has.
    #[serde(default)]
    pub consumers: u64,
}

/// One step of a purge (see `Store::purge_step`).
#[derive(Debug, Clone)]
pub enum PurgeStep {
    /// Removed this many; more are left.
    More(u64),
    /// Removed this many, and the purge is done.
    Done(u64),
    /// Removed this many, then reached a segment the purge ends inside:
    /// `blocks` (each a reference to its first message) hold its messages
    /// from `first_seq` through the purge's end, whose payload bytes the
    /// next step needs.
    Cut {
        /// Messages removed before it.
        removed: u64,
        /// The segment's first sequence.
        first_seq: u64,
        /// Its blocks up to the one holding the purge's end.
        blocks: Vec<(u64, SegmentRef)>,
    },
}

/// A segment that a purge ends inside, and the payload bytes of its
/// messages up to that end.
#[derive(Debug, Clone, Copy)]
pub struct SegmentCut {
    /// The segment's first sequence.
    pub first_seq: u64,
    /// Payload bytes of its messages from `first_seq` through the purge's end.
    pub bytes: u64,
}

impl Store {
    /// Sets a subject's own retention limits (`None` fields stay as they are).
    pub async fn set_subject_limits(&self, subject: &str, limits: Limits) -> Result<(), Error> {
        let _: (bool,) = self
            .call(
                "mts_set_subject_limits",
                (subject, limits.to_lua_map()),
                self.timeout,
            )
            .await?;
        Ok(())
    }

    /// Up to `limit` subjects named with `prefix`, in name order after
    /// `after` (empty = from the first). Subjects deleted and not used since
    /// are left out.
    pub async fn list_subjects(
        &self,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<Page<SubjectState>, Error> {
        let (entries, more): (Vec<SubjectState>, bool) = self
            .call("mts_list_subjects", (prefix, after, limit), self.timeout)
            .await?;
        Ok(Page { entries, more })
    }

    /// One bounded step (about `budget` messages, one transaction) of
    /// purging `subject` through `through` (0 = its last sequence when the
    /// step runs); `cut` as the previous step asked for it. Returns what the
    /// step did and `through` as resolved, to pass to the next.
    pub async fn purge_step(
        &self,
        subject: &str,
        through: u64,
        budget: u32,
        cut: Option<SegmentCut>,
    ) -> Result<(PurgeStep, u64), Error> {
        use tarant::Value;
        let cut = cut.map(|cut| {
            Value::Map(vec![
                (Value::from("first_seq"), Value::from(cut.first_seq)),
                (Value::from("bytes"), Value::from(cut.bytes)),
            ])
        });
        type Block = (u64, String, u64, u64, u64);
        let (state, removed, through, blocks, first_seq): (String, u64, u64, Vec<Block>, u64) =
            self.call(
                "mts_purge_step",
                (subject, through, budget, cut),
                self.timeout,
            )
            .await?;
        let step = match state.as_str() {
            "done" => PurgeStep::Done(removed),
            "cut" => PurgeStep::Cut {
                removed,
                first_seq,
                blocks: blocks
                    .into_iter()
                    .map(|(seq, object_key, offset, length, object_size)| {
                        let at = SegmentRef {
                            object_key,
                            offset,
                            length,
                            object_size,
                        };
                        (seq, at)
                    })
                    .collect(),
            },
            _ => PurgeStep::More(removed),
        };
        Ok((step, through))
    }

    /// One step of finishing DeleteSubject once its messages are purged:
    /// deletes its consumers, limits and (up to `budget` a step) message
    /// ids; the row stays, keeping its last sequence. Returns whether it is
    /// done, and how many consumers it deleted.
    pub async fn delete_subject_step(
        &self,
        subject: &str,
        budget: u32,
    ) -> Result<(bool, u64), Error> {
        let (done, consumers): (bool, u64) = self
            .call("mts_delete_subject", (subject, budget), self.timeout)
            .await?;
        Ok((done, consumers))
    }

    /// What is stored for a subject.
    pub async fn subject_info(&self, subject: &str) -> Result<SubjectState, Error> {
        let (state,): (SubjectState,) = self
            .call("mts_subject_info", (subject,), self.timeout)
            .await?;
        Ok(state)
    }
}
