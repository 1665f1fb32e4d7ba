//! When the next commit is due.
//!
//! While the worker keeps up with its inputs, commits start every `commitInterval`, measured
//! from the start of the last one: the commit's own time (tens of milliseconds waiting for
//! the broker) does not stretch the cadence, so a record waits at most about one interval
//! plus one commit before it is visible. At least half an interval still separates the end
//! of one commit (or checkpoint cut) from the start of the next, so a slow broker cannot turn
//! the loop into back-to-back commits of a few records each.
//!
//! With a backlog, a full interval of processing follows every commit: fewer, larger
//! transactions cost less per event, and latency is then the backlog's anyway.

use std::time::{Duration, Instant};

/// `started`/`ended`: the last commit (with its checkpoint cut, if any); `caught_up`: a poll
/// found nothing to read since the commit before it.
pub fn next_commit(
    started: Instant,
    ended: Instant,
    interval: Duration,
    caught_up: bool,
) -> Instant {
    if caught_up {
        (started + interval).max(ended + interval / 2)
    } else {
        ended + interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn caught_up_commits_keep_the_interval_from_start_to_start() {
        let t0 = Instant::now();
        assert_eq!(next_commit(t0, t0 + 40 * MS, 100 * MS, true), t0 + 100 * MS);
    }

    #[test]
    fn a_slow_commit_is_followed_by_half_an_interval_of_processing() {
        let t0 = Instant::now();
        assert_eq!(next_commit(t0, t0 + 90 * MS, 100 * MS, true), t0 + 140 * MS);
        assert_eq!(
            next_commit(t0, t0 + 300 * MS, 100 * MS, true),
            t0 + 350 * MS
        );
    }

    #[test]
    fn with_a_backlog_a_full_interval_follows_the_commit() {
        let t0 = Instant::now();
        assert_eq!(
            next_commit(t0, t0 + 40 * MS, 100 * MS, false),
            t0 + 140 * MS
        );
    }
}
