//! Backups: the hold on object deletions (on the leader), a checkpoint pinned
//! on one member and read out (a follower's in a replica set), and the object
//! keys it may name.

use super::*;

/// A checkpoint pinned for a backup on one member of the replica set.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    member: usize,
    /// The member it was taken on (`host:port`).
    pub address: String,
    /// Its files: names and sizes.
    pub files: Vec<(String, u64)>,
}

impl Store {
    /// Holds object deletions for `hold`, takes a checkpoint and pins its
    /// files until `backup_stop`. In a replica set the checkpoint is a
    /// follower's (the one least behind), once it has every write the leader
    /// had when the backup began, so that the leader goes on serving; the
    /// leader's own when no follower answers or catches up in time. Waits up
    /// to `limit` for it.
    pub async fn backup_start(&self, hold: Duration, limit: Duration) -> Result<Checkpoint, Error> {
        self.backup_renew(hold).await?;
        let member = self.members.backup_source(self.timeout).await;
        let files = self
            .call_on(member, "mts_backup_checkpoint", (), limit)
            .await;
        match files {
            Ok((files,)) => Ok(Checkpoint {
                member,
                address: self.members.address(member).to_owned(),
                files,
            }),
            Err(err) => {
                if let Err(release) = self.backup_release().await {
                    tracing::warn!(%release, "the hold on object deletions stays until it lapses");
                }
                Err(err)
            }
        }
    }

    /// Extends the hold on object deletions to `hold` from now.
    pub async fn backup_renew(&self, hold: Duration) -> Result<(), Error> {
        let (_,): (bool,) = self
            .call("mts_backup_hold", (millis(hold),), self.timeout)
            .await?;
        Ok(())
    }

    /// Up to `length` bytes of the checkpoint's file `name` from `offset`.
    pub async fn backup_read(
        &self,
        checkpoint: &Checkpoint,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, Error> {
        use base64::Engine;
        let (encoded,): (String,) = self
            .call_on(
                checkpoint.member,
                "mts_backup_read",
                (name, offset, length),
                self.timeout,
            )
            .await?;
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| Error::protocol(format!("backup chunk: {e}")))
    }

    /// A page of the object keys a checkpoint may name, from `source`
    /// ("messages", "segments" or "gc", the deleted ones the hold keeps),
    /// after `after`, with their sizes. Asked of the leader, which has all
    /// that any follower's checkpoint has.
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
    pub async fn backup_stop(&self, checkpoint: &Checkpoint) -> Result<(), Error> {
        let unpinned = self
            .call_on::<(bool,)>(checkpoint.member, "mts_backup_unpin", (), self.timeout)
            .await;
        self.backup_release().await?;
        unpinned.map(|_| ())
    }

    async fn backup_release(&self) -> Result<(), Error> {
        let (_,): (bool,) = self.call("mts_backup_release", (), self.timeout).await?;
        Ok(())
    }
}
