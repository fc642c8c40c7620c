package station

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"provision/internal/fsutil"
	"provision/inventory"
	"provision/station/ca"
)

// Rotation: a new certificate for the key a unit already holds in its TPM, laid out for the device-side swap the
// edge agent does (write a shadow directory beside the live one, check it, then switch atomically).

// Rotation bundle files (OutDir/<serial>/), besides BundleCert, BundleChain and BundleRoot.
const (
	RotateManifest = "manifest.json"
	RotateReadme   = "README"
)

// RotateResult is what Rotate made.
type RotateResult struct {
	Dir      string
	Old, New *x509.Certificate
}

// rotateManifest is manifest.json of a rotation bundle (docs/lifecycle.md).
type rotateManifest struct {
	Serial      string           `json:"serial"`
	Station     string           `json:"station"`
	Created     string           `json:"created"`
	PublicKey   string           `json:"public_sha256"`
	Old         rotateManifestCe `json:"old_certificate"`
	New         rotateManifestCe `json:"certificate"`
	Files       []string         `json:"files"`
	ConfirmWith string           `json:"confirm_with"`
}

type rotateManifestCe struct {
	Serial   string `json:"serial"`
	SHA256   string `json:"sha256"`
	NotAfter string `json:"not_after"`
}

// Rotate issues a new certificate for a shippable unit's existing key (ca.Renew: same subject, SANs and public key)
// and writes the rotation bundle OutDir/<serial>/ (device.crt, chain.crt, ca.crt, manifest.json, README) through a
// temporary directory. The new certificate becomes the unit's active one (audit step rotate); the old one is
// superseded but stays valid until the device has switched: revoke it then (the README says how). The key comes from
// the unit's current certificate: the inventory's copy, else current (PEM), which must be that certificate. The CA
// must be loaded.
func (s *Station) Rotate(ctx context.Context, serial string, current []byte, outDir, operator string) (*RotateResult, error) {
	if s.CA == nil {
		return nil, fmt.Errorf("rotate: %w: the CA is not loaded", ErrCA)
	}
	u, err := s.Inv.Unit(ctx, serial)
	if err != nil {
		return nil, fmt.Errorf("rotate: %w", err)
	}
	if u.State != inventory.StateShippable {
		return nil, fmt.Errorf("rotate: unit %s is %s: only a shippable unit's certificate is rotated (a returned or failed unit is provisioned again): %w", serial, u.State, ErrRefused)
	}
	active, err := s.Inv.ActiveCertificate(ctx, serial)
	if errors.Is(err, inventory.ErrNotFound) {
		return nil, fmt.Errorf("rotate: unit %s holds no active certificate (revoked?): %w", serial, ErrRefused)
	}
	if err != nil {
		return nil, fmt.Errorf("rotate: %w", err)
	}
	old, err := currentCertificate(active, current)
	if err != nil {
		return nil, fmt.Errorf("rotate: unit %s: %w", serial, err)
	}
	nc, err := s.CA.Renew(old, ca.Request{Validity: time.Duration(s.Config.Certificate.ValidityDays) * 24 * time.Hour,
		CRLDistributionPoints: s.Config.CRL.DistributionPoints()})
	if err != nil {
		if errors.Is(err, ca.ErrExpired) {
			return nil, fmt.Errorf("rotate: %w: %w", ErrCA, err)
		}
		return nil, fmt.Errorf("rotate: %w", err)
	}
	sha := ca.Fingerprint(nc)
	pubSHA, err := publicSHA256(nc.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("rotate: %w", err)
	}
	m := rotateManifest{Serial: serial, Station: s.Config.StationID, Created: time.Now().UTC().Format(time.RFC3339), PublicKey: pubSHA,
		Old:         rotateManifestCe{CertSerial(old), active.SHA256, old.NotAfter.UTC().Format(time.RFC3339)},
		New:         rotateManifestCe{CertSerial(nc), sha, nc.NotAfter.UTC().Format(time.RFC3339)},
		Files:       []string{BundleCert, BundleChain, BundleRoot},
		ConfirmWith: fmt.Sprintf("provision revoke %s --cert %s --reason superseded", serial, CertSerial(old))}
	mj, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	files := []bundleFile{
		{BundleCert, ca.EncodeCerts(nc)},
		{BundleChain, ca.EncodeCerts(s.CA.Chain()...)},
		{BundleRoot, ca.EncodeCerts(s.CA.Root)},
		{RotateManifest, append(mj, '\n')},
		{RotateReadme, []byte(rotateReadme(m))},
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return nil, fmt.Errorf("rotate: %w", err)
	}
	tmp, err := writeTempBundle(outDir, serial, files)
	if err != nil {
		return nil, fmt.Errorf("rotate: %w", err)
	}
	defer os.RemoveAll(tmp)
	now := time.Now()
	err = s.Inv.Update(ctx, func(tx *inventory.Tx) error {
		if err := tx.AddRotatedCertificate(inventory.Certificate{Serial: CertSerial(nc), Unit: serial, SHA256: sha,
			NotBefore: nc.NotBefore, NotAfter: nc.NotAfter, Issued: now, DER: nc.Raw}); err != nil {
			return err
		}
		return tx.Append(inventory.Event{Time: now, Serial: serial, Step: inventory.StepRotate, Outcome: "ok",
			Detail:   fmt.Sprintf("certificate %s for the unit's key %.16s, replacing %s (valid until revoked)", CertSerial(nc), pubSHA, CertSerial(old)),
			Operator: operator, Station: s.Config.StationID, CertSHA256: sha})
	})
	if err != nil {
		return nil, fmt.Errorf("rotate: %w", err)
	}
	final := filepath.Join(outDir, serial)
	if err := installDir(tmp, final); err != nil {
		return nil, fmt.Errorf("rotate: certificate %s recorded, but its bundle: %w", CertSerial(nc), err)
	}
	if err := fsutil.SyncDirs(outDir, []string{final}); err != nil { // on stable storage before rotate reports success
		return nil, fmt.Errorf("rotate: certificate %s recorded, but syncing its bundle %s: %w", CertSerial(nc), final, err)
	}
	return &RotateResult{Dir: final, Old: old, New: nc}, nil
}

// currentCertificate is the unit's active certificate: the inventory's copy, else the PEM given, which must be it.
func currentCertificate(active inventory.Certificate, current []byte) (*x509.Certificate, error) {
	if len(active.DER) > 0 {
		return x509.ParseCertificate(active.DER)
	}
	if len(current) == 0 {
		return nil, fmt.Errorf("the inventory holds no copy of its certificate %s (issued before certificates were stored): give the unit's current certificate (device.crt) with --cert-file: %w", active.Serial, ErrRefused)
	}
	certs, err := ca.ParseCerts(current)
	if err != nil {
		return nil, fmt.Errorf("--cert-file: %v: %w", err, ErrRefused)
	}
	if ca.Fingerprint(certs[0]) != active.SHA256 {
		return nil, fmt.Errorf("--cert-file holds certificate %s (sha256 %.16s…), not the unit's active certificate %s (%.16s…): %w",
			CertSerial(certs[0]), ca.Fingerprint(certs[0]), active.Serial, active.SHA256, ErrRefused)
	}
	return certs[0], nil
}

type bundleFile struct {
	name string
	data []byte
}

// writeTempBundle writes files into a new temporary directory in outDir (Rotate syncs it once it is in place).
func writeTempBundle(outDir, serial string, files []bundleFile) (string, error) {
	tmp, err := os.MkdirTemp(outDir, tempPrefix+serial+"-")
	if err != nil {
		return "", err
	}
	for _, f := range files {
		if err := writeNew(filepath.Join(tmp, f.name), f.data, 0o644); err != nil {
			os.RemoveAll(tmp)
			return "", err
		}
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		os.RemoveAll(tmp)
		return "", err
	}
	return tmp, nil
}

// installDir swaps tmp in as final atomically (the old final, if any, ends in tmp).

func rotateReadme(m rotateManifest) string {
	var b strings.Builder
	fmt.Fprintf(&b, `Certificate rotation for unit %s (station %s, %s)

The unit keeps its key (in its TPM: device.tss2.pem is unchanged; public key sha256 %s). This bundle holds
its new certificate %s (valid until %s), replacing %s.

  device.crt   the new certificate (leaf)
  chain.crt    the issuing CA, then the root
  ca.crt       the root CA
  manifest.json  the same facts, for scripts

On the device, never overwrite the live certificates in place (the shadow directory pattern):
  1. copy this directory to the shadow directory beside the live one, e.g. /etc/certs.new/
     (keep the live key file: cp /etc/certs/device.tss2.pem /etc/certs.new/)
  2. check it: openssl verify -CAfile /etc/certs.new/ca.crt -untrusted /etc/certs.new/chain.crt /etc/certs.new/device.crt
     and that the certificate's public key is the key's (openssl x509 -noout -pubkey -in device.crt)
  3. switch atomically: mv /etc/certs /etc/certs.old && mv /etc/certs.new /etc/certs
  4. reload the agent (SIGHUP); once it connects with the new certificate, remove /etc/certs.old

The old certificate stays valid until the switch is confirmed. Then, at the station:
  %s
`, m.Serial, m.Station, m.Created, m.PublicKey, m.New.Serial, m.New.NotAfter, m.Old.Serial, m.ConfirmWith)
	return b.String()
}
