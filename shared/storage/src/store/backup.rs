//! Backups: a checkpoint pinned and read out, the object keys it may name,
//! and the hold on object deletions while it runs.

use super::*;

impl Store {
    /// Holds object deletions for `hold`, takes a checkpoint and pins its
    /// files until `backup_stop`: their names and sizes. Waits up to
    /// `limit` for the checkpoint.
    pub async fn backup_start(
        &self,
        hold: Duration,
        limit: Duration,
    ) -> Result<Vec<(String, u64)>, Error> {
        let hold_ms = millis(hold);
        let (files,): (Vec<(String, u64)>,) =
            self.call("mts_backup_start", (hold_ms,), limit).await?;
        Ok(files)
    }

    /// Extends the hold on object deletions to `hold` from now.
    pub async fn backup_renew(&self, hold: Duration) -> Result<(), Error> {
        let hold_ms = millis(hold);
        let (_,): (bool,) = self
            .call("mts_backup_renew", (hold_ms,), self.timeout)
            .await?;
        Ok(())
    }

    /// Up to `length` bytes of pinned checkpoint file `name` from `offset`.
    pub async fn backup_read(
        &self,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, Error> {
        use base64::Engine;
        let (encoded,): (String,) = self
            .call("mts_backup_read", (name, offset, length), self.timeout)
            .await?;
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| Error::protocol(format!("backup chunk: {e}")))
    }

    /// Up to `limit` object keys (with sizes, 0 when unknown) after `after`,
    /// from stored messages (`source` "messages") or the deletion queue ("gc").
    pub async fn backup_keys(
        &self,
        source: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, u64)>, Error> {
        let (keys,): (Vec<(String, u64)>,) = self
            .call("mts_backup_keys", (source, after, limit), self.timeout)
            .await?;
        Ok(keys)
    }

    /// Unpins the checkpoint and lifts the hold on deletions.
    pub async fn backup_stop(&self) -> Result<(), Error> {
        let (_,): (bool,) = self.call("mts_backup_stop", (), self.timeout).await?;
        Ok(())
    }
}
