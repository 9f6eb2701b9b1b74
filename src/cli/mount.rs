//! `mount` and `umount`: a restore point shown read-only under a directory.

use super::args::{MountArgs, UmountArgs};
use super::output::{human_bytes, outln, print_json};
use super::Ctx;
use crate::mount::{self, MountOptions, MountReport};
use anyhow::Result;
use std::io::Write;

pub(super) fn cmd_mount(a: MountArgs, ctx: &Ctx) -> Result<()> {
    let opts = MountOptions {
        repo: a.repo,
        dir: a.dir,
        name: a.select.name,
        image: a.select.image,
        raw: a.raw,
    };
    if a.background {
        let r = mount::serve_in_background(&opts)?;
        print_ready(&r, ctx, true);
        return Ok(());
    }
    mount::serve(&opts, None, &mut |r| print_ready(r, ctx, false))
}

fn print_ready(r: &MountReport, ctx: &Ctx, background: bool) {
    // A foreground server keeps serving whatever happens to its stdout and stderr: a closed
    // pipe must not end it (println! would panic and leave its mounts behind), so write errors
    // are ignored.
    for w in &r.warnings {
        let _ = writeln!(std::io::stderr(), "cairn: warning: {w}");
    }
    let text = if ctx.json {
        serde_json::to_string_pretty(r).expect("serialisable") + "\n"
    } else if ctx.quiet {
        return;
    } else {
        ready_text(r, background)
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn ready_text(r: &MountReport, background: bool) -> String {
    let d = r.dir.display();
    let mut t = format!(
        "image {} of {:?} ({}) is mounted read-only at {d}\n",
        r.image, r.name, r.created
    );
    t += &format!(
        "  {d}/disk: the whole disk, {}{}\n",
        human_bytes(r.size),
        r.partition_table
            .as_ref()
            .map(|t| format!(", {t} partition table"))
            .unwrap_or_default()
    );
    for p in &r.parts {
        let what = match p.number {
            Some(n) => format!("partition {n}"),
            None => "the filesystem".to_string(),
        };
        t += &match (&p.mounted, &p.note) {
            (Some(m), _) => format!(
                "  {}: {what}, {} mounted read-only (raw bytes: {})\n",
                m.display(),
                p.filesystem,
                p.raw_file.display()
            ),
            (None, Some(note)) => format!(
                "  {}: {what}, raw ({}: {note})\n",
                p.raw_file.display(),
                p.filesystem
            ),
            (None, None) => format!(
                "  {}: {what}, raw, {}\n",
                p.raw_file.display(),
                human_bytes(p.size)
            ),
        };
    }
    t += &if background {
        format!("`cairn umount {d}` ends it.\n")
    } else {
        format!("Serving until Ctrl-C or `cairn umount {d}`.\n")
    };
    t
}

pub(super) fn cmd_umount(a: UmountArgs, ctx: &Ctx) -> Result<()> {
    let r = mount::umount(&a.dir)?;
    if ctx.json {
        print_json(&r);
    } else if !ctx.quiet {
        outln!(
            "{} is unmounted{}",
            r.dir.display(),
            if r.server_was_dead {
                " (its process had died; what it left was cleared)"
            } else {
                ""
            }
        );
    }
    Ok(())
}
