package inventory

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"provision/internal/fsutil"
)

// The slotted audit head (audit.head, format v3): two fixed 512-byte slots, A at offset 0 and B at offset 512, each
// one signed record padded with zero bytes:
//
//	provision-audit-head v3
//	seq N                    the write number: the slot with the higher one is the current head
//	head COUNT HASH          as in v2
//	pending COUNT HASH       as in v2, only while a write is in flight
//	key KEYID                as in v2
//	sig SIGNATURE            Ed25519 signature (standard base64) of every byte of the slot above this line
//
// A writer overwrites the older slot in place (one pwrite inside one disk sector) with seq = current + 1 and, for the
// pending head written before a commit, one fdatasync: no temp file, no rename, no directory fsync. The file's size
// never changes after it is created, so fdatasync makes the slot durable. A slot torn by a crash fails its signature
// and the other slot, untouched, is still the head; the torn slot is the older one the next writer overwrites.
//
// Two slots must not weaken what one signed file guaranteed: after a settled write, "head = the log after" is the
// current slot and the older slot still says "head = before, pending = after". Damaging the current slot would make
// the older one current and let the entries of the last write be removed unnoticed. So when one slot does not verify
// (torn, or damaged on purpose), a current slot that holds a pending head accepts only its pending log: a torn settle
// leaves exactly that (the write committed). The one case this refuses that a crash can make is two failures in a row
// (a write sealed but not committed, then the next writer's pending head torn by a power loss): it is reported, never
// laundered.
//
// `init` and `adopt-key` write a v2 head (one record, durably replaced); the first write turns it into v3 (temp file,
// fsync, rename, directory fsync, once). v2 and v1 heads are still read.

const (
	slotSize  = 512
	slotsSize = 2 * slotSize
	v3Magic   = "provision-audit-head v3\n"
)

// headSlot is one v3 slot.
type headSlot struct {
	Seq uint64
	SignedHead
}

func (s headSlot) body() []byte {
	var b bytes.Buffer
	b.WriteString(v3Magic)
	fmt.Fprintf(&b, "seq %d\n", s.Seq)
	s.writeFields(&b)
	return b.Bytes()
}

// marshal is the slot as stored: the record, its signature line and zero bytes up to slotSize.
func (s headSlot) marshal() []byte {
	b := append(s.body(), "sig "+base64.StdEncoding.EncodeToString(s.Sig)+"\n"...)
	return append(b, make([]byte, slotSize-len(b))...)
}

func signSlot(s headSlot, key ed25519.PrivateKey) headSlot {
	s.KeyID = KeyID(key.Public().(ed25519.PublicKey))
	s.Sig = ed25519.Sign(key, s.body())
	return s
}

func (s headSlot) verify(pub ed25519.PublicKey) error { return s.verifyBody(pub, s.body()) }

// parseSlot reads one slot strictly: the record, its final newline, then only zero bytes.
func parseSlot(b []byte) (headSlot, error) {
	var s headSlot
	text, pad, _ := bytes.Cut(b, []byte{0})
	if len(bytes.Trim(pad, "\x00")) != 0 {
		return s, errors.New("bytes after the record (torn or damaged)")
	}
	if !bytes.HasSuffix(text, []byte("\n")) {
		return s, errors.New("truncated slot (no final newline)")
	}
	lines := strings.Split(strings.TrimSuffix(string(text), "\n"), "\n")
	if len(lines) < 5 || lines[0]+"\n" != v3Magic {
		return s, errors.New("not a v3 audit head slot")
	}
	n, ok := strings.CutPrefix(lines[1], "seq ")
	seq, err := strconv.ParseUint(n, 10, 64)
	if !ok || err != nil || strconv.FormatUint(seq, 10) != n {
		return s, fmt.Errorf("bad seq line %q", lines[1])
	}
	h, err := parseFields(lines[2:])
	if err != nil {
		return s, err
	}
	return headSlot{Seq: seq, SignedHead: h}, nil
}

// slotFile is a parsed v3 file: each slot, or why it does not parse.
type slotFile struct {
	slots [2]headSlot
	errs  [2]error
}

func parseSlotFile(b []byte) *slotFile {
	f := &slotFile{}
	for i := range f.slots {
		f.slots[i], f.errs[i] = parseSlot(b[i*slotSize : (i+1)*slotSize])
	}
	return f
}

// slotView is what a v3 file says once its slots are verified.
type slotView struct {
	cur     headSlot // the valid slot with the higher seq
	older   int      // the index of the slot the next write overwrites
	damaged bool     // one slot does not verify: cur accepts only its pending log when it has one
}

// view verifies both slots with pub. It fails when neither verifies.
func (f *slotFile) view(pub ed25519.PublicKey) (slotView, error) {
	var ok [2]bool
	errs := f.errs
	for i := range f.slots {
		if errs[i] == nil {
			errs[i] = f.slots[i].verify(pub)
		}
		ok[i] = errs[i] == nil
	}
	switch {
	case ok[0] && ok[1]:
		cur := 0
		if f.slots[1].Seq > f.slots[0].Seq {
			cur = 1
		}
		return slotView{cur: f.slots[cur], older: 1 - cur}, nil
	case ok[0], ok[1]:
		cur := 0
		if ok[1] {
			cur = 1
		}
		return slotView{cur: f.slots[cur], older: 1 - cur, damaged: true}, nil
	}
	// Report a slot that parses (its signature or key is what fails) before one that does not.
	if f.errs[0] != nil && f.errs[1] == nil {
		return slotView{}, fmt.Errorf("slot B: %v (slot A: %v)", errs[1], errs[0])
	}
	return slotView{}, fmt.Errorf("slot A: %v (slot B: %v)", errs[0], errs[1])
}

// accepts says whether log is a state the head allows: head or pending; only pending when the other slot is damaged
// and there is one (see the format comment).
func (v slotView) accepts(log Head) bool {
	if v.cur.Pending != nil && log == *v.cur.Pending {
		return true
	}
	return log == v.cur.Head && (!v.damaged || v.cur.Pending == nil)
}

// headCache is the v3 file as this DB last wrote or verified it: when the file still holds exactly these bytes its
// slots need no new signature check.
type headCache struct {
	mu   sync.Mutex
	raw  []byte
	view slotView
}

// slotView returns the verified view of f (a v3 head), from the cache when the file has not changed.
func (db *DB) slotView(f headFile) (slotView, error) {
	c := db.audit.cache
	if c != nil {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.raw != nil && bytes.Equal(c.raw, f.raw) {
			return c.view, nil
		}
	}
	v, err := f.v3.view(db.audit.pub)
	if err == nil && c != nil {
		c.raw, c.view = f.raw, v
	}
	return v, err
}

// writeSlot overwrites the older slot of the v3 file whose bytes are raw with s, fdatasync'ed when durable, and
// caches the result.
func (db *DB) writeSlot(raw []byte, v slotView, s headSlot, durable bool) error {
	b := s.marshal()
	f, err := os.OpenFile(db.headPath, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteAt(b, int64(v.older*slotSize))
	if err == nil && durable {
		err = fdatasync(f)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if c := db.audit.cache; c != nil {
		c.mu.Lock()
		c.raw = nil
		if err == nil {
			c.raw = bytes.Clone(raw)
			copy(c.raw[v.older*slotSize:], b)
			c.view = slotView{cur: s, older: 1 - v.older}
		}
		c.mu.Unlock()
	}
	return err
}

// createSlots replaces the head file (missing, or v2) with a v3 file holding first in slot A and second in slot B,
// durably (temp file, fsync, rename, directory fsync).
func (db *DB) createSlots(first, second headSlot) error {
	raw := append(first.marshal(), second.marshal()...)
	if err := fsutil.WriteFileSync(db.headPath, raw, 0o644); err != nil {
		return err
	}
	if c := db.audit.cache; c != nil {
		c.mu.Lock()
		c.raw, c.view = raw, slotView{cur: second, older: 0}
		c.mu.Unlock()
	}
	return nil
}

func fdatasync(f *os.File) error {
	for {
		err := syscall.Fdatasync(int(f.Fd()))
		if !errors.Is(err, syscall.EINTR) {
			return err
		}
	}
}
