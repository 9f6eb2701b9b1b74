//! What a backup stores and relative to what: the kind and parent, and the work for the reader.

use crate::chain;
use crate::device::{DeviceInfo, Kind};
use crate::format::{self, ImageKind, Manifest};
use crate::repo::{Image, Repository};
use anyhow::Result;

pub(super) struct Decision {
    pub(super) kind: ImageKind,
    /// The image this one is relative to, with its manifest hash.
    pub(super) parent: Option<(Manifest, format::Hash)>,
    /// The parent's restore point, oldest first (empty for a full).
    pub(super) parent_chain: Vec<Image>,
    pub(super) note: Option<String>,
    /// Why the parent is not the image the kind asks for (whose chain is broken), when it is not.
    pub(super) fallback: Option<String>,
}

/// Full for a new name (or when asked); otherwise incremental (default) or differential, relative
/// to the newest image (the newest full for a differential) whose chain is restorable. Never onto
/// a broken chain: when that image's chain is broken the parent is the newest restorable one
/// before it (`fallback` says so), and a full when there is none.
pub(super) fn decide_kind(
    asked: Option<ImageKind>,
    history: &[(Manifest, format::Hash)],
    name: &str,
    mut restorable: impl FnMut(&Manifest) -> Result<Vec<Image>>,
) -> Decision {
    let wanted = asked.unwrap_or(if history.is_empty() {
        ImageKind::Full
    } else {
        ImageKind::Incremental
    });
    let full = |note: Option<String>| Decision {
        kind: ImageKind::Full,
        parent: None,
        parent_chain: Vec::new(),
        note,
        fallback: None,
    };
    if wanted == ImageKind::Full {
        return full(None);
    }
    let mut candidates = history
        .iter()
        .rev()
        .filter(|(m, _)| wanted != ImageKind::Differential || m.kind == ImageKind::Full)
        .peekable();
    if candidates.peek().is_none() {
        return full(Some(format!(
            "{name} has no full image yet: taking a full image, which starts the chain"
        )));
    }
    let mut broken: Option<String> = None;
    for candidate in candidates {
        match restorable(&candidate.0) {
            Ok(chain) => {
                let fallback = broken.map(|why| {
                    format!(
                        "{why}; this {} is relative to {}, the newest restorable image, by compare-scan",
                        wanted.as_str(),
                        candidate.0.id
                    )
                });
                return Decision {
                    kind: wanted,
                    parent: Some(candidate.clone()),
                    parent_chain: chain,
                    note: fallback.clone(),
                    fallback,
                };
            }
            Err(e) => {
                broken.get_or_insert_with(|| {
                    format!(
                        "image {} cannot be a parent, its restore point is broken ({e:#})",
                        candidate.0.id
                    )
                });
            }
        }
    }
    full(Some(format!(
        "{}; no image of {name} is restorable: taking a full image, which starts a new chain",
        broken.unwrap_or_default()
    )))
}

/// The restore point ending at `m`, when it is complete and restorable: every manifest and index
/// present and checked, parent hashes matching, every segment present at its size.
pub(super) fn restorable_chain(repo: &Repository, m: &Manifest) -> Result<Vec<Image>> {
    let chain = chain::resolve(repo, &m.id)?;
    for img in &chain {
        img.check_segments_present()?;
    }
    Ok(chain)
}

/// Every readable image of `name`, oldest first. Unreadable manifests are never taken as a parent
/// (`verify` reports them).
pub(super) fn images_of_name(
    repo: &Repository,
    catalogue: &crate::repo::Catalogue,
    name: &str,
) -> Vec<(Manifest, format::Hash)> {
    catalogue
        .of_name(name)
        .filter_map(|i| match repo.load_manifest(&i.id) {
            Ok(mh) => Some(mh),
            Err(e) => {
                tracing::warn!("skipping unreadable image: {e:#}");
                None
            }
        })
        .collect()
}

/// The whole disk and byte range the tracker knows this source by.
pub(super) fn tracked_range(
    info: &DeviceInfo,
) -> std::result::Result<((u32, u32), u64, u64), String> {
    match info.kind {
        Kind::File => Err("the source is a file; only block devices are tracked".into()),
        Kind::Disk => Ok((info.devno.expect("block device"), 0, info.size)),
        Kind::Partition => {
            let (Some(devno), Some(parent)) = (info.devno, info.parent_devno) else {
                return Err("cannot find the disk holding this partition".into());
            };
            let start =
                std::fs::read_to_string(format!("/sys/dev/block/{}:{}/start", devno.0, devno.1))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or("cannot read the partition's start from sysfs")?;
            Ok((parent, start * 512, info.size))
        }
    }
}

/// Granule runs → read extents, each inside one block.
pub(super) fn extents_from_runs(
    runs: &[(u64, u64)],
    granule: u64,
    block_size: u64,
    size: u64,
) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(g, n) in runs {
        let mut at = g * granule;
        let end = ((g + n) * granule).min(size);
        while at < end {
            let block_end = (at / block_size + 1) * block_size;
            let stop = end.min(block_end);
            out.push((at, stop - at));
            at = stop;
        }
    }
    out
}

/// What the reader reads.
pub(super) enum Work {
    /// Every block; store whatever is not zero.
    All,
    /// Every block, compared with the base chain; store what differs.
    Compare,
    /// Only these extents (offset, length), each inside one block.
    Extents(Vec<(u64, u64)>),
}

impl Work {
    pub(super) fn bytes(&self, size: u64) -> u64 {
        match self {
            Work::All | Work::Compare => size,
            Work::Extents(e) => e.iter().map(|x| x.1).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_become_extents_inside_blocks() {
        let size = (4 << 20) - 100;
        let e = extents_from_runs(
            &[(0, 2), (250, 10), (1000, 5), (1023, 5)],
            4096,
            1 << 20,
            size,
        );
        assert_eq!(
            e,
            vec![
                (0, 8192),
                (250 * 4096, 6 * 4096),
                (1 << 20, 4 * 4096),
                (1000 * 4096, 5 * 4096),
                (1023 * 4096, size - 1023 * 4096)
            ]
        );
    }
}
