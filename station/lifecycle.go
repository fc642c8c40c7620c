package station

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"time"

	"provision/central"
	"provision/internal/fsutil"
	"provision/inventory"
	"provision/station/ca"
)

// Life after the line (docs/lifecycle.md): revocation and the CRL, returned units (RMA), expiring certificates.
// Rotation is in lifecycle_rotate.go, the server CA in lifecycle_server.go.

// ReasonRMA is the revocation reason of a returned unit's certificate: the unit left service. A unit returned
// because its key may be known is revoked with keyCompromise first (provision revoke).
const ReasonRMA = "cessationOfOperation"

// CRLFile is the station's latest CRL (DER), written by every CRL the station makes; `provision serve` answers
// /crl/<station_id> with it. CRLPEMFile is the same CRL in PEM (a broker's crlfile).
func (l Layout) CRLFile() string    { return filepath.Join(l.Dir, "crl.der") }
func (l Layout) CRLPEMFile() string { return filepath.Join(l.Dir, "crl.pem") }

// RevokeRequest names what to revoke: the unit's valid certificates (its active one, and one a rotation replaced
// that is not on the CRL yet), or the one certificate CertSerial (lowercase hex; Unit may then be empty).
type RevokeRequest struct {
	Unit       string
	CertSerial string
	Reason     string // RFC 5280 reason name in camelCase
	Operator   string
}

// Revoke marks certificates revoked, each with an audit entry (step revoke, its fingerprint, the reason) in one
// transaction. Nothing to revoke, a certificate of another unit or one revoked already is ErrRefused; an unknown
// unit or certificate is inventory.ErrNotFound.
func (s *Station) Revoke(ctx context.Context, req RevokeRequest) ([]inventory.Certificate, error) {
	if _, err := ca.ReasonCode(req.Reason); err != nil {
		return nil, fmt.Errorf("revoke: %w", err)
	}
	var targets []inventory.Certificate
	switch {
	case req.CertSerial != "":
		c, err := s.Inv.Certificate(ctx, req.CertSerial)
		if err != nil {
			return nil, fmt.Errorf("revoke: %w", err)
		}
		if req.Unit != "" && c.Unit != req.Unit {
			return nil, fmt.Errorf("revoke: certificate %s belongs to unit %s, not %s: %w", c.Serial, c.Unit, req.Unit, ErrRefused)
		}
		targets = append(targets, c)
	default:
		if _, err := s.Inv.Unit(ctx, req.Unit); err != nil {
			return nil, fmt.Errorf("revoke: %w", err)
		}
		certs, err := s.Inv.Certificates(ctx, req.Unit)
		if err != nil {
			return nil, fmt.Errorf("revoke: %w", err)
		}
		for _, c := range certs {
			if c.Status == inventory.CertActive || (c.Status == inventory.CertSuperseded && c.RevokedAt.IsZero()) {
				targets = append(targets, c)
			}
		}
		if len(targets) == 0 {
			return nil, fmt.Errorf("revoke: unit %s holds no valid certificate (every one is revoked or superseded): %w", req.Unit, ErrRefused)
		}
	}
	now := time.Now()
	err := s.Inv.Update(ctx, func(tx *inventory.Tx) error {
		for _, c := range targets {
			if err := tx.Revoke(c.Serial, req.Reason, now); err != nil {
				return err
			}
			if err := tx.Append(inventory.Event{Time: now, Serial: c.Unit, Step: inventory.StepRevoke, Outcome: "ok",
				Detail: fmt.Sprintf("certificate %s revoked (%s)", c.Serial, req.Reason), Operator: req.Operator,
				Station: s.Config.StationID, CertSHA256: c.SHA256}); err != nil {
				return err
			}
		}
		return nil
	})
	if errors.Is(err, inventory.ErrAlreadyRevoked) {
		return nil, fmt.Errorf("revoke: %w: %w", err, ErrRefused)
	}
	if err != nil {
		return nil, fmt.Errorf("revoke: %w", err)
	}
	return targets, nil
}

// CRL makes and signs the station's CRL now (the CA must be loaded): every certificate revoked or superseded and not
// yet expired, the next CRL number (stored, never reused), thisUpdate now, nextUpdate crl.next_update_hours later. It
// is also kept as crl.der and crl.pem in the station directory, for serve and a broker's crlfile.
func (s *Station) CRL(ctx context.Context) (der []byte, number int64, err error) {
	if s.CA == nil {
		return nil, 0, fmt.Errorf("crl: %w: the CA is not loaded", ErrCA)
	}
	now := time.Now().UTC().Truncate(time.Second)
	certs, err := s.Inv.RevokedCertificates(ctx, now)
	if err != nil {
		return nil, 0, fmt.Errorf("crl: %w", err)
	}
	entries := make([]ca.Revoked, 0, len(certs))
	for _, c := range certs {
		serial, ok := new(big.Int).SetString(c.Serial, 16)
		if !ok {
			return nil, 0, fmt.Errorf("crl: certificate serial %q of unit %s is not hex: %w", c.Serial, c.Unit, inventory.ErrDamaged)
		}
		code, err := ca.ReasonCode(c.Reason)
		if err != nil {
			code = 0 // a reason this version does not know: unspecified
		}
		entries = append(entries, ca.Revoked{Serial: serial, At: c.RevokedAt, Reason: code})
	}
	err = s.Inv.Update(ctx, func(tx *inventory.Tx) error {
		var this time.Time
		if number, this, err = tx.NextCRLNumber(now); err != nil {
			return err
		}
		der, err = s.CA.CRL(entries, number, this, this.Add(s.Config.CRL.NextUpdate()))
		return err
	})
	if err != nil {
		return nil, 0, fmt.Errorf("crl: %w", err)
	}
	if err := fsutil.WriteFileAtomic(s.Layout.CRLFile(), der, 0o644); err != nil {
		return nil, 0, fmt.Errorf("crl: %w", err)
	}
	if err := fsutil.WriteFileAtomic(s.Layout.CRLPEMFile(), CRLPEM(der), 0o644); err != nil {
		return nil, 0, fmt.Errorf("crl: %w", err)
	}
	return der, number, nil
}

// CRLPEM is a DER CRL in PEM ("X509 CRL").
func CRLPEM(der []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}) }

// ServeCRL is the hook for `provision serve`'s GET /crl/{station_id} (server.Config.CRL): this station's latest CRL
// (DER) for its own id; for another id or before the first CRL an error wrapping both inventory.ErrNotFound and
// central.ErrNotFound (the server's 404). With the CA loaded (s.CA), a
// CRL past half its validity is made anew first, so a running serve keeps it fresh; without it, `provision crl` must
// run at least every crl.next_update_hours (a timer).
func (s *Station) ServeCRL(ctx context.Context, stationID string) ([]byte, error) {
	if stationID != s.Config.StationID {
		return nil, fmt.Errorf("crl of station %q: not this station (%s): %w: %w", stationID, s.Config.StationID, inventory.ErrNotFound, central.ErrNotFound)
	}
	der, err := os.ReadFile(s.Layout.CRLFile())
	stale := err != nil
	if err == nil {
		rl, perr := x509.ParseRevocationList(der)
		stale = perr != nil || time.Now().After(rl.ThisUpdate.Add(rl.NextUpdate.Sub(rl.ThisUpdate)/2))
	}
	if stale && s.CA != nil {
		fresh, _, cerr := s.CRL(ctx)
		if cerr == nil {
			return fresh, nil
		}
		if err != nil {
			return nil, cerr
		}
	}
	if err != nil {
		return nil, fmt.Errorf("crl of station %q: no CRL made yet (run provision crl): %w: %w", stationID, inventory.ErrNotFound, central.ErrNotFound)
	}
	return der, nil
}

// RMA takes back a shipped unit: it becomes returned (re-provisionable like a failed unit: a new key in its TPM, a
// new certificate), its active certificate is revoked (ReasonRMA) and one audit entry (step rma) records both. Its
// history, its TPM binding (EK) and its data are kept. A unit that is not shippable is ErrRefused.
func (s *Station) RMA(ctx context.Context, serial, operator string) (*inventory.Certificate, error) {
	var revoked *inventory.Certificate
	err := s.Inv.Update(ctx, func(tx *inventory.Tx) error {
		u, err := tx.Unit(serial)
		if err != nil {
			return err
		}
		if u.State != inventory.StateShippable {
			return fmt.Errorf("unit %s is %s: only a shippable (shipped) unit is returned: %w", serial, u.State, ErrRefused)
		}
		now := time.Now()
		detail := "returned"
		var sha string
		if c, err := tx.ActiveCertificate(serial); err == nil {
			if err := tx.Revoke(c.Serial, ReasonRMA, now); err != nil {
				return err
			}
			revoked, sha = &c, c.SHA256
			detail += fmt.Sprintf("; certificate %s revoked (%s)", c.Serial, ReasonRMA)
		} else if !errors.Is(err, inventory.ErrNotFound) {
			return err
		}
		u.State, u.FailedStep, u.Error, u.Operator, u.Station = inventory.StateReturned, "", "", operator, s.Config.StationID
		if err := tx.PutUnit(u); err != nil {
			return err
		}
		return tx.Append(inventory.Event{Time: now, Serial: serial, Step: inventory.StepRMA, Outcome: "ok", Detail: detail,
			Operator: operator, Station: s.Config.StationID, CertSHA256: sha})
	})
	if err != nil {
		return nil, fmt.Errorf("rma: %w", err)
	}
	return revoked, nil
}

// Expiring is a unit whose active certificate expires soon.
type Expiring struct {
	Unit        inventory.Unit
	Certificate inventory.Certificate
}

// ExpiringWithin lists the units whose active certificate expires before now + within, soonest first.
func (s *Station) ExpiringWithin(ctx context.Context, within time.Duration) ([]Expiring, error) {
	certs, err := s.Inv.ExpiringCertificates(ctx, time.Now().Add(within))
	if err != nil {
		return nil, fmt.Errorf("expiring: %w", err)
	}
	out := make([]Expiring, 0, len(certs))
	for _, c := range certs {
		u, err := s.Inv.Unit(ctx, c.Unit)
		if err != nil {
			return nil, fmt.Errorf("expiring: %w", err)
		}
		out = append(out, Expiring{Unit: u, Certificate: c})
	}
	return out, nil
}
