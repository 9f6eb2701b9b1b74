//! Not read yet: never detected.

use super::{Disk, Doubt, FsMap};

pub(super) fn detect(_d: &Disk) -> bool {
    false
}

pub(super) fn read(_d: &Disk) -> Result<FsMap, Doubt> {
    super::doubt("", "not supported yet")
}
