//! The wait between attempts at something only another system can make
//! succeed (Kafka answering a commit, a dead-letter write going through):
//! doubling from a short first delay to a cap, so a blip costs little and
//! an outage is not hammered, and always cut short by shutdown.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    delay: Duration,
}

impl Backoff {
    /// Waits start at `first` and double up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            delay: first,
        }
    }

    /// How long the next wait lasts.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// Waits the current delay, without lengthening it. False if `shutdown`
    /// came first.
    pub async fn sleep(&self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(self.delay) => true,
        }
    }

    /// Doubles the delay, up to the cap.
    pub fn grow(&mut self) {
        self.delay = (self.delay * 2).min(self.max);
    }

    /// [`Self::sleep`], then [`Self::grow`] (whether or not shutdown came).
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let slept = self.sleep(shutdown).await;
        self.grow();
        slept
    }

    /// Back to the first delay: the last failure was not the other side's.
    pub fn reset(&mut self) {
        self.delay = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut delays = Vec::new();
        for _ in 0..8 {
            delays.push(backoff.delay().as_millis());
            backoff.grow();
        }
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.delay(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_when_shutdown_comes_during_it() {
        let shutdown = CancellationToken::new();
        let mut backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(5));
        let start = Instant::now();
        let waiting = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move { backoff.wait(&shutdown).await })
        };
        // The wait has begun (paused time moves only when every task
        // waits); shutdown comes one second into its five.
        tokio::time::sleep(Duration::from_secs(1)).await;
        shutdown.cancel();
        assert!(!waiting.await.unwrap(), "ended by shutdown");
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_lasts_its_delay_and_one_after_shutdown_returns_at_once() {
        let shutdown = CancellationToken::new();
        let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(8));
        let start = Instant::now();
        assert!(backoff.wait(&shutdown).await);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(backoff.delay(), Duration::from_secs(4));
        shutdown.cancel();
        assert!(!backoff.sleep(&shutdown).await);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}
