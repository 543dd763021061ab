//! A value read from the database, held in memory for lock-free reads and replaced by reloads.
//!
//! Writers are serialized: a reload that read the database before a write committed can never
//! store its stale answer over a reload (or local update) that came after the write. Without
//! that, a background reload racing a "write, then reload at once" would undo the write in memory
//! until the next reload.

use std::{future::Future, sync::Arc};

use arc_swap::{ArcSwap, Guard};

pub struct Reloaded<T> {
    value: ArcSwap<T>,
    writer: tokio::sync::Mutex<()>,
}

impl<T> Reloaded<T> {
    pub fn new(value: T) -> Self {
        Self {
            value: ArcSwap::from_pointee(value),
            writer: tokio::sync::Mutex::new(()),
        }
    }

    /// The current value; never blocks.
    pub fn load(&self) -> Guard<Arc<T>> {
        self.value.load()
    }

    /// Replaces the value with what `read` builds from the database (given the current value).
    pub async fn reload<E, F, Fut>(&self, read: F) -> Result<(), E>
    where
        F: FnOnce(Arc<T>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let _writer = self.writer.lock().await;
        let next = read(self.value.load_full()).await?;
        self.value.store(Arc::new(next));
        Ok(())
    }

    /// Applies a local change (one already committed to the database) at once.
    pub async fn update(&self, change: impl FnOnce(&T) -> T) {
        let _writer = self.writer.lock().await;
        let next = change(&self.value.load());
        self.value.store(Arc::new(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reload_that_read_before_a_write_cannot_overwrite_it() {
        let cache = Arc::new(Reloaded::new(0u32));
        let (read_started, started) = tokio::sync::oneshot::channel();
        let (let_stale_finish, finish) = tokio::sync::oneshot::channel::<()>();
        let stale = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .reload(|_| async move {
                        let _ = read_started.send(());
                        let _ = finish.await;
                        Ok::<_, ()>(1) // what the database said before the write
                    })
                    .await
            }
        });
        started.await.ok();
        let fresh = tokio::spawn({
            let cache = cache.clone();
            async move { cache.reload(|_| async { Ok::<_, ()>(2) }).await }
        });
        tokio::task::yield_now().await;
        let _ = let_stale_finish.send(());
        stale.await.ok();
        fresh.await.ok();
        assert_eq!(**cache.load(), 2);
    }
}
