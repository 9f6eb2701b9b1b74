//! The retention commands: `prune`, `delete`, `protect` and `upgrade`.

use super::args::{DeleteArgs, ListArgs, ProtectArgs, PruneArgs};
use super::output::{human_bytes, outln, print_json};
use super::Ctx;
use crate::prune::{self, decision::Rules, PruneOptions, Report};
use crate::repo::Repository;
use anyhow::Result;
use std::time::Duration;

pub(super) fn cmd_prune(a: PruneArgs, ctx: &Ctx) -> Result<()> {
    let repo = Repository::open(&a.repo)?;
    let opts = PruneOptions {
        name: a.name,
        rules: Rules {
            last: a.keep_last,
            hourly: a.keep_hourly,
            daily: a.keep_daily,
            weekly: a.keep_weekly,
            monthly: a.keep_monthly,
            within: a.keep_within.map(|d| d.as_secs()),
            max_size: a.max_size,
        },
        dry_run: a.dry_run,
        wait: a.wait.unwrap_or(Duration::ZERO),
    };
    let r = prune::prune(&repo, &opts)?;
    print_report(&r, ctx);
    Ok(())
}

pub(super) fn cmd_delete(a: DeleteArgs, ctx: &Ctx) -> Result<()> {
    let repo = Repository::open(&a.repo)?;
    let r = prune::delete(&repo, &a.image, a.dry_run, a.wait.unwrap_or(Duration::ZERO))?;
    print_report(&r, ctx);
    Ok(())
}

pub(super) fn cmd_protect(a: ProtectArgs, ctx: &Ctx) -> Result<()> {
    let repo = Repository::open(&a.repo)?;
    let lock = repo.lock()?;
    let was = prune::execute::set_protected(&repo, &lock, &a.image, !a.unprotect)?;
    if ctx.json {
        print_json(&serde_json::json!({
            "id": a.image, "protected": !a.unprotect, "was_protected": was
        }));
    } else if !ctx.quiet {
        eprintln!(
            "image {} is {}protected",
            a.image,
            if a.unprotect { "no longer " } else { "" }
        );
    }
    Ok(())
}

pub(super) fn cmd_upgrade(a: ListArgs, ctx: &Ctx) -> Result<()> {
    let repo = Repository::open(&a.repo)?;
    let lock = repo.lock()?;
    let from = repo.marker_version()?;
    let changed = repo.upgrade(&lock)?;
    if ctx.json {
        print_json(&serde_json::json!({
            "from_version": from,
            "version": crate::format::FORMAT_VERSION,
            "changed": changed
        }));
    } else if !ctx.quiet {
        eprintln!(
            "{}: format version {}{}",
            repo.root.display(),
            crate::format::FORMAT_VERSION,
            if changed {
                format!(" (was {from}; its images are unchanged)")
            } else {
                " already".to_string()
            }
        );
    }
    Ok(())
}

fn print_report(r: &Report, ctx: &Ctx) {
    if ctx.json {
        print_json(r);
        return;
    }
    if ctx.quiet {
        return;
    }
    for p in &r.points {
        let why = if p.reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", p.reasons.join(", "))
        };
        outln!(
            "{} {:<20} {:<24} {:<12} {}{}",
            if p.keep { "keep  " } else { "remove" },
            p.id,
            p.name,
            p.kind,
            p.created,
            why
        );
    }
    for w in &r.outcome.rewritten {
        let now = match &w.parent {
            Some(parent) => format!("an {} over {parent}", w.now),
            None => format!("a synthetic {}", w.now),
        };
        outln!(
            "{} {} becomes {now}, taking over {} ({} index entries, {} of them windows of stored frames)",
            if r.dry_run { "would:" } else { "done: " },
            w.id,
            w.merged.join(", "),
            w.entries,
            w.windows
        );
    }
    if !r.fits {
        eprintln!(
            "the repository does not fit --max-size without removing a newest or protected point"
        );
    }
    outln!(
        "{} {} of {} ({} written){}",
        if r.dry_run { "would free" } else { "freed" },
        human_bytes(r.freed_bytes),
        human_bytes(r.outcome.bytes_before),
        human_bytes(r.outcome.bytes_written),
        if r.dry_run {
            "; nothing was changed"
        } else {
            ""
        }
    );
}

/// `cairn list` with the repository's space: per image the bytes it alone holds and the bytes it
/// shares, and the total and reclaimable bytes (`--json --totals`: one object).
pub(super) fn cmd_list_totals(a: ListArgs, ctx: &Ctx) -> Result<()> {
    let repo = Repository::open(&a.repo)?;
    let t = crate::list::totals(&repo)?;
    if ctx.json {
        print_json(&t);
        return Ok(());
    }
    if t.images.is_empty() {
        eprintln!("no images in {}", repo.root.display());
        return Ok(());
    }
    outln!(
        "{:<20} {:<24} {:<12} {:<20} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<20} STATUS",
        "ID",
        "NAME",
        "KIND",
        "PARENT",
        "SIZE",
        "DATA",
        "STORED",
        "UNIQUE",
        "SHARED",
        "CREATED"
    );
    let short = |v: Option<u64>| {
        v.map(super::output::short_bytes)
            .unwrap_or_else(|| "?".into())
    };
    for r in &t.images {
        outln!(
            "{:<20} {:<24} {:<12} {:<20} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<20} {}{}",
            r.id,
            r.name.as_deref().unwrap_or("?"),
            r.kind.unwrap_or("?"),
            r.parent.as_deref().unwrap_or("-"),
            short(r.source_size),
            short(r.data_bytes),
            short(r.stored_bytes),
            short(r.unique_bytes),
            short(r.shared_bytes),
            r.created.as_deref().unwrap_or("?"),
            r.status,
            if r.protected { " (protected)" } else { "" }
        );
        if let Some(pt) = &r.partition_table {
            outln!("    {}", crate::list::table_summary(pt));
        }
    }
    outln!(
        "repository: {} in all, {} reclaimable (`cairn prune` collects it)",
        human_bytes(t.total_bytes),
        human_bytes(t.reclaimable_bytes)
    );
    Ok(())
}
