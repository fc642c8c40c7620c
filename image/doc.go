// Package image edits a unit's disk image in place: a raw image file or a block device, MBR or GPT (512-byte
// sectors), ext2/3/4 through e2fsprogs' libext2fs and FAT12/16/32 through go-diskfs.
//
// Safety. Open takes an exclusive lock (a shared one for ReadOnly; a block device opened for writing also gets
// O_EXCL, which the kernel refuses while it is mounted) and refuses what is not a partitioned disk image or whose table
// is damaged or truncated. FS refuses a file system with errors (ext: superblock not clean, errors recorded, journal
// needing recovery, bad checksums; FAT: dirty bits set, FAT copies differing). Apply checks every write and every
// target, including free blocks and inodes, before anything is written; Check runs the same checks on a planned edit
// without writing (a pre-flight before the data exists).
//
// Crash safety. Every edit goes through a transactional overlay (overlay.go; its journal: journal.go): nothing reaches
// the image before a commit (Apply, Commit, Close), and then all of it or none of it does, across a kill or power loss:
// the original of every changed 4 KiB page is written to an undo journal and synced first ("<image>.provision-undo"
// beside the real file, symbolic links resolved, or in a directory given with WithJournalDir, where a block device's is
// named by its major:minor numbers), and Open rolls back an edit a crash interrupted. A journal is replayed only onto
// the image it was written for, as the interrupted edit left it; one the image has changed since is renamed aside, not
// replayed (ErrUndoJournal). Apply reads every file back before the commit and again from the image after the pages are
// written, rolling back on a mismatch. Only changed pages are written, so the cost of an edit does not grow with the
// image.
//
// FAT keeps no modes or owners: WriteFile ignores them and Stat reports 0644 (directories 0755), root. Symbolic links
// are not followed when writing: a parent directory that is a link is refused (on a device it may point into another
// partition), and a link at the path itself is replaced.
//
// An Image is not safe for concurrent use by several goroutines.
//
// The files:
//   - image.go: the errors, Partition, FileInfo, the FS interface, Image; Open (lock, rollback of an interrupted
//     edit, table), FS, Commit, Sync, Close, Discard.
//   - table.go: ReadTable, the partition-table reader (MBR, GPT, file system probes): pure code over an
//     io.ReaderAt, fuzzed by FuzzReadTable.
//   - select.go: Select (selectors) and the check that a Partition is the image's own.
//   - check.go: Check, the pre-flight, and the checks of an edit's files Apply shares (groupEdit, checkPath,
//     checkParents); space.go: the free space check (checkSpace, missingDirs).
//   - apply.go: Apply: check, write, read back, commit.
//   - overlay.go: the transactional overlay and its commit stages; journal.go: its undo journal and the rollback.
//   - ext4.go, ext4.c, ext4.h, ext4_export.go: ext2/3/4 through libext2fs, its I/O served from the overlay.
//   - fat.go: FAT through go-diskfs and the boot sector's layout; fat_repair.go: the repairs of what go-diskfs
//     leaves wrong (FAT32 FSInfo, lost clusters, ".." of top-level directories, case-insensitive names).
//   - golden/: sample golden images for the tests, the demo and the benchmarks.
package image
