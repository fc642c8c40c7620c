package image

// #include <stdint.h>
import "C"

import (
	"errors"
	"io"
	"runtime/cgo"
	"unsafe"
)

// provReadAt serves libext2fs reads from the overlay (called from ext4.c). Bytes past the end of the partition read
// as zeros, as a block device's would not exist: that is an error.
//
//export provReadAt
func provReadAt(h C.uintptr_t, buf unsafe.Pointer, off C.longlong, n C.int) C.int {
	s := cgo.Handle(h).Value().(*section)
	p := unsafe.Slice((*byte)(buf), int(n))
	got, err := s.ReadAt(p, int64(off))
	if err != nil && !(errors.Is(err, io.EOF) && got == len(p)) {
		return -1
	}
	return 0
}

// provWriteAt records libext2fs writes in the overlay (called from ext4.c).
//
//export provWriteAt
func provWriteAt(h C.uintptr_t, buf unsafe.Pointer, off C.longlong, n C.int) C.int {
	s := cgo.Handle(h).Value().(*section)
	p := unsafe.Slice((*byte)(buf), int(n))
	if _, err := s.WriteAt(p, int64(off)); err != nil {
		return -1
	}
	return 0
}
