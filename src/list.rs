//! List: one row per image, cheap (manifests and file sizes only; `verify` reads the data).

use crate::repo::Repository;
use anyhow::Result;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Row {
    pub id: String,
    pub name: Option<String>,
    pub kind: Option<&'static str>,
    pub parent: Option<String>,
    pub created: Option<String>,
    pub method: Option<&'static str>,
    pub source: Option<String>,
    pub source_size: Option<u64>,
    pub data_bytes: Option<u64>,
    pub stored_bytes: Option<u64>,
    /// Bytes only this image holds: its own files, and the segments no other image references
    /// (what removing it alone would free, unless a kept point needs its data).
    pub unique_bytes: Option<u64>,
    /// Bytes of the segments it references that other images reference too (format 2).
    pub shared_bytes: Option<u64>,
    /// Protected from prune and delete (`cairn protect`).
    pub protected: bool,
    /// The source disk's partition table, when the image recorded one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_table: Option<crate::format::PartitionTableRecord>,
    /// "complete", or "damaged: why" when the manifest or a segment is missing or wrong.
    pub status: String,
}

/// Rows in the repository's order, oldest first (`repo::image_order`); images whose manifest cannot
/// be read have no known place and come last.
pub fn run(repo: &Repository) -> Result<Vec<Row>> {
    let _lock = repo.lock_shared()?;
    let mut rows = Vec::new();
    for id in repo.image_dir_ids()? {
        let row = match repo.load_manifest_rewritten(&id) {
            Ok((m, rewrite, _)) => {
                let sequence = m.sequence;
                // Manifests and file sizes only: `verify` reads the data.
                let dir = repo.images_dir().join(&id);
                let status =
                    match crate::repo::check_files_present(&dir, &m, Some(rewrite.generation)) {
                        Ok(()) => "complete".to_string(),
                        Err(e) => format!("damaged: {e:#}"),
                    };
                let row = Row {
                    id: id.clone(),
                    name: Some(m.name.clone()),
                    kind: Some(m.kind.as_str()),
                    parent: m.parent.as_ref().map(|p| p.id.clone()),
                    created: Some(m.created.clone()),
                    method: Some(match m.method {
                        crate::format::Method::Full => "full",
                        crate::format::Method::Tracked => "tracked",
                        crate::format::Method::CompareScan => "compare-scan",
                    }),
                    source: Some(m.source.path.clone()),
                    source_size: Some(m.source.size),
                    data_bytes: Some(m.stats.data_bytes),
                    stored_bytes: Some(m.stats.stored_bytes),
                    unique_bytes: None,
                    shared_bytes: None,
                    protected: crate::prune::execute::is_protected(repo, &id),
                    partition_table: m.partition_table.clone(),
                    status,
                };
                (Some(sequence), row)
            }
            Err(e) => (
                None,
                Row {
                    id: id.clone(),
                    name: None,
                    kind: None,
                    parent: None,
                    created: None,
                    method: None,
                    source: None,
                    source_size: None,
                    data_bytes: None,
                    stored_bytes: None,
                    unique_bytes: None,
                    shared_bytes: None,
                    protected: false,
                    partition_table: None,
                    status: format!("damaged: {e:#}"),
                },
            ),
        };
        rows.push(row);
    }
    // Readable rows (`Some(sequence)`) in order, then the unreadable ones by id.
    rows.sort_by(|(a, ra), (b, rb)| {
        a.is_none().cmp(&b.is_none()).then_with(|| {
            crate::repo::image_order(a.flatten(), &ra.id)
                .cmp(&crate::repo::image_order(b.flatten(), &rb.id))
        })
    });
    let mut rows: Vec<Row> = rows.into_iter().map(|(_, row)| row).collect();
    space_per_image(repo, &mut rows);
    Ok(rows)
}

/// The repository's space: every file, and what no image needs.
#[derive(Debug, Serialize)]
pub struct Totals {
    pub images: Vec<Row>,
    /// Bytes of every file under images/, segments/ and tmp/.
    pub total_bytes: u64,
    /// Bytes of files no readable image needs (leftovers of an interrupted run; what the next
    /// prune's garbage collection deletes). An unreadable image's files are never counted here.
    pub reclaimable_bytes: u64,
}

pub fn totals(repo: &Repository) -> Result<Totals> {
    let images = run(repo)?;
    let _lock = repo.lock_shared()?;
    let total_bytes = crate::prune::execute::files_bytes(repo)?;
    let mut needed = 0u64;
    let mut segments = std::collections::BTreeSet::new();
    for row in &images {
        let dir = repo.images_dir().join(&row.id);
        let Ok((m, _)) = repo.load_manifest(&row.id) else {
            needed += dir_bytes(&dir);
            continue;
        };
        needed += own_files_bytes(repo, &row.id);
        for s in &m.segments {
            let place = crate::repo::segment_place(&dir, &repo.pool_dir(), &row.id, s);
            if segments.insert(place.origin.clone()) {
                needed += std::fs::metadata(&place.path).map_or(0, |md| md.len());
            }
        }
    }
    Ok(Totals {
        images,
        total_bytes,
        reclaimable_bytes: total_bytes.saturating_sub(needed),
    })
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// The files of an image's current generation that are not segments: manifest, index,
/// unreadable-range list, protection mark.
fn own_files_bytes(repo: &Repository, id: &str) -> u64 {
    let Ok((_, rw, _)) = repo.load_manifest_rewritten(id) else {
        return 0;
    };
    let dir = repo.images_dir().join(id);
    [
        "manifest".to_string(),
        crate::format::index_file_name(rw.generation),
        crate::format::bad_ranges_file_name(rw.generation),
        crate::prune::execute::PROTECTED.to_string(),
    ]
    .iter()
    .filter_map(|n| std::fs::metadata(dir.join(n)).ok())
    .map(|m| m.len())
    .sum()
}

/// Fills in each readable row's unique and shared bytes: a segment referenced by one image is
/// its alone; by several, shared.
fn space_per_image(repo: &Repository, rows: &mut [Row]) {
    use std::collections::HashMap;
    let mut refs: HashMap<String, Vec<(crate::format::manifest::SegmentOrigin, u64)>> =
        HashMap::new();
    let mut count: HashMap<crate::format::manifest::SegmentOrigin, usize> = HashMap::new();
    for row in rows.iter() {
        let Ok((m, _)) = repo.load_manifest(&row.id) else {
            continue;
        };
        let dir = repo.images_dir().join(&row.id);
        let mut mine = Vec::new();
        for s in &m.segments {
            let place = crate::repo::segment_place(&dir, &repo.pool_dir(), &row.id, s);
            *count.entry(place.origin.clone()).or_default() += 1;
            mine.push((place.origin, s.size));
        }
        refs.insert(row.id.clone(), mine);
    }
    for row in rows.iter_mut() {
        let Some(mine) = refs.get(&row.id) else {
            continue;
        };
        let (mut unique, mut shared) = (own_files_bytes(repo, &row.id), 0u64);
        for (origin, size) in mine {
            if count[origin] > 1 {
                shared += size;
            } else {
                unique += size;
            }
        }
        row.unique_bytes = Some(unique);
        row.shared_bytes = Some(shared);
    }
}

/// One line about a partition table, under an image's row in `list`.
pub fn table_summary(t: &crate::format::PartitionTableRecord) -> String {
    let parts: Vec<String> = t
        .partitions
        .iter()
        .map(|p| {
            format!(
                "{}: {} {}",
                p.number,
                crate::progress::short_bytes(p.size),
                p.type_name.as_deref().unwrap_or(&p.type_id)
            )
        })
        .collect();
    format!(
        "{} {}, {}-byte sectors: {}",
        t.kind.as_str().to_uppercase(),
        t.disk_id,
        t.sector_size,
        if parts.is_empty() {
            "no partitions".to_string()
        } else {
            parts.join(", ")
        }
    )
}

/// `cairn show`: what one image's manifest says, for a person, with what is unreadable at its
/// restore point (or why that cannot be told).
pub fn show_lines(
    m: &crate::format::Manifest,
    unreadable: &Result<crate::chain::Unreadable, String>,
) -> Vec<String> {
    use crate::progress::human_bytes;
    let s = &m.source;
    let mut out = vec![
        format!("image      {}", m.id),
        format!("name       {}", m.name),
        format!(
            "kind       {}{}",
            m.kind.as_str(),
            m.parent
                .as_ref()
                .map(|p| format!(" (parent {})", p.id))
                .unwrap_or_default()
        ),
        format!("created    {}", m.created),
        format!("source     {} ({})", s.path, s.kind),
        format!("size       {}", human_bytes(s.size)),
        format!(
            "sectors    {} logical, {} physical",
            s.logical_sector_size, s.physical_sector_size
        ),
    ];
    for (k, v) in [("model", &s.model), ("serial", &s.serial), ("wwn", &s.wwn)] {
        if let Some(v) = v {
            out.push(format!("{k:<10} {v}"));
        }
    }
    out.push(format!(
        "data       {} in {} of {} blocks ({} stored)",
        human_bytes(m.stats.data_bytes),
        m.stats.blocks_stored,
        m.stats.blocks_total,
        human_bytes(m.stats.stored_bytes)
    ));
    if m.has_bad_ranges() {
        out.push(format!(
            "bad reads  {} of the source could not be read by this image",
            human_bytes(m.bad_bytes())
        ));
    }
    match unreadable {
        Ok(u) if u.count == 0 => out.push("unreadable none at this restore point".to_string()),
        Ok(u) => out.push(format!(
            "unreadable {} in {} ranges at this restore point (`cairn badmap --image {}` lists them)",
            human_bytes(u.bytes),
            u.count,
            m.id
        )),
        Err(e) => out.push(format!("unreadable unknown: {e}")),
    }
    match &m.partition_table {
        Some(t) => out.extend(crate::ptable::PartitionTable::from(t.clone()).describe()),
        None => out.push("no partition table recorded".to_string()),
    }
    out
}
