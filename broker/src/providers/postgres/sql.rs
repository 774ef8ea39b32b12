//! SQL text the provider sends: quoting of identifiers and literals, and the templates of the
//! optional extra statements a credential definition may carry.
//!
//! Invariant: every value the broker substitutes (role names, database names, timestamps, claim
//! values) goes through [`quote_ident`] or [`quote_literal`]; a template may place a value only
//! where SQL code is expected, never inside a quoted string, quoted identifier, dollar quote or
//! comment (checked when the policy loads), so a quoted value cannot be re-opened. Utility
//! statements such as `CREATE ROLE` take no bind parameters, which is why quoting is needed at
//! all.

use serde::{Deserialize, Serialize};

/// Postgres truncates longer identifiers silently; we refuse them instead (a truncated name could
/// name a different object).
pub const MAX_IDENT_BYTES: usize = 63;

/// Why a value cannot be quoted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuoteError {
    #[error("value contains a NUL byte")]
    Nul,
    #[error("identifier is empty or longer than 63 bytes")]
    IdentLength,
}

impl QuoteError {
    pub fn reason_code(&self) -> &'static str {
        match self {
            QuoteError::Nul => "nul_byte",
            QuoteError::IdentLength => "identifier_length",
        }
    }
}

/// `"name"` with embedded double quotes doubled. Empty, over-long or NUL-bearing names are refused.
pub fn quote_ident(name: &str) -> Result<String, QuoteError> {
    if name.contains('\0') {
        return Err(QuoteError::Nul);
    }
    if name.is_empty() || name.len() > MAX_IDENT_BYTES {
        return Err(QuoteError::IdentLength);
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// `'value'` with quotes doubled; a value with a backslash becomes `E'…'` with backslashes doubled
/// too, so the result means the same whatever `standard_conforming_strings` says.
pub fn quote_literal(value: &str) -> Result<String, QuoteError> {
    if value.contains('\0') {
        return Err(QuoteError::Nul);
    }
    let body = value.replace('\'', "''");
    if value.contains('\\') {
        Ok(format!(" E'{}'", body.replace('\\', "\\\\")))
    } else {
        Ok(format!("'{body}'"))
    }
}

/// One piece of a statement template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Sql(String),
    Value(Placeholder),
}

/// What a placeholder stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholder {
    /// `{{username}}`: the new role (identifier).
    Username,
    /// `{{database}}`: the credential's database (identifier).
    Database,
    /// `{{owner}}`: the owner role (identifier).
    Owner,
    /// `{{expires_at}}`: the grant expiry, RFC 3339 (literal).
    ExpiresAt,
    /// `{{grant_id}}`: the grant id (literal).
    GrantId,
    /// `{{literal:CLAIM}}`: a claim value as a string literal.
    ClaimLiteral(String),
    /// `{{ident:CLAIM}}`: a claim value as an identifier (at most 63 bytes).
    ClaimIdent(String),
}

/// Values available when rendering a statement.
pub trait Values {
    fn username(&self) -> &str;
    fn database(&self) -> &str;
    fn owner(&self) -> &str;
    fn expires_at(&self) -> String;
    fn grant_id(&self) -> String;
    /// A claim as a string (numbers rendered); `None` if missing or not a scalar.
    fn claim(&self, name: &str) -> Option<String>;
}

/// Why a statement template did not parse (policy load) or render (mint).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("statement {0:?}: unclosed {{{{")]
    Unclosed(String),
    #[error("statement {statement:?}: unknown placeholder {placeholder:?}")]
    UnknownPlaceholder {
        statement: String,
        placeholder: String,
    },
    #[error(
        "statement {0:?}: a placeholder must stand where SQL code goes, not inside quotes, a dollar quote or a comment (the broker quotes every value itself)"
    )]
    PlaceholderInQuotes(String),
    #[error("statement {0:?}: unterminated quote, dollar quote or comment")]
    Unterminated(String),
    #[error("statement {0:?}: one statement per entry (no `;` except at the end)")]
    Several(String),
    #[error("statement is empty")]
    Empty,
    #[error("claim {0:?} is missing or not a string or number")]
    MissingClaim(String),
    #[error("claim {claim:?} cannot be quoted ({reason})")]
    Unquotable { claim: String, reason: &'static str },
}

impl TemplateError {
    pub fn reason_code(&self) -> &'static str {
        match self {
            TemplateError::MissingClaim(_) | TemplateError::Unquotable { .. } => {
                "invalid_claim_value"
            }
            _ => "bad_statement_template",
        }
    }
}

/// A parsed extra statement: SQL code written by the policy author, with placeholders the
/// broker fills with quoted values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementTemplate {
    source: String,
    pieces: Vec<Piece>,
}

fn claim_name_ok(n: &str) -> bool {
    !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn placeholder(stmt: &str, inner: &str) -> Result<Placeholder, TemplateError> {
    let inner = inner.trim();
    let unknown = || TemplateError::UnknownPlaceholder {
        statement: stmt.to_owned(),
        placeholder: inner.to_owned(),
    };
    Ok(match inner {
        "username" => Placeholder::Username,
        "database" => Placeholder::Database,
        "owner" => Placeholder::Owner,
        "expires_at" => Placeholder::ExpiresAt,
        "grant_id" => Placeholder::GrantId,
        _ => match inner.split_once(':') {
            Some(("literal", c)) if claim_name_ok(c) => Placeholder::ClaimLiteral(c.to_owned()),
            Some(("ident", c)) if claim_name_ok(c) => Placeholder::ClaimIdent(c.to_owned()),
            _ => return Err(unknown()),
        },
    })
}

/// Lexer state while scanning SQL code for places where a placeholder may stand.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lex {
    Code,
    /// `'…'`; `escapes` for `E'…'` (backslash escapes the next character).
    Str {
        escapes: bool,
    },
    Ident,
    LineComment,
    /// Nesting depth (Postgres block comments nest).
    BlockComment(u32),
    Dollar(String),
}

impl StatementTemplate {
    /// Parse and check a statement template (at policy load).
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        if source.trim().is_empty() {
            return Err(TemplateError::Empty);
        }
        let bytes = source.as_bytes();
        let mut pieces = Vec::new();
        let mut sql = String::new();
        let mut state = Lex::Code;
        let mut i = 0;
        // Byte-wise scan; every delimiter is ASCII, so slicing at these indexes stays on char
        // boundaries.
        while i < bytes.len() {
            let b = bytes[i];
            let next = bytes.get(i + 1).copied();
            if source[i..].starts_with("{{") {
                if state != Lex::Code {
                    return Err(TemplateError::PlaceholderInQuotes(source.to_owned()));
                }
                let end = source[i + 2..]
                    .find("}}")
                    .ok_or_else(|| TemplateError::Unclosed(source.to_owned()))?;
                let inner = &source[i + 2..i + 2 + end];
                if !sql.is_empty() {
                    pieces.push(Piece::Sql(std::mem::take(&mut sql)));
                }
                pieces.push(Piece::Value(placeholder(source, inner)?));
                i += 2 + end + 2;
                continue;
            }
            let mut step = 1;
            match &mut state {
                Lex::Code => match b {
                    b'\'' => {
                        let e = i > 0 && matches!(bytes[i - 1], b'e' | b'E');
                        state = Lex::Str { escapes: e };
                    }
                    b'"' => state = Lex::Ident,
                    b'-' if next == Some(b'-') => {
                        state = Lex::LineComment;
                        step = 2;
                    }
                    b'/' if next == Some(b'*') => {
                        state = Lex::BlockComment(1);
                        step = 2;
                    }
                    b'$' => {
                        // `$tag$` opens a dollar quote; `$1` is a parameter (not allowed anyway).
                        if let Some(len) = source[i + 1..].find('$') {
                            let tag = &source[i + 1..i + 1 + len];
                            if tag.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
                                && !tag.bytes().next().is_some_and(|c| c.is_ascii_digit())
                            {
                                state = Lex::Dollar(tag.to_owned());
                                step = len + 2;
                            }
                        }
                    }
                    b';' => {
                        if !source[i + 1..].trim().is_empty() {
                            return Err(TemplateError::Several(source.to_owned()));
                        }
                        // Drop the trailing `;`: one statement is sent per entry.
                        i = bytes.len();
                        continue;
                    }
                    _ => {}
                },
                Lex::Str { escapes } => {
                    if *escapes && b == b'\\' {
                        step = 2;
                    } else if b == b'\'' {
                        if next == Some(b'\'') {
                            step = 2;
                        } else {
                            state = Lex::Code;
                        }
                    }
                }
                Lex::Ident => {
                    if b == b'"' {
                        if next == Some(b'"') {
                            step = 2;
                        } else {
                            state = Lex::Code;
                        }
                    }
                }
                Lex::LineComment => {
                    if b == b'\n' {
                        state = Lex::Code;
                    }
                }
                Lex::BlockComment(depth) => {
                    if b == b'*' && next == Some(b'/') {
                        *depth -= 1;
                        step = 2;
                        if *depth == 0 {
                            state = Lex::Code;
                        }
                    } else if b == b'/' && next == Some(b'*') {
                        *depth += 1;
                        step = 2;
                    }
                }
                Lex::Dollar(tag) => {
                    let close = format!("${tag}$");
                    if source[i..].starts_with(&close) {
                        step = close.len();
                        state = Lex::Code;
                    }
                }
            }
            let end = (i + step).min(bytes.len());
            sql.push_str(&source[i..end]);
            i = end;
        }
        if !matches!(state, Lex::Code | Lex::LineComment) {
            return Err(TemplateError::Unterminated(source.to_owned()));
        }
        if !sql.is_empty() {
            pieces.push(Piece::Sql(sql));
        }
        Ok(Self {
            source: source.to_owned(),
            pieces,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Claim names the template reads.
    pub fn claims(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Value(Placeholder::ClaimLiteral(c) | Placeholder::ClaimIdent(c)) => {
                Some(c.as_str())
            }
            _ => None,
        })
    }

    /// The statement with every value quoted.
    pub fn render(&self, v: &dyn Values) -> Result<String, TemplateError> {
        let mut out = String::with_capacity(self.source.len() + 32);
        let claim = |c: &str| {
            v.claim(c)
                .ok_or_else(|| TemplateError::MissingClaim(c.into()))
        };
        fn unq(c: &str) -> impl Fn(QuoteError) -> TemplateError + '_ {
            move |e| TemplateError::Unquotable {
                claim: c.to_owned(),
                reason: e.reason_code(),
            }
        }
        for p in &self.pieces {
            let piece = match p {
                Piece::Sql(s) => {
                    out.push_str(s);
                    continue;
                }
                Piece::Value(Placeholder::Username) => quote_ident(v.username()),
                Piece::Value(Placeholder::Database) => quote_ident(v.database()),
                Piece::Value(Placeholder::Owner) => quote_ident(v.owner()),
                Piece::Value(Placeholder::ExpiresAt) => quote_literal(&v.expires_at()),
                Piece::Value(Placeholder::GrantId) => quote_literal(&v.grant_id()),
                Piece::Value(Placeholder::ClaimLiteral(c)) => {
                    out.push_str(&quote_literal(&claim(c)?).map_err(unq(c))?);
                    continue;
                }
                Piece::Value(Placeholder::ClaimIdent(c)) => {
                    out.push_str(&quote_ident(&claim(c)?).map_err(unq(c))?);
                    continue;
                }
            };
            // Names from the definition were validated at load; a failure here is a claim's.
            out.push_str(&piece.map_err(|e| TemplateError::Unquotable {
                claim: "definition value".into(),
                reason: e.reason_code(),
            })?);
        }
        Ok(out)
    }
}

impl<'de> Deserialize<'de> for StatementTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        StatementTemplate::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for StatementTemplate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct V(BTreeMap<&'static str, &'static str>);
    impl Values for V {
        fn username(&self) -> &str {
            "brk_ci_0123"
        }
        fn database(&self) -> &str {
            "app"
        }
        fn owner(&self) -> &str {
            "app_owner"
        }
        fn expires_at(&self) -> String {
            "2030-01-01T00:00:00Z".into()
        }
        fn grant_id(&self) -> String {
            "g-1".into()
        }
        fn claim(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|s| (*s).to_owned())
        }
    }

    fn v(repo: &'static str) -> V {
        V(BTreeMap::from([("repository", repo)]))
    }

    #[test]
    fn quoting_doubles_delimiters_and_refuses_nul() {
        assert_eq!(quote_ident("a\"b").unwrap(), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's").unwrap(), "'it''s'");
        assert_eq!(quote_literal("a\\'b").unwrap(), " E'a\\\\''b'");
        assert_eq!(quote_ident("x\0"), Err(QuoteError::Nul));
        assert_eq!(quote_literal("x\0"), Err(QuoteError::Nul));
        assert_eq!(quote_ident(""), Err(QuoteError::IdentLength));
        assert_eq!(quote_ident(&"a".repeat(64)), Err(QuoteError::IdentLength));
        assert!(quote_ident(&"a".repeat(63)).is_ok());
        // Multi-byte: 63 bytes is the bound, not 63 characters.
        assert_eq!(quote_ident(&"é".repeat(32)), Err(QuoteError::IdentLength));
    }

    #[test]
    fn renders_values_quoted() {
        let t = StatementTemplate::parse("COMMENT ON ROLE {{username}} IS {{literal:repository}};")
            .unwrap();
        let sql = t.render(&v("acme/api")).unwrap();
        assert_eq!(sql, "COMMENT ON ROLE \"brk_ci_0123\" IS 'acme/api'");
        assert_eq!(t.claims().collect::<Vec<_>>(), vec!["repository"]);
    }

    #[test]
    fn hostile_claims_stay_inside_their_quotes() {
        let t = StatementTemplate::parse("COMMENT ON ROLE {{username}} IS {{literal:repository}}")
            .unwrap();
        let sql = t.render(&v("x'; DROP ROLE postgres; --")).unwrap();
        assert_eq!(
            sql,
            "COMMENT ON ROLE \"brk_ci_0123\" IS 'x''; DROP ROLE postgres; --'"
        );
        let sql = t.render(&v("a\\'; DROP ROLE postgres; --")).unwrap();
        assert!(
            sql.ends_with(" E'a\\\\''; DROP ROLE postgres; --'"),
            "{sql}"
        );
        let id =
            StatementTemplate::parse("GRANT USAGE ON SCHEMA {{ident:repository}} TO {{username}}")
                .unwrap();
        let sql = id.render(&v("\"; DROP ROLE postgres; --")).unwrap();
        assert_eq!(
            sql,
            "GRANT USAGE ON SCHEMA \"\"\"; DROP ROLE postgres; --\" TO \"brk_ci_0123\""
        );
        let long: &'static str = Box::leak("r".repeat(300).into_boxed_str());
        assert_eq!(
            id.render(&v(long)).unwrap_err().reason_code(),
            "invalid_claim_value"
        );
        assert_eq!(
            id.render(&V(BTreeMap::new())).unwrap_err(),
            TemplateError::MissingClaim("repository".into())
        );
    }

    #[test]
    fn placeholders_in_quotes_or_comments_are_refused() {
        for bad in [
            "COMMENT ON ROLE {{username}} IS '{{literal:repository}}'",
            "SELECT \"{{username}}\"",
            "SELECT 1 -- {{username}}",
            "SELECT 1 /* /* */ {{username}} */",
            "SELECT $f$ {{username}} $f$",
            "SELECT E'\\' {{username}}'",
        ] {
            assert!(
                matches!(
                    StatementTemplate::parse(bad),
                    Err(TemplateError::PlaceholderInQuotes(_))
                ),
                "{bad}"
            );
        }
        // Quotes that close before the placeholder are fine.
        assert!(
            StatementTemplate::parse("SELECT 'it''s', \"a\"\"b\", $f$x$f$, {{username}}").is_ok()
        );
    }

    #[test]
    fn malformed_templates_are_refused() {
        assert!(matches!(
            StatementTemplate::parse("GRANT x TO {{user}}"),
            Err(TemplateError::UnknownPlaceholder { .. })
        ));
        assert!(matches!(
            StatementTemplate::parse("GRANT x TO {{literal:a b}}"),
            Err(TemplateError::UnknownPlaceholder { .. })
        ));
        assert!(matches!(
            StatementTemplate::parse("GRANT x TO {{username"),
            Err(TemplateError::Unclosed(_))
        ));
        assert!(matches!(
            StatementTemplate::parse("SELECT 1; DROP ROLE postgres"),
            Err(TemplateError::Several(_))
        ));
        assert!(matches!(
            StatementTemplate::parse("SELECT 'open"),
            Err(TemplateError::Unterminated(_))
        ));
        assert_eq!(StatementTemplate::parse("  "), Err(TemplateError::Empty));
        // `;` inside quotes is not a separator.
        assert!(StatementTemplate::parse("COMMENT ON ROLE {{username}} IS 'a;b'").is_ok());
    }
}

#[cfg(test)]
mod quote_properties {
    use super::{quote_ident, quote_literal};
    use proptest::prelude::*;

    /// Read one SQL string literal the way Postgres's lexer does (`'…'` with `''`, or `E'…'`
    /// with `''` and `\\`), requiring it to span the whole input: (value, rest-was-empty).
    fn unquote_literal(q: &str) -> Option<String> {
        let (escape, body) = if let Some(b) = q.strip_prefix(" E'") {
            (true, b)
        } else {
            (false, q.strip_prefix('\'')?)
        };
        let mut out = String::new();
        let mut it = body.chars().peekable();
        while let Some(c) = it.next() {
            match c {
                '\'' if it.peek() == Some(&'\'') => {
                    it.next();
                    out.push('\'');
                }
                // The closing quote must be the last character: nothing escapes the literal.
                '\'' => return it.next().is_none().then_some(out),
                '\\' if escape => out.push(it.next().filter(|n| *n == '\\')?),
                c => out.push(c),
            }
        }
        None
    }

    fn unquote_ident(q: &str) -> Option<String> {
        let body = q.strip_prefix('"')?.strip_suffix('"')?;
        let mut out = String::new();
        let mut it = body.chars().peekable();
        while let Some(c) = it.next() {
            if c == '"' {
                // Inside, a quote only ever appears doubled.
                it.next().filter(|n| *n == '"')?;
            }
            out.push(c);
        }
        Some(out)
    }

    proptest! {
        #[test]
        fn literals_round_trip_and_never_break_out(v in any::<String>()) {
            match quote_literal(&v) {
                Ok(q) => prop_assert_eq!(unquote_literal(&q), Some(v)),
                Err(_) => prop_assert!(v.contains('\0')),
            }
        }

        #[test]
        fn literals_with_hostile_characters(v in "[a-z'\\\\\";$ -]{0,40}") {
            let q = quote_literal(&v).unwrap();
            prop_assert_eq!(unquote_literal(&q), Some(v));
        }

        #[test]
        fn identifiers_round_trip_and_never_break_out(v in any::<String>()) {
            match quote_ident(&v) {
                Ok(q) => prop_assert_eq!(unquote_ident(&q), Some(v)),
                Err(_) => prop_assert!(v.contains('\0') || v.is_empty() || v.len() > super::MAX_IDENT_BYTES),
            }
        }
    }
}
