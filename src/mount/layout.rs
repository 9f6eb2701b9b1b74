//! What the view shows: the restore point's partitions (from the partition table in its data),
//! the filesystem each holds and how it is mounted here, and the tree of names under DIR.

use super::probe;
use super::source::{BlockSource, RestorePoint};
use super::view::{NodeKind, Tree};
use crate::ptable::{PartitionTable, ReadError};
use std::sync::Arc;

/// One partition (or the whole image's filesystem) as the view shows it.
pub struct Part {
    pub number: Option<u32>,
    pub start: u64,
    pub size: u64,
    pub fs: probe::Fs,
    pub mounter: Result<probe::Mounter, String>,
    /// Name under DIR: "pN" or "fs".
    pub name: String,
    /// The file the loop device reads (relative to DIR).
    pub raw_rel: String,
}

/// The partition table in the restore point's data (as restore reads it), or why there is none.
pub fn read_table(
    source: &Arc<BlockSource>,
    point: &RestorePoint,
    warnings: &mut Vec<String>,
) -> Option<PartitionTable> {
    let m = point.manifest();
    if m.source.kind == "partition" {
        return None;
    }
    let mut stream = source.stream(0, point.size);
    match crate::ptable::read(&mut stream, point.size, m.source.logical_sector_size) {
        Ok(t) => t,
        Err(ReadError::Io(e)) => {
            warnings.push(format!(
                "the blocks holding the partition table could not be read ({e:#}); only DIR/disk is shown"
            ));
            None
        }
        Err(ReadError::Table(e)) => {
            warnings.push(format!(
                "the partition table is not one cairn can read ({e:#}); only DIR/disk is shown"
            ));
            None
        }
    }
}

/// A byte range of the restore point that the view shows as a partition (or as its only
/// filesystem).
struct Range {
    number: Option<u32>,
    start: u64,
    size: u64,
    extended: bool,
}

/// The ranges to show: the table's partitions (clipped to the restore point), or, without a
/// table, the whole image as one filesystem (none with `--raw`: DIR/disk is all there is).
fn ranges(size: u64, table: Option<&PartitionTable>, raw: bool) -> Vec<Range> {
    match table {
        Some(t) => t
            .partitions
            .iter()
            .map(|p| {
                let start = p.start.min(size);
                Range {
                    number: Some(p.number),
                    start,
                    size: p.size.min(size - start),
                    extended: p.extended,
                }
            })
            .collect(),
        None if raw => Vec::new(),
        None => vec![Range {
            number: None,
            start: 0,
            size,
            extended: false,
        }],
    }
}

/// The filesystem a range holds and how it is mounted here, or why it stays raw.
fn classify(
    source: &Arc<BlockSource>,
    r: &Range,
    raw: bool,
    kernel: &[String],
) -> (probe::Fs, Result<probe::Mounter, String>) {
    if raw {
        return (probe::Fs::Unknown, Err("--raw".to_string()));
    }
    if r.extended {
        return (
            probe::Fs::Unknown,
            Err("an extended partition (a container of logical partitions)".into()),
        );
    }
    match probe::probe(&mut source.stream(r.start, r.size), r.size) {
        Ok(fs) => (fs, probe::mounter(fs, kernel)),
        Err(e) => (
            probe::Fs::Unknown,
            Err(format!("its superblock could not be read ({e})")),
        ),
    }
}

pub fn plan_parts(
    source: &Arc<BlockSource>,
    table: Option<&PartitionTable>,
    raw: bool,
) -> Vec<Part> {
    let kernel = probe::kernel_filesystems();
    ranges(source.size(), table, raw)
        .into_iter()
        .map(|r| {
            let (fs, mounter) = classify(source, &r, raw, &kernel);
            let name = match r.number {
                Some(n) => format!("p{n}"),
                None => "fs".to_string(),
            };
            let raw_rel = match r.number {
                Some(_) if raw => name.clone(),
                Some(_) => format!(".raw/{name}"),
                None => "disk".to_string(),
            };
            Part {
                number: r.number,
                start: r.start,
                size: r.size,
                fs,
                mounter,
                name,
                raw_rel,
            }
        })
        .collect()
}

pub fn build_tree(size: u64, parts: &[Part], raw: bool) -> Tree {
    let mut tree = Tree::new();
    tree.add(Tree::ROOT, "disk", NodeKind::Raw { start: 0, size });
    let partitioned = parts.iter().any(|p| p.number.is_some());
    let raw_dir = (partitioned && !raw).then(|| tree.add(Tree::ROOT, ".raw", NodeKind::Dir));
    for p in parts {
        let bytes = NodeKind::Raw {
            start: p.start,
            size: p.size,
        };
        if let Some(d) = raw_dir {
            tree.add(d, &p.name, bytes.clone());
        }
        match (&p.mounter, p.number) {
            (Ok(_), _) => {
                tree.add(Tree::ROOT, &p.name, NodeKind::Dir);
            }
            (Err(_), Some(_)) => {
                tree.add(Tree::ROOT, &p.name, bytes);
            }
            // An unpartitioned image whose filesystem stays raw: DIR/disk is its bytes.
            (Err(_), None) => {}
        }
    }
    tree
}
