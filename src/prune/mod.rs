//! Retention: `cairn prune`, `cairn delete`, `cairn protect` (docs/prune.md).
//!
//! [`decision`] decides, purely, which restore points to keep; [`execute`] carries a decision
//! out crash-safely, merging what kept points need from the images that go.

pub mod decision;
pub mod execute;

use crate::repo::{RepoLock, Repository};
use anyhow::{bail, Result};
use decision::{Mark, Point, Rules};
use execute::Outcome;
use serde::Serialize;
use std::collections::BTreeSet;
use std::time::Duration;

/// One restore point in a prune's report.
#[derive(Debug, Clone, Serialize)]
pub struct PointRow {
    pub id: String,
    pub name: String,
    pub kind: &'static str,
    pub created: String,
    pub protected: bool,
    pub keep: bool,
    pub reasons: Vec<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub dry_run: bool,
    /// The points the decision looked at, oldest first.
    pub points: Vec<PointRow>,
    /// False when `--max-size` could not be met without removing a newest or protected point.
    pub fits: bool,
    /// Bytes freed (a dry run: that would be freed).
    pub freed_bytes: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

pub struct PruneOptions {
    pub name: Option<String>,
    pub rules: Rules,
    pub dry_run: bool,
    /// How long to wait for the repository's lock.
    pub wait: Duration,
}

/// The restore points of the repository (of `name` only, when given), oldest first.
fn points(repo: &Repository, name: Option<&str>) -> Result<Vec<(Point, String)>> {
    let cat = repo.catalogue()?;
    let mut out = Vec::new();
    for l in &cat.images {
        if name.is_some_and(|n| n != l.name) {
            continue;
        }
        let (m, _) = repo.load_manifest(&l.id)?;
        out.push((
            Point {
                id: l.id.clone(),
                name: m.name.clone(),
                created_unix: m.created_unix,
                kind: m.kind,
                parent: m.parent.map(|p| p.id),
                protected: execute::is_protected(repo, &l.id),
            },
            m.created,
        ));
    }
    if let Some(n) = name {
        if out.is_empty() {
            bail!("no image named {n:?} in {}", repo.root.display());
        }
    }
    Ok(out)
}

pub fn prune(repo: &Repository, opts: &PruneOptions) -> Result<Report> {
    let lock = lock_for_writing(repo, opts.wait, opts.dry_run)?;
    let listed = points(repo, opts.name.as_deref())?;
    let pts: Vec<Point> = listed.iter().map(|(p, _)| p.clone()).collect();
    // `--max-size`: what the repository would hold is measured by planning the removal.
    let mut measure_error = None;
    let (marks, fits) = decision::decide(&pts, &opts.rules, |marks| {
        let Some(max) = opts.rules.max_size else {
            return true;
        };
        match plan(repo, lock.as_ref(), marks) {
            Ok(o) => o.bytes_after <= max,
            Err(e) => {
                measure_error.get_or_insert(e);
                true
            }
        }
    })?;
    if let Some(e) = measure_error {
        return Err(e);
    }
    let remove = removed(&marks);
    let outcome = run(repo, lock.as_ref(), &remove, opts.dry_run)?;
    Ok(report(listed, marks, fits, opts.dry_run, outcome))
}

/// `cairn delete --image ID`: one point goes; the points that depend on it are rewritten so they
/// stay exactly what they were.
pub fn delete(repo: &Repository, id: &str, dry_run: bool, wait: Duration) -> Result<Report> {
    let lock = lock_for_writing(repo, wait, dry_run)?;
    repo.load_manifest(id)?;
    if execute::is_protected(repo, id) {
        bail!("image {id} is protected; `cairn protect --unprotect --image {id}` first");
    }
    let listed = points(repo, None)?;
    let marks: Vec<Mark> = listed
        .iter()
        .map(|(p, _)| Mark {
            id: p.id.clone(),
            keep: p.id != id,
            reasons: if p.id == id {
                vec![]
            } else {
                vec!["not named"]
            },
        })
        .collect();
    let remove = removed(&marks);
    let outcome = run(repo, lock.as_ref(), &remove, dry_run)?;
    Ok(report(listed, marks, true, dry_run, outcome))
}

/// A dry run reads under the shared lock (it writes nothing); a real run takes the exclusive one.
enum Held {
    Writer(RepoLock),
    Reader(#[allow(dead_code)] crate::repo::SharedRepoLock),
}

impl Held {
    fn as_ref(&self) -> Option<&RepoLock> {
        match self {
            Held::Writer(l) => Some(l),
            Held::Reader(_) => None,
        }
    }
}

fn lock_for_writing(repo: &Repository, wait: Duration, dry_run: bool) -> Result<Held> {
    Ok(if dry_run {
        Held::Reader(repo.lock_shared()?)
    } else {
        Held::Writer(repo.lock_for_removal(wait)?)
    })
}

fn removed(marks: &[Mark]) -> BTreeSet<String> {
    marks
        .iter()
        .filter(|m| !m.keep)
        .map(|m| m.id.clone())
        .collect()
}

fn plan(repo: &Repository, lock: Option<&RepoLock>, marks: &[Mark]) -> Result<Outcome> {
    execute::plan_or_execute(repo, lock, &removed(marks), true)
}

fn run(
    repo: &Repository,
    lock: Option<&RepoLock>,
    remove: &BTreeSet<String>,
    dry_run: bool,
) -> Result<Outcome> {
    // Even with nothing to remove, a prune finishes what an interrupted one left (tmp/, garbage).
    execute::plan_or_execute(repo, lock, remove, dry_run)
}

fn report(
    listed: Vec<(Point, String)>,
    marks: Vec<Mark>,
    fits: bool,
    dry_run: bool,
    outcome: Outcome,
) -> Report {
    let points = listed
        .into_iter()
        .zip(marks)
        .map(|((p, created), m)| PointRow {
            id: p.id,
            name: p.name,
            kind: p.kind.as_str(),
            created,
            protected: p.protected,
            keep: m.keep,
            reasons: m.reasons,
        })
        .collect();
    Report {
        dry_run,
        points,
        fits,
        freed_bytes: outcome.freed(),
        outcome,
    }
}
