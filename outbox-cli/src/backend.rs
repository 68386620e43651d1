//! Opening the store and the broker through the facade's URL registry, with errors that name
//! the setting the URL came from and never show its password.

use std::sync::Arc;

use outbox::registry::{BrokerOptions, OutboxStore, StoreOptions};

use crate::error::Failure;
use crate::settings::Common;

/// Open the configured store with `options` (the common ones, or changed by the command).
pub(crate) async fn store(
    common: &Common,
    options: &StoreOptions,
) -> Result<Arc<dyn OutboxStore>, Failure> {
    let url = common.store()?;
    tracing::debug!(store = %url.value, "opening the store");
    outbox::open_store_with(url.value.expose(), options)
        .await
        .map_err(|e| Failure::open("store", &url.value.to_string(), &url.origin, &e))
}

/// Open the configured broker with `options`.
pub(crate) async fn broker(
    common: &Common,
    options: &BrokerOptions,
) -> Result<Arc<dyn outbox::Broker>, Failure> {
    let url = common.broker()?;
    tracing::debug!(broker = %url.value, "opening the broker");
    outbox::open_broker_with(url.value.expose(), options)
        .await
        .map_err(|e| Failure::open("broker", &url.value.to_string(), &url.origin, &e))
}
