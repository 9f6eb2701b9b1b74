//! What a backup stores and relative to what: the kind and parent, and the work for the reader.

use crate::chain;
use crate::device::{DeviceInfo, Kind};
use crate::format::{self, ImageKind, Manifest, Method};
use crate::repo::{Image, Repository};
use crate::tracker::{self, protocol::CutKind, protocol::Token};
use anyhow::{bail, Context, Result};
use std::path::Path;

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
fn decide_kind(
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
fn restorable_chain(repo: &Repository, m: &Manifest) -> Result<Vec<Image>> {
    let chain = chain::resolve(repo, &m.id)?;
    for img in &chain {
        img.check_segments_present()?;
    }
    Ok(chain)
}

/// Every readable image of `name`, oldest first. Unreadable manifests are never taken as a parent
/// (`verify` reports them).
fn images_of_name(
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
fn tracked_range(info: &DeviceInfo) -> std::result::Result<((u32, u32), u64, u64), String> {
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

/// Granule runs → read extents (offset, length), each inside one block and inside the source,
/// produced as the runs arrive: the list of runs is never held.
pub(super) struct Extents<I> {
    runs: I,
    granule: u64,
    block_size: u64,
    size: u64,
    /// The rest of the current run: [at, end).
    at: u64,
    end: u64,
}

impl<I: Iterator<Item = Result<(u64, u64)>>> Extents<I> {
    pub(super) fn new(runs: I, granule: u64, block_size: u64, size: u64) -> Self {
        Extents {
            runs,
            granule,
            block_size,
            size,
            at: 0,
            end: 0,
        }
    }
}

impl<I: Iterator<Item = Result<(u64, u64)>>> Iterator for Extents<I> {
    type Item = Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.at >= self.end {
            let (g, n) = match self.runs.next()? {
                Ok(run) => run,
                Err(e) => return Some(Err(e)),
            };
            let start = g.checked_mul(self.granule).filter(|&s| s < self.size);
            let Some(start) = start else {
                return Some(Err(anyhow::anyhow!(
                    "the tracker reported granule {g} changed, past the end of the {}-byte source",
                    self.size
                )));
            };
            self.at = start;
            self.end = g
                .saturating_add(n)
                .saturating_mul(self.granule)
                .min(self.size);
        }
        let block_end = (self.at / self.block_size + 1) * self.block_size;
        let stop = self.end.min(block_end);
        let extent = (self.at, stop - self.at);
        self.at = stop;
        Some(Ok(extent))
    }
}

/// What the reader reads.
pub(super) enum Work {
    /// Every block; store whatever is not zero.
    All,
    /// Every block, compared with the base chain; store what differs.
    Compare,
    /// The tracker's changed runs, read from its session as the reader goes.
    Tracked(tracker::Changed),
}

impl Work {
    /// How much the reader reads (for progress; a tracked set's last granule may be cut short
    /// by the source's end).
    pub(super) fn bytes(&self, size: u64, granule: u32) -> u64 {
        match self {
            Work::All | Work::Compare => size,
            Work::Tracked(c) => c.granules.saturating_mul(u64::from(granule)).min(size),
        }
    }
}

/// What this backup is, once decided: the image, its kind and parent, and how to find what to
/// store.
pub(super) struct Plan {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) kind: ImageKind,
    /// The image this one is relative to, with its manifest hash.
    pub(super) parent: Option<(Manifest, format::Hash)>,
    pub(super) note: Option<String>,
    pub(super) method: Method,
    pub(super) method_reason: Option<String>,
    pub(super) granule: u32,
    pub(super) block_size: u32,
    pub(super) created_unix: u64,
    pub(super) work: Work,
}

/// The kind and parent of the new image of `name`, from the readable images of that name.
pub(super) fn decide(
    repo: &Repository,
    catalogue: &crate::repo::Catalogue,
    asked: Option<ImageKind>,
    name: &str,
) -> Decision {
    let history = images_of_name(repo, catalogue, name);
    let decision = decide_kind(asked, &history, name, |m| restorable_chain(repo, m));
    if let Some(why) = catalogue.doubt_newest(catalogue.newest_of(name)) {
        tracing::warn!("{why}: it may be the newest image of {name}; the new image is relative to the newest readable one");
    }
    decision
}

/// The tracker's answer for this backup, or why there is none.
pub(super) struct Tracking {
    pub(super) session: Option<tracker::Session>,
    pub(super) cut: Option<tracker::Cut>,
    pub(super) problem: Option<String>,
}

/// Asks the change tracker for the writes since the parent image.
pub(super) fn ask_tracker(
    state_dir: &Path,
    info: &DeviceInfo,
    consumer: &str,
    kind: ImageKind,
    parent: Option<&(Manifest, format::Hash)>,
    granule: u32,
) -> Tracking {
    let parent_token = parent.and_then(|(m, _)| m.tracking.clone()).map(|t| Token {
        lineage: t.lineage,
        seq: t.seq,
    });
    let cut_kind = match kind {
        ImageKind::Full => CutKind::Full,
        ImageKind::Incremental => CutKind::Incremental,
        ImageKind::Differential => CutKind::Differential,
    };
    let (session, cut, problem) = match tracked_range(info) {
        Err(why) => (None, None, Some(why)),
        Ok((disk, start, len)) => match tracker::Session::connect(state_dir) {
            Err(e) => (None, None, Some(format!("{e:#}"))),
            Ok(mut s) => match s.cut(
                disk,
                start,
                len,
                u64::from(granule),
                consumer,
                cut_kind,
                parent_token,
            ) {
                Ok(c) => (Some(s), Some(c), None),
                Err(e) => (None, None, Some(format!("{e:#}"))),
            },
        },
    };
    Tracking {
        session,
        cut,
        problem,
    }
}

/// How to find what to store, and why a compare-scan is needed when it is.
pub(super) fn choose_method(
    kind: ImageKind,
    fallback: Option<String>,
    tracking: &Tracking,
) -> (Method, Option<String>) {
    let (method, method_reason) = match (kind, &tracking.cut) {
        (ImageKind::Full, _) => (Method::Full, None),
        // The tracker's changes are relative to the image it cut last, which is not the parent.
        _ if fallback.is_some() => (Method::CompareScan, fallback),
        (_, Some(c)) if c.changed.is_some() => (Method::Tracked, None),
        (_, Some(c)) => (Method::CompareScan, c.reason.clone()),
        (_, None) => (Method::CompareScan, tracking.problem.clone()),
    };
    if kind == ImageKind::Full {
        if let Some(p) = &tracking.problem {
            tracing::info!("no change tracking for this series: {p}");
        }
    }
    if let Some(r) = &method_reason {
        tracing::warn!("compare-scan (reads the whole source): {r}");
    }
    (method, method_reason)
}

/// What the reader reads for `method`.
pub(super) fn work_for(method: Method, cut: Option<&tracker::Cut>) -> Work {
    match (method, cut.and_then(|c| c.changed)) {
        (Method::Tracked, Some(changed)) => Work::Tracked(changed),
        (Method::CompareScan, _) => Work::Compare,
        _ => Work::All,
    }
}

/// The parent chain again, just before commit: an image deleted or replaced by hand during the
/// run must not leave a new image on a broken chain.
pub(super) fn check_parent_unchanged(
    repo: &Repository,
    parent: Option<&(Manifest, format::Hash)>,
    source: &Path,
) -> Result<()> {
    let Some((m, h)) = parent else {
        return Ok(());
    };
    let chain = restorable_chain(repo, m).with_context(|| {
        format!(
            "backup of {} failed; the repository is unchanged: the parent chain broke during the backup",
            source.display()
        )
    })?;
    if chain.last().map(|i| i.manifest_hash) != Some(*h) {
        bail!(
            "backup of {} failed; the repository is unchanged: the parent image {} was replaced during the backup",
            source.display(),
            m.id
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_become_extents_inside_blocks() {
        let size = (4 << 20) - 100;
        let runs = [(0, 2), (250, 10), (1000, 5), (1023, 5)];
        let e: Vec<(u64, u64)> = Extents::new(runs.into_iter().map(Ok), 4096, 1 << 20, size)
            .collect::<Result<_>>()
            .unwrap();
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

    #[test]
    fn a_run_past_the_source_or_a_tracker_error_stops_the_extents() {
        let runs = [(0, 1), (1024, 1)].into_iter().map(Ok);
        let e: Vec<Result<(u64, u64)>> = Extents::new(runs, 4096, 1 << 20, 4 << 20).collect();
        assert_eq!(e.len(), 2);
        assert!(format!("{:#}", e[1].as_ref().unwrap_err()).contains("past the end"));
        let failing = [Ok((0, 1)), Err(anyhow::anyhow!("tracker gone"))].into_iter();
        let e: Vec<Result<(u64, u64)>> = Extents::new(failing, 4096, 1 << 20, 4 << 20).collect();
        assert!(e[1].is_err());
    }
}
