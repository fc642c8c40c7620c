package inventory

import (
	"context"
	"errors"
	"testing"
)

func TestAttestationsAndOneTPMOneUnit(t *testing.T) {
	db, _ := openTest(t)
	ctx := context.Background()
	put := func(u Unit) error { return db.Update(ctx, func(tx *Tx) error { return tx.PutUnit(u) }) }
	if err := put(Unit{Serial: "SN-1", State: StateKeyed, EKSHA256: "ek-a"}); err != nil {
		t.Fatal(err)
	}
	// The database itself refuses a second unit with the same EK.
	if err := put(Unit{Serial: "SN-2", State: StateKeyed, EKSHA256: "ek-a"}); !errors.Is(err, ErrDuplicate) {
		t.Fatalf("second unit with the same EK: got %v, want ErrDuplicate", err)
	}
	// An empty EK in a later write keeps the binding (a re-provisioned unit stays bound to its TPM).
	if err := put(Unit{Serial: "SN-1", State: StateCertified}); err != nil {
		t.Fatal(err)
	}
	u, err := db.UnitByEK(ctx, "ek-a")
	if err != nil || u.Serial != "SN-1" || u.EKSHA256 != "ek-a" {
		t.Fatalf("UnitByEK: %+v, %v", u, err)
	}
	if _, err := db.UnitByEK(ctx, "ek-b"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown EK: %v", err)
	}
	if _, err := db.Attestation(ctx, "SN-1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("no attestation yet: %v", err)
	}
	for _, a := range []Attestation{
		{Serial: "SN-1", Policy: "record", Outcome: "failed", Status: AttestUntrusted, Cause: "first"},
		{Serial: "SN-1", Policy: "record", Outcome: "ok", Status: AttestTrusted, EKSHA256: "ek-a", Warnings: []string{"w1", "w2"},
			Evidence: []byte(`{"version":1}`)},
	} {
		if err := db.Update(ctx, func(tx *Tx) error { return tx.AddAttestation(a) }); err != nil {
			t.Fatal(err)
		}
	}
	a, err := db.Attestation(ctx, "SN-1")
	if err != nil {
		t.Fatal(err)
	}
	if a.Status != AttestTrusted || a.Outcome != "ok" || len(a.Warnings) != 2 || string(a.Evidence) != `{"version":1}` ||
		a.EvidenceSHA256 != EvidenceSHA256(a.Evidence) || a.EvidenceSHA256 == "" {
		t.Fatalf("latest attestation: %+v", a)
	}
	bad := Attestation{Serial: "SN-1", Policy: "record", Outcome: "ok", Status: "genuine-ish"}
	if err := db.Update(ctx, func(tx *Tx) error { return tx.AddAttestation(bad) }); err == nil {
		t.Fatal("a status outside the contract was stored")
	}
}
