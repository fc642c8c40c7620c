package station

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"provision/export"
	"provision/inventory"
)

func TestExportUnitsFromTheInventory(t *testing.T) {
	ctx := context.Background()
	s := newStation(t)
	out := t.TempDir()
	if r := enrollOne(t, s, openDevice(t, "sim"), "SN-0001", out, false); r.Err != nil {
		t.Fatal(r.Err)
	}
	if r := enrollOne(t, s, openDevice(t, "soft"), "SN-0002", out, false); r.Err != nil {
		t.Fatal(r.Err)
	}

	units, err := s.ExportUnits(ctx, ExportOptions{BundlesDir: out})
	if err != nil || len(units) != 2 {
		t.Fatalf("ExportUnits: %d units, %v", len(units), err)
	}
	for _, u := range units {
		if u.Certificate.DER == nil || sha256Hex(u.Certificate.DER) != u.Certificate.SHA256 {
			t.Errorf("%s: certificate not taken from its bundle", u.Serial)
		}
	}
	tpmUnit := units[0]
	if tpmUnit.Serial != "SN-0001" || tpmUnit.KeyKind != "tpm" || tpmUnit.PublicKey == nil {
		t.Fatalf("TPM unit without its attested public key: %+v", tpmUnit)
	}
	if tpmUnit.EKSHA256 == "" || tpmUnit.EKPublic == nil {
		t.Errorf("TPM unit without its EK public area: ek_sha256 %q", tpmUnit.EKSHA256)
	}
	cert, err := x509.ParseCertificate(tpmUnit.Certificate.DER)
	if err != nil || !bytes.Equal(cert.RawSubjectPublicKeyInfo, tpmUnit.PublicKey) {
		t.Errorf("the attested key is not the certificate's key (%v)", err)
	}

	// Without bundles: the inventory keeps each certificate, and Mender gets both units' keys.
	bare, err := s.ExportUnits(ctx, ExportOptions{})
	if err != nil || len(bare) != 2 || bare[1].Certificate.DER == nil {
		t.Fatalf("ExportUnits without bundles: %d units, %v", len(bare), err)
	}
	var buf bytes.Buffer
	skipped, err := export.Mender(&buf, bare)
	if err != nil || len(skipped) != 0 {
		t.Fatalf("mender: skipped %v, %v", skipped, err)
	}
	var dev export.MenderDevice
	if err := json.NewDecoder(&buf).Decode(&dev); err != nil {
		t.Fatal(err)
	}
	if blk, _ := pem.Decode([]byte(dev.PubKey)); blk == nil || !bytes.Equal(blk.Bytes, cert.RawSubjectPublicKeyInfo) {
		t.Errorf("mender pubkey is not the unit's key")
	}

	// Selection: one serial, --since, unknown serials.
	one, err := s.ExportUnits(ctx, ExportOptions{Serial: "SN-0002"})
	if err != nil || len(one) != 1 || one[0].Serial != "SN-0002" {
		t.Errorf("--serial SN-0002: %v, %v", one, err)
	}
	if _, err := s.ExportUnits(ctx, ExportOptions{Serial: "SN-9999"}); !errors.Is(err, ErrRefused) {
		t.Errorf("unknown serial: %v, want ErrRefused", err)
	}
	if later, err := s.ExportUnits(ctx, ExportOptions{Since: time.Now().Add(time.Hour)}); err != nil || len(later) != 0 {
		t.Errorf("--since an hour ahead: %d units, %v", len(later), err)
	}
	if earlier, err := s.ExportUnits(ctx, ExportOptions{Since: time.Now().Add(-time.Hour)}); err != nil || len(earlier) != 2 {
		t.Errorf("--since an hour ago: %d units, %v", len(earlier), err)
	}

	// Azure: TPM attestation exactly when the unit's EK is RSA; X.509 for the soft unit.
	var az bytes.Buffer
	if skipped, err := export.Azure(&az, units); err != nil || len(skipped) != 0 {
		t.Fatalf("azure: skipped %v, %v", skipped, err)
	}
	var enr []export.AzureEnrollment
	for _, line := range bytes.Split(bytes.TrimSpace(az.Bytes()), []byte("\n")) {
		var e export.AzureEnrollment
		if err := json.Unmarshal(line, &e); err != nil {
			t.Fatal(err)
		}
		enr = append(enr, e)
	}
	if rsa := tpmUnit.EKPublic[0] == 0 && tpmUnit.EKPublic[1] == 1; (enr[0].Attestation.Type == "tpm") != rsa {
		t.Errorf("TPM unit: attestation %q with an RSA EK: %v", enr[0].Attestation.Type, rsa)
	}
	if enr[1].Attestation.Type != "x509" {
		t.Errorf("soft unit: attestation %q, want x509", enr[1].Attestation.Type)
	}

	ca, err := s.IssuingCertPEM()
	if err != nil {
		t.Fatal(err)
	}
	if skipped, err := export.AWS(&bytes.Buffer{}, units, ca); err != nil || len(skipped) != 0 {
		t.Errorf("aws: skipped %v, %v", skipped, err)
	}
}

func TestExportManifestSignedByTheAuditKey(t *testing.T) {
	s := newStation(t)
	if r := enrollOne(t, s, openDevice(t, "soft"), "SN-0001", t.TempDir(), false); r.Err != nil {
		t.Fatal(r.Err)
	}
	units, err := s.ExportUnits(context.Background(), ExportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	doc, sig, err := s.ExportManifest(units, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	pub, err := loadAuditPub(s.Layout)
	if err != nil || !export.Verify(pub, doc, sig) || len(sig) != ed25519.SignatureSize {
		t.Fatalf("manifest signature does not verify with ca/audit.pub (%v)", err)
	}
	var m export.ManifestDoc
	if err := json.Unmarshal(doc, &m); err != nil || m.Station != "test" || len(m.Units) != 1 || m.Units[0].Certificate.SHA256 == "" {
		t.Errorf("manifest: %+v, %v", m, err)
	}
	if err := os.Remove(filepath.Join(s.Layout.Dir, "ca", "audit.key")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.ExportManifest(units, time.Now()); !errors.Is(err, ErrAuditKey) {
		t.Errorf("without ca/audit.key: %v, want ErrAuditKey", err)
	}
}

// derInventory is an inventory that keeps certificate DER, as certificateDERReader describes.
type derInventory map[string][]byte

func (d derInventory) CertificateDER(_ context.Context, serial string) ([]byte, error) {
	if der, ok := d[serial]; ok {
		return der, nil
	}
	return nil, inventory.ErrNotFound
}

// Once the inventory keeps certificates, they come from it; a copy that is not the recorded certificate is ignored.
func TestExportCertificateFromAnInventoryThatKeepsDER(t *testing.T) {
	ctx := context.Background()
	der := []byte("certificate DER")
	c := inventory.Certificate{Serial: "01", Unit: "SN-0001", SHA256: sha256Hex(der)}
	if got, err := certificateDER(ctx, derInventory{"01": der}, c, ""); err != nil || !bytes.Equal(got, der) {
		t.Errorf("from the inventory: %q, %v", got, err)
	}
	if got, err := certificateDER(ctx, derInventory{"01": []byte("another")}, c, ""); err != nil || got != nil {
		t.Errorf("a mismatched copy: %q, %v", got, err)
	}
	if got, err := certificateDER(ctx, derInventory{}, c, ""); err != nil || got != nil {
		t.Errorf("none kept: %q, %v", got, err)
	}
}
