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
    /// "complete", or "damaged: why" when the manifest or a segment is missing or wrong.
    pub status: String,
}

pub fn run(repo: &Repository) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for id in repo.image_ids()? {
        let row = match repo.load_manifest(&id) {
            Ok((m, _)) => {
                let status = match repo
                    .load_image(&id)
                    .and_then(|img| img.check_segments_present())
                {
                    Ok(()) => "complete".to_string(),
                    Err(e) => format!("damaged: {e:#}"),
                };
                Row {
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
                    status,
                }
            }
            Err(e) => Row {
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
                status: format!("damaged: {e:#}"),
            },
        };
        rows.push(row);
    }
    rows.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
    Ok(rows)
}
