//! Rules the requests of several RPCs share: names, sequence lists, lease
//! extensions, rejection reasons, and
//! what "the consumer does not hold these" means to a client.

use mts_runtime::validate;
use mts_storage::store::NotHeld;

use crate::Error;

/// Most sequences one Ack or Nack may name.
pub(crate) const MAX_SEQUENCES: usize = 10_000;

/// Checks a subject and durable name pair.
pub(crate) fn consumer_names(subject: &str, durable: &str) -> Result<(), validate::Error> {
    validate::subject(subject)?;
    validate::durable_name(durable)
}

/// Checks a list of sequences to ack or nack.
pub(crate) fn sequence_list(sequences: &[u64]) -> Result<(), validate::Error> {
    if sequences.is_empty() {
        return Err(validate::Error::new(
            "sequences",
            "name at least one sequence",
        ));
    }
    if sequences.len() > MAX_SEQUENCES {
        return Err(validate::Error::new(
            "sequences",
            format!(
                "{} sequences; the limit is {MAX_SEQUENCES}",
                sequences.len()
            ),
        ));
    }
    if sequences.contains(&0) {
        return Err(validate::Error::new("sequences", "sequences start at 1"));
    }
    Ok(())
}

/// Longest a lease extension may reach: a worker that needs more says so
/// again.
pub(crate) const MAX_EXTENSION_MS: u32 = 12 * 3600 * 1000;

/// Checks a lease extension's length; `None` is the consumer's ack_wait.
pub(crate) fn extension(extend_ms: u32) -> Result<Option<u32>, validate::Error> {
    match extend_ms {
        0 => Ok(None),
        ms if ms > MAX_EXTENSION_MS => Err(validate::Error::new(
            "extend_ms",
            format!(
                "{ms} ms is longer than the limit of {MAX_EXTENSION_MS} (12 hours); extend again later"
            ),
        )),
        ms => Ok(Some(ms)),
    }
}

/// Longest reason a rejection may give.
pub(crate) const MAX_REJECT_REASON: usize = 1024;

/// Checks a rejection's reason.
pub(crate) fn reject_reason(reason: &str) -> Result<(), validate::Error> {
    if reason.len() > MAX_REJECT_REASON {
        return Err(validate::Error::new(
            "reason",
            format!("{} bytes; the limit is {MAX_REJECT_REASON}", reason.len()),
        ));
    }
    Ok(())
}

/// Maps "the consumer does not hold these" to the service error.
pub(crate) fn held<T>(
    subject: &str,
    durable: &str,
    verdict: Result<T, NotHeld>,
) -> Result<T, Error> {
    verdict.map_err(|NotHeld(sequences)| Error::NotHeld {
        subject: subject.to_owned(),
        durable: durable.to_owned(),
        sequences,
    })
}
