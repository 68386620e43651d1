//! `outbox drain`: exit 0 once nothing is pending, for deploy scripts and tests.

use std::time::Instant;

use outbox::BacklogStats;

use crate::backend;
use crate::cli::DrainArgs;
use crate::duration;
use crate::error::{Failure, describe};
use crate::output;
use crate::settings::Common;

/// Look at the backlog until nothing is pending (`--wait`) or once.
pub(crate) async fn run(common: &Common, args: &DrainArgs) -> Result<(), Failure> {
    let store = backend::store(common, &common.store_options).await?;
    let started = Instant::now();
    loop {
        let left = args.timeout.saturating_sub(started.elapsed());
        match store.stats().await {
            Ok(stats) if stats.pending == 0 => {
                output::line(&format!(
                    "drained: nothing pending ({} dead letters)",
                    stats.dead
                ));
                return Ok(());
            }
            Ok(stats) if !args.wait => {
                return Err(Failure::Failed(format!(
                    "not drained: {}",
                    what_is_left(&stats)
                )));
            }
            Ok(stats) if left.is_zero() => {
                return Err(Failure::Failed(format!(
                    "not drained after {}: {}",
                    duration::show(args.timeout),
                    what_is_left(&stats)
                )));
            }
            Ok(_) => {}
            // A deploy waiting for the drain should not fail on one blip of the store.
            Err(e) if args.wait && e.kind().is_retryable() && !left.is_zero() => {
                tracing::warn!(error = %describe(&e), "reading the backlog failed; trying again");
            }
            Err(e) => return Err(Failure::call("read the backlog", &e)),
        }
        tokio::time::sleep(args.interval.min(left)).await;
    }
}

fn what_is_left(stats: &BacklogStats) -> String {
    let mut text = format!("{} pending", stats.pending);
    if stats.held_back > 0 {
        text.push_str(&format!(
            " ({} held back behind dead letters: requeue or delete those)",
            stats.held_back
        ));
    }
    text.push_str(&format!(
        ", oldest {}; {} dead letters",
        output::show_age(stats.oldest_pending_age),
        stats.dead
    ));
    text
}
