//! `postgres:` parameters of a credential definition (from a policy file).

use super::sql::{MAX_IDENT_BYTES, StatementTemplate};
use serde::{Deserialize, Deserializer, Serialize};

/// Most statements one definition may run at mint.
pub const MAX_STATEMENTS: usize = 32;

/// A database object name from a policy: 1 to 63 bytes, no NUL. Always quoted when used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PgName(String);

/// A string that cannot be a Postgres name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a Postgres name (1 to {MAX_IDENT_BYTES} bytes, no NUL)")]
pub struct PgNameError(pub String);

impl PgName {
    pub fn parse(s: &str) -> Result<Self, PgNameError> {
        if s.is_empty() || s.len() > MAX_IDENT_BYTES || s.contains('\0') {
            return Err(PgNameError(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for PgName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PgName::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn statements<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<StatementTemplate>, D::Error> {
    let v = Vec::<StatementTemplate>::deserialize(d)?;
    if v.len() > MAX_STATEMENTS {
        return Err(serde::de::Error::custom(format!(
            "at most {MAX_STATEMENTS} statements"
        )));
    }
    Ok(v)
}

/// A job-scoped Postgres user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSpec {
    /// A server named under `targets.postgres` in the broker config.
    pub target: String,
    /// The database the job uses (in `database_url`; extra statements run there).
    pub database: PgName,
    /// Group roles the user joins (`IN ROLE`): the recommended way to grant privileges.
    #[serde(default)]
    pub roles: Vec<PgName>,
    /// Role that inherits whatever the job created (`REASSIGN OWNED BY … TO owner`) at revoke.
    pub owner: PgName,
    /// `CONNECTION LIMIT` of the user; unset means no limit.
    #[serde(default)]
    pub connection_limit: Option<u32>,
    /// Extra statements run as the admin in `database` after `CREATE ROLE`. Placeholders
    /// (`{{username}}`, `{{database}}`, `{{owner}}`, `{{expires_at}}`, `{{grant_id}}`,
    /// `{{literal:CLAIM}}`, `{{ident:CLAIM}}`) are replaced by quoted values.
    #[serde(default, deserialize_with = "statements")]
    pub statements: Vec<StatementTemplate>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let s: PostgresSpec = serde_saphyr::from_str(
            "target: main\ndatabase: app\nroles: [app_read]\nowner: app_owner\nconnection_limit: 3\n\
             statements:\n  - \"COMMENT ON ROLE {{username}} IS {{literal:repository}}\"\n",
        )
        .unwrap();
        assert_eq!(s.roles[0].as_str(), "app_read");
        assert_eq!(s.connection_limit, Some(3));
        assert_eq!(s.statements.len(), 1);
        for bad in [
            "target: m\ndatabase: app\nowner: o\nbogus: 1\n",
            "target: m\ndatabase: ''\nowner: o\n",
            "target: m\ndatabase: app\n",
            "target: m\ndatabase: app\nowner: o\nstatements: [\"SELECT '{{username}}'\"]\n",
        ] {
            assert!(
                serde_saphyr::from_str::<PostgresSpec>(bad).is_err(),
                "{bad}"
            );
        }
        let long = format!("target: m\ndatabase: {}\nowner: o\n", "d".repeat(64));
        assert!(serde_saphyr::from_str::<PostgresSpec>(&long).is_err());
    }
}
