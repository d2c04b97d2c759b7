//! Housekeeping: retention in bounded steps, the objects it released, and
//! the named leases that let one replica at a time do it.

use super::*;

impl Store {
    /// One bounded step of retention from `cursor` with default `limits`:
    /// returns where to resume ("" when every subject was visited) and how
    /// many messages were removed.
    pub async fn retention_step(
        &self,
        cursor: &str,
        limits: Limits,
        budget: u32,
        budget_ms: u32,
    ) -> Result<(String, u64), Error> {
        self.call(
            "mts_retention_step",
            (cursor, limits.to_lua_map(), budget, budget_ms),
            self.timeout,
        )
        .await
    }

    /// Up to `limit` object keys whose metadata is gone.
    pub async fn released_objects(&self, limit: u32) -> Result<Vec<String>, Error> {
        let (keys,): (Vec<String>,) = self.call("mts_gc_take", (limit,), self.timeout).await?;
        Ok(keys)
    }

    /// Forgets released object keys once their objects are deleted.
    pub async fn forget_objects(&self, keys: &[String]) -> Result<(), Error> {
        let _: (bool,) = self.call("mts_gc_done", (keys,), self.timeout).await?;
        Ok(())
    }

    /// Takes or renews lease `name` for `holder`; whether `holder` holds it.
    pub async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, Error> {
        let ttl_ms = millis(ttl);
        let (held,): (bool,) = self
            .call("mts_lease", (name, holder, ttl_ms), self.timeout)
            .await?;
        Ok(held)
    }
}
