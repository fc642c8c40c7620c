package image

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"time"

	"github.com/diskfs/go-diskfs/backend"
	"github.com/diskfs/go-diskfs/filesystem"
	"github.com/diskfs/go-diskfs/filesystem/fat16"
	"github.com/diskfs/go-diskfs/filesystem/fat32"
)

type timeT = time.Time

// ovBackend lets go-diskfs read and write the image through the overlay.
type ovBackend struct {
	readerAt
	ov *overlay
}

func newBackend(ov *overlay) *ovBackend {
	return &ovBackend{readerAt: readerAt{r: ov, n: ov.size}, ov: ov}
}

var _ backend.Storage = (*ovBackend)(nil)

func (b *ovBackend) WriteAt(p []byte, off int64) (int, error) { return b.ov.WriteAt(p, off) }
func (b *ovBackend) Path() string                             { return "" }
func (b *ovBackend) Sys() (*os.File, error)                   { return nil, backend.ErrNotSuitable }
func (b *ovBackend) Writable() (backend.WritableFile, error)  { return b, nil }

// fatImpl is what package image uses of go-diskfs' FAT file systems.
type fatImpl interface {
	OpenFile(p string, flag int) (filesystem.File, error)
	Mkdir(p string) error
	Remove(p string) error
	ReadFile(p string) ([]byte, error)
	Stat(p string) (fs.FileInfo, error)
	BytesPerCluster() int
}

// fatFS is a FAT16/32 file system. FAT keeps no modes or owners.
type fatFS struct {
	impl  fatImpl
	ov    *overlay
	p     Partition
	rw    bool
	wrote bool
	where string
	bpb   fatBPB
}

func openFAT(ov *overlay, p Partition, rw bool, where string) (*fatFS, error) {
	bpb, err := readBPB(ov, p)
	if err != nil {
		return nil, fmt.Errorf("fat %s: %v: %w", where, err, ErrUnsupportedFS)
	}
	b := newBackend(ov)
	var impl fatImpl
	if bpb.fat32 {
		impl, err = fat32.Read(b, p.Size, p.Start, 512)
	} else {
		impl, err = fat16.Read(b, p.Size, p.Start, 512)
	}
	if err != nil {
		return nil, fmt.Errorf("fat %s: %v: %w", where, err, ErrUnsupportedFS)
	}
	// The dirty bit of FAT[1] (clean shutdown / no I/O error) is the FAT counterpart of an unclean superblock.
	if clean, err := bpb.clean(ov, p); err != nil {
		return nil, fmt.Errorf("fat %s: %w", where, err)
	} else if !clean {
		return nil, fmt.Errorf("fat %s: file system was not cleanly unmounted or recorded an I/O error (run fsck.vfat on it first): %w", where, ErrFSErrors)
	}
	return &fatFS{impl: impl, ov: ov, p: p, rw: rw, where: where, bpb: bpb}, nil
}

func (f *fatFS) clusterSize() int64 { return int64(f.bpb.clusterBytes()) }

func (f *fatFS) ReadFile(p string) ([]byte, error) {
	p, err := cleanPath(p)
	if err != nil {
		return nil, err
	}
	b, err := f.impl.ReadFile(p)
	if err != nil {
		if _, serr := f.impl.Stat(p); serr != nil {
			return nil, fmt.Errorf("fat %s: read %s: %w", f.where, p, fs.ErrNotExist)
		}
		return nil, fmt.Errorf("fat %s: read %s: %w", f.where, p, err)
	}
	return b, nil
}

func (f *fatFS) Stat(p string) (FileInfo, error) {
	p, err := cleanPath(p)
	if err != nil {
		return FileInfo{}, err
	}
	st, err := f.impl.Stat(p)
	if err != nil {
		return FileInfo{}, fmt.Errorf("fat %s: stat %s: %w", f.where, p, fs.ErrNotExist)
	}
	if st.IsDir() {
		return FileInfo{Mode: fs.ModeDir | 0o755, Size: st.Size()}, nil
	}
	return FileInfo{Mode: 0o644, Size: st.Size()}, nil
}

func (f *fatFS) WriteFile(p string, data []byte, mode fs.FileMode, uid, gid int) error {
	p, err := cleanPath(p)
	if err != nil {
		return err
	}
	if !f.rw {
		return fmt.Errorf("fat %s: write %s: opened read-only", f.where, p)
	}
	if dir := path.Dir(p); dir != "/" {
		if err := f.impl.Mkdir(dir); err != nil {
			return fmt.Errorf("fat %s: mkdir %s: %w", f.where, dir, err)
		}
	}
	fh, err := f.impl.OpenFile(p, os.O_CREATE|os.O_RDWR|os.O_TRUNC)
	if err != nil {
		return fmt.Errorf("fat %s: create %s: %w", f.where, p, err)
	}
	_, err = fh.Write(data)
	if cerr := fh.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("fat %s: write %s: %w", f.where, p, err)
	}
	f.wrote = true
	return nil
}

func (f *fatFS) Remove(p string) error {
	p, err := cleanPath(p)
	if err != nil {
		return err
	}
	if err := f.impl.Remove(p); err != nil {
		return fmt.Errorf("fat %s: remove %s: %w", f.where, p, err)
	}
	f.wrote = true
	return nil
}

func (f *fatFS) Free() (int64, int64, error) {
	free, _, err := f.bpb.countFree(f.ov, f.p)
	if err != nil {
		return 0, 0, fmt.Errorf("fat %s: %w", f.where, err)
	}
	return free * int64(f.bpb.clusterBytes()), 1 << 30, nil
}

// Close brings the FAT32 FSInfo sector's free-cluster count and next-free hint up to date (go-diskfs leaves them
// stale, which fsck.vfat reports).
func (f *fatFS) Close() error {
	if !f.wrote {
		return nil
	}
	if err := f.fixDotDot(); err != nil {
		return fmt.Errorf("fat %s: %w", f.where, err)
	}
	if !f.bpb.fat32 {
		f.wrote = false
		return nil
	}
	free, next, err := f.bpb.countFree(f.ov, f.p)
	if err != nil {
		return fmt.Errorf("fat %s: %w", f.where, err)
	}
	var v [8]byte
	binary.LittleEndian.PutUint32(v[0:4], uint32(free))
	binary.LittleEndian.PutUint32(v[4:8], next)
	sectors := []int64{int64(f.bpb.fsInfoSector)}
	if f.bpb.backupBoot != 0 && f.bpb.backupBoot != 0xffff {
		sectors = append(sectors, int64(f.bpb.backupBoot)+int64(f.bpb.fsInfoSector))
	}
	for _, s := range sectors {
		off := f.p.Start + s*int64(f.bpb.bytesPerSector)
		var sig [4]byte
		if _, err := f.ov.ReadAt(sig[:], off); err != nil || string(sig[:]) != "RRaA" {
			continue
		}
		if _, err := f.ov.WriteAt(v[:], off+488); err != nil {
			return fmt.Errorf("fat %s: FSInfo: %w", f.where, err)
		}
	}
	f.wrote = false
	return nil
}

// fatBPB is what we need of the BIOS parameter block.
type fatBPB struct {
	fat32                             bool
	bytesPerSector, sectorsPerCluster int
	reservedSectors, numFATs          int
	sectorsPerFAT, totalSectors       int64
	rootEntries                       int
	fsInfoSector, backupBoot          uint16
}

func (b fatBPB) clusterBytes() int { return b.bytesPerSector * b.sectorsPerCluster }

func readBPB(r io.ReaderAt, p Partition) (fatBPB, error) {
	bs := make([]byte, 512)
	if _, err := r.ReadAt(bs, p.Start); err != nil {
		return fatBPB{}, err
	}
	var b fatBPB
	b.bytesPerSector = int(binary.LittleEndian.Uint16(bs[11:13]))
	b.sectorsPerCluster = int(bs[13])
	b.reservedSectors = int(binary.LittleEndian.Uint16(bs[14:16]))
	b.numFATs = int(bs[16])
	b.rootEntries = int(binary.LittleEndian.Uint16(bs[17:19]))
	b.totalSectors = int64(binary.LittleEndian.Uint16(bs[19:21]))
	if b.totalSectors == 0 {
		b.totalSectors = int64(binary.LittleEndian.Uint32(bs[32:36]))
	}
	b.sectorsPerFAT = int64(binary.LittleEndian.Uint16(bs[22:24]))
	if b.sectorsPerFAT == 0 {
		b.fat32 = true
		b.sectorsPerFAT = int64(binary.LittleEndian.Uint32(bs[36:40]))
		b.fsInfoSector = binary.LittleEndian.Uint16(bs[48:50])
		b.backupBoot = binary.LittleEndian.Uint16(bs[50:52])
	}
	if b.bytesPerSector != 512 && b.bytesPerSector != 1024 && b.bytesPerSector != 2048 && b.bytesPerSector != 4096 ||
		b.sectorsPerCluster == 0 || b.numFATs == 0 || b.sectorsPerFAT == 0 || b.totalSectors == 0 {
		return fatBPB{}, errors.New("bad FAT boot sector")
	}
	if b.totalSectors*int64(b.bytesPerSector) > p.Size {
		return fatBPB{}, fmt.Errorf("FAT file system (%d bytes) is larger than its partition (%d bytes)", b.totalSectors*int64(b.bytesPerSector), p.Size)
	}
	return b, nil
}

func (b fatBPB) clusters() int64 {
	rootSectors := int64((b.rootEntries*32 + b.bytesPerSector - 1) / b.bytesPerSector)
	data := b.totalSectors - int64(b.reservedSectors) - int64(b.numFATs)*b.sectorsPerFAT - rootSectors
	return data / int64(b.sectorsPerCluster)
}

func (b fatBPB) readFAT(r io.ReaderAt, p Partition) ([]byte, error) {
	fat := make([]byte, b.sectorsPerFAT*int64(b.bytesPerSector))
	if _, err := r.ReadAt(fat, p.Start+int64(b.reservedSectors)*int64(b.bytesPerSector)); err != nil {
		return nil, fmt.Errorf("read FAT: %w", err)
	}
	return fat, nil
}

func (b fatBPB) entry(fat []byte, i int64) uint32 {
	if b.fat32 {
		return binary.LittleEndian.Uint32(fat[i*4:]) & 0x0fffffff
	}
	return uint32(binary.LittleEndian.Uint16(fat[i*2:]))
}

// countFree counts free clusters in the first FAT and finds the first free one.
func (b fatBPB) countFree(r io.ReaderAt, p Partition) (free int64, next uint32, err error) {
	fat, err := b.readFAT(r, p)
	if err != nil {
		return 0, 0, err
	}
	width := int64(2)
	if b.fat32 {
		width = 4
	}
	n := b.clusters()
	next = 0xffffffff
	for i := int64(2); i < n+2 && (i+1)*width <= int64(len(fat)); i++ {
		if b.entry(fat, i) == 0 {
			free++
			if next == 0xffffffff {
				next = uint32(i)
			}
		}
	}
	return free, next, nil
}

// clean reads the "clean shutdown" and "no hard error" bits of FAT[1].
func (b fatBPB) clean(r io.ReaderAt, p Partition) (bool, error) {
	fat := make([]byte, 8)
	if _, err := r.ReadAt(fat, p.Start+int64(b.reservedSectors)*int64(b.bytesPerSector)); err != nil {
		return false, err
	}
	if b.fat32 {
		v := binary.LittleEndian.Uint32(fat[4:8])
		return v&0x08000000 != 0 && v&0x04000000 != 0, nil
	}
	v := binary.LittleEndian.Uint16(fat[2:4])
	return v&0x8000 != 0 && v&0x4000 != 0, nil
}

// fixDotDot makes the ".." entry of every directory directly under the root point at cluster 0, as the FAT
// specification requires (go-diskfs writes the root's cluster number there, which fsck.vfat reports).
func (f *fatFS) fixDotDot() error {
	fat, err := f.bpb.readFAT(f.ov, f.p)
	if err != nil {
		return err
	}
	root, err := f.rootEntries(fat)
	if err != nil {
		return err
	}
	for i := 0; i+32 <= len(root); i += 32 {
		e := root[i : i+32]
		if e[0] == 0 {
			break
		}
		if e[0] == 0xe5 || e[11] == 0x0f || e[11]&0x10 == 0 || e[0] == '.' {
			continue
		}
		cl := int64(binary.LittleEndian.Uint16(e[20:22]))<<16 | int64(binary.LittleEndian.Uint16(e[26:28]))
		if cl < 2 {
			continue
		}
		off := f.clusterOffset(cl) + 32
		dd := make([]byte, 32)
		if _, err := f.ov.ReadAt(dd, off); err != nil {
			return err
		}
		if string(dd[0:11]) != "..         " {
			continue
		}
		if binary.LittleEndian.Uint16(dd[20:22]) != 0 || binary.LittleEndian.Uint16(dd[26:28]) != 0 {
			var zero [2]byte
			f.ov.WriteAt(zero[:], off+20)
			f.ov.WriteAt(zero[:], off+26)
		}
	}
	return nil
}

func (f *fatFS) clusterOffset(cl int64) int64 {
	b := f.bpb
	rootSectors := int64((b.rootEntries*32 + b.bytesPerSector - 1) / b.bytesPerSector)
	firstData := int64(b.reservedSectors) + int64(b.numFATs)*b.sectorsPerFAT + rootSectors
	return f.p.Start + (firstData+(cl-2)*int64(b.sectorsPerCluster))*int64(b.bytesPerSector)
}

// rootEntries reads the root directory: the fixed region (FAT16) or the root cluster chain (FAT32).
func (f *fatFS) rootEntries(fat []byte) ([]byte, error) {
	b := f.bpb
	if !b.fat32 {
		buf := make([]byte, b.rootEntries*32)
		off := f.p.Start + (int64(b.reservedSectors)+int64(b.numFATs)*b.sectorsPerFAT)*int64(b.bytesPerSector)
		_, err := f.ov.ReadAt(buf, off)
		return buf, err
	}
	bs := make([]byte, 512)
	if _, err := f.ov.ReadAt(bs, f.p.Start); err != nil {
		return nil, err
	}
	cl := int64(binary.LittleEndian.Uint32(bs[44:48]))
	var out []byte
	for n := 0; cl >= 2 && cl < 0x0ffffff8 && n < 65536; n++ {
		buf := make([]byte, b.clusterBytes())
		if _, err := f.ov.ReadAt(buf, f.clusterOffset(cl)); err != nil {
			return nil, err
		}
		out = append(out, buf...)
		if (cl+1)*4 > int64(len(fat)) {
			break
		}
		cl = int64(b.entry(fat, cl))
	}
	return out, nil
}
