//! The kernel side of tracking: a private tracefs instance with the block layer's
//! `block_bio_queue` and `block_rq_complete` events, filtered on the tracked disks, read from the
//! per-CPU binary ring buffers (`per_cpu/cpuN/trace_pipe_raw`).
//!
//! Layouts are read from the kernel (`events/.../format`, `events/header_page`), never assumed:
//! they differ between kernel versions (RWBS_LEN went 8 → 9 → 10). See shared notes
//! kernel-tracking-facts.md for what was checked.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs at /sys/kernel/tracing when it is not mounted yet.
pub fn ensure_mounted() -> Result<PathBuf> {
    let root = PathBuf::from(TRACEFS);
    if root.join("instances").is_dir() {
        return Ok(root);
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("the tracker needs root (to use tracefs at {TRACEFS})");
    }
    nix::mount::mount(
        Some("nodev"),
        &root,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("cannot mount tracefs at {TRACEFS} (is CONFIG_TRACING enabled?)"))?;
    if !root.join("instances").is_dir() {
        bail!("tracefs mounted at {TRACEFS} has no instances directory");
    }
    Ok(root)
}

/// Where one field of an event record lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: usize,
    pub size: usize,
}

/// An event's id and field layout, from its `format` file.
#[derive(Debug, Clone)]
pub struct EventFormat {
    pub id: u16,
    fields: HashMap<String, Field>,
}

impl EventFormat {
    pub fn parse(text: &str) -> Result<Self> {
        let mut id = None;
        let mut fields = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(v) = line.strip_prefix("ID:") {
                id = Some(v.trim().parse::<u16>().context("event id")?);
            } else if let Some(rest) = line.strip_prefix("field:") {
                // "field:char rwbs[10];\toffset:28;\tsize:10;\tsigned:0;"
                let mut parts = rest.split(';').map(str::trim);
                let decl = parts.next().unwrap_or_default();
                let name = decl
                    .rsplit(|c: char| c.is_whitespace())
                    .next()
                    .unwrap_or_default()
                    .split('[')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let mut offset = None;
                let mut size = None;
                for p in parts {
                    if let Some(v) = p.strip_prefix("offset:") {
                        offset = v.parse().ok();
                    } else if let Some(v) = p.strip_prefix("size:") {
                        size = v.parse().ok();
                    }
                }
                if let (Some(offset), Some(size)) = (offset, size) {
                    fields.insert(name, Field { offset, size });
                }
            }
        }
        Ok(EventFormat {
            id: id.ok_or_else(|| anyhow!("event format has no ID"))?,
            fields,
        })
    }

    pub fn field(&self, name: &str) -> Result<Field> {
        self.fields
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("event has no field {name:?}"))
    }
}

/// The fields cairn needs from a block event, located once.
#[derive(Debug, Clone, Copy)]
pub struct BlockLayout {
    pub id: u16,
    dev: Field,
    sector: Field,
    nr_sector: Field,
    rwbs: Field,
}

impl BlockLayout {
    pub fn from_format(f: &EventFormat) -> Result<Self> {
        let l = BlockLayout {
            id: f.id,
            dev: f.field("dev")?,
            sector: f.field("sector")?,
            nr_sector: f.field("nr_sector")?,
            rwbs: f.field("rwbs")?,
        };
        if l.dev.size != 4 || l.sector.size != 8 || l.nr_sector.size != 4 {
            bail!(
                "unexpected block event field sizes (dev {}, sector {}, nr_sector {})",
                l.dev.size,
                l.sector.size,
                l.nr_sector.size
            );
        }
        Ok(l)
    }
}

/// One write-like block operation: `nr_sector` 512-byte sectors from `sector` of the disk `dev`
/// (kernel encoding, major << 20 | minor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockEvent {
    pub dev: u32,
    pub sector: u64,
    pub nr_sector: u32,
}

/// True for every operation that can change data: anything but a read, with a length. Write-zeroes
/// appears as "N" and discards as "D"/"DE", so a test for "W" alone would miss real changes.
pub fn rwbs_changes_data(rwbs: &[u8]) -> bool {
    let s: Vec<u8> = rwbs.iter().copied().take_while(|&c| c != 0).collect();
    // A leading 'F' is a preflush; the operation letter follows it.
    let op = match s.as_slice() {
        [b'F', rest @ ..] if !rest.is_empty() => rest,
        other => other,
    };
    // 'R' read, 'F' a flush (no data); everything else — W, N (write-zeroes and others), D, DE,
    // zone operations — may change data.
    !matches!(op.first(), None | Some(b'R') | Some(b'F'))
}

pub fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | minor
}

/// Result of parsing one ring-buffer page.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PageInfo {
    /// The kernel dropped events before this page.
    pub missed: bool,
    pub events: usize,
}

const RB_MISSED_EVENTS: u64 = 1 << 31;
const RB_MISSED_STORED: u64 = 1 << 30;
const TYPE_PADDING: u32 = 29;
const TYPE_TIME_EXTEND: u32 = 30;
const TYPE_TIME_STAMP: u32 = 31;

/// Page header layout, from `events/header_page`.
#[derive(Debug, Clone, Copy)]
pub struct PageLayout {
    commit_offset: usize,
    commit_size: usize,
    data_offset: usize,
}

impl PageLayout {
    pub fn parse(text: &str) -> Result<Self> {
        let f = EventFormat::parse(&format!("ID: 0\n{text}"))?;
        let commit = f.field("commit")?;
        let data = f.field("data")?;
        Ok(PageLayout {
            commit_offset: commit.offset,
            commit_size: commit.size,
            data_offset: data.offset,
        })
    }
}

/// Parses one page read from trace_pipe_raw, appending the write-like block events in it.
pub fn parse_page(
    page: &[u8],
    layout: &PageLayout,
    events: &[BlockLayout],
    out: &mut Vec<BlockEvent>,
) -> Result<PageInfo> {
    let rd = |at: usize, n: usize| -> Option<u64> {
        let b = page.get(at..at + n)?;
        Some(match n {
            4 => u64::from(u32::from_le_bytes(b.try_into().ok()?)),
            8 => u64::from_le_bytes(b.try_into().ok()?),
            _ => return None,
        })
    };
    let commit = rd(layout.commit_offset, layout.commit_size)
        .ok_or_else(|| anyhow!("short ring-buffer page"))?;
    let mut info = PageInfo {
        missed: commit & RB_MISSED_EVENTS != 0,
        events: 0,
    };
    let len = (commit & !(RB_MISSED_EVENTS | RB_MISSED_STORED) & 0xffff_ffff) as usize;
    let data = page
        .get(layout.data_offset..layout.data_offset + len)
        .ok_or_else(|| anyhow!("ring-buffer page claims {len} bytes of data"))?;
    let mut pos = 0usize;
    while pos + 4 <= data.len() {
        let hdr = u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4"));
        let type_len = hdr & 0x1f;
        let time_delta = hdr >> 5;
        let (payload_at, total) = match type_len {
            TYPE_PADDING => {
                if time_delta == 0 {
                    break; // the rest of the page is padding
                }
                let l = data
                    .get(pos + 4..pos + 8)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("4")));
                let l = l.ok_or_else(|| anyhow!("truncated padding event"))? as usize;
                (pos + 8, 4 + l)
            }
            TYPE_TIME_EXTEND | TYPE_TIME_STAMP => (pos + 8, 8),
            0 => {
                let l = data
                    .get(pos + 4..pos + 8)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("4")));
                let l = l.ok_or_else(|| anyhow!("truncated event length"))? as usize;
                if l < 4 {
                    bail!("corrupt ring-buffer event length {l}");
                }
                let total = 4 + l;
                // array[0] counts itself; the record follows it.
                let rec = data
                    .get(pos + 8..pos + total)
                    .ok_or_else(|| anyhow!("event overruns its page"))?;
                decode_record(rec, events, out, &mut info)?;
                pos += total.next_multiple_of(4);
                continue;
            }
            n => {
                let total = 4 + 4 * n as usize;
                let rec = data
                    .get(pos + 4..pos + total)
                    .ok_or_else(|| anyhow!("event overruns its page"))?;
                decode_record(rec, events, out, &mut info)?;
                pos += total;
                continue;
            }
        };
        let _ = payload_at;
        if total == 0 {
            bail!("zero-length ring-buffer event");
        }
        pos += total.next_multiple_of(4);
    }
    Ok(info)
}

/// Decodes one record. Records of other events (a `trace_marker` write into the instance, say)
/// are skipped; one of ours that is too short for its format is a garbled page, and an error:
/// skipping it could drop a write.
fn decode_record(
    rec: &[u8],
    events: &[BlockLayout],
    out: &mut Vec<BlockEvent>,
    info: &mut PageInfo,
) -> Result<()> {
    if rec.len() < 2 {
        bail!("ring-buffer record of {} bytes has no event id", rec.len());
    }
    let id = u16::from_le_bytes([rec[0], rec[1]]);
    let Some(l) = events.iter().find(|l| l.id == id) else {
        return Ok(());
    };
    let get = |f: Field| rec.get(f.offset..f.offset + f.size);
    let (Some(dev), Some(sector), Some(nr), Some(rwbs)) =
        (get(l.dev), get(l.sector), get(l.nr_sector), get(l.rwbs))
    else {
        bail!(
            "block event record (id {id}) of {} bytes is shorter than its format",
            rec.len()
        );
    };
    let nr_sector = u32::from_le_bytes(nr.try_into().expect("4"));
    if nr_sector == 0 || !rwbs_changes_data(rwbs) {
        return Ok(());
    }
    info.events += 1;
    out.push(BlockEvent {
        dev: u32::from_le_bytes(dev.try_into().expect("4")),
        sector: u64::from_le_bytes(sector.try_into().expect("8")),
        nr_sector,
    });
    Ok(())
}

/// Loss counters of one CPU's buffer (cumulative since the instance was created).
pub fn read_loss(instance: &Path, cpu: usize) -> Result<u64> {
    let p = instance.join(format!("per_cpu/cpu{cpu}/stats"));
    let s = read_text(&p)?;
    let mut total = 0u64;
    for line in s.lines() {
        if let Some((k, v)) = line.split_once(':') {
            if matches!(k.trim(), "overrun" | "commit overrun" | "dropped events") {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok(total)
}

/// The private instance and its per-CPU readers.
pub struct Instance {
    pub path: PathBuf,
    pub filter: String,
    pub buffer_kb: u64,
    /// What buffer_size_kb reads back (the kernel rounds the size up): the reference for
    /// noticing that someone changed it.
    pub buffer_readback: String,
    pub page: PageLayout,
    pub layouts: Vec<BlockLayout>,
    readers: Vec<File>,
    page_size: usize,
}

const EVENTS: [&str; 2] = ["block_bio_queue", "block_rq_complete"];

/// The filter every event of the instance carries.
pub fn filter_for(devs: &[u32]) -> String {
    let any: Vec<String> = devs.iter().map(|d| format!("dev == {d}")).collect();
    format!("({}) && nr_sector > 0", any.join(" || "))
}

impl Instance {
    /// Creates the instance `name` with our events and filter, or, when `reuse` and it already
    /// exists, attaches to it after checking it is exactly as we configured it (a restart of the
    /// daemon keeps the kernel buffering events, so nothing is missed in between).
    /// Returns the instance and whether an existing one was reused.
    pub fn open(
        root: &Path,
        name: &str,
        devs: &[u32],
        buffer_kb: u64,
        reuse: Option<&str>,
    ) -> Result<(Instance, bool)> {
        let path = root.join("instances").join(name);
        let filter = filter_for(devs);
        let mut reused = false;
        if path.exists() {
            if reuse.is_some_and(|rb| Self::configured_as(&path, &filter, rb).is_ok()) {
                reused = true;
            } else {
                Self::remove_path(&path)?;
            }
        }
        if !reused {
            fs::create_dir(&path)
                .with_context(|| format!("cannot create tracefs instance {}", path.display()))?;
            write(&path.join("tracing_on"), "0")?;
            write(&path.join("buffer_size_kb"), &buffer_kb.to_string())?;
            // When the buffer is full, drop new events (and count them) rather than overwrite:
            // either way cairn sees the loss and falls back to a compare-scan.
            write(&path.join("options/overwrite"), "0")?;
            for ev in EVENTS {
                let dir = path.join("events/block").join(ev);
                write(&dir.join("filter"), &filter)?;
                write(&dir.join("enable"), "1")?;
            }
            write(&path.join("tracing_on"), "1")?;
        }
        let page = PageLayout::parse(&read_text(&root.join("events/header_page"))?)?;
        let mut layouts = Vec::new();
        for ev in EVENTS {
            let f = read_text(&path.join("events/block").join(ev).join("format"))?;
            layouts.push(BlockLayout::from_format(&EventFormat::parse(&f)?)?);
        }
        let page_size = usize::try_from(
            nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)?.unwrap_or(4096),
        )?;
        let mut readers = Vec::new();
        for cpu in 0..cpu_count(&path)? {
            let p = path.join(format!("per_cpu/cpu{cpu}/trace_pipe_raw"));
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&p)
                .with_context(|| format!("opening {}", p.display()))?;
            readers.push(f);
        }
        let buffer_readback = read_text(&path.join("buffer_size_kb"))?.trim().to_string();
        Ok((
            Instance {
                path,
                filter,
                buffer_kb,
                buffer_readback,
                page,
                layouts,
                readers,
                page_size,
            },
            reused,
        ))
    }

    /// Why the instance no longer looks as configured, if it does not.
    pub fn check_configured(&self) -> Result<()> {
        Self::configured_as(&self.path, &self.filter, &self.buffer_readback)
    }

    fn configured_as(path: &Path, filter: &str, buffer_readback: &str) -> Result<()> {
        let rd = |p: PathBuf| read_text(&p).map(|s| s.trim().to_string());
        if rd(path.join("tracing_on"))? != "1" {
            bail!("tracing was switched off in the instance");
        }
        if rd(path.join("buffer_size_kb"))? != buffer_readback {
            bail!("the instance's buffer size was changed");
        }
        for ev in EVENTS {
            let dir = path.join("events/block").join(ev);
            if rd(dir.join("enable"))? != "1" {
                bail!("event {ev} was disabled");
            }
            if rd(dir.join("filter"))? != filter {
                bail!("the filter of {ev} was changed");
            }
        }
        Ok(())
    }

    pub fn cpus(&self) -> usize {
        self.readers.len()
    }

    /// Reads every page the kernel has for us, without blocking. Returns whether any page said
    /// events were missed.
    pub fn drain(&mut self, out: &mut Vec<BlockEvent>) -> Result<bool> {
        let mut missed = false;
        let mut buf = vec![0u8; self.page_size];
        for r in &mut self.readers {
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let info = parse_page(&buf[..n], &self.page, &self.layouts, out)?;
                        missed |= info.missed;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(anyhow!(e).context("reading trace_pipe_raw")),
                }
            }
        }
        Ok(missed)
    }

    /// Total lost events over all CPUs (cumulative).
    pub fn losses(&self) -> Result<u64> {
        (0..self.readers.len())
            .map(|c| read_loss(&self.path, c))
            .sum()
    }

    /// Stops tracing and removes the instance; later drains read nothing.
    pub fn close_and_remove(&mut self) -> Result<()> {
        // The buffers must be closed first: an open trace_pipe_raw keeps the instance busy.
        self.readers.clear();
        Self::remove_path(&self.path)
    }

    fn remove_path(path: &Path) -> Result<()> {
        let _ = write(&path.join("tracing_on"), "0");
        for ev in EVENTS {
            let _ = write(&path.join("events/block").join(ev).join("enable"), "0");
        }
        fs::remove_dir(path)
            .with_context(|| format!("cannot remove tracefs instance {}", path.display()))
    }
}

/// Stops and removes an instance by path.
pub fn remove_instance(path: &Path) -> Result<()> {
    Instance::remove_path(path)
}

fn cpu_count(instance: &Path) -> Result<usize> {
    let n = fs::read_dir(instance.join("per_cpu"))
        .context("reading per_cpu")?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("cpu"))
        .count();
    if n == 0 {
        bail!("tracefs instance has no per-CPU buffers");
    }
    Ok(n)
}

/// Reads a tracefs control file. Some of them (header_page) do not support reading in pieces:
/// a small first read followed by a second returns a truncated text, and std's read_to_string
/// starts with a 32-byte probe when the size is unknown. One large read gets it whole.
pub fn read_text(p: &Path) -> Result<String> {
    let mut f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut buf = vec![0u8; 256 << 10];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(anyhow!(e).context(format!("reading {}", p.display()))),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).with_context(|| format!("{} is not text", p.display()))
}

fn write(p: &Path, v: &str) -> Result<()> {
    fs::write(p, v).with_context(|| format!("writing {v:?} to {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIO_QUEUE_618: &str = "name: block_bio_queue\nID: 2097\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;\n\tfield:char rwbs[10];\toffset:28;\tsize:10;\tsigned:0;\n\tfield:char comm[16];\toffset:38;\tsize:16;\tsigned:0;\n";
    const HEADER_PAGE: &str = "\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n\tfield: local_t commit;\toffset:8;\tsize:8;\tsigned:1;\n\tfield: int overwrite;\toffset:8;\tsize:1;\tsigned:1;\n\tfield: char data;\toffset:16;\tsize:4080;\tsigned:0;\n";

    fn record(id: u16, dev: u32, sector: u64, nr: u32, rwbs: &str) -> Vec<u8> {
        let mut r = vec![0u8; 54];
        r[0..2].copy_from_slice(&id.to_le_bytes());
        r[8..12].copy_from_slice(&dev.to_le_bytes());
        r[16..24].copy_from_slice(&sector.to_le_bytes());
        r[24..28].copy_from_slice(&nr.to_le_bytes());
        r[28..28 + rwbs.len()].copy_from_slice(rwbs.as_bytes());
        r
    }

    /// Builds a page the way the kernel does: small records with type_len, others with a length word.
    fn page(records: &[Vec<u8>], missed: bool, long_form: bool) -> Vec<u8> {
        let mut data = Vec::new();
        // a time-extend event first, as the kernel emits after a gap
        data.extend_from_slice(&(30u32 | (5 << 5)).to_le_bytes());
        data.extend_from_slice(&0u32.to_le_bytes());
        for r in records {
            let padded = r.len().next_multiple_of(4);
            if long_form {
                data.extend_from_slice(&(1u32 << 5).to_le_bytes());
                data.extend_from_slice(&((padded + 4) as u32).to_le_bytes());
            } else {
                data.extend_from_slice(&(((padded / 4) as u32) | (1 << 5)).to_le_bytes());
            }
            data.extend_from_slice(r);
            data.resize(data.len() + padded - r.len(), 0);
        }
        let mut p = vec![0u8; 4096];
        let commit = data.len() as u64 | if missed { RB_MISSED_EVENTS } else { 0 };
        p[8..16].copy_from_slice(&commit.to_le_bytes());
        p[16..16 + data.len()].copy_from_slice(&data);
        p
    }

    #[test]
    fn parses_formats_and_pages_in_both_record_forms() {
        let f = EventFormat::parse(BIO_QUEUE_618).unwrap();
        assert_eq!(f.id, 2097);
        assert_eq!(
            f.field("rwbs").unwrap(),
            Field {
                offset: 28,
                size: 10
            }
        );
        let layout = BlockLayout::from_format(&f).unwrap();
        let pl = PageLayout::parse(HEADER_PAGE).unwrap();
        let recs = vec![
            record(2097, kernel_dev(7, 2), 2088, 8, "WS"),
            record(2097, kernel_dev(7, 2), 100, 8, "R"),
            record(2097, kernel_dev(7, 2), 4096, 2048, "N"),
            record(2097, kernel_dev(7, 2), 9000, 16, "FWS"),
            record(2097, kernel_dev(7, 2), 9000, 0, "FF"),
            record(2097, kernel_dev(7, 2), 70000, 64, "DE"),
            record(1234, kernel_dev(7, 2), 1, 1, "W"),
        ];
        for long in [false, true] {
            let mut out = Vec::new();
            let info = parse_page(&page(&recs, long, long), &pl, &[layout], &mut out).unwrap();
            assert_eq!(info.missed, long);
            let got: Vec<(u64, u32)> = out.iter().map(|e| (e.sector, e.nr_sector)).collect();
            assert_eq!(got, vec![(2088, 8), (4096, 2048), (9000, 16), (70000, 64)]);
            assert!(out.iter().all(|e| e.dev == (7 << 20 | 2)));
        }
    }

    #[test]
    fn garbage_pages_are_errors_not_panics() {
        let pl = PageLayout::parse(HEADER_PAGE).unwrap();
        let layout = BlockLayout::from_format(&EventFormat::parse(BIO_QUEUE_618).unwrap()).unwrap();
        let mut p = vec![0xffu8; 4096];
        p[8..16].copy_from_slice(&100u64.to_le_bytes());
        let mut out = Vec::new();
        let _ = parse_page(&p, &pl, &[layout], &mut out);
        assert!(parse_page(&p[..10], &pl, &[layout], &mut out).is_err());
    }

    #[test]
    fn a_truncated_record_of_ours_is_an_error_not_a_skipped_write() {
        let pl = PageLayout::parse(HEADER_PAGE).unwrap();
        let layout = BlockLayout::from_format(&EventFormat::parse(BIO_QUEUE_618).unwrap()).unwrap();
        let mut short = record(2097, kernel_dev(7, 2), 2088, 8, "WS");
        short.truncate(20);
        let mut out = Vec::new();
        let e = parse_page(&page(&[short], false, false), &pl, &[layout], &mut out).unwrap_err();
        assert!(
            format!("{e:#}").contains("shorter than its format"),
            "{e:#}"
        );
        // Another event's short record is not ours to judge.
        let mut other = record(1234, kernel_dev(7, 2), 1, 1, "W");
        other.truncate(8);
        assert!(parse_page(&page(&[other], false, false), &pl, &[layout], &mut out).is_ok());
    }

    #[test]
    fn rwbs_classification() {
        for w in ["W", "WS", "WFS", "FWS", "N", "D", "DE", "WM", "ZW"] {
            assert!(rwbs_changes_data(w.as_bytes()), "{w}");
        }
        for r in ["R", "RA", "RM", "RS", "", "F"] {
            assert!(!rwbs_changes_data(r.as_bytes()), "{r}");
        }
    }
}
