//! The seam between the store's queries and its two databases: each query is written once, as
//! SQL text with `$n` parameters and [`Arg`] values, and runs on either backend.
//!
//! What differs between Postgres and SQLite is kept here and nowhere else in the shared code:
//! - value encodings ([`Arg`] when binding, [`Row`] when reading): Postgres has `uuid`,
//!   `timestamptz` and `jsonb`; the SQLite schema keeps uuids as hyphenated lowercase TEXT, times
//!   as INTEGER unix milliseconds and JSON as TEXT (see `migrations/sqlite`);
//! - a few SQL fragments ([`Dialect`]): list membership (`= ANY(array)` against `json_each`),
//!   a JSON field, row locks (`FOR UPDATE [SKIP LOCKED]`; SQLite's single write lock needs none);
//! - how a write transaction starts ([`Backend::begin`]: SQLite's `BEGIN IMMEDIATE` takes the
//!   write lock up front, so a transaction that reads and then writes waits instead of failing
//!   busy).
//!
//! A hand-written enum rather than sqlx's `Any` driver: `Any` carries neither uuids, times nor
//! JSON, which every table here holds; rather than generic functions over `sqlx::Database`:
//! their trait bounds would be repeated on every query function.

use super::StoreError;
use super::codec::corrupt;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnection, PgRow};
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqliteConnection, SqliteRow};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Row as _, Sqlite, SqlitePool};
use std::borrow::Cow;
use time::OffsetDateTime;
use uuid::Uuid;

/// The two pools. Debug prints only the backend name: pool options could reveal the host.
#[derive(Clone)]
pub(super) enum Backend {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Postgres(_) => f.write_str("Backend::Postgres"),
            Backend::Sqlite(_) => f.write_str("Backend::Sqlite"),
        }
    }
}

impl Backend {
    /// A pooled connection, for reads and single-statement writes (autocommit).
    pub(super) async fn acquire(&self) -> Result<Pooled, StoreError> {
        Ok(match self {
            Backend::Postgres(p) => Pooled::Pg(p.acquire().await?),
            Backend::Sqlite(p) => Pooled::Lite(p.acquire().await?),
        })
    }
    pub(super) fn dialect(&self) -> Dialect {
        match self {
            Backend::Postgres(_) => Dialect::Postgres,
            Backend::Sqlite(_) => Dialect::Sqlite,
        }
    }
    /// A write transaction (SQLite: `BEGIN IMMEDIATE`, see the module comment).
    pub(super) async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(match self {
            Backend::Postgres(p) => Tx::Pg(p.begin().await?),
            Backend::Sqlite(p) => Tx::Lite(p.begin_with("BEGIN IMMEDIATE").await?),
        })
    }
}

/// A connection taken from the pool.
pub(super) enum Pooled {
    Pg(PoolConnection<Postgres>),
    Lite(PoolConnection<Sqlite>),
}

impl Pooled {
    pub(super) fn conn(&mut self) -> Conn<'_> {
        match self {
            Pooled::Pg(c) => Conn::Pg(c),
            Pooled::Lite(c) => Conn::Lite(c),
        }
    }
}

/// An open write transaction; dropped without [`Tx::commit`], it rolls back.
pub(super) enum Tx {
    Pg(sqlx::Transaction<'static, Postgres>),
    Lite(sqlx::Transaction<'static, Sqlite>),
}

impl Tx {
    pub(super) fn conn(&mut self) -> Conn<'_> {
        match self {
            Tx::Pg(t) => Conn::Pg(t),
            Tx::Lite(t) => Conn::Lite(t),
        }
    }
    pub(super) async fn commit(self) -> Result<(), StoreError> {
        match self {
            Tx::Pg(t) => t.commit().await?,
            Tx::Lite(t) => t.commit().await?,
        }
        Ok(())
    }
}

/// A borrowed connection of either backend (inside a transaction or not).
pub(super) enum Conn<'c> {
    Pg(&'c mut PgConnection),
    Lite(&'c mut SqliteConnection),
}

/// The SQL fragments that differ between the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    Postgres,
    Sqlite,
}

impl Dialect {
    /// `expr` is one of the list bound as parameter `$n` ([`Arg::TextList`], [`Arg::IdList`]).
    pub(super) fn in_list(self, expr: &str, n: usize) -> String {
        match self {
            Dialect::Postgres => format!("{expr} = ANY(${n})"),
            Dialect::Sqlite => format!("{expr} IN (SELECT value FROM json_each(${n}))"),
        }
    }
    /// The text of field `key` of JSON column `col`, written exactly as the expression indexes
    /// on it are (`grants_active_job_idx`), so the planners use them.
    pub(super) fn json_field(self, col: &str, key: &str) -> String {
        match self {
            Dialect::Postgres => format!("({col} ->> '{key}')"),
            Dialect::Sqlite => format!("json_extract({col}, '$.{key}')"),
        }
    }
    /// A JSON column as its text.
    pub(super) fn json_text(self, col: &str) -> String {
        match self {
            Dialect::Postgres => format!("{col}::text"),
            Dialect::Sqlite => col.to_owned(),
        }
    }
    /// Row locks for a read that a write in the same transaction depends on (SQLite: the
    /// transaction already holds the single write lock).
    pub(super) fn for_update(self) -> &'static str {
        match self {
            Dialect::Postgres => " FOR UPDATE",
            Dialect::Sqlite => "",
        }
    }
    /// Row locks that pass over rows another transaction holds (replicas splitting work).
    pub(super) fn for_update_skip_locked(self) -> &'static str {
        match self {
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        }
    }
}

impl Conn<'_> {
    pub(super) fn dialect(&self) -> Dialect {
        match self {
            Conn::Pg(_) => Dialect::Postgres,
            Conn::Lite(_) => Dialect::Sqlite,
        }
    }
    /// Rows changed.
    pub(super) async fn execute(&mut self, sql: &Sql<'_>) -> Result<u64, StoreError> {
        Ok(match self {
            Conn::Pg(c) => sql.pg()?.execute(&mut **c).await?.rows_affected(),
            Conn::Lite(c) => sql.lite()?.execute(&mut **c).await?.rows_affected(),
        })
    }
    pub(super) async fn fetch_all(&mut self, sql: &Sql<'_>) -> Result<Vec<Row>, StoreError> {
        Ok(match self {
            Conn::Pg(c) => {
                let rows = sql.pg()?.fetch_all(&mut **c).await?;
                rows.into_iter().map(Row::Pg).collect()
            }
            Conn::Lite(c) => {
                let rows = sql.lite()?.fetch_all(&mut **c).await?;
                rows.into_iter().map(Row::Lite).collect()
            }
        })
    }
    pub(super) async fn fetch_optional(
        &mut self,
        sql: &Sql<'_>,
    ) -> Result<Option<Row>, StoreError> {
        Ok(match self {
            Conn::Pg(c) => sql.pg()?.fetch_optional(&mut **c).await?.map(Row::Pg),
            Conn::Lite(c) => sql.lite()?.fetch_optional(&mut **c).await?.map(Row::Lite),
        })
    }
    pub(super) async fn fetch_one(&mut self, sql: &Sql<'_>) -> Result<Row, StoreError> {
        Ok(match self {
            Conn::Pg(c) => Row::Pg(sql.pg()?.fetch_one(&mut **c).await?),
            Conn::Lite(c) => Row::Lite(sql.lite()?.fetch_one(&mut **c).await?),
        })
    }
}

/// One bound value, encoded per backend when the statement runs.
#[derive(Debug, Clone)]
pub(super) enum Arg<'a> {
    Str(Option<&'a str>),
    String(Option<String>),
    Int(Option<i64>),
    Time(Option<OffsetDateTime>),
    Id(Option<Uuid>),
    Json(&'a serde_json::Value),
    TextList(&'a [String]),
    IdList(&'a [Uuid]),
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Str(Some(v))
    }
}
impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Str(Some(v))
    }
}
impl<'a> From<&'a Option<String>> for Arg<'a> {
    fn from(v: &'a Option<String>) -> Self {
        Arg::Str(v.as_deref())
    }
}
impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Arg::Str(v)
    }
}
impl<'a> From<&'a serde_json::Value> for Arg<'a> {
    fn from(v: &'a serde_json::Value) -> Self {
        Arg::Json(v)
    }
}

/// `From` a value and from an optional value (bound as NULL when `None`).
macro_rules! arg_from {
    ($($t:ty => $variant:ident),* $(,)?) => {$(
        impl From<$t> for Arg<'_> {
            fn from(v: $t) -> Self {
                Arg::$variant(Some(v))
            }
        }
        impl From<Option<$t>> for Arg<'_> {
            fn from(v: Option<$t>) -> Self {
                Arg::$variant(v)
            }
        }
    )*};
}
arg_from!(String => String, i64 => Int, OffsetDateTime => Time, Uuid => Id);

/// A statement: its text (parameters `$1`, `$2`, ...) and the values bound to them, in order.
#[derive(Debug, Clone)]
pub(super) struct Sql<'a> {
    text: String,
    args: Vec<Arg<'a>>,
}

impl<'a> Sql<'a> {
    pub(super) fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            args: Vec::new(),
        }
    }
    /// Bind the next parameter (`$1` first) of a fixed text.
    pub(super) fn bind(mut self, arg: impl Into<Arg<'a>>) -> Self {
        self.args.push(arg.into());
        self
    }
    /// Append text.
    pub(super) fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }
    /// Append a new parameter `$n` bound to `arg`.
    pub(super) fn push_bind(&mut self, arg: impl Into<Arg<'a>>) -> &mut Self {
        self.args.push(arg.into());
        self.text.push_str(&format!("${}", self.args.len()));
        self
    }
    /// ` AND col = $n` when `v` is given.
    pub(super) fn and_eq(&mut self, col: &str, v: &'a Option<String>) -> &mut Self {
        if let Some(v) = v {
            self.push(&format!(" AND {col} = ")).push_bind(v);
        }
        self
    }
    /// ` AND col >= $n` / ` AND col < $m` for the bounds given (a half-open range).
    pub(super) fn and_within(
        &mut self,
        col: &str,
        from: Option<OffsetDateTime>,
        until: Option<OffsetDateTime>,
    ) -> &mut Self {
        if let Some(t) = from {
            self.push(&format!(" AND {col} >= ")).push_bind(t);
        }
        if let Some(t) = until {
            self.push(&format!(" AND {col} < ")).push_bind(t);
        }
        self
    }
    /// The number the next [`Sql::push_bind`] (or `bind`) parameter gets.
    pub(super) fn next_param(&self) -> usize {
        self.args.len() + 1
    }

    fn pg(&self) -> Result<Query<'_, Postgres, PgArguments>, StoreError> {
        let mut q = sqlx::query(&self.text);
        for a in &self.args {
            q = match a {
                Arg::Str(v) => q.bind(*v),
                Arg::String(v) => q.bind(v.as_deref()),
                Arg::Int(v) => q.bind(*v),
                Arg::Time(v) => q.bind(*v),
                Arg::Id(v) => q.bind(*v),
                Arg::Json(v) => q.bind(Json(*v)),
                Arg::TextList(v) => q.bind(*v),
                Arg::IdList(v) => q.bind(*v),
            };
        }
        Ok(q)
    }

    /// SQLite gets every value as TEXT or INTEGER (see the module comment).
    fn lite(&self) -> Result<Query<'_, Sqlite, SqliteArguments<'_>>, StoreError> {
        let mut q = sqlx::query(&self.text);
        for a in &self.args {
            let text: Option<Cow<'_, str>> = match a {
                Arg::Int(v) => {
                    q = q.bind(*v);
                    continue;
                }
                Arg::Time(v) => {
                    q = q.bind(v.map(ms));
                    continue;
                }
                Arg::Str(v) => v.map(Cow::Borrowed),
                Arg::String(v) => v.as_deref().map(Cow::Borrowed),
                Arg::Id(v) => v.map(|u| Cow::Owned(u.to_string())),
                Arg::Json(v) => Some(Cow::Owned(json_text(v)?)),
                Arg::TextList(v) => Some(Cow::Owned(json_text(v)?)),
                Arg::IdList(v) => Some(Cow::Owned(json_text(v)?)),
            };
            q = q.bind(text);
        }
        Ok(q)
    }
}

/// A row of either backend, read by column name into the broker's types.
pub(super) enum Row {
    Pg(PgRow),
    Lite(SqliteRow),
}

impl Row {
    /// A column whose Rust type both drivers decode alike (text, integers).
    pub(super) fn get<T>(&self, col: &str) -> Result<T, StoreError>
    where
        T: for<'r> sqlx::Decode<'r, Postgres>
            + sqlx::Type<Postgres>
            + for<'r> sqlx::Decode<'r, Sqlite>
            + sqlx::Type<Sqlite>,
    {
        Ok(match self {
            Row::Pg(r) => r.try_get(col)?,
            Row::Lite(r) => r.try_get(col)?,
        })
    }
    pub(super) fn opt_time(&self, col: &str) -> Result<Option<OffsetDateTime>, StoreError> {
        match self {
            Row::Pg(r) => Ok(r.try_get(col)?),
            Row::Lite(r) => r.try_get::<Option<i64>, _>(col)?.map(from_ms).transpose(),
        }
    }
    pub(super) fn time(&self, col: &str) -> Result<OffsetDateTime, StoreError> {
        self.opt_time(col)?.ok_or_else(|| corrupt("timestamp"))
    }
    pub(super) fn opt_uuid(&self, col: &str) -> Result<Option<Uuid>, StoreError> {
        match self {
            Row::Pg(r) => Ok(r.try_get(col)?),
            Row::Lite(r) => r
                .try_get::<Option<&str>, _>(col)?
                .map(|s| Uuid::parse_str(s).map_err(|_| corrupt("uuid")))
                .transpose(),
        }
    }
    pub(super) fn uuid(&self, col: &str) -> Result<Uuid, StoreError> {
        self.opt_uuid(col)?.ok_or_else(|| corrupt("uuid"))
    }
    /// A uuid column as its text, as stored (SQLite: whatever the row holds, unparsed, so a
    /// tampered value is reported by the chain walk rather than refused here).
    pub(super) fn uuid_text(&self, col: &str) -> Result<String, StoreError> {
        self.opt_uuid_text(col)?.ok_or_else(|| corrupt("uuid"))
    }
    pub(super) fn opt_uuid_text(&self, col: &str) -> Result<Option<String>, StoreError> {
        match self {
            Row::Pg(r) => Ok(r.try_get::<Option<Uuid>, _>(col)?.map(|u| u.to_string())),
            Row::Lite(r) => Ok(r.try_get(col)?),
        }
    }
    pub(super) fn json<T: serde::de::DeserializeOwned>(&self, col: &str) -> Result<T, StoreError> {
        match self {
            Row::Pg(r) => Ok(r.try_get::<Json<T>, _>(col)?.0),
            Row::Lite(r) => serde_json::from_str(r.try_get(col)?).map_err(|_| corrupt("json")),
        }
    }
}

/// Unix milliseconds, the SQLite schema's time encoding (floor, so ordering is kept before
/// 1970 too).
pub(super) fn ms(t: OffsetDateTime) -> i64 {
    let millis = t.unix_timestamp_nanos().div_euclid(1_000_000);
    // Every OffsetDateTime (years ±9999) fits: i64 milliseconds span ±292 million years.
    i64::try_from(millis).unwrap_or(i64::MAX)
}

fn from_ms(v: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(v) * 1_000_000)
        .map_err(|_| corrupt("timestamp"))
}

pub(super) fn json_text<T: serde::Serialize + ?Sized>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v)
        .map_err(|_| StoreError::Unavailable("value not encodable as json".to_owned()))
}
