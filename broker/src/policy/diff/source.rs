//! Where the two sides of a diff come from: a directory, or the policy directory at a git
//! revision (`REV:PATH`, or `git:REV` for the default path), written into a temporary
//! directory with `git ls-tree` + `git show` so nothing in the work tree is touched.
//!
//! Revisions and paths come from the command line of a CI job, which may take them from a pull
//! request: they are passed to git as separate arguments after checks (never through a shell),
//! a revision may not start with `-`, and only regular blobs under PATH ending in `.yaml` /
//! `.yml` are written, at paths git itself listed, so a tree cannot write outside the temp dir.

use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// Why a side could not be materialised.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}: not a directory, and not a git revision (REV:PATH or git:REV)")]
    NotFound(String),
    #[error("{0}: a revision must not start with '-'")]
    BadRevision(String),
    #[error("git {args}: {message}")]
    Git { args: String, message: String },
    #[error("{0}: unsafe path in the git tree")]
    UnsafePath(String),
    #[error("cannot write the temporary copy: {0}")]
    Io(String),
}

/// A side ready to load. Holds the temporary directory (if any) alive.
#[derive(Debug)]
pub struct PolicySource {
    pub dir: PathBuf,
    /// How the user named it (for the report).
    pub label: String,
    _temp: Option<tempfile::TempDir>,
}

fn git(repo: &Path, args: &[&str]) -> Result<Vec<u8>, SourceError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .map_err(|e| SourceError::Git {
            args: args.join(" "),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(SourceError::Git {
            args: args.join(" "),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

/// Resolve `spec`: an existing directory as is; else `git:REV` (path `default_path`) or
/// `REV:PATH`, read from the git repository at `repo`.
pub fn resolve(spec: &str, repo: &Path, default_path: &str) -> Result<PolicySource, SourceError> {
    let as_dir = Path::new(spec);
    if as_dir.is_dir() {
        return Ok(PolicySource {
            dir: as_dir.to_path_buf(),
            label: spec.to_owned(),
            _temp: None,
        });
    }
    let (rev, path) = if let Some(rest) = spec.strip_prefix("git:") {
        match rest.split_once(':') {
            Some((r, p)) => (r, p),
            None => (rest, default_path),
        }
    } else {
        spec.split_once(':')
            .ok_or_else(|| SourceError::NotFound(spec.to_owned()))?
    };
    if rev.is_empty() || rev.starts_with('-') {
        return Err(SourceError::BadRevision(spec.to_owned()));
    }
    let path = path.trim_matches('/');
    let temp = tempfile::tempdir().map_err(|e| SourceError::Io(e.to_string()))?;
    // The commit, resolved once, so both listing and reading see the same tree.
    let commit = git(
        repo,
        &[
            "rev-parse",
            "--verify",
            "--end-of-options",
            &format!("{rev}^{{commit}}"),
        ],
    )?;
    let commit = String::from_utf8_lossy(&commit).trim().to_owned();
    let mut args = vec!["ls-tree", "-r", "-z", "--full-tree", &commit];
    if !path.is_empty() {
        args.extend(["--", path]);
    }
    let listing = git(repo, &args)?;
    for entry in listing.split(|b| *b == 0).filter(|e| !e.is_empty()) {
        let entry = String::from_utf8_lossy(entry);
        // "<mode> <type> <object>\t<path>"
        let Some((meta, file)) = entry.split_once('\t') else {
            continue;
        };
        let mut meta = meta.split(' ');
        let (mode, kind, object) = (meta.next(), meta.next(), meta.next());
        let yaml = file.ends_with(".yaml") || file.ends_with(".yml");
        if kind != Some("blob") || mode == Some("120000") || !yaml {
            continue;
        }
        let Some(object) = object else { continue };
        let rel = Path::new(file)
            .strip_prefix(path)
            .map_err(|_| SourceError::UnsafePath(file.to_owned()))?;
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(SourceError::UnsafePath(file.to_owned()));
        }
        let content = git(repo, &["cat-file", "blob", object])?;
        let target = temp.path().join(rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| SourceError::Io(e.to_string()))?;
        }
        std::fs::write(&target, content).map_err(|e| SourceError::Io(e.to_string()))?;
    }
    Ok(PolicySource {
        dir: temp.path().to_path_buf(),
        label: format!("{rev}:{path}"),
        _temp: Some(temp),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(dir: &Path, args: &[&str]) {
        let st = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
            .status()
            .unwrap();
        assert!(st.success(), "git {args:?}");
    }

    #[test]
    fn materialises_a_revision_and_refuses_options() {
        let repo = tempfile::tempdir().unwrap();
        let r = repo.path();
        run(r, &["init", "-q"]);
        std::fs::create_dir_all(r.join("pol/team")).unwrap();
        std::fs::write(r.join("pol/a.yaml"), "# one\n").unwrap();
        std::fs::write(r.join("pol/team/b.yml"), "# two\n").unwrap();
        std::fs::write(r.join("pol/notes.txt"), "x").unwrap();
        run(r, &["add", "."]);
        run(r, &["commit", "-q", "-m", "one"]);
        std::fs::write(r.join("pol/a.yaml"), "# changed\n").unwrap();
        run(r, &["commit", "-q", "-am", "two"]);

        let s = resolve("HEAD~1:pol", r, "policies").unwrap();
        assert_eq!(
            std::fs::read_to_string(s.dir.join("a.yaml")).unwrap(),
            "# one\n"
        );
        assert_eq!(
            std::fs::read_to_string(s.dir.join("team/b.yml")).unwrap(),
            "# two\n"
        );
        assert!(!s.dir.join("notes.txt").exists());
        let s = resolve("git:HEAD", r, "pol").unwrap();
        assert_eq!(
            std::fs::read_to_string(s.dir.join("a.yaml")).unwrap(),
            "# changed\n"
        );
        let dir = s.dir.clone();
        drop(s);
        assert!(!dir.exists(), "the temporary copy is removed");

        assert!(matches!(
            resolve("--output=/tmp/x:pol", r, "pol"),
            Err(SourceError::BadRevision(_))
        ));
        assert!(matches!(
            resolve("no-such-rev:pol", r, "pol"),
            Err(SourceError::Git { .. })
        ));
        assert!(matches!(
            resolve("nothing-here", r, "pol"),
            Err(SourceError::NotFound(_))
        ));
    }
}
