//! `outbox purge`: delete published messages older than an age, in bounded batches, with
//! progress on stderr. The store's purge never touches pending or dead-lettered rows, and
//! measures the age by its own clock.

use std::time::Instant;

use crate::backend;
use crate::cli::PurgeArgs;
use crate::duration;
use crate::error::Failure;
use crate::output;
use crate::settings::Common;

/// Purge until a batch comes back short.
pub(crate) async fn run(common: &Common, args: &PurgeArgs) -> Result<(), Failure> {
    let store = backend::store(common, &common.store_options).await?;
    let age = duration::show(args.published_older_than);
    let batch = args.batch as usize;
    let started = Instant::now();
    let mut total = 0u64;
    loop {
        let purged = store
            .purge(args.published_older_than, batch)
            .await
            .map_err(|e| {
                Failure::Failed(format!(
                    "purge failed after {total} rows: {}",
                    crate::error::describe(&e)
                ))
            })?;
        total += purged;
        if purged > 0 {
            output::note(&format!(
                "purged {total} published messages so far ({})",
                duration::show(started.elapsed())
            ));
        }
        if purged < batch as u64 {
            break;
        }
    }
    output::line(&format!(
        "purged {total} published messages older than {age}"
    ));
    Ok(())
}
