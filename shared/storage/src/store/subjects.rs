//! Subjects: their retention limits and what is stored for them.

use super::*;

/// Retention limits; `None` = the service default, `Some(0)` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Limits {
    /// Longest a message is kept, in milliseconds.
    pub max_age_ms: Option<u64>,
    /// Most messages kept.
    pub max_messages: Option<u64>,
    /// Most payload bytes kept.
    pub max_bytes: Option<u64>,
}

impl Limits {
    pub(super) fn to_lua_map(self) -> tarant::Value {
        use tarant::Value;
        let fields = [
            ("max_age_ms", self.max_age_ms),
            ("max_messages", self.max_messages),
            ("max_bytes", self.max_bytes),
        ];
        Value::Map(
            fields
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (Value::from(k), Value::from(v))))
                .collect(),
        )
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
