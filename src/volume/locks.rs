//! One operation at a time per volume; other volumes are not held up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

/// Locks keyed by SR uuid (one SR per volume). Entries are dropped when nobody holds or waits
/// for them, so the table does not grow with every volume ever touched.
#[derive(Debug, Default)]
pub struct LockTable {
    locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while an operation works on a volume.
#[derive(Debug)]
pub struct VolumeLock {
    _guard: OwnedMutexGuard<()>,
}

impl LockTable {
    pub async fn lock(&self, sr: Uuid) -> VolumeLock {
        let lock = {
            let mut locks = self.locks.lock().expect("lock poisoned");
            locks.retain(|_, l| Arc::strong_count(l) > 1 || l.try_lock().is_err());
            locks.entry(sr).or_default().clone()
        };
        VolumeLock {
            _guard: lock.lock_owned().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn same_volume_waits_other_volume_does_not() {
        let table = Arc::new(LockTable::default());
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let held = table.lock(a).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), table.lock(b))
                .await
                .is_ok()
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(50), table.lock(a))
                .await
                .is_err()
        );
        drop(held);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), table.lock(a))
                .await
                .is_ok()
        );
    }
}
