//! `outbox migrate`: create or upgrade the schema, or print it.

use outbox::registry::{StoreKind, StoreOptions};

use crate::backend;
use crate::cli::MigrateArgs;
use crate::error::Failure;
use crate::output;
use crate::settings::Common;

/// Migrate the store (idempotent), then check and describe the schema; with `--print`, write
/// the SQL instead, without connecting.
pub(crate) async fn run(common: &Common, args: &MigrateArgs) -> Result<(), Failure> {
    let url = common.store()?;
    let options = StoreOptions {
        migrate: true,
        ..common.store_options.clone()
    };
    if args.print {
        let sql = outbox::registry::schema_sql(url.value.expose(), &options)
            .map_err(|e| Failure::open("store", &url.value.to_string(), &url.origin, &e))?;
        output::raw(&sql);
        return Ok(());
    }
    let store = backend::store(common, &options).await?;
    let schema = store
        .check_schema()
        .await
        .map_err(|e| Failure::call("check the schema after the migration", &e))?;
    output::line(&format!("schema in place: {schema}"));
    let prefix = options.table_prefix.as_deref().unwrap_or("outbox");
    match url.value.kind() {
        StoreKind::Postgres => output::line(&format!(
            "enqueue from SQL: SELECT \"{}\".{prefix}_enqueue(topic, key, payload, headers)",
            options.schema.as_deref().unwrap_or("public"),
        )),
        StoreKind::MySql => output::line(&format!(
            "enqueue from SQL: CALL {}{prefix}_enqueue(topic, key, payload, headers)",
            options
                .schema
                .as_deref()
                .map(|db| format!("`{db}`."))
                .unwrap_or_default(),
        )),
        _ => {}
    }
    Ok(())
}
