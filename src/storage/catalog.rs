//! Opening the SQL catalog, and the commit fence.
//!
//! K2 records consumed Kafka offsets in each snapshot's summary. iceberg-rust's
//! `Transaction::commit` reloads the table and re-applies its actions on the
//! newest snapshot before every attempt, so a commit prepared on an older
//! snapshot would succeed silently and overwrite the offsets another writer
//! recorded in between. [`FencedCatalog`] closes that hole: it refuses (with a
//! non-retryable error) any table update whose table has moved past the
//! snapshot the offsets were read from. The committer then reloads, re-merges
//! and tries again. See `docs/adr/0001-offsets-in-snapshot-summaries.md`.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use iceberg::io::LocalFsStorageFactory;
use iceberg::table::Table;
use iceberg::{Catalog, CatalogBuilder, Error, ErrorKind};
use iceberg_catalog_sql::{
    SQL_CATALOG_PROP_BIND_STYLE, SQL_CATALOG_PROP_URI, SQL_CATALOG_PROP_WAREHOUSE, SqlBindStyle,
    SqlCatalogBuilder,
};

use crate::config::CatalogConfig;

/// Message of the error [`FencedCatalog`] returns when the table moved.
pub const FENCE_MESSAGE: &str = "k2 commit fence: table changed since its offsets were read";

/// Opens the SQL catalog described by `config` (SQLite or PostgreSQL) with a
/// local-filesystem warehouse. Relative paths are resolved against `base_dir`.
pub async fn open_catalog(config: &CatalogConfig, base_dir: &Path) -> anyhow::Result<Arc<dyn Catalog>> {
    use anyhow::Context as _;

    let db = CatalogDb::new(config, base_dir)?;
    let uri = db.uri.clone();
    let bind_style = if db.dollar_placeholders {
        SqlBindStyle::DollarNumeric
    } else {
        SqlBindStyle::QMark
    };
    let warehouse = config
        .warehouse
        .strip_prefix("file://")
        .unwrap_or(&config.warehouse);
    let warehouse = base_dir.join(warehouse);
    std::fs::create_dir_all(&warehouse)
        .with_context(|| format!("failed to create warehouse directory {}", warehouse.display()))?;
    let warehouse = warehouse
        .canonicalize()
        .with_context(|| format!("failed to resolve warehouse directory {}", warehouse.display()))?;

    let props = HashMap::from([
        (SQL_CATALOG_PROP_URI.to_string(), uri.clone()),
        (
            SQL_CATALOG_PROP_WAREHOUSE.to_string(),
            format!("file://{}", warehouse.display()),
        ),
        (SQL_CATALOG_PROP_BIND_STYLE.to_string(), bind_style.to_string()),
    ]);
    let catalog = SqlCatalogBuilder::default()
        .with_storage_factory(Arc::new(LocalFsStorageFactory))
        .load(config.name.clone(), props)
        .await
        .with_context(|| format!("failed to open the Iceberg SQL catalog at {}", redact(&uri)))?;
    Ok(Arc::new(catalog))
}

/// Where the SQL catalog keeps its tables' metadata pointers: what table
/// maintenance needs to swap a pointer itself (see `storage::maintenance`).
#[derive(Debug, Clone)]
pub struct CatalogDb {
    /// sqlx URI (a SQLite path resolved against the config's directory).
    pub uri: String,
    /// PostgreSQL's `$1..$N` placeholders instead of `?`.
    pub dollar_placeholders: bool,
    /// `catalog_name` column of the catalog's rows.
    pub catalog_name: String,
}

impl CatalogDb {
    pub fn new(config: &CatalogConfig, base_dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;

        let (uri, dollar_placeholders) = if let Some((path, query)) = sqlite_path(config, base_dir) {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("failed to create catalog directory {}", parent.display()))?;
            }
            let query = if query.is_empty() {
                "mode=rwc".to_string()
            } else {
                query.to_string()
            };
            (format!("sqlite:{}?{query}", path.display()), false)
        } else {
            (config.uri.clone(), true)
        };
        Ok(Self {
            uri,
            dollar_placeholders,
            catalog_name: config.name.clone(),
        })
    }

    /// `sql` written with `?` placeholders, in this database's bind style.
    pub fn bind(&self, sql: &str) -> String {
        if !self.dollar_placeholders {
            return sql.to_string();
        }
        let mut out = String::with_capacity(sql.len() + 8);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                out.push_str(&format!("${n}"));
            } else {
                out.push(c);
            }
        }
        out
    }
}

/// Opens a catalog that must already exist: tools that only read or amend
/// what `k2 run` wrote (`k2 backfill`) refuse a SQLite path with no file
/// instead of creating an empty catalog there.
pub async fn open_existing_catalog(
    config: &CatalogConfig,
    base_dir: &Path,
) -> anyhow::Result<Arc<dyn Catalog>> {
    if let Some((path, _)) = sqlite_path(config, base_dir)
        && !path.is_file()
    {
        anyhow::bail!(
            "no catalog at {} (from [catalog] uri = \"{}\"): has `k2 run` ever run with this config?",
            path.display(),
            config.uri
        );
    }
    open_catalog(config, base_dir).await
}

/// The database file and the query string of a `sqlite:` catalog URI,
/// resolved against `base_dir`; None for any other database.
fn sqlite_path<'a>(config: &'a CatalogConfig, base_dir: &Path) -> Option<(std::path::PathBuf, &'a str)> {
    let path = config.uri.strip_prefix("sqlite:")?.trim_start_matches("//");
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    Some((base_dir.join(path), query))
}

/// Hides a password in a database URI before it reaches a log or an error.
fn redact(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &uri[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &uri[..scheme_end + 3], &uri[at..]),
                None => uri.to_string(),
            }
        }
        _ => uri.to_string(),
    }
}

/// A catalog that accepts a table update only if the table's current snapshot
/// is still `expected_snapshot_id`. Everything else is delegated.
pub struct FencedCatalog<'a> {
    inner: &'a dyn Catalog,
    expected_snapshot_id: Option<i64>,
}

impl<'a> FencedCatalog<'a> {
    pub fn new(inner: &'a dyn Catalog, base: &Table) -> Self {
        Self {
            inner,
            expected_snapshot_id: base.metadata().current_snapshot_id(),
        }
    }
}

impl fmt::Debug for FencedCatalog<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FencedCatalog")
            .field("expected_snapshot_id", &self.expected_snapshot_id)
            .finish()
    }
}

/// True when `err` is the fence's refusal (reload, re-merge, retry).
pub fn is_fence_error(err: &Error) -> bool {
    err.message() == FENCE_MESSAGE
}

/// Implements [`Catalog`] for a wrapper around another catalog (its field
/// `$inner`): every method is delegated except `update_table`, whose body is
/// given. The wrappers that change one thing (the fence, injected faults)
/// read as that one thing.
#[macro_export]
macro_rules! catalog_wrapper {
    ($ty:ty, $inner:ident, |$this:ident, $commit:ident| $update:block) => {
        #[async_trait::async_trait]
        impl iceberg::Catalog for $ty {
            async fn list_namespaces(
                &self,
                parent: Option<&iceberg::NamespaceIdent>,
            ) -> iceberg::Result<Vec<iceberg::NamespaceIdent>> {
                self.$inner.list_namespaces(parent).await
            }
            async fn create_namespace(
                &self,
                namespace: &iceberg::NamespaceIdent,
                properties: std::collections::HashMap<String, String>,
            ) -> iceberg::Result<iceberg::Namespace> {
                self.$inner.create_namespace(namespace, properties).await
            }
            async fn get_namespace(
                &self,
                namespace: &iceberg::NamespaceIdent,
            ) -> iceberg::Result<iceberg::Namespace> {
                self.$inner.get_namespace(namespace).await
            }
            async fn namespace_exists(&self, namespace: &iceberg::NamespaceIdent) -> iceberg::Result<bool> {
                self.$inner.namespace_exists(namespace).await
            }
            async fn update_namespace(
                &self,
                namespace: &iceberg::NamespaceIdent,
                properties: std::collections::HashMap<String, String>,
            ) -> iceberg::Result<()> {
                self.$inner.update_namespace(namespace, properties).await
            }
            async fn drop_namespace(&self, namespace: &iceberg::NamespaceIdent) -> iceberg::Result<()> {
                self.$inner.drop_namespace(namespace).await
            }
            async fn list_tables(
                &self,
                namespace: &iceberg::NamespaceIdent,
            ) -> iceberg::Result<Vec<iceberg::TableIdent>> {
                self.$inner.list_tables(namespace).await
            }
            async fn create_table(
                &self,
                namespace: &iceberg::NamespaceIdent,
                creation: iceberg::TableCreation,
            ) -> iceberg::Result<iceberg::table::Table> {
                self.$inner.create_table(namespace, creation).await
            }
            async fn load_table(
                &self,
                table: &iceberg::TableIdent,
            ) -> iceberg::Result<iceberg::table::Table> {
                self.$inner.load_table(table).await
            }
            async fn drop_table(&self, table: &iceberg::TableIdent) -> iceberg::Result<()> {
                self.$inner.drop_table(table).await
            }
            async fn purge_table(&self, table: &iceberg::TableIdent) -> iceberg::Result<()> {
                self.$inner.purge_table(table).await
            }
            async fn table_exists(&self, table: &iceberg::TableIdent) -> iceberg::Result<bool> {
                self.$inner.table_exists(table).await
            }
            async fn rename_table(
                &self,
                src: &iceberg::TableIdent,
                dest: &iceberg::TableIdent,
            ) -> iceberg::Result<()> {
                self.$inner.rename_table(src, dest).await
            }
            async fn register_table(
                &self,
                table: &iceberg::TableIdent,
                metadata_location: String,
            ) -> iceberg::Result<iceberg::table::Table> {
                self.$inner.register_table(table, metadata_location).await
            }
            async fn update_table(
                &self,
                $commit: iceberg::TableCommit,
            ) -> iceberg::Result<iceberg::table::Table> {
                let $this = self;
                $update
            }
        }
    };
}

catalog_wrapper!(FencedCatalog<'_>, inner, |this, commit| {
    let current = this.inner.load_table(commit.identifier()).await?;
    let current_id = current.metadata().current_snapshot_id();
    if current_id != this.expected_snapshot_id {
        return Err(Error::new(ErrorKind::CatalogCommitConflicts, FENCE_MESSAGE)
            .with_context("expected_snapshot_id", format!("{:?}", this.expected_snapshot_id))
            .with_context("current_snapshot_id", format!("{current_id:?}"))
            .with_retryable(false));
    }
    // The inner SQL catalog still compare-and-swaps the metadata location,
    // and the transaction's own requirement pins the snapshot id, so a
    // writer that slips in after this check makes the update fail too.
    this.inner.update_table(commit).await
});

#[cfg(test)]
mod tests {
    use super::{open_catalog, open_existing_catalog, redact};
    use crate::config::CatalogConfig;

    #[test]
    fn password_in_catalog_uri_is_redacted() {
        assert_eq!(
            redact("postgres://k2:secret@db:5432/k2"),
            "postgres://k2:***@db:5432/k2"
        );
        assert_eq!(redact("postgres://k2@db/k2"), "postgres://k2@db/k2");
        assert_eq!(redact("sqlite:/tmp/x.db?mode=rwc"), "sqlite:/tmp/x.db?mode=rwc");
    }

    #[actix_rt::test]
    async fn a_missing_sqlite_catalog_is_refused_and_not_created_by_tools_that_need_one() {
        let dir = tempfile::tempdir().unwrap();
        let config = CatalogConfig {
            uri: "sqlite:data/catlog.db".to_string(),
            warehouse: "data/warehouse".to_string(),
            ..CatalogConfig::default()
        };
        let err = open_existing_catalog(&config, dir.path())
            .await
            .expect_err("a missing catalog is refused")
            .to_string();
        let path = dir.path().join("data/catlog.db");
        assert!(
            err.contains(&format!("no catalog at {}", path.display()))
                && err.contains("sqlite:data/catlog.db"),
            "{err}"
        );
        assert!(!path.exists(), "the refusal created a file");

        open_catalog(&config, dir.path()).await.unwrap();
        assert!(path.is_file(), "k2 run creates the catalog it writes");
        open_existing_catalog(&config, dir.path()).await.unwrap();
    }
}
