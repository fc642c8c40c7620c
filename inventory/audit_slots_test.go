package inventory

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"os"
	"testing"
)

// slots returns the index of the current (higher seq) and the older slot of the v3 head.
func (k *keyedDB) slots(tb testing.TB) (cur, older int) {
	tb.Helper()
	b, err := os.ReadFile(k.head)
	if err != nil || len(b) != slotsSize {
		tb.Fatalf("head: %d bytes, %v", len(b), err)
	}
	v, err := parseSlotFile(b).view(k.key.Public().(ed25519.PublicKey))
	if err != nil || v.damaged {
		tb.Fatalf("head: %+v %v", v, err)
	}
	return 1 - v.older, v.older
}

// tear overwrites a few bytes in the middle of slot i, as a write cut short would leave it.
func (k *keyedDB) tear(tb testing.TB, i int) {
	tb.Helper()
	f, err := os.OpenFile(k.head, os.O_WRONLY, 0)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("torn"), int64(i*slotSize+100)); err != nil {
		tb.Fatal(err)
	}
}

func appendVerify(db *DB, serial string) error {
	return db.Update(context.Background(), func(tx *Tx) error {
		return tx.Append(Event{Serial: serial, Step: "validate", Outcome: "ok"}) // changes no state
	})
}

// A slot torn by a crash leaves the other one as the head: a torn settle (the write committed) and a torn pending head
// (the write never committed) both verify, and the next write carries on over the torn slot.
func TestAuditSlotTornByCrash(t *testing.T) {
	for _, tt := range []struct {
		name        string
		crash       func(t *testing.T, k *keyedDB)
		interrupted bool
	}{
		{"settle torn", func(t *testing.T, k *keyedDB) {
			cur, _ := k.slots(t)
			k.tear(t, cur) // the settled slot; the older one holds the pending head naming the commit
		}, true},
		{"pending head torn before the commit", func(t *testing.T, k *keyedDB) {
			_, older := k.slots(t)
			k.tear(t, older)
		}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			k := openKeyed(t)
			provisionUnit(t, k.DB, "U0")
			tt.crash(t, k)
			rep, err := k.verifyFile()
			if err != nil || rep.Interrupted != tt.interrupted {
				t.Fatalf("%+v %v", rep, err)
			}
			db := k.reopen(t)
			if err := appendVerify(db, "U0"); err != nil {
				t.Fatal(err)
			}
			if rep, err := k.verifyFile(); err != nil || rep.Interrupted || rep.Head.Count != 4 {
				t.Fatalf("after the next write: %+v %v", rep, err)
			}
			k.slots(t) // both slots verify again
		})
	}
}

// Two slots do not weaken the head: damaging the current slot does not let the last settled write's entries be
// removed unnoticed (the older slot still names the log before it as its head), and a writer refuses such a log.
func TestAuditSlotDamagedCannotHideRemovedWrite(t *testing.T) {
	for name, damage := range map[string]func(t *testing.T, k *keyedDB, cur int){
		"torn":   func(t *testing.T, k *keyedDB, cur int) { k.tear(t, cur) },
		"zeroed": func(t *testing.T, k *keyedDB, cur int) { writeAt(t, k.head, make([]byte, slotSize), cur*slotSize) },
		"foreign": func(t *testing.T, k *keyedDB, cur int) {
			_, other, _ := ed25519.GenerateKey(rand.Reader)
			s := signSlot(headSlot{Seq: 99, SignedHead: SignedHead{Head: Head{Count: 4, Hash: mustEventHash(t, k.DB, 4)}}}, other)
			writeAt(t, k.head, s.marshal(), cur*slotSize)
		},
	} {
		t.Run(name, func(t *testing.T) {
			k := openKeyed(t)
			provisionUnit(t, k.DB, "U0")
			if err := appendVerify(k.DB, "U0"); err != nil {
				t.Fatal(err)
			}
			cur, _ := k.slots(t)
			damage(t, k, cur)
			mustExec(t, k.db, "DELETE FROM events WHERE seq = 4")
			rep, err := k.verifyFile()
			wantProblem(t, rep, err, "entries removed")
			before, _ := os.ReadFile(k.head)
			if err := appendVerify(k.reopen(t), "U0"); !errors.Is(err, ErrAudit) {
				t.Fatalf("writer over a removed write: %v", err)
			}
			if after, _ := os.ReadFile(k.head); string(before) != string(after) {
				t.Fatal("the refusing writer rewrote the head")
			}
		})
	}
}

func writeAt(tb testing.TB, path string, b []byte, off int) {
	tb.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, int64(off)); err != nil {
		tb.Fatal(err)
	}
}

// A v2 head (stations before the slotted format, and what init writes) becomes v3 at the first write.
func TestAuditV2HeadUpgraded(t *testing.T) {
	k := openKeyed(t)
	if b, _ := os.ReadFile(k.head); string(b[:24]) != "provision-audit-head v2\n" {
		t.Fatalf("init wrote %q", b)
	}
	provisionUnit(t, k.DB, "U0")
	k.slots(t)
	if rep, err := k.verifyFile(); err != nil || rep.Head.Count != 3 {
		t.Fatalf("%+v %v", rep, err)
	}
}

// The writer's cache of its own head never hides a change to the file: a head replaced behind its back (same size,
// signed with another key) is refused.
func TestAuditSlotCacheSeesChanges(t *testing.T) {
	k := openKeyed(t)
	provisionUnit(t, k.DB, "U0")
	_, other, _ := ed25519.GenerateKey(rand.Reader)
	h := SignedHead{Head: Head{Count: 3, Hash: mustEventHash(t, k.DB, 3)}}
	raw := append(signSlot(headSlot{Seq: 10, SignedHead: h}, other).marshal(), signSlot(headSlot{Seq: 11, SignedHead: h}, other).marshal()...)
	if err := os.WriteFile(k.head, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := appendVerify(k.DB, "U0"); !errors.Is(err, ErrAudit) {
		t.Fatalf("got %v, want ErrAudit", err)
	}
	rep, err := k.verifyFile()
	wantProblem(t, rep, err, "another key")
}

func FuzzParseSlot(f *testing.F) {
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	f.Add(signSlot(headSlot{Seq: 1, SignedHead: SignedHead{Head: Head{Count: 3, Hash: genesis}}}, key).marshal())
	f.Add(signSlot(headSlot{Seq: 2, SignedHead: SignedHead{Head: Head{Count: 3, Hash: genesis}, Pending: &Head{Count: 4, Hash: genesis}}}, key).marshal())
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) != slotSize {
			return
		}
		s, err := parseSlot(b)
		if err != nil {
			return
		}
		if string(s.marshal()) != string(b) {
			t.Fatalf("not canonical: %q vs %q", b, s.marshal())
		}
	})
}

// BenchmarkAuditUpdate is one signed write: an audit entry, with the head sealed (synced) and settled.
func BenchmarkAuditUpdate(b *testing.B) {
	k := openKeyed(b)
	for b.Loop() {
		if err := appendVerify(k.DB, "B"); err != nil {
			b.Fatal(err)
		}
	}
}
