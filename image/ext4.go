package image

/*
#cgo pkg-config: ext2fs com_err
#include <stdlib.h>
#include "ext4.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"path"
	"runtime/cgo"
	"strings"
	"unsafe"
)

// ext4FS is an ext2/3/4 file system opened through libext2fs on the image overlay (see ext4.c).
type ext4FS struct {
	fs       C.ext2_filsys
	handle   cgo.Handle
	rw       bool
	modified bool
	failed   error // a write or remove failed part way: Close drops the changes
	where    string
}

// ext4Err wraps a libext2fs error code with the operation, the library's own words for it (com_err), advice for
// the common ones, and the package's sentinel.
func ext4Err(op, where string, code C.errcode_t) error {
	msg := C.GoString(C.prov_error(code))
	var sentinel error
	advice := ""
	switch code {
	case C.EXT2_ET_FILE_NOT_FOUND:
		sentinel = fs.ErrNotExist
	case C.EXT2_ET_BLOCK_ALLOC_FAIL, C.EXT2_ET_INODE_ALLOC_FAIL, C.EXT2_ET_RES_GDT_BLOCKS:
		sentinel, advice = ErrNoSpace, "free space in the partition or use a larger image"
	case C.EXT2_ET_BAD_MAGIC:
		sentinel, advice = ErrUnsupportedFS, "not an ext2/3/4 file system: check the partition selector"
	case C.EXT2_ET_UNSUPP_FEATURE, C.EXT2_ET_RO_UNSUPP_FEATURE, C.EXT2_ET_UNIMPLEMENTED, C.EXT2_ET_JOURNAL_UNSUPP_VERSION:
		sentinel, advice = ErrUnsupportedFS, "the file system uses a feature this station's libext2fs cannot write: compare dumpe2fs -h with the station's e2fsprogs, or make the file system with the station's mke2fs"
	case C.EXT2_ET_SB_CSUM_INVALID, C.EXT2_ET_BAD_DESC_SIZE, C.EXT2_ET_GDESC_BAD_BLOCK_MAP, C.EXT2_ET_GDESC_BAD_INODE_MAP,
		C.EXT2_ET_GDESC_BAD_INODE_TABLE, C.EXT2_ET_CORRUPT_SUPERBLOCK, C.EXT2_ET_BAD_INODE_NUM, C.EXT2_ET_BAD_BLOCK_NUM,
		C.EXT2_ET_INODE_CSUM_INVALID, C.EXT2_ET_INODE_BITMAP_CSUM_INVALID, C.EXT2_ET_BLOCK_BITMAP_CSUM_INVALID,
		C.EXT2_ET_EXTENT_CSUM_INVALID, C.EXT2_ET_DIR_CSUM_INVALID, C.EXT2_ET_EXT_ATTR_CSUM_INVALID,
		C.EXT2_ET_DIR_CORRUPTED, C.EXT2_ET_EXTENT_HEADER_BAD, C.EXT2_ET_DIR_NO_SPACE_FOR_CSUM, C.EXT2_ET_GDESC_READ,
		C.EXT2_ET_CORRUPT_JOURNAL_SB:
		sentinel, advice = ErrFSErrors, "the file system is damaged: check it with e2fsck -f (on a copy of the image first)"
	case C.EXT2_ET_SHORT_READ:
		advice = "the partition is shorter than the file system says, or the device failed a read: is the image whole (not truncated) and the device healthy?"
	case C.EXT2_ET_SHORT_WRITE:
		advice = "a write fell outside the partition: the file system is larger than its partition"
	case C.EXT2_ET_FILE_TOO_BIG:
		advice = "files over 64 MiB are not read or written"
	}
	e := fmt.Errorf("%s: ext4: %s: %s", where, op, msg)
	if advice != "" {
		e = fmt.Errorf("%w (%s)", e, advice)
	}
	if sentinel != nil {
		return fmt.Errorf("%w: %w", e, sentinel)
	}
	return e
}

func openExt4(sec *section, rw bool, where string) (*ext4FS, error) {
	h := cgo.NewHandle(sec)
	name := C.CString(fmt.Sprintf("ovl:%d", uint64(h)))
	defer C.free(unsafe.Pointer(name))
	var cfs C.ext2_filsys
	rwFlag := C.int(0)
	if rw {
		rwFlag = 1
	}
	if code := C.prov_open(name, rwFlag, &cfs); code != 0 {
		h.Delete()
		return nil, ext4Err("open", where, code)
	}
	e := &ext4FS{fs: cfs, handle: h, rw: rw, where: where}
	if size := int64(C.prov_size(cfs)); size > sec.size {
		e.discard()
		return nil, fmt.Errorf("%s: ext4: the file system (%d bytes) is larger than its partition (%d bytes): %w", where, size, sec.size, ErrFSErrors)
	}
	if st := C.prov_state(cfs); st != 0 {
		var why []string
		if st&C.PROV_NOT_CLEAN != 0 {
			why = append(why, "was not cleanly unmounted")
		}
		if st&C.PROV_HAS_ERRORS != 0 {
			why = append(why, "has recorded errors")
		}
		if st&C.PROV_NEEDS_RECOVERY != 0 {
			why = append(why, "has a journal that needs recovery")
		}
		e.discard()
		return nil, fmt.Errorf("%s: ext4: the file system %s (check it with e2fsck): %w", where, strings.Join(why, " and "), ErrFSErrors)
	}
	return e, nil
}

func (e *ext4FS) info() (freeBytes, freeInodes int64, blockSize int, label string) {
	var fb, fi C.ulonglong
	var bs C.uint
	var buf [17]C.char
	C.prov_info(e.fs, &fb, &fi, &bs, &buf[0])
	return int64(fb), int64(fi), int(bs), C.GoString(&buf[0])
}

func (e *ext4FS) closed(op, p string) error {
	if e.fs == nil {
		return fmt.Errorf("%s: ext4: %s %s: file system closed", e.where, op, p)
	}
	return nil
}

// discard releases the file system without writing anything.
func (e *ext4FS) discard() {
	if e.fs != nil {
		C.prov_close(e.fs, 1)
		e.fs = nil
		e.handle.Delete()
	}
}

// Close writes the file system's metadata (superblock, group descriptors, bitmaps) into the overlay if anything was
// changed, and releases it.
func (e *ext4FS) Close() error {
	if e.fs == nil {
		return nil
	}
	if e.failed != nil {
		e.discard()
		return fmt.Errorf("%s: ext4: changes dropped, an earlier change failed: %w", e.where, e.failed)
	}
	if !e.rw || !e.modified {
		e.discard()
		return nil
	}
	code := C.prov_close(e.fs, 0)
	e.fs = nil
	e.handle.Delete()
	if code != 0 {
		return ext4Err("close", e.where, code)
	}
	return nil
}

func (e *ext4FS) ReadFile(p string) ([]byte, error) {
	info, err := e.Stat(p)
	if err != nil {
		return nil, err
	}
	if !info.Mode.IsRegular() {
		return nil, fmt.Errorf("%s: ext4: read %s: not a regular file (%s)", e.where, p, info.Mode.Type())
	}
	cp := C.CString(p)
	defer C.free(unsafe.Pointer(cp))
	var buf *C.char
	var n C.ulonglong
	if code := C.prov_read(e.fs, cp, &buf, &n); code != 0 {
		return nil, ext4Err("read "+p, e.where, code)
	}
	defer C.free(unsafe.Pointer(buf))
	return C.GoBytes(unsafe.Pointer(buf), C.int(n)), nil
}

// Stat describes path; a symbolic link itself, not its target.
func (e *ext4FS) Stat(p string) (FileInfo, error) {
	if err := checkPath(p); err != nil {
		return FileInfo{}, fmt.Errorf("%s: ext4: stat: %w", e.where, err)
	}
	if err := e.closed("stat", p); err != nil {
		return FileInfo{}, err
	}
	cp := C.CString(p)
	defer C.free(unsafe.Pointer(cp))
	var mode, uid, gid C.int
	var size C.ulonglong
	if code := C.prov_stat(e.fs, cp, &mode, &uid, &gid, &size); code != 0 {
		return FileInfo{}, ext4Err("stat "+p, e.where, code)
	}
	m := fs.FileMode(mode & 0o777)
	switch mode & 0o170000 {
	case 0o040000:
		m |= fs.ModeDir
	case 0o120000:
		m |= fs.ModeSymlink
	case 0o100000:
	default:
		m |= fs.ModeIrregular
	}
	if mode&0o4000 != 0 {
		m |= fs.ModeSetuid
	}
	if mode&0o2000 != 0 {
		m |= fs.ModeSetgid
	}
	if mode&0o1000 != 0 {
		m |= fs.ModeSticky
	}
	return FileInfo{Mode: m, UID: int(uid), GID: int(gid), Size: int64(size)}, nil
}

// WriteFile creates or replaces path (whatever non-directory is there: a symbolic link itself is replaced, not its
// target). Missing parent directories are created (0755, root:root); a parent that is a symbolic link is refused:
// its target may be another partition on the device.
func (e *ext4FS) WriteFile(p string, data []byte, mode fs.FileMode, uid, gid int) error {
	if err := checkPath(p); err != nil {
		return fmt.Errorf("%s: ext4: write: %w", e.where, err)
	}
	if err := e.closed("write", p); err != nil {
		return err
	}
	if !e.rw {
		return fmt.Errorf("%s: ext4: write %s: opened read-only", e.where, p)
	}
	if uid < 0 || gid < 0 || uid > math.MaxUint32 || gid > math.MaxUint32 || int64(len(data)) > C.PROV_MAX_FILE {
		return fmt.Errorf("%s: ext4: write %s: owner %d:%d or size %d out of range", e.where, p, uid, gid, len(data))
	}
	if info, err := e.Stat(p); err == nil && info.Mode.IsDir() {
		return fmt.Errorf("%s: ext4: write %s: is a directory", e.where, p)
	}
	dir, name := path.Split(p)
	cdir, cname := C.CString(dir), C.CString(name)
	defer C.free(unsafe.Pointer(cdir))
	defer C.free(unsafe.Pointer(cname))
	var cdata *C.char
	if len(data) > 0 {
		cdata = (*C.char)(C.CBytes(data))
		defer func() {
			clear(unsafe.Slice((*byte)(unsafe.Pointer(cdata)), len(data))) // may hold a private key
			C.free(unsafe.Pointer(cdata))
		}()
	}
	e.modified = true
	code := C.prov_write(e.fs, cdir, cname, cdata, C.uint(len(data)), C.int(mode.Perm()), C.int(uid), C.int(gid))
	if code == C.EXT2_ET_NO_DIRECTORY {
		e.failed = e.notDir("write", p)
		return e.failed
	}
	if code != 0 {
		e.failed = ext4Err("write "+p, e.where, code)
		return e.failed
	}
	return nil
}

// notDir names the component of p that is in the way of a directory.
func (e *ext4FS) notDir(op, p string) error {
	parts := strings.Split(strings.TrimPrefix(path.Dir(p), "/"), "/")
	cur := ""
	for _, part := range parts {
		cur += "/" + part
		info, err := e.Stat(cur)
		if err != nil {
			break
		}
		switch {
		case info.Mode&fs.ModeSymlink != 0:
			return fmt.Errorf("%s: ext4: %s %s: %s is a symbolic link; write to the file system it points to instead", e.where, op, p, cur)
		case !info.Mode.IsDir():
			return fmt.Errorf("%s: ext4: %s %s: %s is not a directory", e.where, op, p, cur)
		}
	}
	return fmt.Errorf("%s: ext4: %s %s: a parent is not a directory", e.where, op, p)
}

func (e *ext4FS) Remove(p string) error {
	if err := checkPath(p); err != nil {
		return fmt.Errorf("%s: ext4: remove: %w", e.where, err)
	}
	if err := e.closed("remove", p); err != nil {
		return err
	}
	if !e.rw {
		return fmt.Errorf("%s: ext4: remove %s: opened read-only", e.where, p)
	}
	dir, name := path.Split(p)
	cdir, cname := C.CString(dir), C.CString(name)
	defer C.free(unsafe.Pointer(cdir))
	defer C.free(unsafe.Pointer(cname))
	code := C.prov_remove(e.fs, cdir, cname)
	if code == C.EXT2_ET_FILE_NOT_FOUND || code == C.EXT2_ET_DIR_EXISTS {
		return ext4Err("remove "+p, e.where, code) // nothing was changed
	}
	e.modified = true
	if code != 0 {
		e.failed = ext4Err("remove "+p, e.where, code)
		return e.failed
	}
	return nil
}

func (e *ext4FS) Free() (int64, int64, error) {
	if err := e.closed("free", ""); err != nil {
		return 0, 0, err
	}
	b, i, _, _ := e.info()
	return b, i, nil
}

// need estimates what writing size bytes to p takes: its data blocks, mapping blocks (extent tree or indirect
// blocks), a block for a directory that may have to grow, and an inode; minus the blocks of a file it replaces; plus a
// block and an inode for each missing parent directory.
func (e *ext4FS) need(p string, size int64, newDirs map[string]bool) (int64, int64, error) {
	_, _, bs, _ := e.info()
	b := int64(bs)
	blocks := (size + b - 1) / b
	var meta int64
	if C.prov_has_extents(e.fs) != 0 {
		meta = blocks/((b-12)/12) + 1 // worst case one extent per block, (block-12)/12 extents per tree block
	} else {
		meta = blocks/(b/4) + 2
	}
	nb, ni := (blocks+meta+1)*b, int64(1)
	if info, err := e.Stat(p); err == nil {
		if info.Mode.IsDir() {
			return 0, 0, fmt.Errorf("%s: ext4: write %s: is a directory", e.where, p)
		}
		if info.Mode.IsRegular() {
			nb -= (info.Size + b - 1) / b * b
		}
		ni--
	} else if !errors.Is(err, fs.ErrNotExist) {
		return 0, 0, err
	}
	dirs := int64(missingDirs(p, newDirs, func(dir string) bool { _, err := e.Stat(dir); return err == nil }))
	return nb + 2*dirs*b, ni + dirs, nil
}
