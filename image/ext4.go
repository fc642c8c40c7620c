package image

/*
#cgo pkg-config: ext2fs com_err
#include <stdlib.h>
#include "ext4.h"
*/
import "C"

import (
	"fmt"
	"io/fs"
	"path"
	"runtime/cgo"
	"strings"
	"unsafe"
)

// ext4FS is an ext2/3/4 file system opened through libext2fs on the image overlay.
type ext4FS struct {
	fs     C.ext2_filsys
	handle cgo.Handle
	rw     bool
	where  string
}

func ext4Err(op, where string, err C.errcode_t) error {
	msg := C.GoString(C.prov_error(err))
	e := fmt.Errorf("ext4 %s: %s: %s", where, op, msg)
	switch err {
	case C.EXT2_ET_FILE_NOT_FOUND:
		return fmt.Errorf("%w: %w", e, fs.ErrNotExist)
	case C.EXT2_ET_BLOCK_ALLOC_FAIL, C.EXT2_ET_INODE_ALLOC_FAIL, C.EXT2_ET_DIR_NO_SPACE_FOR_CSUM:
		return fmt.Errorf("%w: %w", e, ErrNoSpace)
	case C.EXT2_ET_BAD_MAGIC, C.EXT2_ET_UNSUPP_FEATURE, C.EXT2_ET_RO_UNSUPP_FEATURE:
		return fmt.Errorf("%w: %w", e, ErrUnsupportedFS)
	case C.EXT2_ET_SB_CSUM_INVALID, C.EXT2_ET_BAD_DESC_SIZE, C.EXT2_ET_GDESC_BAD_BLOCK_MAP, C.EXT2_ET_GDESC_BAD_INODE_MAP,
		C.EXT2_ET_GDESC_BAD_INODE_TABLE, C.EXT2_ET_CORRUPT_SUPERBLOCK:
		return fmt.Errorf("%w: %w", e, ErrFSErrors)
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
	if err := C.prov_open(name, rwFlag, &cfs); err != 0 {
		h.Delete()
		return nil, ext4Err("open", where, err)
	}
	e := &ext4FS{fs: cfs, handle: h, rw: rw, where: where}
	if st := C.prov_state(cfs); st != 0 {
		var why []string
		if st&C.PROV_NOT_CLEAN != 0 {
			why = append(why, "not cleanly unmounted")
		}
		if st&C.PROV_HAS_ERRORS != 0 {
			why = append(why, "has recorded errors")
		}
		if st&C.PROV_NEEDS_RECOVERY != 0 {
			why = append(why, "its journal needs recovery")
		}
		e.discard()
		return nil, fmt.Errorf("ext4 %s: file system %s (run e2fsck on it first): %w", where, strings.Join(why, ", "), ErrFSErrors)
	}
	return e, nil
}

func (e *ext4FS) info() (freeBytes, freeInodes int64, blockSize int, label string) {
	var fb, fi C.ulonglong
	var bs C.uint
	buf := (*C.char)(C.malloc(17))
	defer C.free(unsafe.Pointer(buf))
	C.prov_info(e.fs, &fb, &fi, &bs, buf)
	return int64(fb), int64(fi), int(bs), C.GoString(buf)
}

func (e *ext4FS) discard() {
	if e.fs != nil {
		C.prov_close(e.fs, 1)
		e.fs = nil
		e.handle.Delete()
	}
}

// Close writes the file system's metadata (superblock, bitmaps, descriptors) into the overlay.
func (e *ext4FS) Close() error {
	if e.fs == nil {
		return nil
	}
	discard := C.int(1)
	if e.rw {
		discard = 0
	}
	err := C.prov_close(e.fs, discard)
	e.fs = nil
	e.handle.Delete()
	if err != 0 {
		return ext4Err("close", e.where, err)
	}
	return nil
}

func cleanPath(p string) (string, error) {
	if !strings.HasPrefix(p, "/") || path.Clean(p) != p || p == "/" || strings.ContainsRune(p, 0) {
		return "", fmt.Errorf("path %q is not absolute and clean", p)
	}
	return p, nil
}

func (e *ext4FS) ReadFile(p string) ([]byte, error) {
	p, err := cleanPath(p)
	if err != nil {
		return nil, err
	}
	cp := C.CString(p)
	defer C.free(unsafe.Pointer(cp))
	var buf *C.char
	var n C.ulonglong
	if err := C.prov_read(e.fs, cp, &buf, &n); err != 0 {
		return nil, ext4Err("read "+p, e.where, err)
	}
	defer C.free(unsafe.Pointer(buf))
	return C.GoBytes(unsafe.Pointer(buf), C.int(n)), nil
}

func (e *ext4FS) Stat(p string) (FileInfo, error) {
	p, err := cleanPath(p)
	if err != nil {
		return FileInfo{}, err
	}
	cp := C.CString(p)
	defer C.free(unsafe.Pointer(cp))
	var mode, uid, gid C.int
	var size C.ulonglong
	if err := C.prov_stat(e.fs, cp, &mode, &uid, &gid, &size); err != 0 {
		return FileInfo{}, ext4Err("stat "+p, e.where, err)
	}
	m := fs.FileMode(mode & 0o7777)
	if mode&0o170000 == 0o040000 {
		m |= fs.ModeDir
	}
	return FileInfo{Mode: m, UID: int(uid), GID: int(gid), Size: int64(size)}, nil
}

func (e *ext4FS) WriteFile(p string, data []byte, mode fs.FileMode, uid, gid int) error {
	p, err := cleanPath(p)
	if err != nil {
		return err
	}
	if !e.rw {
		return fmt.Errorf("ext4 %s: write %s: opened read-only", e.where, p)
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
	if err := C.prov_write(e.fs, cdir, cname, cdata, C.uint(len(data)), C.int(mode.Perm()), C.int(uid), C.int(gid)); err != 0 {
		return ext4Err("write "+p, e.where, err)
	}
	return nil
}

func (e *ext4FS) Remove(p string) error {
	p, err := cleanPath(p)
	if err != nil {
		return err
	}
	dir, name := path.Split(p)
	cdir, cname := C.CString(dir), C.CString(name)
	defer C.free(unsafe.Pointer(cdir))
	defer C.free(unsafe.Pointer(cname))
	if err := C.prov_remove(e.fs, cdir, cname); err != 0 {
		return ext4Err("remove "+p, e.where, err)
	}
	return nil
}

func (e *ext4FS) Free() (int64, int64, error) {
	b, i, _, _ := e.info()
	return b, i, nil
}

func (e *ext4FS) blockSize() int {
	_, _, bs, _ := e.info()
	return bs
}
