//! The commands that only read: `verify`, `badmap`, `show`, `list` and `disks`.

use super::args::{ListArgs, SelectArgs, ShowArgs};
use super::output::{human_bytes, outln, print_json};
use super::Ctx;
use crate::format::Manifest;
use crate::repo::Repository;
use crate::verify::{self, ImageStatus, VerifyReport};
use crate::{chain, list, restore};
use anyhow::{bail, Result};

pub(super) fn cmd_verify(a: SelectArgs, ctx: &Ctx) -> Result<()> {
    let repo = Repository::open(&a.repo)?;
    let r = verify::run(
        &repo,
        a.select.name.as_deref(),
        a.select.image.as_deref(),
        &ctx.progress,
    )?;
    if ctx.json {
        print_json(&r);
    } else if !ctx.quiet {
        for i in &r.images {
            print_image_status(i);
        }
    }
    if !r.ok {
        bail!(unverified(&r));
    }
    Ok(())
}

fn print_image_status(i: &ImageStatus) {
    let what = match (i.status, i.restorable) {
        ("ok", true) => "ok".to_string(),
        ("intact-with-bad-sectors", true) => {
            "ok, but the source had unreadable sectors".to_string()
        }
        (_, false) if verify::intact(i.status) => {
            "intact, but not restorable (a parent is damaged)".to_string()
        }
        _ => format!("DAMAGED ({} damaged blocks)", i.damaged_blocks),
    };
    eprintln!("{} {}: {what}", i.id, i.name.as_deref().unwrap_or("?"));
    if let Some(u) = i.unreadable.as_ref().filter(|u| u.count > 0) {
        eprintln!(
            "  unreadable at this restore point: {} in {} ranges (`cairn badmap --image {}`)",
            human_bytes(u.bytes),
            u.count,
            i.id
        );
    }
    for e in &i.errors {
        eprintln!("  {e}");
    }
}

/// The one-line error of a failed verify: which images, and the first error found.
fn unverified(r: &VerifyReport) -> String {
    let bad: Vec<&str> = r
        .images
        .iter()
        .filter(|i| !verify::intact(i.status) || !i.restorable)
        .map(|i| i.id.as_str())
        .collect();
    let first = r
        .images
        .iter()
        .flat_map(|i| i.errors.first())
        .next()
        .cloned()
        .unwrap_or_default();
    format!(
        "{} image(s) damaged or unrestorable: {} ({first})",
        bad.len(),
        bad.join(", ")
    )
}

/// Prints even with --quiet: the map is the command's result.
pub(super) fn cmd_badmap(a: SelectArgs, ctx: &Ctx) -> Result<()> {
    let repo = Repository::open(&a.repo)?;
    let id = restore::select_image(&repo, a.select.name.as_deref(), a.select.image.as_deref())?;
    let chain = chain::resolve(&repo, &id)?;
    let unreadable = chain::unreadable_at(&chain)?;
    let m = &chain.last().expect("non-empty chain").manifest;
    if ctx.json {
        print_json(&serde_json::json!({
            "id": id,
            "size": m.source.size,
            "unreadable_bytes": unreadable.iter().map(|r| r.1).sum::<u64>(),
            "bad_ranges": unreadable,
        }));
    } else {
        print!("{}", ddrescue_map(m, &id, &unreadable));
    }
    Ok(())
}

/// GNU ddrescue's mapfile of a restore point: '+' read fine, '-' unreadable (`bad`).
fn ddrescue_map(m: &Manifest, id: &str, bad: &[(u64, u64)]) -> String {
    let mut out = format!(
        "# Mapfile. Created by cairn {} for image {id} of {}\n# current_pos  current_status  current_pass\n0x{:08X}     +               1\n#      pos        size  status\n",
        env!("CARGO_PKG_VERSION"),
        m.source.path,
        m.source.size
    );
    let mut at = 0u64;
    for &(o, l) in bad {
        if o > at {
            out.push_str(&format!("0x{at:08X}  0x{:08X}  +\n", o - at));
        }
        out.push_str(&format!("0x{o:08X}  0x{l:08X}  -\n"));
        at = o + l;
    }
    if at < m.source.size {
        out.push_str(&format!("0x{at:08X}  0x{:08X}  +\n", m.source.size - at));
    }
    out
}

pub(super) fn cmd_show(a: ShowArgs, ctx: &Ctx) -> Result<()> {
    let repo = Repository::open(&a.repo)?;
    let id = restore::select_image(&repo, a.select.name.as_deref(), a.select.image.as_deref())?;
    let (m, _) = repo.load_manifest(&id)?;
    // What is unreadable at this point needs the whole chain; a chain that cannot be
    // read is reported, and the manifest is shown anyway.
    let unreadable = chain::resolve(&repo, &id)
        .and_then(|c| chain::unreadable_at(&c))
        .map(|u| chain::Unreadable::summary(&u))
        .map_err(|e| format!("{e:#}"));
    if ctx.json {
        let mut v = serde_json::to_value(&m).expect("serialisable");
        v["unreadable"] = match &unreadable {
            Ok(u) => serde_json::to_value(u).expect("serialisable"),
            Err(e) => serde_json::json!({ "error": e }),
        };
        print_json(&v);
    } else {
        for l in list::show_lines(&m, &unreadable) {
            outln!("{l}");
        }
    }
    Ok(())
}

pub(super) fn cmd_disks(ctx: &Ctx) -> Result<()> {
    let disks = crate::disks::run()?;
    if ctx.json {
        print_json(&disks);
    } else {
        for l in crate::disks::render(&disks) {
            outln!("{l}");
        }
    }
    Ok(())
}

/// `cairn list --json` without `--totals`: the rows as an array (scripts read this shape). The
/// table and `--totals` are `prune::cmd_list_totals`.
pub(super) fn cmd_list_json(a: ListArgs) -> Result<()> {
    let repo = Repository::open(&a.repo)?;
    print_json(&list::run(&repo)?);
    Ok(())
}
