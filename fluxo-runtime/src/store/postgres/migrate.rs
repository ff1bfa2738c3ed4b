//! The schema migrations, embedded in the crate and applied when a store
//! opens.
//!
//! `sqlx::migrate!` cannot place its objects in a schema chosen at run time,
//! so this is a small versioned runner of its own: the applied versions are
//! recorded in `<schema>.fluxo_migrations`, and the pending ones are applied
//! in one transaction that holds a transaction-level advisory lock on the
//! schema, so processes opening the same schema at the same time apply each
//! migration exactly once (the others wait, then find nothing to do).
//! Migrations are append-only: a released one is never edited.

use sqlx::PgPool;

use super::db_err;
use crate::store::{StoreError, StoreResult};

/// One schema change.
struct Migration {
    version: i64,
    description: &'static str,
    /// SQL with `{schema}` standing for the quoted schema name.
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "initial schema",
    sql: include_str!("../../../migrations/postgres/0001_initial_schema.sql"),
}];

/// First key of the advisory lock taken while migrating (the second is a
/// hash of the schema name). Arbitrary, fixed: "flux" in ASCII.
const LOCK_CLASS: i32 = 0x666c_7578;

/// Brings `schema` up to the newest migration this build knows.
pub(super) async fn run(pool: &PgPool, schema: &str) -> StoreResult<()> {
    let quoted = format!("\"{schema}\"");
    let mut tx = pool.begin().await.map_err(db_err)?;
    let migrated = async {
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(schema)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        // Creating a schema needs the CREATE privilege on the database even when
        // it exists; a schema made beforehand by an administrator is used as is.
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(schema)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
        if !exists {
            sqlx::raw_sql(&format!("CREATE SCHEMA {quoted}"))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        let table: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(format!("{quoted}.fluxo_migrations"))
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
        if table.is_none() {
            sqlx::raw_sql(&format!(
                "CREATE TABLE {quoted}.fluxo_migrations (\
                   version BIGINT PRIMARY KEY, \
                   description TEXT NOT NULL, \
                   applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            ))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        let applied: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT version FROM {quoted}.fluxo_migrations ORDER BY version"
        ))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        let newest = MIGRATIONS.last().map_or(0, |m| m.version);
        if let Some(&latest) = applied.last() {
            if latest > newest {
                return Err(StoreError::Corrupt(format!(
                    "schema {schema:?} is at migration {latest}, newer than this build of fluxo \
                     knows ({newest}); upgrade fluxo to use it"
                )));
            }
        }
        for m in MIGRATIONS {
            if applied.contains(&m.version) {
                continue;
            }
            tracing::info!(
                schema,
                version = m.version,
                description = m.description,
                "applying migration"
            );
            sqlx::raw_sql(&m.sql.replace("{schema}", &quoted))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            sqlx::query(&format!(
                "INSERT INTO {quoted}.fluxo_migrations (version, description) VALUES ($1, $2)"
            ))
            .bind(m.version)
            .bind(m.description)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        Ok(())
    }
    .await;
    match migrated {
        Ok(()) => tx.commit().await.map_err(db_err),
        Err(e) => {
            // At once, not when the connection is next used: the
            // transaction holds the migration lock.
            if let Err(rollback) = tx.rollback().await {
                tracing::debug!(error = %rollback, "rolling back a failed migration failed");
            }
            Err(e)
        }
    }
}
