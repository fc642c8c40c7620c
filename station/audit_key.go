package station

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"provision/internal/fsutil"
	"provision/inventory"
)

// The station audit key signs audit.head (inventory/audit_head.go): ca/audit.key (Ed25519, PKCS#8 PEM, 0600) and
// ca/audit.pub (PKIX PEM) beside it. init makes it; `provision audit adopt-key` gives one to a station made before
// audit keys.

// ErrAuditKey: the audit key files are missing, unreadable, insecure or do not belong together. It is also ErrCA (the
// station's own key material: exit 4).
var ErrAuditKey error = auditKeyError{}

type auditKeyError struct{}

func (auditKeyError) Error() string        { return "station audit key unusable" }
func (auditKeyError) Is(target error) bool { return target == ErrCA }

// generateAuditKey writes a new audit key pair, replacing any.
func generateAuditKey(l Layout) (ed25519.PrivateKey, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("audit key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, fmt.Errorf("audit key: %w", err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("audit key: %w", err)
	}
	if err := fsutil.WriteFileSync(l.AuditKey(), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return nil, fmt.Errorf("audit key: write %s: %w", l.AuditKey(), err)
	}
	if err := fsutil.WriteFileSync(l.AuditPub(), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o644); err != nil {
		return nil, fmt.Errorf("audit key: write %s: %w", l.AuditPub(), err)
	}
	return priv, nil
}

// loadAuditPub reads ca/audit.pub; nil without error when the station has none (made before audit keys).
func loadAuditPub(l Layout) (ed25519.PublicKey, error) {
	b, err := os.ReadFile(l.AuditPub())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrAuditKey, err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PUBLIC KEY" {
		return nil, fmt.Errorf("%w: %s is not a PEM public key", ErrAuditKey, l.AuditPub())
	}
	k, err := x509.ParsePKIXPublicKey(blk.Bytes)
	pub, ok := k.(ed25519.PublicKey)
	if err != nil || !ok {
		return nil, fmt.Errorf("%w: %s is not an Ed25519 public key", ErrAuditKey, l.AuditPub())
	}
	return pub, nil
}

// loadAuditKey reads ca/audit.key; nil without error when the station has none. The key must not be readable by group
// or others, and must be the key of ca/audit.pub.
func loadAuditKey(l Layout) (ed25519.PrivateKey, error) {
	st, err := os.Stat(l.AuditKey())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrAuditKey, err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%w: %s is readable by others (mode %04o): run chmod 600 on it", ErrAuditKey, l.AuditKey(), st.Mode().Perm())
	}
	b, err := os.ReadFile(l.AuditKey())
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrAuditKey, err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("%w: %s is not a PEM private key", ErrAuditKey, l.AuditKey())
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	priv, ok := k.(ed25519.PrivateKey)
	if err != nil || !ok {
		return nil, fmt.Errorf("%w: %s is not an Ed25519 private key", ErrAuditKey, l.AuditKey())
	}
	pub, err := loadAuditPub(l)
	if err != nil {
		return nil, err
	}
	if pub == nil || !pub.Equal(priv.Public()) {
		return nil, fmt.Errorf("%w: %s is missing or is not the public key of %s", ErrAuditKey, l.AuditPub(), l.AuditKey())
	}
	return priv, nil
}

// auditOptions are the inventory options for the station's audit key: signing with it when the private key is here,
// verifying with the public key otherwise.
func auditOptions(l Layout) ([]inventory.Option, error) {
	priv, err := loadAuditKey(l)
	if err != nil {
		return nil, err
	}
	if priv != nil {
		return []inventory.Option{inventory.WithAuditKey(priv)}, nil
	}
	pub, err := loadAuditPub(l)
	if err != nil {
		return nil, err
	}
	if pub != nil {
		return []inventory.Option{inventory.WithAuditPub(pub)}, nil
	}
	return nil, nil
}

// VerifyAudit checks the station's audit log (inventory.VerifyAudit) without writing anything: not the database, its
// WAL or shared memory, nor the head. It needs only ca/audit.pub (a station made before audit keys has none: its
// unsigned head is reported).
func VerifyAudit(ctx context.Context, dir string) (inventory.AuditReport, error) {
	l := Layout{dir}
	if _, err := os.Stat(l.Config()); errors.Is(err, fs.ErrNotExist) {
		return inventory.AuditReport{}, fmt.Errorf("station %s: %w: run `provision init --station %s` first", dir, ErrNotInitialised, dir)
	}
	pub, err := loadAuditPub(l)
	if err != nil {
		return inventory.AuditReport{}, fmt.Errorf("station %s: %w", dir, err)
	}
	rep, err := inventory.VerifyFile(ctx, l.Inventory(), inventory.VerifyOptions{HeadPath: l.AuditHead(), Pub: pub, StateRule: AuditStateRule})
	if err != nil && !errors.Is(err, inventory.ErrAudit) {
		return rep, fmt.Errorf("station %s: %w", dir, err)
	}
	return rep, err
}

// AdoptAuditKey gives a station made before audit keys its key: the log is verified against its unsigned head first,
// then a key pair is made (or the one an interrupted adoption left is reused) and the head is signed with it. A station
// whose head is already signed is refused.
func AdoptAuditKey(ctx context.Context, dir string) (inventory.AuditReport, error) {
	l := Layout{dir}
	if _, err := os.Stat(l.Config()); errors.Is(err, fs.ErrNotExist) {
		return inventory.AuditReport{}, fmt.Errorf("station %s: %w: run `provision init --station %s` first", dir, ErrNotInitialised, dir)
	}
	priv, err := loadAuditKey(l)
	if err != nil {
		return inventory.AuditReport{}, err
	}
	if priv == nil {
		if _, err := os.Stat(l.AuditPub()); err == nil {
			return inventory.AuditReport{}, fmt.Errorf("%w: %s exists without %s: restore the private key", ErrAuditKey, l.AuditPub(), l.AuditKey())
		}
		// Check first, so a station whose log does not verify gets no key.
		inv, err := inventory.Open(ctx, l.Inventory(), inventory.WithAuditHead(l.AuditHead()), inventory.WithStateRule(AuditStateRule))
		if err != nil {
			return inventory.AuditReport{}, fmt.Errorf("station %s: %w", dir, err)
		}
		rep, err := inv.VerifyAudit(ctx)
		inv.Close()
		if err != nil && !rep.Unsigned {
			return rep, err
		}
		if rep.Unsigned && len(rep.Problems) > 1 {
			return rep, fmt.Errorf("station %s: the audit log does not verify: %w", dir, inventory.ErrAudit)
		}
		if priv, err = generateAuditKey(l); err != nil {
			return inventory.AuditReport{}, err
		}
	}
	inv, err := inventory.Open(ctx, l.Inventory(), inventory.WithAuditHead(l.AuditHead()), inventory.WithAuditKey(priv))
	if err != nil {
		return inventory.AuditReport{}, fmt.Errorf("station %s: %w", dir, err)
	}
	defer inv.Close()
	return inv.AdoptKey(ctx)
}
