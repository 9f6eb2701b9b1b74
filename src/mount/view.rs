//! The read-only FUSE tree: directories, and raw files that are byte ranges of the restore point.
//!
//! The tree is fixed when the view is mounted (it is an old disk's state: nothing in it changes),
//! so the kernel may cache names, attributes and pages for as long as it likes. Every operation
//! that would change something fails with EROFS.

use super::source::BlockSource;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr, Request,
};
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Names and attributes never change, so the kernel keeps them (a year): a revalidation after
/// the server died would fail and make the mounts below unreachable by path.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Clone)]
pub enum NodeKind {
    Dir,
    /// Bytes `[start, start + size)` of the restore point.
    Raw {
        start: u64,
        size: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Node {
    pub parent: u64,
    pub name: String,
    pub kind: NodeKind,
}

/// Inode `n` is `nodes[n - 1]`; inode 1 is the root.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    pub fn new() -> Tree {
        Tree {
            nodes: vec![Node {
                parent: 1,
                name: String::new(),
                kind: NodeKind::Dir,
            }],
        }
    }

    pub const ROOT: u64 = 1;

    /// Adds a node under `parent`; returns its inode.
    pub fn add(&mut self, parent: u64, name: &str, kind: NodeKind) -> u64 {
        self.nodes.push(Node {
            parent,
            name: name.to_string(),
            kind,
        });
        self.nodes.len() as u64
    }

    fn get(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    fn children(&self, ino: u64) -> impl Iterator<Item = (u64, &Node)> {
        self.nodes
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, n)| (i as u64 + 1, n))
            .filter(move |(_, n)| n.parent == ino)
    }
}

pub struct View {
    tree: Tree,
    source: Arc<BlockSource>,
    /// The restore point's time, for every node.
    time: SystemTime,
    uid: u32,
    gid: u32,
}

impl View {
    pub fn new(tree: Tree, source: Arc<BlockSource>, created_unix: u64) -> View {
        View {
            tree,
            source,
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(created_unix),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        }
    }

    fn attr(&self, ino: u64, node: &Node) -> FileAttr {
        let (kind, perm, size, nlink) = match node.kind {
            NodeKind::Dir => (FileType::Directory, 0o555, 0, 2),
            NodeKind::Raw { size, .. } => (FileType::RegularFile, 0o444, size, 1),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// The path of a node below the view's root, for log lines.
    fn path(&self, ino: u64) -> String {
        let mut parts = Vec::new();
        let mut at = ino;
        while at != Tree::ROOT {
            let Some(n) = self.tree.get(at) else { break };
            parts.push(n.name.as_str());
            at = n.parent;
        }
        parts.reverse();
        parts.join("/")
    }
}

impl Filesystem for View {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large read-ahead: a block is decoded whole anyway. The kernel may lower it.
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self
            .tree
            .children(parent.0)
            .find(|(_, n)| OsStr::new(&n.name) == name)
        {
            Some((ino, n)) => reply.entry(&TTL, &self.attr(ino, n), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.tree.get(ino.0) {
            Some(n) => reply.attr(&TTL, &self.attr(ino.0, n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.tree.get(ino.0).map(|n| &n.kind) {
            None => reply.error(Errno::ENOENT),
            Some(NodeKind::Dir) => reply.error(Errno::EISDIR),
            Some(NodeKind::Raw { .. }) if flags.acc_mode() != OpenAccMode::O_RDONLY => {
                reply.error(Errno::EROFS)
            }
            // The bytes never change: the page cache may outlive an open.
            Some(NodeKind::Raw { .. }) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(NodeKind::Raw { start, size: len }) = self.tree.get(ino.0).map(|n| &n.kind) else {
            reply.error(Errno::EISDIR);
            return;
        };
        let (start, len) = (*start, *len);
        if offset >= len {
            reply.data(&[]);
            return;
        }
        let n = u64::from(size).min(len - offset) as usize;
        match self.source.read_slices(start + offset, n) {
            // Most requests lie inside one block: its cached bytes go out as they are.
            Ok(slices) if slices.len() == 1 => reply.data(slices[0].bytes()),
            Ok(slices) => {
                let mut buf = Vec::with_capacity(n);
                for s in &slices {
                    buf.extend_from_slice(s.bytes());
                }
                reply.data(&buf)
            }
            Err(f) => {
                // The whole request fails: a short read would make the kernel assume the file
                // ends there and fill the rest with zeros. The kernel then reads page by page,
                // so only the pages of the bad block fail.
                let bs = self.source.point().block_size;
                let bad = f.block * bs;
                tracing::error!(
                    "{}: bytes {}..{} unreadable (EIO): restore point bytes {}..{}: {:#}",
                    self.path(ino.0),
                    bad.saturating_sub(start).min(len),
                    (bad + bs).saturating_sub(start).min(len),
                    bad,
                    (bad + bs).min(self.source.size()),
                    f.error
                );
                reply.error(Errno::EIO)
            }
        }
    }

    // Nothing is ever written, so there is nothing to flush or sync.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    // ENOSYS tells the kernel once for all that there are no extended attributes and that
    // permissions are the mode bits (fuser's defaults answer the same, with a warning each).
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(node) = self.tree.get(ino.0) else {
            reply.error(Errno::ENOENT);
            return;
        };
        if !matches!(node.kind, NodeKind::Dir) {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let mut entries: Vec<(u64, FileType, &str)> = vec![
            (ino.0, FileType::Directory, "."),
            (node.parent, FileType::Directory, ".."),
        ];
        for (child, n) in self.tree.children(ino.0) {
            let kind = match n.kind {
                NodeKind::Dir => FileType::Directory,
                NodeKind::Raw { .. } => FileType::RegularFile,
            };
            entries.push((child, kind, n.name.as_str()));
        }
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
