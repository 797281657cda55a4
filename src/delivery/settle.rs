//! Settling a transaction whose commit or abort ended without a verdict.
//!
//! A commit can time out or lose its connection mid-EndTxn and still have
//! committed. Nothing may be acknowledged or produced again until the
//! outcome is known, and the way it is learnt must not let a zombie (an
//! instance frozen while a successor took over) fence its successor: this
//! is the sharpest edge of exactly-once delivery, kept apart from the
//! commit loop so its order of steps reads in one place. See
//! `docs/delivery.md`, "Unknown outcomes".

use super::exactly_once::{decode_head, ExactlyOnce};
use super::DeliveryError;
use crate::backoff::Backoff;
use crate::kafka::{SinkError, TransactionalSink};
use crate::telemetry;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What became of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    Committed,
    /// Not committed: its records must be produced again.
    Aborted,
    /// Shutdown came first; the outcome is left to the next instance's
    /// `init_transactions`, and nothing is acknowledged.
    Stopped,
}

/// The transactional call whose outcome is being settled.
#[derive(Debug, Clone, Copy)]
pub(super) enum Call {
    Commit,
    Abort,
}

/// Backoff between attempts while Kafka is failing.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The wait between attempts at something only Kafka can make succeed:
/// short for a blip, long enough not to hammer an outage.
pub(super) fn backoff() -> Backoff {
    Backoff::new(RETRY_MIN, RETRY_MAX)
}

/// Learns what became of a transaction whose `call` (commit or abort)
/// ended without a verdict: timed out, or the connection broke mid-EndTxn.
/// `exactly_once` is the state the transaction was written with, `token`
/// the token of its head record (if it had one).
///
/// 1. Ask the same producer again until the coordinator answers:
///    librdkafka carries on with the same call, its documented handling
///    of a timeout. A zombie (frozen mid-commit while a successor took
///    over) hears "fenced" here and stops; re-creating its producer
///    first would have fenced the successor instead.
/// 2. Exactly once: read the head, which fences no one, and judge it
///    (see [`judge`]): committed, not committed, or a successor
///    exists (stop). The read goes to the high watermark with
///    `read_committed`, so it waits until this transaction is settled
///    on the broker: its verdict is final. At least once takes the
///    answer of step 1.
/// 3. Re-create the producer all the same, so that no request of the
///    old one still on its way can land on a later transaction
///    (Jepsen's 2024 Kafka analysis, KIP-890).
pub(super) async fn settle(
    sink: &mut TransactionalSink,
    exactly_once: Option<&ExactlyOnce>,
    token: Option<u64>,
    mut call: Call,
    shutdown: &CancellationToken,
) -> Result<Fate, DeliveryError> {
    let mut backoff = backoff();
    let answer = loop {
        if !backoff.sleep(shutdown).await {
            return Ok(Fate::Stopped);
        }
        let result = match call {
            Call::Commit => sink.commit().await,
            Call::Abort => sink.abort().await,
        };
        match (call, result) {
            (Call::Commit, Ok(())) => break Fate::Committed,
            (Call::Abort, Ok(())) => break Fate::Aborted,
            // A successor took over: stop, and do not fence it back.
            (_, Err(e)) if e.is_fenced() => return Err(e.into()),
            // The coordinator refused the commit: it did not happen.
            (Call::Commit, Err(SinkError::Abortable(_))) => call = Call::Abort,
            // Timed out again: Kafka is still not answering.
            (_, Err(SinkError::Retriable(e))) => {
                tracing::warn!(error = %e, "transaction outcome still unknown; asking again");
                backoff.grow();
            }
            // Anything else, fatal errors included (measured: a paused
            // broker that answers again can reject the retried EndTxn
            // as "invalid transaction state", fatal to librdkafka):
            // this producer cannot tell. Re-creating it settles the
            // transaction; with exactly once the head read back
            // decides, and at least once produces the batch again,
            // which at least once allows.
            (_, Err(e)) => {
                tracing::warn!(error = %e, "the producer cannot settle the transaction; re-creating it");
                break Fate::Aborted;
            }
        }
    };
    // Re-creating the producer fences every other producer with this
    // identity, a successor's too: a zombie whose commit had landed
    // before it froze gets "committed" from the retry above, not
    // "fenced". So the head is read first: every instance claims it
    // when it starts, so a successor shows there.
    let fate = if let Some(eo) = exactly_once {
        let Some(head) = read_head(eo, shutdown).await? else {
            return Ok(Fate::Stopped);
        };
        let fate = judge(head, token, eo.last_token)?;
        tracing::debug!(?fate, coordinator_said = ?answer, "head record read back");
        fate
    } else {
        answer
    };
    if !recover(sink, shutdown).await? {
        return Ok(Fate::Stopped);
    }
    match fate {
        Fate::Committed => telemetry::settled("committed"),
        Fate::Aborted => telemetry::settled("aborted"),
        Fate::Stopped => {}
    }
    Ok(fate)
}

/// The head read back after an unknown outcome: this transaction's token
/// (`ours`) means it committed, the last committed token (`last`) that it
/// did not, and anything else that another instance with this identity
/// has committed since, so this one must stop: it is a zombie, its state
/// is stale.
fn judge(head: Option<u64>, ours: Option<u64>, last: Option<u64>) -> Result<Fate, DeliveryError> {
    if head.is_some() && head == ours {
        Ok(Fate::Committed)
    } else if head == last {
        Ok(Fate::Aborted)
    } else {
        Err(DeliveryError::Superseded)
    }
}

/// The last committed head token, retrying while Kafka is unreachable;
/// `None` if shutdown came first.
async fn read_head(
    eo: &ExactlyOnce,
    shutdown: &CancellationToken,
) -> Result<Option<Option<u64>>, DeliveryError> {
    let mut backoff = backoff();
    loop {
        // The read waits for an open transaction on the state topic to be
        // decided (up to the transaction timeout): shutdown must not wait
        // for that.
        let read = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            read = eo.read() => read,
        };
        match read {
            Ok(stored) => {
                let head = stored.head.as_deref().map(decode_head).transpose()?;
                return Ok(Some(head));
            }
            Err(error) => tracing::warn!(%error, "cannot read the exactly-once head; retrying"),
        }
        if !backoff.wait(shutdown).await {
            return Ok(None);
        }
    }
}

/// Re-creates the producer, retrying while Kafka is unreachable.
/// Returns false if shutdown was requested first.
async fn recover(
    sink: &mut TransactionalSink,
    shutdown: &CancellationToken,
) -> Result<bool, DeliveryError> {
    let mut backoff = backoff();
    loop {
        match sink.recreate().await {
            Ok(()) => return Ok(true),
            Err(SinkError::Fatal(e)) => return Err(SinkError::Fatal(e).into()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-create the Kafka producer; retrying")
            }
        }
        if !backoff.wait(shutdown).await {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settling_backs_off_from_100_ms_to_5_s() {
        let mut backoff = backoff();
        let mut delays = Vec::new();
        for _ in 0..8 {
            delays.push(backoff.delay().as_millis());
            backoff.grow();
        }
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn judge_reads_the_head() {
        let (last, ours) = (Some(1), Some(2));
        assert_eq!(judge(ours, ours, last).unwrap(), Fate::Committed);
        assert_eq!(judge(last, ours, last).unwrap(), Fate::Aborted);
        assert!(matches!(
            judge(Some(3), ours, last),
            Err(DeliveryError::Superseded)
        ));
        // No head yet and none written: nothing of ours committed.
        assert_eq!(judge(None, None, None).unwrap(), Fate::Aborted);
        // A transaction without a head is never taken for committed.
        assert_eq!(judge(last, None, last).unwrap(), Fate::Aborted);
        assert!(matches!(
            judge(Some(3), None, None),
            Err(DeliveryError::Superseded)
        ));
    }
}
