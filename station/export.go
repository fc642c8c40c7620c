package station

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"provision/central"
	"provision/export"
	"provision/inventory"
	"provision/tpm/attest"
)

// `provision export` (docs/exports.md): the station gathers its units from the inventory (or, with --central, every
// station's from the central store) into export.Unit values; the export package writes the formats.

// ExportOptions select the units to export: one unit (Serial), or every exportable unit changed at or after Since
// (zero: all of them); from the central store, Batch narrows them to a distributed batch's units. BundlesDir, when
// set, is a directory of enroll bundles (<dir>/<serial>/device.crt) to take certificates from while the inventory (or
// the central store) keeps none.
type ExportOptions struct {
	Serial     string
	Since      time.Time
	Batch      string // ExportCentralUnits only
	BundlesDir string
}

// exportable: the states in which a unit has left, or can leave, the station with its identity: shippable (unit, tui,
// batch) and certified (enroll's end state).
func exportable(st inventory.State) bool {
	return st == inventory.StateShippable || st == inventory.StateCertified
}

// certificateDERReader is what the inventory offers once it keeps each certificate's DER (a later migration: a
// certificates.der column behind inventory.Certificate.DER). Until then certificates come from enroll bundles
// (ExportOptions.BundlesDir), and formats that need the certificate skip units without one.
type certificateDERReader interface {
	CertificateDER(ctx context.Context, certSerial string) ([]byte, error)
}

// ExportUnits reads the selected units with their active certificate and attestation evidence. An unknown serial, or
// a unit that is not exportable (not certified or shippable, or without an active certificate), is ErrRefused.
func (s *Station) ExportUnits(ctx context.Context, opt ExportOptions) ([]export.Unit, error) {
	var recs []inventory.Unit
	if opt.Serial != "" {
		u, err := s.Inv.Unit(ctx, opt.Serial)
		if errors.Is(err, inventory.ErrNotFound) {
			return nil, fmt.Errorf("export: no unit %q in %s: %w", opt.Serial, s.Inv.Path(), ErrRefused)
		}
		if err != nil {
			return nil, fmt.Errorf("export: %w", err)
		}
		if !exportable(u.State) {
			return nil, fmt.Errorf("export: unit %q is %s: only certified and shippable units are exported: %w", u.Serial, u.State, ErrRefused)
		}
		recs = []inventory.Unit{u}
	} else {
		all, err := s.Inv.Units(ctx, "")
		if err != nil {
			return nil, fmt.Errorf("export: %w", err)
		}
		for _, u := range all {
			if exportable(u.State) && !u.Updated.Before(opt.Since) {
				recs = append(recs, u)
			}
		}
	}
	out := make([]export.Unit, 0, len(recs))
	for _, u := range recs {
		eu, err := s.exportUnit(ctx, u, opt)
		if errors.Is(err, inventory.ErrNotFound) && opt.Serial == "" {
			continue // no active certificate: nothing to hand off
		}
		if errors.Is(err, inventory.ErrNotFound) {
			return nil, fmt.Errorf("export: unit %q holds no active certificate: %w", u.Serial, ErrRefused)
		}
		if err != nil {
			return nil, err
		}
		out = append(out, eu)
	}
	return out, nil
}

func (s *Station) exportUnit(ctx context.Context, u inventory.Unit, opt ExportOptions) (export.Unit, error) {
	c, err := s.Inv.ActiveCertificate(ctx, u.Serial)
	if err != nil {
		return export.Unit{}, err
	}
	eu := export.Unit{Serial: u.Serial, State: string(u.State), Station: u.Station, Operator: u.Operator, Updated: u.Updated,
		KeyKind: u.KeyKind, EKSHA256: u.EKSHA256, Fields: u.Fields,
		Certificate: export.Certificate{Serial: c.Serial, SHA256: c.SHA256, NotAfter: c.NotAfter}}
	if eu.Certificate.DER, err = certificateDER(ctx, s.Inv, c, opt.BundlesDir); err != nil {
		return export.Unit{}, err
	}
	a, err := s.Inv.Attestation(ctx, u.Serial)
	if errors.Is(err, inventory.ErrNotFound) {
		return eu, nil
	}
	if err != nil {
		return export.Unit{}, fmt.Errorf("export: %w", err)
	}
	withEvidence(&eu, a.Evidence, a.EKSHA256, u.PublicSHA256)
	return eu, nil
}

// withEvidence completes eu from the evidence of the unit's latest attestation (the station's JSON; evidenceEK the EK
// that attestation saw): the EK public area only when it is the TPM the unit is bound to, the public key only when it
// is the unit's recorded key (publicSHA256). Evidence that is absent or unusable adds nothing: formats that need it
// skip the unit.
func withEvidence(eu *export.Unit, evidence []byte, evidenceEK, publicSHA256 string) {
	var ev attest.Evidence
	if len(evidence) == 0 || json.Unmarshal(evidence, &ev) != nil {
		return
	}
	if eu.EKSHA256 != "" && evidenceEK == eu.EKSHA256 {
		eu.EKPublic = ev.EKPublic
	}
	if pub, err := attest.PublicKey(ev.KeyPublic); err == nil {
		if der, err := x509.MarshalPKIXPublicKey(pub); err == nil && sha256Hex(der) == publicSHA256 {
			eu.PublicKey = der
		}
	}
}

// exportableStates are the states exportable allows, for the central store's query.
func exportableStates() []string {
	return []string{string(inventory.StateShippable), string(inventory.StateCertified)}
}

// ExportCentralUnits is ExportUnits from the central store: the selected units of every station (opt.Batch: the units
// of a distributed batch, batch --central), each with its active certificate at the station that made it and the
// evidence of its latest attestation there. A certificate the store holds no copy of (pushed before the store kept
// certificates) comes from opt.BundlesDir when set, else stays empty and the formats that need it skip the unit. An
// unknown serial, or one that is not exportable, is ErrRefused, as in ExportUnits.
func (s *Station) ExportCentralUnits(ctx context.Context, store *central.Store, opt ExportOptions) ([]export.Unit, error) {
	f := central.ExportFilter{Batch: opt.Batch, Since: opt.Since, States: exportableStates()}
	if opt.Serial != "" {
		f = central.ExportFilter{Serials: []string{opt.Serial}}
	}
	recs, err := store.ExportUnits(ctx, f)
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	if opt.Serial != "" {
		switch {
		case len(recs) == 0:
			return nil, fmt.Errorf("export: no unit %q in the central store %s: %w", opt.Serial, store.Where(), ErrRefused)
		case !exportable(inventory.State(recs[0].Unit.State)):
			return nil, fmt.Errorf("export: unit %q is %s at station %s: only certified and shippable units are exported: %w",
				opt.Serial, recs[0].Unit.State, recs[0].Unit.Station, ErrRefused)
		case recs[0].Certificate.Serial == "":
			return nil, fmt.Errorf("export: unit %q holds no active certificate: %w", opt.Serial, ErrRefused)
		}
	}
	out := make([]export.Unit, 0, len(recs))
	for _, r := range recs {
		u, c := r.Unit, r.Certificate
		if c.Serial == "" {
			continue // no active certificate: nothing to hand off
		}
		eu := export.Unit{Serial: u.Serial, State: u.State, Station: u.Station, Operator: u.Operator, Updated: u.Updated,
			KeyKind: u.KeyKind, EKSHA256: u.EKSHA256,
			Certificate: export.Certificate{Serial: c.Serial, SHA256: c.SHA256, NotAfter: c.NotAfter}}
		ic := inventory.Certificate{Serial: c.Serial, Unit: c.Unit, SHA256: c.SHA256, DER: c.DER}
		if eu.Certificate.DER, err = certificateDER(ctx, nil, ic, opt.BundlesDir); err != nil {
			return nil, err
		}
		withEvidence(&eu, r.Evidence, r.EvidenceEKSHA256, u.PublicSHA256)
		out = append(out, eu)
	}
	return out, nil
}

// certificateDER is the DER of certificate c: from inv when it keeps certificates (certificateDERReader), else from
// the unit's enroll bundle when bundles is set and the bundle's device.crt is that certificate; nil when neither has it.
// A copy whose fingerprint is not the inventory's is never used.
func certificateDER(ctx context.Context, inv any, c inventory.Certificate, bundles string) ([]byte, error) {
	if len(c.DER) > 0 && sha256Hex(c.DER) == c.SHA256 { // the inventory keeps certificates issued since migration 0005
		return c.DER, nil
	}
	if r, ok := inv.(certificateDERReader); ok {
		der, err := r.CertificateDER(ctx, c.Serial)
		if err == nil && sha256Hex(der) == c.SHA256 {
			return der, nil
		}
		if err != nil && !errors.Is(err, inventory.ErrNotFound) {
			return nil, fmt.Errorf("export: %w", err)
		}
	}
	if bundles == "" {
		return nil, nil
	}
	b, err := os.ReadFile(filepath.Join(bundles, c.Unit, "device.crt"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("export: bundle of %s: %w", c.Unit, err)
	}
	for rest := b; ; {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil {
			return nil, nil
		}
		if blk.Type == "CERTIFICATE" && sha256Hex(blk.Bytes) == c.SHA256 {
			return blk.Bytes, nil
		}
	}
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// IssuingCertPEM is the station's issuing CA certificate (ca/issuing.crt), the CA a fleet backend registers (aws).
func (s *Station) IssuingCertPEM() ([]byte, error) {
	blk, err := s.issuingCertBlock()
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	return pem.EncodeToMemory(blk), nil
}

// IssuedHere splits units into those whose certificate this station's issuing CA signed (and those without a
// certificate copy: the format skips them itself) and the others, skipped with the reason. An AWS registration line
// carries the CA that issued its certificate, and a station knows only its own; the units of a station with another
// issuing CA are exported at that station.
func (s *Station) IssuedHere(units []export.Unit) ([]export.Unit, []export.Skipped, error) {
	blk, err := s.issuingCertBlock()
	if err != nil {
		return nil, nil, fmt.Errorf("export: %w", err)
	}
	issuing, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("export: %s: %w: %w", s.Layout.IssuingCert(), err, ErrCA)
	}
	var here []export.Unit
	var others []export.Skipped
	for _, u := range units {
		if len(u.Certificate.DER) > 0 {
			c, err := x509.ParseCertificate(u.Certificate.DER)
			if err != nil || c.CheckSignatureFrom(issuing) != nil {
				others = append(others, export.Skipped{Serial: u.Serial, Reason: fmt.Sprintf("its certificate was not "+
					"issued by this station's issuing CA: export it at station %s", u.Station)})
				continue
			}
		}
		here = append(here, u)
	}
	return here, others, nil
}

// issuingCertBlock is the first PEM block of ca/issuing.crt, a certificate.
func (s *Station) issuingCertBlock() (*pem.Block, error) {
	b, err := os.ReadFile(s.Layout.IssuingCert())
	if err != nil {
		return nil, fmt.Errorf("issuing CA certificate: %w: %w", err, ErrCA)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s is not a PEM certificate: %w", s.Layout.IssuingCert(), ErrCA)
	}
	return blk, nil
}

// ExportManifest is the signed manifest of units: the document and its detached signature by the station audit key
// (ca/audit.key). A station without an audit key cannot sign: ErrAuditKey (run `provision audit adopt-key`).
func (s *Station) ExportManifest(units []export.Unit, now time.Time) (doc, sig []byte, err error) {
	key, err := loadAuditKey(s.Layout)
	if err != nil {
		return nil, nil, fmt.Errorf("export manifest: %w", err)
	}
	if key == nil {
		return nil, nil, fmt.Errorf("export manifest: %w: %s is missing: run `provision audit adopt-key`", ErrAuditKey, s.Layout.AuditKey())
	}
	if doc, err = export.Manifest(s.Config.StationID, now, units); err != nil {
		return nil, nil, fmt.Errorf("export manifest: %w", err)
	}
	if sig, err = export.Sign(key, doc); err != nil {
		return nil, nil, err
	}
	return doc, sig, nil
}
