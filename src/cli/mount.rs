//! `mount` and `umount`: a restore point shown read-only under a directory.

use super::args::{MountArgs, UmountArgs};
use super::output::{human_bytes, print_json};
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
    for w in &r.warnings {
        eprintln!("cairn: warning: {w}");
    }
    if ctx.json {
        print_json(r);
    } else if !ctx.quiet {
        let d = r.dir.display();
        println!(
            "image {} of {:?} ({}) is mounted read-only at {d}",
            r.image, r.name, r.created
        );
        println!(
            "  {d}/disk: the whole disk, {}{}",
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
            match (&p.mounted, &p.note) {
                (Some(m), _) => println!(
                    "  {}: {what}, {} mounted read-only (raw bytes: {})",
                    m.display(),
                    p.filesystem,
                    p.raw_file.display()
                ),
                (None, Some(note)) => println!(
                    "  {}: {what}, raw ({}: {note})",
                    p.raw_file.display(),
                    p.filesystem
                ),
                (None, None) => println!(
                    "  {}: {what}, raw, {}",
                    p.raw_file.display(),
                    human_bytes(p.size)
                ),
            }
        }
        if background {
            println!("`cairn umount {d}` ends it.");
        } else {
            println!("Serving until Ctrl-C or `cairn umount {d}`.");
        }
    }
    let _ = std::io::stdout().flush();
}

pub(super) fn cmd_umount(a: UmountArgs, ctx: &Ctx) -> Result<()> {
    let r = mount::umount(&a.dir)?;
    if ctx.json {
        print_json(&r);
    } else if !ctx.quiet {
        println!(
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
