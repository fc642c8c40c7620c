package inventory

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"database/sql"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"syscall"

	"provision/internal/fsutil"
)

// The signed audit head (audit.head). Format v2, written by InitHead and AdoptKey and read; the first write turns it
// into the slotted format v3 that writers keep (audit_slots.go):
//
//	provision-audit-head v2
//	head COUNT HASH          the log as last committed: entry count and the hash of the last entry
//	pending COUNT HASH       only while a write is in flight: the log as it is once that write commits
//	key KEYID                SHA-256 of the station audit public key (Ed25519), lowercase hex
//	sig SIGNATURE            Ed25519 signature (standard base64) of every byte above this line
//
// A writer, holding the head lock (audit.head.lock, flock) and SQLite's write lock, checks that the log it is about to
// extend is exactly what the head says (head, or pending when the previous writer committed and did not settle), writes
// "head = the log before, pending = the log after" (synced) before its commit, and after the commit writes
// "head = the log after" (into the other v3 slot). So at every instant, crash or not, the log is either the signed head
// or the signed pending head; anything else — a removed, rewritten or appended entry, a missing, truncated, unsigned or foreign-signed
// head — does not verify.

// auditKeys are the station audit key pair a DB signs and verifies heads with.
type auditKeys struct {
	priv  ed25519.PrivateKey
	pub   ed25519.PublicKey
	cache *headCache // the v3 head this DB last wrote or verified (audit_slots.go)
}

// txAudit is what a write transaction remembers for the head: the log before its first Append.
type txAudit struct {
	started bool
	before  Head
	sealed  *Head  // the pending head written before the commit
	seq     uint64 // the v3 slot it was written in
}

// WithAuditKey signs the audit head with the station audit key (writers). The public half verifies it.
func WithAuditKey(key ed25519.PrivateKey) Option {
	return func(o *options) {
		o.audit.priv = key
		if key != nil {
			o.audit.pub = key.Public().(ed25519.PublicKey)
			o.audit.cache = &headCache{}
		}
	}
}

// WithAuditPub verifies the audit head's signature with this public key (readers).
func WithAuditPub(pub ed25519.PublicKey) Option { return func(o *options) { o.audit.pub = pub } }

// KeyID names an audit public key in the head: the SHA-256 of the raw key, lowercase hex.
func KeyID(pub ed25519.PublicKey) string {
	s := sha256.Sum256(pub)
	return hex.EncodeToString(s[:])
}

// SignedHead is a parsed v2 audit head.
type SignedHead struct {
	Head    Head
	Pending *Head // set while a write is in flight
	KeyID   string
	Sig     []byte
}

func (h SignedHead) body() []byte {
	var b bytes.Buffer
	b.WriteString("provision-audit-head v2\n")
	h.writeFields(&b)
	return b.Bytes()
}

// writeFields writes the head, pending and key lines (v2 and the v3 slots share them).
func (h SignedHead) writeFields(b *bytes.Buffer) {
	fmt.Fprintf(b, "head %d %s\n", h.Head.Count, h.Head.Hash)
	if h.Pending != nil {
		fmt.Fprintf(b, "pending %d %s\n", h.Pending.Count, h.Pending.Hash)
	}
	fmt.Fprintf(b, "key %s\n", h.KeyID)
}

// Marshal is the file's content.
func (h SignedHead) Marshal() []byte {
	return append(h.body(), []byte("sig "+base64.StdEncoding.EncodeToString(h.Sig)+"\n")...)
}

func signHead(h SignedHead, key ed25519.PrivateKey) SignedHead {
	h.KeyID = KeyID(key.Public().(ed25519.PublicKey))
	h.Sig = ed25519.Sign(key, h.body())
	return h
}

// Verify checks the signature with pub and that the head names pub.
func (h SignedHead) Verify(pub ed25519.PublicKey) error { return h.verifyBody(pub, h.body()) }

// verifyBody checks the signature over body (the v2 file or a v3 slot) and that the head names pub.
func (h SignedHead) verifyBody(pub ed25519.PublicKey, body []byte) error {
	if h.KeyID != KeyID(pub) {
		return fmt.Errorf("signed by another key (%.16s…, the station's audit key is %.16s…)", h.KeyID, KeyID(pub))
	}
	if !ed25519.Verify(pub, body, h.Sig) {
		return errors.New("signature does not verify")
	}
	return nil
}

// ParseSignedHead reads the v2 format strictly: line order, fields and the final newline.
func ParseSignedHead(b []byte) (SignedHead, error) {
	var h SignedHead
	if !bytes.HasSuffix(b, []byte("\n")) {
		return h, errors.New("truncated (no final newline)")
	}
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	if len(lines) < 4 || lines[0] != "provision-audit-head v2" {
		return h, errors.New("not a v2 audit head")
	}
	return parseFields(lines[1:])
}

// parseFields reads the head, optional pending, key and sig lines, strictly.
func parseFields(lines []string) (SignedHead, error) {
	var h SignedHead
	if len(lines) < 3 {
		return h, errors.New("wrong number of lines")
	}
	parseHead := func(line, name string) (Head, error) {
		f := strings.Split(line, " ")
		if len(f) != 3 || f[0] != name {
			return Head{}, fmt.Errorf("bad %s line %q", name, line)
		}
		n, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil || n < 0 || strconv.FormatInt(n, 10) != f[1] {
			return Head{}, fmt.Errorf("bad entry count %q", f[1])
		}
		if _, err := hex.DecodeString(f[2]); err != nil || len(f[2]) != 64 || strings.ToLower(f[2]) != f[2] {
			return Head{}, fmt.Errorf("bad hash %q", f[2])
		}
		return Head{Count: n, Hash: f[2]}, nil
	}
	var err error
	if h.Head, err = parseHead(lines[0], "head"); err != nil {
		return h, err
	}
	rest := lines[1:]
	if strings.HasPrefix(rest[0], "pending ") {
		p, err := parseHead(rest[0], "pending")
		if err != nil {
			return h, err
		}
		h.Pending, rest = &p, rest[1:]
	}
	if len(rest) != 2 {
		return h, errors.New("wrong number of lines")
	}
	key, ok := strings.CutPrefix(rest[0], "key ")
	if _, err := hex.DecodeString(key); !ok || err != nil || len(key) != 64 {
		return h, fmt.Errorf("bad key line %q", rest[0])
	}
	h.KeyID = key
	sig, ok := strings.CutPrefix(rest[1], "sig ")
	raw, err := base64.StdEncoding.DecodeString(sig)
	if !ok || err != nil || len(raw) != ed25519.SignatureSize {
		return h, errors.New("bad signature line")
	}
	h.Sig = raw
	return h, nil
}

// headFile is what audit.head holds.
type headFile struct {
	missing bool
	v1      *Head       // an unsigned head from a station made before audit keys
	v2      *SignedHead // a signed head
	v3      *slotFile   // a slotted signed head (audit_slots.go)
	err     error       // unreadable or unparseable
	raw     []byte
}

func readHeadFile(path string) headFile {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return headFile{missing: true}
	}
	if err != nil {
		return headFile{err: err}
	}
	f := headFile{raw: b}
	switch {
	case len(b) == 0:
		f.err = errors.New("empty (truncated)")
	case len(b) == slotsSize && (bytes.HasPrefix(b, []byte(v3Magic)) || bytes.HasPrefix(b[slotSize:], []byte(v3Magic))):
		f.v3 = parseSlotFile(b)
	case bytes.HasPrefix(b, []byte("provision-audit-head v2\n")):
		h, err := ParseSignedHead(b)
		if err != nil {
			f.err = err
		} else {
			f.v2 = &h
		}
	default:
		h, err := ParseHead(b)
		if err != nil {
			f.err = err
		} else {
			f.v1 = &h
		}
	}
	return f
}

// lockHead takes the head lock: exclusive for writers (creating the lock file), shared for readers (only when the lock
// file exists: a reader creates nothing).
func lockHead(headPath string, exclusive bool) (unlock func(), err error) {
	path := headPath + ".lock"
	var f *os.File
	if exclusive {
		f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	} else {
		f, err = os.Open(path)
		if errors.Is(err, fs.ErrNotExist) {
			return func() {}, nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("audit head lock: %w", err)
	}
	how := syscall.LOCK_SH
	if exclusive {
		how = syscall.LOCK_EX
	}
	for {
		err = syscall.Flock(int(f.Fd()), how)
		if !errors.Is(err, syscall.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("audit head lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

// txHead is the log's head as the transaction sees it.
func txHead(ctx context.Context, q queryer) (Head, error) {
	h := Head{Hash: genesis}
	err := q.QueryRowContext(ctx, "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").Scan(&h.Count, &h.Hash)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return Head{}, classify(err)
	}
	return h, nil
}

// checkExtends says whether a writer may extend the log from before: the head file must say exactly that (as head, or
// as pending when the previous writer committed and did not get to settle).
func (db *DB) checkExtends(f headFile, before Head) error {
	switch {
	case f.err != nil:
		return fmt.Errorf("audit head %s: %v: run `provision audit verify`: %w", db.headPath, f.err, ErrAudit)
	case f.missing:
		if before.Count == 0 {
			return nil
		}
		return fmt.Errorf("audit head %s is missing while the log holds %d entries (tampering or damage; never rebuilt): run `provision audit verify`: %w", db.headPath, before.Count, ErrAudit)
	case f.v1 != nil:
		return fmt.Errorf("audit head %s is unsigned while this station has an audit key: run `provision audit adopt-key`: %w", db.headPath, ErrAudit)
	case f.v3 != nil:
		v, err := db.slotView(f)
		if err != nil {
			return fmt.Errorf("audit head %s: %v: run `provision audit verify`: %w", db.headPath, err, ErrAudit)
		}
		if v.accepts(before) {
			return nil
		}
		return fmt.Errorf("audit log (%d entries) does not match its signed head (%d entries): run `provision audit verify`: %w", before.Count, v.cur.Head.Count, ErrAudit)
	}
	if err := f.v2.Verify(db.audit.pub); err != nil {
		return fmt.Errorf("audit head %s: %v: run `provision audit verify`: %w", db.headPath, err, ErrAudit)
	}
	if before == f.v2.Head || (f.v2.Pending != nil && before == *f.v2.Pending) {
		return nil
	}
	return fmt.Errorf("audit log (%d entries) does not match its signed head (%d entries): run `provision audit verify`: %w", before.Count, f.v2.Head.Count, ErrAudit)
}

// sealHead runs inside the write transaction, after fn appended events and before the commit: it checks the log the
// transaction started from against the signed head and writes "head = before, pending = after", synced. Without an
// audit key (a station made before audit keys) it only refuses to write over a signed head; the unsigned head is moved
// forward after the commit, as before.
func (db *DB) sealHead(tx *Tx) error {
	if db.headPath == "" {
		return nil
	}
	after, err := txHead(tx.ctx, tx.tx)
	if err != nil {
		return fmt.Errorf("audit head: %w", err)
	}
	if db.audit.priv == nil {
		if f := readHeadFile(db.headPath); f.v2 != nil || f.v3 != nil {
			return refusal{fmt.Errorf("the audit head is signed but the station audit key is not available (ca/audit.key): %w", ErrAudit)}
		}
		return nil
	}
	unlock, err := lockHead(db.headPath, true)
	if err != nil {
		return err
	}
	defer unlock()
	f := readHeadFile(db.headPath)
	if err := db.checkExtends(f, tx.audit.before); err != nil {
		return refusal{err}
	}
	pending := SignedHead{Head: tx.audit.before, Pending: &after}
	if f.v3 != nil {
		v, err := db.slotView(f) // cached by checkExtends
		if err != nil {
			return refusal{err}
		}
		s := signSlot(headSlot{Seq: v.cur.Seq + 1, SignedHead: pending}, db.audit.priv)
		if err := db.writeSlot(f.raw, v, s, true); err != nil {
			return fmt.Errorf("audit head: write %s: %w", db.headPath, err)
		}
		tx.audit.sealed, tx.audit.seq = &after, s.Seq
		return nil
	}
	// A v2 head (or none, for an empty log) becomes v3, durably, once.
	first := signSlot(headSlot{Seq: 1, SignedHead: SignedHead{Head: tx.audit.before}}, db.audit.priv)
	second := signSlot(headSlot{Seq: 2, SignedHead: pending}, db.audit.priv)
	if err := db.createSlots(first, second); err != nil {
		return fmt.Errorf("audit head: write %s: %w", db.headPath, err)
	}
	tx.audit.sealed, tx.audit.seq = &after, second.Seq
	return nil
}

// settleHead runs after the commit: it rewrites the pending head this transaction wrote as the head. If another writer
// has written its own pending head meanwhile, that one already names this commit and is left alone. A crash before
// this leaves the pending head, which verifies.
func (db *DB) settleHead(tx *Tx) {
	if tx.audit.sealed == nil {
		return
	}
	unlock, err := lockHead(db.headPath, true)
	if err != nil {
		return
	}
	defer unlock()
	f := readHeadFile(db.headPath)
	if f.v3 == nil {
		return
	}
	v, err := db.slotView(f)
	if err != nil || v.cur.Seq != tx.audit.seq || v.cur.Pending == nil || *v.cur.Pending != *tx.audit.sealed {
		return
	}
	s := signSlot(headSlot{Seq: v.cur.Seq + 1, SignedHead: SignedHead{Head: *tx.audit.sealed}}, db.audit.priv)
	// Not synced: after a power loss the synced pending slot, which names this commit too, is the head instead (a
	// torn settle fails its signature and leaves that slot current).
	db.writeSlot(f.raw, v, s, false)
}

// InitHead writes the first signed head for the log as it is (init: empty). It refuses to replace an existing head.
func (db *DB) InitHead(ctx context.Context) error {
	if db.audit.priv == nil || db.headPath == "" {
		return errors.New("inventory: audit head: no audit key or head file configured")
	}
	unlock, err := lockHead(db.headPath, true)
	if err != nil {
		return err
	}
	defer unlock()
	if f := readHeadFile(db.headPath); !f.missing {
		return fmt.Errorf("inventory: audit head %s exists already: %w", db.headPath, ErrAudit)
	}
	cur, err := txHead(ctx, db.db)
	if err != nil {
		return fmt.Errorf("inventory: audit head: %w", err)
	}
	if cur.Count != 0 {
		return fmt.Errorf("inventory: audit head: the log already holds %d entries: %w", cur.Count, ErrAudit)
	}
	h := signHead(SignedHead{Head: cur}, db.audit.priv)
	if err := fsutil.WriteFileSync(db.headPath, h.Marshal(), 0o644); err != nil {
		return fmt.Errorf("inventory: audit head: write %s: %w", db.headPath, err)
	}
	return nil
}

// AdoptKey signs the head of a station made before audit keys: the whole log must verify against its unsigned head
// first (the key vouches only for what was checked). It is for `provision audit adopt-key`; a station that already
// has a signed head is refused.
func (db *DB) AdoptKey(ctx context.Context) (AuditReport, error) {
	if db.audit.priv == nil || db.headPath == "" {
		return AuditReport{}, errors.New("inventory: adopt key: no audit key or head file configured")
	}
	unlock, err := lockHead(db.headPath, true)
	if err != nil {
		return AuditReport{}, err
	}
	defer unlock()
	f := readHeadFile(db.headPath)
	if f.v2 != nil || f.v3 != nil {
		return AuditReport{}, fmt.Errorf("inventory: audit head %s is already signed: %w", db.headPath, ErrAudit)
	}
	rep, err := verifyAudit(ctx, db.db, f, nil, db.stateRule, true)
	if err != nil {
		return rep, err
	}
	cur, err := txHead(ctx, db.db)
	if err != nil {
		return rep, fmt.Errorf("inventory: audit head: %w", err)
	}
	h := signHead(SignedHead{Head: cur}, db.audit.priv)
	if err := fsutil.WriteFileSync(db.headPath, h.Marshal(), 0o644); err != nil {
		return rep, fmt.Errorf("inventory: audit head: write %s: %w", db.headPath, err)
	}
	return rep, nil
}
