package inventory

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// An inventory of version 4 (before the lifecycle) is migrated: units rebuilt with the returned state and their
// references kept, superseded certificates put on the CRL as of their replacement, foreign keys enforced afterwards.
func TestMigrateLifecycleFromV4(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "inventory.db")
	sdb, err := openSQL(path, "rwc")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"0001_init.sql", "0002_unit_fields.sql", "0003_attestations.sql", "0004_sync.sql"} {
		body, err := migrations.ReadFile("migrations/" + name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := sdb.ExecContext(ctx, string(body)); err != nil {
			t.Fatal(name, err)
		}
	}
	stmts := []string{
		"PRAGMA user_version = 4",
		`INSERT INTO units (serial, state, created_at, updated_at, ek_sha256) VALUES ('U1','shippable','2026-01-01T00:00:00Z','2026-01-01T00:00:00Z','ek1')`,
		`INSERT INTO certificates VALUES ('01','U1','aa','2026-01-01T00:00:00Z','2099-01-01T00:00:00Z','superseded','2026-01-01T00:00:00Z')`,
		`INSERT INTO certificates VALUES ('02','U1','bb','2026-01-02T00:00:00Z','2099-01-01T00:00:00Z','active','2026-01-02T00:00:00Z')`,
		`INSERT INTO attestations (serial, time, policy, outcome, status) VALUES ('U1','2026-01-01T00:00:00Z','record','ok','soft')`,
	}
	for _, s := range stmts {
		if _, err := sdb.ExecContext(ctx, s); err != nil {
			t.Fatal(s, err)
		}
	}
	sdb.Close()

	db, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	u, err := db.Unit(ctx, "U1")
	if err != nil || u.EKSHA256 != "ek1" || u.State != StateShippable {
		t.Fatalf("unit after migration: %+v, %v", u, err)
	}
	revoked, err := db.RevokedCertificates(ctx, time.Now())
	if err != nil || len(revoked) != 1 || revoked[0].Serial != "01" || revoked[0].Reason != ReasonSuperseded ||
		!revoked[0].RevokedAt.Equal(time.Date(2026, 1, 2, 0, 0, 0, 0, time.UTC)) {
		t.Fatalf("revoked after migration: %+v, %v", revoked, err)
	}
	if err := db.Update(ctx, func(tx *Tx) error { return tx.PutUnit(Unit{Serial: "U1", State: StateReturned}) }); err != nil {
		t.Fatalf("returned refused: %v", err)
	}
	err = db.Update(ctx, func(tx *Tx) error {
		return tx.AddCertificate(Certificate{Serial: "09", Unit: "nobody", SHA256: "cc"})
	})
	if err == nil {
		t.Fatal("a certificate of an unknown unit was stored: foreign keys are off after the migration")
	}
}

func TestRevokeAndCRLNumber(t *testing.T) {
	ctx := context.Background()
	db, _ := openTest(t)
	now := time.Now()
	err := db.Update(ctx, func(tx *Tx) error {
		if err := tx.PutUnit(Unit{Serial: "U1", State: StateShippable}); err != nil {
			return err
		}
		for _, c := range []Certificate{
			{Serial: "01", SHA256: "aa", NotAfter: now.Add(time.Hour)},
			{Serial: "02", SHA256: "bb", NotAfter: now.Add(time.Hour)},
			{Serial: "03", SHA256: "cc", NotAfter: now.Add(time.Hour), DER: []byte{1, 2, 3}},
		} {
			c.Unit = "U1"
			if err := tx.AddCertificate(c); err != nil {
				return err
			}
		}
		return tx.AddRotatedCertificate(Certificate{Serial: "04", Unit: "U1", SHA256: "dd", NotAfter: now.Add(-time.Minute)})
	})
	if err != nil {
		t.Fatal(err)
	}
	list := func() []string {
		rev, err := db.RevokedCertificates(ctx, now)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, c := range rev {
			out = append(out, c.Serial+":"+c.Reason)
		}
		return out
	}
	// 01 and 02 superseded by a new certificate: on the CRL; 03 rotated away: not yet; 04 active.
	if got := list(); len(got) != 2 || got[0] != "01:superseded" || got[1] != "02:superseded" {
		t.Fatalf("CRL entries %v", got)
	}
	c3, err := db.Certificate(ctx, "03")
	if err != nil || string(c3.DER) != "\x01\x02\x03" || c3.Status != CertSuperseded {
		t.Fatalf("certificate 03: %+v, %v", c3, err)
	}
	if err := db.Update(ctx, func(tx *Tx) error { return tx.Revoke("03", "keyCompromise", now) }); err != nil {
		t.Fatal(err)
	}
	if err := db.Update(ctx, func(tx *Tx) error { return tx.Revoke("03", "keyCompromise", now) }); !errors.Is(err, ErrAlreadyRevoked) {
		t.Fatalf("second revoke: %v", err)
	}
	if err := db.Update(ctx, func(tx *Tx) error { return tx.Revoke("04", "cessationOfOperation", now) }); err != nil {
		t.Fatal(err)
	}
	// 04 has expired: it ages out of the CRL.
	if got := list(); len(got) != 3 || !slices.Contains(got, "03:keyCompromise") {
		t.Fatalf("CRL entries %v", got)
	}
	var nums []int64
	for i := 0; i < 3; i++ {
		err := db.Update(ctx, func(tx *Tx) error {
			n, _, err := tx.NextCRLNumber(now)
			nums = append(nums, n)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if nums[0] != 1 || nums[2] != 3 {
		t.Fatalf("CRL numbers %v", nums)
	}
	exp, err := db.ExpiringCertificates(ctx, now.Add(2*time.Hour))
	if err != nil || len(exp) != 0 {
		t.Fatalf("expiring: %+v, %v (04 is revoked, nothing active)", exp, err)
	}
}
