//! Slots for streamed uploads: a cap for the whole process, and a share of
//! it per client, so that one client's slow or idle streams cannot take
//! every slot and block everyone else's uploads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::Error;

/// The upload slots of one ingress process.
pub struct UploadSlots {
    total: Arc<Semaphore>,
    limit: usize,
    per_client: usize,
    /// Slots held, by client.
    held: Mutex<HashMap<String, usize>>,
}

/// One upload's slot, given back when dropped.
pub struct Slot {
    slots: Arc<UploadSlots>,
    client: String,
    _permit: OwnedSemaphorePermit,
}

impl UploadSlots {
    /// `limit` slots in all, at most `per_client` of them for one client.
    pub fn new(limit: usize, per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            total: Arc::new(Semaphore::new(limit)),
            limit,
            per_client: per_client.min(limit),
            held: Mutex::default(),
        })
    }

    /// A slot for `client`, or why there is none now.
    pub fn take(self: &Arc<Self>, client: &str) -> Result<Slot, Error> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.get(client).copied().unwrap_or(0) >= self.per_client {
            return Err(Error::ClientBusy {
                limit: self.per_client,
            });
        }
        let permit = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| Error::Busy { limit: self.limit })?;
        *held.entry(client.to_owned()).or_default() += 1;
        Ok(Slot {
            slots: Arc::clone(self),
            client: client.to_owned(),
            _permit: permit,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_gets_only_its_share() {
        let slots = UploadSlots::new(4, 2);
        let a1 = slots.take("a").unwrap();
        let _a2 = slots.take("a").unwrap();
        assert!(matches!(
            slots.take("a"),
            Err(Error::ClientBusy { limit: 2 })
        ));
        let _b1 = slots.take("b").unwrap();
        let _b2 = slots.take("b").unwrap();
        assert!(matches!(slots.take("c"), Err(Error::Busy { limit: 4 })));
        drop(a1);
        let _a3 = slots.take("a").unwrap();
        assert!(slots.held.lock().unwrap().len() == 2);
    }

    #[test]
    fn a_client_without_slots_is_forgotten() {
        let slots = UploadSlots::new(2, 1);
        drop(slots.take("a").unwrap());
        assert!(slots.held.lock().unwrap().is_empty());
    }
}
