//! The partition table at restore: a table cairn cannot read is a clear warning (the bytes are
//! restored as they are, nothing fitted or checked), and image data that cannot be read where the
//! table lies is an error before anything is written.

mod common;

use common::*;
use std::fs;
use std::path::Path;

const SIZE: u64 = 4 << 20;

/// A disk image whose sector 0 holds a protective MBR while no GPT follows: a table cairn refuses.
fn protective_mbr_without_gpt(path: &Path) {
    write_random_file(path, SIZE, 81);
    let mut disk = fs::read(path).unwrap();
    disk[446..510].fill(0);
    disk[446 + 4] = 0xee;
    disk[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    disk[446 + 12..446 + 16].copy_from_slice(&((SIZE / 512 - 1) as u32).to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xaa;
    assert_ne!(&disk[512..520], b"EFI PART");
    fs::write(path, disk).unwrap();
}

#[test]
fn an_unreadable_table_is_restored_as_is_with_a_warning() {
    let t = tempdir();
    let (src, repo, out) = (
        t.path().join("disk.img"),
        t.path().join("repo"),
        t.path().join("out.img"),
    );
    protective_mbr_without_gpt(&src);
    backup(s(&src), &repo, "d", &[]);
    let r = cairn(&["restore", s(&repo), s(&out), "--name", "d", "--json"]);
    r.ok();
    let warning = r.text_lower();
    assert!(
        warning.contains("partition table is not one cairn can read")
            && warning.contains("protective mbr")
            && warning.contains("without fitting the table")
            && warning.contains("sector size"),
        "restore must say that the table was not fitted or checked:\n{}",
        r.describe()
    );
    assert_same_content(&src, &out);
}

#[test]
fn image_data_unreadable_where_the_table_lies_is_an_error() {
    let t = tempdir();
    let (src, repo, out) = (
        t.path().join("disk.img"),
        t.path().join("repo"),
        t.path().join("out.img"),
    );
    protective_mbr_without_gpt(&src);
    let id = id_of(&backup(s(&src), &repo, "d", &[]));
    // The first frame's payload (after the segment and frame headers) holds sector 0.
    let segment = &segment_files(&image_dir(&repo, &id))[0];
    flip_byte(segment, 32 + 32 + 100);
    let r = cairn(&["restore", s(&repo), s(&out), "--name", "d"]);
    r.error();
    let line = r.error_line();
    assert!(
        line.contains("partition table could not be read") && line.contains("nothing was written"),
        "{}",
        r.describe()
    );
}
