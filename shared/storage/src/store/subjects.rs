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

    /// What is stored for a subject.
    pub async fn subject_info(&self, subject: &str) -> Result<SubjectState, Error> {
        let (state,): (SubjectState,) = self
            .call("mts_subject_info", (subject,), self.timeout)
            .await?;
        Ok(state)
    }
}
