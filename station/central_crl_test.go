package station

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"testing"
	"time"

	"provision/central"
	"provision/export"
	"provision/internal/testutil"
)

// Two stations on one store: station B revokes a unit and makes its CRL; after B syncs, the store holds B's CRL under
// B's id (listing the revoked serial), and station A's serve hook answers it for B's id while it answers its own id
// from its own directory.
func TestCentralCRLPerStation(t *testing.T) {
	dsn := testutil.PostgresDB(t)
	store := initCentral(t, dsn)
	a := centralStation(t, "line-a", dsn, CentralRequired)
	b := centralStation(t, "line-b", dsn, CentralRequired)
	ctx := context.Background()
	out := t.TempDir()
	for _, u := range []struct {
		s      *Station
		serial string
	}{{a, "SN-A1"}, {b, "SN-B1"}, {b, "SN-B2"}} {
		if r := enrollOne(t, u.s, openDevice(t, "soft"), u.serial, out, false); r.Err != nil {
			t.Fatal(r.Err)
		}
	}
	ownA, _, err := a.CRL(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []*Station{a, b} {
		if _, err := s.SyncCentral(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := store.CRL(ctx, "line-b"); !errors.Is(err, central.ErrNotFound) {
		t.Fatalf("station B's CRL before it made one: %v, want ErrNotFound", err)
	}
	if _, err := a.StationCRL(ctx, store, "line-b"); !errors.Is(err, central.ErrNotFound) {
		t.Fatalf("serve hook for B before it made a CRL: %v, want ErrNotFound", err)
	}

	revoked, err := b.Revoke(ctx, RevokeRequest{Unit: "SN-B1", Reason: "keyCompromise", Operator: "t"})
	if err != nil {
		t.Fatal(err)
	}
	crlB, number, err := b.CRL(ctx)
	if err != nil {
		t.Fatal(err)
	}
	res, err := b.SyncCentral(ctx)
	if err != nil || res.CRL != number || res.Events == 0 {
		t.Fatalf("B's sync after revoke and crl: %+v, %v; want CRL %d pushed", res, err, number)
	}
	got, err := store.CRL(ctx, "line-b")
	if err != nil || !bytes.Equal(got, crlB) {
		t.Fatalf("the store's CRL of B is not B's latest (%v)", err)
	}
	rl, err := x509.ParseRevocationList(got)
	if err != nil || len(rl.RevokedCertificateEntries) != 1 ||
		fmt.Sprintf("%x", rl.RevokedCertificateEntries[0].SerialNumber) != revoked[0].Serial {
		t.Fatalf("B's CRL from the store: %+v, %v; want certificate %s", rl, err, revoked[0].Serial)
	}

	// Station A's serve hook: B's CRL from the store, its own from its directory, none for an unknown station.
	if der, err := a.StationCRL(ctx, store, "line-b"); err != nil || !bytes.Equal(der, crlB) {
		t.Errorf("serve hook at A for B: %v", err)
	}
	if der, err := a.StationCRL(ctx, store, "line-a"); err != nil || !bytes.Equal(der, ownA) {
		t.Errorf("serve hook at A for A: %v", err)
	}
	if _, err := a.StationCRL(ctx, store, "line-x"); !errors.Is(err, central.ErrNotFound) {
		t.Errorf("serve hook for an unknown station: %v, want ErrNotFound", err)
	}

	// Nothing new: the next sync pushes no CRL. A CRL signed by another CA is never pushed as B's.
	if res, err := b.SyncCentral(ctx); err != nil || res.CRL != 0 {
		t.Errorf("sync without a new CRL: %+v, %v", res, err)
	}
	for i := 0; i < 3; i++ { // A's CRL numbers pass B's
		if ownA, _, err = a.CRL(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(b.Layout.CRLFile(), ownA, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := b.SyncCentral(ctx); err == nil {
		t.Error("B pushed a CRL of another CA")
	}
	if got, _ := store.CRL(ctx, "line-b"); !bytes.Equal(got, crlB) {
		t.Error("the store's CRL of B was replaced by another CA's")
	}
}

// Units provisioned at two stations, exported from the central store: each format gives, for each unit, what the
// station that made it exports from its own inventory. A unit whose certificate the store holds no copy of is skipped
// with its reason.
func TestCentralExportMatchesLocal(t *testing.T) {
	dsn := testutil.PostgresDB(t)
	store := initCentral(t, dsn)
	a := centralStation(t, "line-a", dsn, CentralRequired)
	a.Config.Attestation = AttestRecord // the TPM unit's EK public area goes to Azure
	b := centralStation(t, "line-b", dsn, CentralRequired)
	ctx := context.Background()
	out := t.TempDir()
	for _, u := range []struct {
		s           *Station
		uri, serial string
	}{{a, "sim", "SN-A1"}, {a, "soft", "SN-A2"}, {b, "soft", "SN-B1"}} {
		if r := enrollOne(t, u.s, openDevice(t, u.uri), u.serial, out, false); r.Err != nil {
			t.Fatal(r.Err)
		}
	}
	for _, s := range []*Station{a, b} {
		if _, err := s.SyncCentral(ctx); err != nil {
			t.Fatal(err)
		}
	}
	all, err := b.ExportCentralUnits(ctx, store, ExportOptions{})
	if err != nil || len(all) != 3 {
		t.Fatalf("export from the central store: %d units, %v", len(all), err)
	}
	if all[0].EKPublic == nil || all[0].PublicKey == nil {
		t.Errorf("the TPM unit without its EK public area or attested key: %+v", all[0])
	}
	now := time.Now()
	for _, s := range []*Station{a, b} {
		local, err := s.ExportUnits(ctx, ExportOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var fromCentral []export.Unit
		for _, u := range all {
			if u.Station == s.Config.StationID {
				fromCentral = append(fromCentral, u)
			}
		}
		caPEM, err := s.IssuingCertPEM()
		if err != nil {
			t.Fatal(err)
		}
		for _, format := range []string{"mender", "aws", "azure", "manifest"} {
			render := func(units []export.Unit) string {
				var buf bytes.Buffer
				if format == "manifest" {
					doc, err := export.Manifest(s.Config.StationID, now, units)
					if err != nil {
						t.Fatal(err)
					}
					return string(doc)
				}
				skipped, err := export.Write(&buf, format, units, caPEM)
				if err != nil || len(skipped) != 0 {
					t.Fatalf("%s %s: skipped %v, %v", s.Config.StationID, format, skipped, err)
				}
				return buf.String()
			}
			if l, c := render(local), render(fromCentral); l != c || len(local) == 0 {
				t.Errorf("%s %s: local export\n%s\nfrom the central store\n%s", s.Config.StationID, format, l, c)
			}
		}
	}

	// One serial; a unit of another station; refusals as in the local export.
	if one, err := a.ExportCentralUnits(ctx, store, ExportOptions{Serial: "SN-B1"}); err != nil || len(one) != 1 || one[0].Station != "line-b" {
		t.Errorf("--serial SN-B1 from A: %+v, %v", one, err)
	}
	if _, err := a.ExportCentralUnits(ctx, store, ExportOptions{Serial: "SN-NONE"}); !errors.Is(err, ErrRefused) {
		t.Errorf("an unknown serial: %v, want ErrRefused", err)
	}
	if later, err := a.ExportCentralUnits(ctx, store, ExportOptions{Since: time.Now().Add(time.Hour)}); err != nil || len(later) != 0 {
		t.Errorf("--since an hour ahead: %d units, %v", len(later), err)
	}

	// A unit pushed before the store kept certificates: no copy, skipped with the reason.
	at := time.Now().Add(-time.Minute)
	old := central.Batch{Station: "line-old",
		Units: []central.Unit{{Serial: "SN-OLD", State: "shippable", KeyKind: "soft", PublicSHA256: sha256Hex([]byte("k")),
			Created: at, Updated: at}},
		Certificates: []central.Certificate{{Serial: "0badc0de", Unit: "SN-OLD", SHA256: sha256Hex([]byte("old certificate")),
			Status: "active", NotBefore: at, NotAfter: at.AddDate(1, 0, 0), Issued: at}}}
	if _, err := store.Push(ctx, old); err != nil {
		t.Fatal(err)
	}
	units, err := a.ExportCentralUnits(ctx, store, ExportOptions{Serial: "SN-OLD"})
	if err != nil || len(units) != 1 || units[0].Certificate.DER != nil {
		t.Fatalf("SN-OLD: %+v, %v", units, err)
	}
	for _, format := range []string{"mender", "aws", "azure"} {
		skipped, err := export.Write(&bytes.Buffer{}, format, units, []byte("ca"))
		if err != nil || len(skipped) != 1 || skipped[0].Serial != "SN-OLD" || skipped[0].Reason == "" {
			t.Errorf("%s of a unit without a certificate copy: skipped %v, %v", format, skipped, err)
		}
	}
}
