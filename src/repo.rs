//! The repository: directories, the lock, writing an image crash-safely, and reading images back
//! with every byte checked (docs/format.md, "Repository").

use crate::format::frame::image_tag;
use crate::format::{
    self, parse_hash_hex, segment_file_name, FormatError, FrameHeader, ImageKind, IndexFile,
    IndexWriter, Manifest, SegmentHeader, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use anyhow::{anyhow, bail, Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const MARKER: &str = "cairn-repository";

pub struct Repository {
    pub root: PathBuf,
}

/// The writer lock: one writer at a time (backup, prune, delete, protect, upgrade).
const WRITER_LOCK: &str = "lock";
/// The removal lock: readers hold it shared, prune and delete exclusive.
const REMOVAL_LOCK: &str = "lock.remove";

/// Holds the repository's writer lock (and for a prune or delete the removal lock) until dropped.
pub struct RepoLock {
    _file: File,
    _removal: Option<File>,
}

/// Holds the repository's removal lock in shared mode until dropped: a reader (restore, verify,
/// list, a mount) that needs every image it uses to stay; a prune or delete waits for it.
pub struct SharedRepoLock {
    /// None on read-only media, where no writer can take the lock either.
    _file: Option<File>,
    /// This holder's record under `lock.readers/`, removed when the lock is let go.
    record: Option<PathBuf>,
}

impl Drop for SharedRepoLock {
    fn drop(&mut self) {
        if let Some(p) = self.record.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Where shared-lock holders record themselves.
const READERS: &str = "lock.readers";

/// "PID COMMAND LINE" of this process, for a lock holder's record.
fn holder_line() -> String {
    let cmd = fs::read("/proc/self/cmdline")
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let cmd: String = cmd.chars().take(200).collect();
    format!("{} {cmd}", std::process::id())
}

/// Opens (creating) a lock file for a shared or exclusive flock (read-only is enough); None on
/// read-only media, where it cannot be created.
fn open_lock_file(path: &Path) -> Result<Option<File>> {
    // Read-only is enough for flock, and lets a repository on read-only media be read.
    match File::open(path) {
        Ok(f) => return Ok(Some(f)),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot open lock file {}", path.display()))
        }
        Err(_) => {}
    }
    match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot create lock file {}", path.display())),
    }
}

/// flock(2) with `op`, retrying until `deadline`; past it, the error `refused` makes.
fn flock_until(
    file: &File,
    op: libc::c_int,
    deadline: std::time::Instant,
    path: &Path,
    refused: impl Fn() -> anyhow::Error,
) -> Result<()> {
    loop {
        // SAFETY: flock takes an open descriptor and an operation constant; no memory is
        // involved.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = nix::errno::Errno::last();
        if e != nix::errno::Errno::EWOULDBLOCK {
            return Err(anyhow!(e).context(format!("cannot lock {}", path.display())));
        }
        if std::time::Instant::now() >= deadline {
            return Err(refused());
        }
        // Polling: flock(2) has no timeout, and a blocking flock in a thread could not be
        // abandoned. A tenth of a second is invisible next to what a holder does.
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// "repository R is HOW H1, H2; wait for it to finish and retry …".
fn refusal(
    root: &Path,
    how: &str,
    holders: &[String],
    waited: std::time::Duration,
) -> anyhow::Error {
    let waited_note = if waited.is_zero() {
        String::new()
    } else {
        format!(" (waited {})", humantime::format_duration(waited))
    };
    anyhow!(
        "repository {} is {how} {}{waited_note}; wait for it to finish and retry{}",
        root.display(),
        holders.join(", "),
        if waited.is_zero() && how == "in use by" {
            " (or give --wait DURATION)"
        } else {
            ""
        }
    )
}

fn process_alive(pid: i32) -> bool {
    pid > 0 && Path::new(&format!("/proc/{pid}")).exists()
}

impl Repository {
    /// Opens an existing repository for reading.
    pub fn open(root: &Path) -> Result<Repository> {
        if !root.join(MARKER).is_file() {
            if !root.exists() {
                bail!("repository {} does not exist", root.display());
            }
            bail!(
                "{} is not a cairn repository (no {MARKER} file)",
                root.display()
            );
        }
        Ok(Repository {
            root: root.to_path_buf(),
        })
    }

    /// Opens a repository for writing, creating it when the directory is absent or empty. A
    /// non-empty directory without the marker is refused: it is somebody else's data.
    pub fn open_or_create(root: &Path) -> Result<Repository> {
        if root.join(MARKER).is_file() {
            return Ok(Repository {
                root: root.to_path_buf(),
            });
        }
        // Before anything is created: a failure must not leave a half-made repository behind.
        let id = random_hex(16).context("cannot make an id for the new repository")?;
        if root.exists() {
            let mut rd =
                fs::read_dir(root).with_context(|| format!("cannot read {}", root.display()))?;
            if rd.next().is_some() {
                bail!(
                    "{} is not empty and is not a cairn repository; choose an empty or new directory",
                    root.display()
                );
            }
        } else {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .with_context(|| {
                    format!("cannot create repository directory {}", root.display())
                })?;
        }
        for d in ["images", "tmp"] {
            mkdir_private(&root.join(d))?;
        }
        mkdir_private(&root.join("segments"))?;
        let marker = serde_json::json!({"format": "cairn-repository", "version": format::FORMAT_VERSION, "id": id});
        write_file_synced(&root.join(MARKER), format!("{marker}\n").as_bytes())?;
        sync_dir(root)?;
        Ok(Repository {
            root: root.to_path_buf(),
        })
    }

    /// A stable identity for the repository, wherever it is mounted: the random id in its marker
    /// (the canonical path for a marker without one).
    pub fn identity(&self) -> String {
        std::fs::read(self.root.join(MARKER))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string))
            .filter(|id| id.len() <= 64 && id.bytes().all(|c| c.is_ascii_hexdigit()))
            .unwrap_or_else(|| {
                fs::canonicalize(&self.root)
                    .unwrap_or_else(|_| self.root.clone())
                    .display()
                    .to_string()
            })
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// The shared segments: segments still referenced after the image that wrote them was removed
    /// (docs/format.md, "Shared segments").
    pub fn pool_dir(&self) -> PathBuf {
        self.root.join("segments")
    }

    /// The format version the repository's marker records (1 when it records none).
    pub fn marker_version(&self) -> Result<u64> {
        let path = self.root.join(MARKER);
        let v: serde_json::Value = serde_json::from_slice(
            &read_bounded(&path, 4096)
                .with_context(|| format!("cannot read {}", path.display()))?,
        )
        .with_context(|| format!("{} is not JSON", path.display()))?;
        Ok(v.get("version").and_then(|v| v.as_u64()).unwrap_or(1))
    }

    /// Makes a format-1 repository a format-2 one (docs/format.md, "Upgrading"): the shared
    /// segment directory, then the marker's version, replaced atomically. No image is touched:
    /// version-1 images stay as they are and readable. Returns whether anything changed.
    pub fn upgrade(&self, _lock: &RepoLock) -> Result<bool> {
        let version = self.marker_version()?;
        if version > u64::from(format::FORMAT_VERSION) {
            bail!(
                "repository {} is format version {version}; this cairn writes version {}: use a newer cairn",
                self.root.display(),
                format::FORMAT_VERSION
            );
        }
        mkdir_private(&self.pool_dir())?;
        if version == u64::from(format::FORMAT_VERSION) {
            return Ok(false);
        }
        let path = self.root.join(MARKER);
        let mut v: serde_json::Value = serde_json::from_slice(&read_bounded(&path, 4096)?)?;
        v["version"] = serde_json::json!(format::FORMAT_VERSION);
        let new = self.root.join(format!("{MARKER}.new"));
        let _ = fs::remove_file(&new);
        write_file_synced(&new, format!("{v}\n").as_bytes())?;
        fs::rename(&new, &path).with_context(|| format!("cannot replace {}", path.display()))?;
        sync_dir(&self.root)?;
        tracing::info!(
            "upgraded repository {} to format version {}",
            self.root.display(),
            format::FORMAT_VERSION
        );
        Ok(true)
    }

    /// Takes the writer lock, refusing (not waiting) when another cairn holds it. Writers (backup,
    /// prune, delete, protect, upgrade) exclude each other; readers are not affected, as a
    /// writer that only adds images never touches a file a reader uses (see `lock_for_removal`).
    pub fn lock(&self) -> Result<RepoLock> {
        self.lock_wait(std::time::Duration::ZERO)
    }

    /// Takes the writer lock, waiting up to `wait` for the writer that holds it; the error names
    /// it (pid and command line).
    pub fn lock_wait(&self, wait: std::time::Duration) -> Result<RepoLock> {
        let deadline = std::time::Instant::now() + wait;
        let path = self.root.join(WRITER_LOCK);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open lock file {} for writing", path.display()))?;
        flock_until(&file, libc::LOCK_EX, deadline, &path, || {
            refusal(&self.root, "locked by", &[self.writer_holder(&file)], wait)
        })?;
        file.set_len(0)
            .and_then(|()| file.write_all_at(format!("{}\n", holder_line()).as_bytes(), 0))
            .with_context(|| format!("cannot record this process in {}", path.display()))?;
        Ok(RepoLock {
            _file: file,
            _removal: None,
        })
    }

    /// The writer lock and, with it, the removal lock: for a prune or delete, which remove or
    /// rename files that restores, verifies, lists and mounts may be reading. Waits up to `wait`
    /// for both; the error names whoever holds them (readers record themselves).
    pub fn lock_for_removal(&self, wait: std::time::Duration) -> Result<RepoLock> {
        let deadline = std::time::Instant::now() + wait;
        let mut lock = self.lock_wait(wait)?;
        let path = self.root.join(REMOVAL_LOCK);
        let file = open_lock_file(&path)?.expect("the writer lock was created read-write");
        flock_until(&file, libc::LOCK_EX, deadline, &path, || {
            refusal(&self.root, "in use by", &self.readers(), wait)
        })?;
        lock._removal = Some(file);
        Ok(lock)
    }

    /// The writer the lock file names, if that process still runs.
    fn writer_holder(&self, lock_file: &File) -> String {
        let mut text = String::new();
        let _ = (&*lock_file).read_to_string(&mut text);
        let line = text.lines().next().unwrap_or("").trim();
        let pid = line.split_whitespace().next().and_then(|p| p.parse().ok());
        match pid {
            Some(pid) if process_alive(pid) => format!("pid {line}"),
            _ => "another cairn process".to_string(),
        }
    }

    /// The readers holding the removal lock that recorded themselves (live pids only).
    fn readers(&self) -> Vec<String> {
        let holders: Vec<String> = fs::read_dir(self.root.join(READERS))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let text = fs::read_to_string(e.path()).ok()?;
                let line = text.lines().next()?.trim().to_string();
                let pid: i32 = line.split_whitespace().next()?.parse().ok()?;
                process_alive(pid).then(|| format!("pid {line} (reading)"))
            })
            .collect();
        if holders.is_empty() {
            vec!["another cairn process (reading)".to_string()]
        } else {
            holders
        }
    }

    /// Takes the removal lock in shared mode, for a reader (restore, verify, list, mount) that
    /// needs every image it uses to stay: refused (not waiting) while a prune or delete holds it;
    /// a backup running meanwhile is fine. Each reader records itself (pid and command line)
    /// under `lock.readers/` so that a prune that has to wait can say for whom.
    pub fn lock_shared(&self) -> Result<SharedRepoLock> {
        let path = self.root.join(REMOVAL_LOCK);
        // On read-only media no writer can take the lock either.
        let Some(file) = open_lock_file(&path)? else {
            return Ok(SharedRepoLock {
                _file: None,
                record: None,
            });
        };
        flock_until(
            &file,
            libc::LOCK_SH,
            std::time::Instant::now(),
            &path,
            || {
                refusal(
                    &self.root,
                    "being pruned by",
                    &[self.writer_holder_at()],
                    std::time::Duration::ZERO,
                )
            },
        )?;
        // Best effort: on a full disk the record is missing, and a waiting prune names only
        // "another cairn process".
        let record = (|| -> Option<PathBuf> {
            static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let dir = self.root.join(READERS);
            mkdir_private(&dir).ok()?;
            let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = dir.join(format!("{}.{n}", std::process::id()));
            fs::write(&p, format!("{}\n", holder_line())).ok()?;
            Some(p)
        })();
        Ok(SharedRepoLock {
            _file: Some(file),
            record,
        })
    }

    /// The writer named in the writer lock file (a prune holding the removal lock holds it too).
    fn writer_holder_at(&self) -> String {
        match File::open(self.root.join(WRITER_LOCK)) {
            Ok(f) => self.writer_holder(&f),
            Err(_) => "another cairn process".to_string(),
        }
    }

    /// Removes what interrupted backups left in tmp/. Call with the lock held.
    pub fn remove_leftovers(&self, _lock: &RepoLock) -> Result<usize> {
        let tmp = self.tmp_dir();
        mkdir_private(&tmp)?;
        let mut n = 0;
        for e in fs::read_dir(&tmp)?.flatten() {
            let p = e.path();
            let r = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.with_context(|| format!("cannot remove leftover {}", p.display()))?;
            n += 1;
        }
        if n > 0 {
            tracing::info!(
                "removed {n} leftover(s) of interrupted backups from {}",
                tmp.display()
            );
            sync_dir(&tmp)?;
        }
        Ok(n)
    }

    /// A fresh image id from the creation time, made unique within the repository.
    pub fn new_image_id(&self, created_unix: u64, _lock: &RepoLock) -> String {
        let t = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(created_unix),
        )
        .to_string();
        let base: String = t.chars().filter(|c| *c != '-' && *c != ':').collect();
        // An id whose segments still lie in the shared directory is taken too: a new image of
        // that id would shadow them (docs/format.md, "Shared segments").
        let pooled: std::collections::HashSet<String> = fs::read_dir(self.pool_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.rsplit_once('.').map(|(origin, _)| origin.to_string())
            })
            .collect();
        let taken = |id: &str| {
            self.images_dir().join(id).exists()
                || self.tmp_dir().join(id).exists()
                || pooled.contains(id)
        };
        if !taken(&base) {
            return base;
        }
        (2..)
            .map(|n| format!("{base}-{n}"))
            .find(|id| !taken(id))
            .expect("unbounded")
    }

    /// Every image directory's id, sorted by id for stable output. Ids are not the repository's
    /// order (a clock can be wrong): `catalogue` gives that.
    pub fn image_dir_ids(&self) -> Result<Vec<String>> {
        let dir = self.images_dir();
        let mut ids = Vec::new();
        for e in fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if format::valid_image_id(&name) && e.path().is_dir() {
                ids.push(name);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Every image in the repository's order, and the images whose manifest cannot be read.
    pub fn catalogue(&self) -> Result<Catalogue> {
        let mut images = Vec::new();
        let mut unreadable = Vec::new();
        for id in self.image_dir_ids()? {
            match self.load_manifest(&id) {
                Ok((m, _)) => images.push(Listed {
                    id,
                    name: m.name,
                    kind: m.kind,
                    sequence: m.sequence,
                }),
                Err(e) => unreadable.push((id, format!("{e:#}"))),
            }
        }
        images.sort_by(|a, b| image_order(a.sequence, &a.id).cmp(&image_order(b.sequence, &b.id)));
        Ok(Catalogue {
            images,
            unreadable,
            counter: self.read_sequence_counter(),
        })
    }

    fn sequence_path(&self) -> PathBuf {
        self.root.join("sequence")
    }

    /// The counter file's value; None when it is absent or unreadable.
    fn read_sequence_counter(&self) -> Option<u64> {
        let text = fs::read_to_string(self.sequence_path()).ok()?;
        let t = text.strip_suffix('\n')?;
        if t.is_empty() || t.len() > 20 || !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    }

    /// Takes the next sequence number for an image about to be published: one more than both the
    /// counter file and every readable manifest, so a damaged manifest's number (still counted by
    /// the counter) and a lost counter (every manifest still counts) are never reused. The counter
    /// is on disk before this returns, so it is on disk before the image is.
    pub fn reserve_sequence(&self, catalogue: &Catalogue, _lock: &RepoLock) -> Result<u64> {
        if catalogue.counter.is_none() && self.sequence_path().exists() {
            tracing::warn!(
                "{} is damaged; numbering images after the readable manifests",
                self.sequence_path().display()
            );
        }
        let next = catalogue
            .counter
            .into_iter()
            .chain(catalogue.images.iter().filter_map(|i| i.sequence))
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .context("the repository's sequence counter is exhausted")?;
        let tmp = self.root.join("sequence.new");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(format!("{next}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, self.sequence_path())
            .with_context(|| format!("cannot replace {}", self.sequence_path().display()))?;
        sync_dir(&self.root)?;
        Ok(next)
    }

    /// Picks the image a command works on: `--image`, else the newest of `--name`, else the newest
    /// of the only name in the repository. Never an older image in place of a newest one that
    /// cannot be read: an unreadable manifest that could be the newest is an error naming it.
    pub fn select_image(&self, name: Option<&str>, image: Option<&str>) -> Result<String> {
        if let Some(id) = image {
            let (m, _) = self.load_manifest(id)?;
            if let Some(n) = name {
                if m.name != n {
                    bail!("image {id} belongs to {:?}, not {n:?}", m.name);
                }
            }
            return Ok(id.to_string());
        }
        let cat = self.catalogue()?;
        let newest = match name {
            Some(n) => cat.newest_of(n),
            None => {
                let names: std::collections::BTreeSet<&str> =
                    cat.images.iter().map(|i| i.name.as_str()).collect();
                if names.len() > 1 {
                    bail!(
                        "repository {} holds several names ({}); choose one with --name or --image",
                        self.root.display(),
                        names.into_iter().collect::<Vec<_>>().join(", ")
                    );
                }
                cat.images.last()
            }
        };
        if let Some(why) = cat.doubt_newest(newest) {
            let what = match name {
                Some(n) => format!("the newest image of {n:?}"),
                None => "the newest image".to_string(),
            };
            bail!(
                "{why}: it may be {what}, so no older image is chosen in its place; \
                 restore an image explicitly with --image ID (`cairn list` shows them) \
                 and check the repository with `cairn verify`"
            );
        }
        match (newest, name) {
            (Some(img), _) => Ok(img.id.clone()),
            (None, Some(n)) => bail!("no image named {n:?} in {}", self.root.display()),
            (None, None) => bail!("repository {} holds no images", self.root.display()),
        }
    }

    /// Loads an image's manifest (checked) without its index.
    pub fn load_manifest(&self, id: &str) -> Result<(Manifest, format::Hash)> {
        self.load_manifest_rewritten(id).map(|(m, _, h)| (m, h))
    }

    /// Loads an image's manifest with the keys prune writes into a rewritten image.
    pub fn load_manifest_rewritten(
        &self,
        id: &str,
    ) -> Result<(Manifest, format::manifest::Rewrite, format::Hash)> {
        if !format::valid_image_id(id) {
            bail!("{id:?} is not a valid image id");
        }
        let path = self.images_dir().join(id).join("manifest");
        let bytes = read_bounded(&path, format::manifest::MAX_MANIFEST_LEN)
            .with_context(|| format!("image {id}: cannot read manifest"))?;
        let (m, r, h) =
            Manifest::decode_rewritten(&bytes).map_err(|e| image_error(id, "manifest", None, e))?;
        if m.id != id {
            bail!(
                "image {id}: manifest belongs to image {:?} (moved or copied by hand?)",
                m.id
            );
        }
        Ok((m, r, h))
    }

    /// Loads an image with its index, checking the whole index against the manifest (read front
    /// to back in bounded memory; entries are read again on demand).
    pub fn load_image(&self, id: &str) -> Result<Image> {
        let (manifest, rewrite, manifest_hash) = self.load_manifest_rewritten(id)?;
        let dir = self.images_dir().join(id);
        let ipath = dir.join(format::index_file_name(rewrite.generation));
        let len = fs::metadata(&ipath)
            .with_context(|| format!("image {id}: cannot read index"))?
            .len();
        if len != manifest.index.size {
            bail!(
                "image {id}: index is {len} bytes, the manifest says {} (truncated or replaced)",
                manifest.index.size
            );
        }
        let (index, hash) = IndexFile::open(&ipath, &manifest.geometry())
            .map_err(|e| image_error(id, "index", None, e))?;
        if parse_hash_hex(&manifest.index.blake3) != Some(hash) {
            bail!("image {id}: index checksum does not match the manifest (the index is damaged)");
        }
        if index.len() != manifest.index.entries {
            bail!(
                "image {id}: index holds {} entries, the manifest says {}",
                index.len(),
                manifest.index.entries
            );
        }
        Ok(Image {
            dir,
            pool: self.pool_dir(),
            manifest,
            rewrite,
            manifest_hash,
            index,
        })
    }

    pub fn begin_image(&self, id: &str, segment_size: u64, lock: &RepoLock) -> Result<ImageWriter> {
        // The first write into a format-1 repository upgrades it (its images stay as they are).
        self.upgrade(lock)?;
        let dir = self.tmp_dir().join(id);
        mkdir_private(&dir)?;
        let ipath = dir.join("index");
        let index = IndexWriter::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&ipath)
                .with_context(|| format!("cannot create {}", ipath.display()))?,
        )
        .map_err(|e| write_error(e, &dir, "index"))?;
        Ok(ImageWriter {
            index: Some(index),
            repo_images: self.images_dir(),
            repo_tmp: self.tmp_dir(),
            dir,
            id: id.to_string(),
            tag: image_tag(id),
            segment_size,
            current: None,
            finished: Vec::new(),
            committed: false,
        })
    }
}

/// A readable image's place in the repository.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: String,
    pub name: String,
    pub kind: ImageKind,
    pub sequence: Option<u64>,
}

/// The repository's images in order, oldest first (docs/format.md, "Image order").
pub struct Catalogue {
    pub images: Vec<Listed>,
    /// Image directories whose manifest cannot be read, with the error (which names the image):
    /// their name and place in the order are unknown.
    pub unreadable: Vec<(String, String)>,
    /// The sequence counter file's value; None when absent or unreadable.
    pub counter: Option<u64>,
}

impl Catalogue {
    /// Readable images of `name`, oldest first.
    pub fn of_name<'a>(&'a self, name: &'a str) -> impl DoubleEndedIterator<Item = &'a Listed> {
        self.images.iter().filter(move |i| i.name == name)
    }

    pub fn newest_of(&self, name: &str) -> Option<&Listed> {
        self.images.iter().rfind(|i| i.name == name)
    }

    /// Whether an unreadable image could come after `img` (or exist where no readable image
    /// does), as words naming the unreadable images; None when none can. Only the counter
    /// bounds an unreadable image's sequence: `img` is provably last when it holds the counter's
    /// value and no readable image is numbered past the counter.
    pub fn doubt_newest(&self, img: Option<&Listed>) -> Option<String> {
        if self.unreadable.is_empty() {
            return None;
        }
        let highest = self.images.iter().filter_map(|i| i.sequence).max();
        let provably_last = match (img.and_then(|i| i.sequence), self.counter) {
            (Some(s), Some(c)) => s == c && highest <= Some(c),
            _ => false,
        };
        if provably_last {
            return None;
        }
        let listed: Vec<String> = self
            .unreadable
            .iter()
            .take(5)
            .map(|(_, why)| why.clone())
            .collect();
        let more = self.unreadable.len().saturating_sub(5);
        Some(if more > 0 {
            format!("{} and {more} more", listed.join("; "))
        } else {
            listed.join("; ")
        })
    }
}

/// The repository's order: sequenced images by sequence, after every unsequenced one (written
/// before sequences existed), which keep the order of their ids. The id breaks ties only.
pub fn image_order(sequence: Option<u64>, id: &str) -> (Option<u64>, (&str, u64)) {
    (sequence, id_order(id))
}

/// Order of ids: the text, then the numeric `-N` suffix given to ids made within the same second
/// (so `-10` sorts after `-9`).
fn id_order(id: &str) -> (&str, u64) {
    match id.rsplit_once('-') {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => {
            (base, n.parse().unwrap_or(u64::MAX))
        }
        _ => (id, 0),
    }
}

/// `n` random bytes as hex, from the kernel's generator: cairn's only source of randomness (the
/// repository id and the tracker's lineage ids). A failure is an error, never zeros, since two
/// all-zero ids would collide and make one repository's or lineage's tracking data another's.
pub fn random_hex(n: usize) -> Result<String> {
    let mut b = vec![0u8; n];
    fill_random(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Fills `buf` from getrandom(2) with no flags: it waits until the kernel's generator is seeded
/// and never returns weak bytes. The syscall is called directly, not through the getrandom crate:
/// in a statically linked build (the rescue system) the crate cannot find the libc symbol, falls
/// back to polling /dev/random for readiness, and on a machine without a hardware entropy source
/// (a VM without virtio-rng, seen under qemu TCG) that poll never returns, while a blocking
/// getrandom(2) makes the kernel gather jitter entropy itself (Linux 5.4+) and returns in about a
/// second.
fn fill_random(buf: &mut [u8]) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, which is valid for writes of that many
        // bytes; getrandom writes at most that many and keeps no reference after returning.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            bail!("the kernel's random number generator failed: {e}");
        }
        filled += n as usize;
    }
    Ok(())
}

pub fn image_error(id: &str, file: &str, offset: Option<u64>, e: FormatError) -> anyhow::Error {
    match offset {
        Some(o) => anyhow!("image {id}, {file}, offset {o}: {e}"),
        None => anyhow!("image {id}, {file}: {e}"),
    }
}

fn mkdir_private(p: &Path) -> Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(anyhow!(e).context(format!("cannot create {}", p.display()))),
    }
}

fn create_private(p: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
        .with_context(|| format!("cannot create {}", p.display()))
}

fn write_file_synced(p: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = create_private(p)?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", p.display()))?;
    f.sync_all()
        .with_context(|| format!("fsync {}", p.display()))?;
    Ok(())
}

pub fn sync_dir(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync directory {}", p.display()))
}

/// Reads a whole file, refusing one larger than `max` before allocating for it.
fn read_bounded(p: &Path, max: u64) -> Result<Vec<u8>> {
    let f = File::open(p).with_context(|| format!("{}", p.display()))?;
    let len = f.metadata()?.len();
    if len > max {
        bail!(
            "{} is {len} bytes, more than the {max} expected",
            p.display()
        );
    }
    let mut v = Vec::with_capacity(len as usize);
    f.take(max).read_to_end(&mut v)?;
    Ok(v)
}

/// Writes one image under tmp/ and moves it into images/ only when every byte is on disk.
pub struct ImageWriter {
    repo_images: PathBuf,
    repo_tmp: PathBuf,
    dir: PathBuf,
    id: String,
    tag: [u8; 12],
    segment_size: u64,
    current: Option<OpenSegment>,
    finished: Vec<format::manifest::SegmentRef>,
    /// Written as the backup runs; None once finished.
    index: Option<IndexWriter>,
    committed: bool,
}

struct OpenSegment {
    number: u32,
    file: File,
    len: u64,
    hasher: blake3::Hasher,
    /// Bytes handed to writeback so far; starting writeback early keeps dirty memory low and
    /// makes the final fsync short.
    flushed: u64,
}

/// Start writeback every this many bytes.
const WRITEBACK_CHUNK: u64 = 32 << 20;

impl ImageWriter {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Appends one frame, returning (segment number, offset of the frame header).
    pub fn append(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<(u32, u64)> {
        let need = (FRAME_HEADER_LEN + payload.len()) as u64;
        let roll = match &self.current {
            None => true,
            Some(s) => s.len + need > self.segment_size && s.len > SEGMENT_HEADER_LEN as u64,
        };
        if roll {
            self.close_segment()?;
            let number = self.finished.len() as u32;
            let path = self.dir.join(segment_file_name(number));
            let mut file = create_private(&path)?;
            let h = SegmentHeader {
                number,
                image_tag: self.tag,
            }
            .encode();
            file.write_all(&h)
                .with_context(|| format!("writing {}", path.display()))?;
            let mut hasher = blake3::Hasher::new();
            hasher.update(&h);
            self.current = Some(OpenSegment {
                number,
                file,
                len: h.len() as u64,
                hasher,
                flushed: 0,
            });
        }
        let seg = self.current.as_mut().expect("segment open");
        let at = seg.len;
        let hb = header.encode();
        seg.file
            .write_all(&hb)
            .and_then(|()| seg.file.write_all(payload))
            .map_err(|e| write_error(e, &self.dir, &segment_file_name(seg.number)))?;
        seg.hasher.update(&hb);
        seg.hasher.update(payload);
        seg.len += need;
        if seg.len - seg.flushed >= WRITEBACK_CHUNK {
            start_writeback(&seg.file, seg.flushed, seg.len - seg.flushed);
            seg.flushed = seg.len;
        }
        Ok((seg.number, at))
    }

    fn close_segment(&mut self) -> Result<()> {
        if let Some(seg) = self.current.take() {
            seg.file
                .sync_all()
                .with_context(|| format!("fsync {}", segment_file_name(seg.number)))?;
            self.finished.push(format::manifest::SegmentRef {
                number: seg.number,
                size: seg.len,
                blake3: seg.hasher.finalize().to_hex().to_string(),
                origin: None,
            });
        }
        Ok(())
    }

    /// Closes the last segment and returns the segment list for the manifest.
    pub fn finish_segments(&mut self) -> Result<Vec<format::manifest::SegmentRef>> {
        self.close_segment()?;
        Ok(self.finished.clone())
    }

    /// Writes one more file of the image (synced), before `commit` publishes it.
    pub fn add_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_file_synced(&self.dir.join(name), bytes)
    }

    /// Appends one index entry (entries come in ascending order).
    pub fn push_entry(&mut self, e: &format::Entry) -> Result<()> {
        let dir = &self.dir;
        self.index
            .as_mut()
            .ok_or_else(|| anyhow!("the index of image {} is already finished", self.id))?
            .push(e)
            .map_err(|err| write_error(err, dir, "index"))
    }

    /// Completes and fsyncs the index; returns what the manifest records about it.
    pub fn finish_index(&mut self) -> Result<format::IndexSummary> {
        let w = self
            .index
            .take()
            .ok_or_else(|| anyhow!("the index of image {} is already finished", self.id))?;
        let (file, summary) = w.finish().map_err(|e| write_error(e, &self.dir, "index"))?;
        file.sync_all().context("fsync index")?;
        Ok(summary)
    }

    /// Writes the manifest, then atomically publishes the image (the index is finished first).
    pub fn commit(mut self, manifest_bytes: &[u8]) -> Result<PathBuf> {
        self.close_segment()?;
        if self.index.is_some() {
            bail!("image {}: commit before its index was finished", self.id);
        }
        write_file_synced(&self.dir.join("manifest"), manifest_bytes)?;
        sync_dir(&self.dir)?;
        let dest = self.repo_images.join(&self.id);
        fs::rename(&self.dir, &dest)
            .with_context(|| format!("cannot publish image {}", self.id))?;
        sync_dir(&self.repo_images)?;
        sync_dir(&self.repo_tmp)?;
        self.committed = true;
        Ok(dest)
    }
}

impl Drop for ImageWriter {
    /// A failed backup removes its partial image at once (best effort); anything a crash leaves is
    /// removed by the next backup.
    fn drop(&mut self) {
        if !self.committed {
            self.current = None;
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A full destination is the common failure here: say so in words a sysadmin acts on.
fn write_error(e: std::io::Error, dir: &Path, file: &str) -> anyhow::Error {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        let free = nix::sys::statvfs::statvfs(dir)
            .map(|v| format!(" ({} bytes free)", v.blocks_available() * v.fragment_size()))
            .unwrap_or_default();
        anyhow!("the repository's filesystem is full{free} while writing {file}: free space or use another destination")
    } else {
        anyhow!(e).context(format!("writing {file}"))
    }
}

fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: sync_file_range only reads its integer arguments; a failure just means writeback
    // starts later, at fsync.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// A complete image: checked manifest and index.
pub struct Image {
    pub dir: PathBuf,
    /// The repository's shared segment directory.
    pub pool: PathBuf,
    pub manifest: Manifest,
    /// The keys of a rewritten image (all absent for an image as its backup wrote it).
    pub rewrite: format::manifest::Rewrite,
    pub manifest_hash: format::Hash,
    pub index: IndexFile,
}

impl Image {
    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    /// Whether `hash` (a child's record of its parent) names this restore point: its manifest's
    /// hash, or one it was published under before a prune rewrote it.
    pub fn answers_to(&self, hash: &str) -> bool {
        format::hash_hex(&self.manifest_hash) == hash
            || self.rewrite.former_manifests.iter().any(|h| h == hash)
    }

    /// The file name of this image's unreadable-range list.
    pub fn bad_ranges_file_name(&self) -> String {
        format::bad_ranges_file_name(self.rewrite.generation)
    }

    /// Where segment `number` of this image's list is, and what its header must say.
    pub fn segment(&self, number: u32) -> Result<SegmentPlace> {
        let seg = self.manifest.segments.get(number as usize).ok_or_else(|| {
            anyhow!(
                "image {}: segment {number} is not in its manifest",
                self.id()
            )
        })?;
        Ok(segment_place(&self.dir, &self.pool, self.id(), seg))
    }

    /// Checks that every segment file exists with the size the manifest records (cheap; run before
    /// anything is written to a target).
    pub fn check_segments_present(&self) -> Result<()> {
        check_files_present(&self.dir, &self.manifest, None)
    }
}

/// A segment's file and identity (docs/format.md, "Shared segments").
#[derive(Debug, Clone)]
pub struct SegmentPlace {
    pub path: PathBuf,
    /// The image that wrote it and its number there (what its header says).
    pub origin: format::manifest::SegmentOrigin,
    pub size: u64,
    pub blake3: String,
}

impl SegmentPlace {
    /// A name for messages: the file under its directory.
    pub fn name(&self) -> String {
        let dir = self
            .path
            .parent()
            .and_then(|p| p.file_name())
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = self
            .path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{dir}/{file}")
    }
}

/// Where a manifest's segment reference points: the writer's image directory while that image
/// exists, else the shared directory (a prune moves a still-referenced segment there with
/// rename(2) before it removes the image that wrote it, so the file is always in exactly one of
/// the two places).
pub fn segment_place(
    image_dir: &Path,
    pool: &Path,
    image_id: &str,
    seg: &format::manifest::SegmentRef,
) -> SegmentPlace {
    let origin = seg
        .origin
        .clone()
        .unwrap_or_else(|| format::manifest::SegmentOrigin {
            image: image_id.to_string(),
            number: seg.number,
        });
    let images = image_dir.parent().unwrap_or(image_dir);
    let own = images
        .join(&origin.image)
        .join(segment_file_name(origin.number));
    let pooled = pool.join(format::pooled_segment_file_name(
        &origin.image,
        origin.number,
    ));
    // Missing from both places: named where it should be while its writer's image exists.
    let path = if own.exists() || (!pooled.exists() && own.parent().is_some_and(Path::is_dir)) {
        own
    } else {
        pooled
    };
    SegmentPlace {
        path,
        origin,
        size: seg.size,
        blake3: seg.blake3.clone(),
    }
}

/// Checks that an image's files exist with the sizes its manifest records (the index too when
/// `with_index`), without reading them: what `list` can afford for thousands of images.
/// `index_generation`: check the index too, of that generation.
pub fn check_files_present(dir: &Path, m: &Manifest, index_generation: Option<u32>) -> Result<()> {
    let id = &m.id;
    let sized = |path: &Path, name: &str, want: u64| -> Result<()> {
        let len = fs::metadata(path)
            .map_err(|e| anyhow!("image {id}: {name} is missing ({e})"))?
            .len();
        if len != want {
            bail!("image {id}: {name} is {len} bytes, the manifest says {want} (truncated or damaged)");
        }
        Ok(())
    };
    if let Some(generation) = index_generation {
        let name = format::index_file_name(generation);
        sized(&dir.join(&name), &name, m.index.size)?;
    }
    let pool = dir
        .parent()
        .and_then(Path::parent)
        .map(|root| root.join("segments"))
        .unwrap_or_default();
    for s in &m.segments {
        let place = segment_place(dir, &pool, id, s);
        sized(&place.path, &place.name(), s.size)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_are_hex_and_distinct() {
        let a = random_hex(16).unwrap();
        let b = random_hex(16).unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
        assert_ne!(a, "0".repeat(32));
    }

    #[test]
    fn a_new_repository_gets_a_random_id() {
        let dir = tempfile::tempdir().unwrap();
        let (r1, r2) = (dir.path().join("a"), dir.path().join("b"));
        let (a, b) = (
            Repository::open_or_create(&r1).unwrap().identity(),
            Repository::open_or_create(&r2).unwrap().identity(),
        );
        assert_eq!(a.len(), 32, "{a}");
        assert_ne!(a, b);
    }
}
