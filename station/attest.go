package station

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"provision/inventory"
	"provision/station/ca"
	"provision/tpm"
	"provision/tpm/attest"
)

// The attest step (after key, before csr): proof that the unit's key lives in a genuine TPM. The TPM's EK certificate
// is chained to a TPM vendor root; the TPM proves it holds that EK (credential activation of a fresh attestation key)
// and certifies the new device key with that AK over a fresh nonce. The evidence goes into the inventory's
// attestations table, the EK binds the TPM to the unit (one TPM, one unit), and the device certificate names the EK.

// ErrTPMBound: the unit's TPM is already bound to another unit (exit 3).
var ErrTPMBound = fmt.Errorf("TPM already bound to another unit: %w", ErrRefused)

// attestation is what the attest step leaves for the rest of the run.
type attestation struct {
	row   inventory.Attestation
	bind  string   // ek_sha256 the unit is bound to once the step passes ("" for soft/off)
	ekURI *url.URL // the device certificate's URI naming the TPM
	// For a profile that writes them (from: ak_cert, ak_key): the AK's certificate, issued by the station, and its
	// TSS2 key file.
	akCert *x509.Certificate
	akKey  []byte
	// nv: the EK certificates and chain certificates the key step read from NV to salt the TPM session (steps.go),
	// so this step does not read them again; nil when it did not.
	nv *ekNV
}

// ekNV is what the TPM's NV holds for attestation: its EK certificates and the chain certificates beside them.
type ekNV struct {
	certs, chain []tpm.NVCertificate
}

func (r *run) akCertPEM() []byte {
	if r.att == nil || r.att.akCert == nil {
		return nil
	}
	return ca.EncodeCerts(r.att.akCert)
}

func (r *run) akKeyPEM() []byte {
	if r.att == nil {
		return nil
	}
	return r.att.akKey
}

// ekCertOrder is the preference among EK certificates a TPM holds: ECC (fast activation) before RSA, low range first.
var ekCertOrder = []uint32{0x01c0000a, 0x01c00014, 0x01c00016, 0x01c00018, 0x01c00002, 0x01c00012, 0x01c0001c, 0x01c0001e}

// TPMRoots is the set of trusted TPM vendor roots: built in, plus tpm_roots (when the folder exists) and
// ExtraTPMRoots (--tpm-roots). Loaded once.
func (s *Station) TPMRoots() (*attest.Roots, error) {
	s.rootsOnce.Do(func() {
		var dirs []string
		if s.Config.TPMRoots != "" {
			d := filepath.Join(s.Layout.Dir, s.Config.TPMRoots)
			if _, err := os.Stat(d); err == nil {
				dirs = append(dirs, d)
			}
		}
		for _, d := range s.ExtraTPMRoots {
			if _, err := os.Stat(d); err != nil {
				s.rootsErr = fmt.Errorf("--tpm-roots %s: %v: %w", d, err, ErrConfig)
				return
			}
		}
		dirs = append(dirs, s.ExtraTPMRoots...)
		s.roots, s.rootsErr = attest.LoadRoots(dirs...)
		if s.rootsErr != nil {
			s.rootsErr = fmt.Errorf("TPM roots: %w: %w", s.rootsErr, ErrConfig)
		}
	})
	return s.roots, s.rootsErr
}

func (r *run) stepAttest(ctx context.Context) (string, error) {
	policy := r.s.Config.AttestationPolicy()
	var nv *ekNV
	if r.att != nil {
		nv = r.att.nv
	}
	r.att = &attestation{row: inventory.Attestation{Policy: policy, Time: time.Now().UTC()}, nv: nv}
	defer func() {
		r.res.Attestation = &AttestResult{Status: r.att.row.Status, EKSHA256: r.att.row.EKSHA256, Cause: r.att.row.Cause}
	}()
	if policy == AttestOff {
		r.att.row.Status = inventory.AttestOff
		r.statusOverride = StatusSkipped
		return "attestation: off", nil
	}
	k, ok := r.key.(*tpm.Key)
	if !ok || k.Kind() != tpm.KindTPM {
		r.att.row.Status = inventory.AttestSoft
		r.statusOverride = StatusSoft
		return "software key: no TPM to attest", nil
	}
	roots, err := r.s.TPMRoots()
	if err != nil {
		return "", err
	}
	ev, err := r.collect(ctx, k, roots, policy)
	if ev != nil {
		r.att.row.Status, r.att.row.Cause, r.att.row.Warnings = ev.Status, ev.Cause, ev.Warnings
		r.att.row.TPMManufacturer = manufacturerName(ev)
		if b, jerr := json.Marshal(ev); jerr == nil {
			r.att.row.Evidence = b
		}
	}
	if err != nil {
		if r.att.row.Cause == "" {
			r.att.row.Cause = err.Error()
		}
		return "", err
	}
	r.att.bind = r.att.row.EKSHA256
	if r.att.row.EKCertSHA256 != "" {
		r.ekSHA = r.att.row.EKCertSHA256 // the EK certificate attested, as the unit's record and enroll's JSON name it
	}
	detail := fmt.Sprintf("%s: EK %.16s", ev.Status, r.att.row.EKSHA256)
	if r.att.row.EKIssuer != "" {
		detail += " issued by " + r.att.row.EKIssuer
	}
	if ev.Cause != "" {
		detail += " (" + ev.Cause + ")"
	}
	for _, w := range ev.Warnings {
		detail += "; warning: " + w
	}
	return detail + "; evidence sha256 " + inventory.EvidenceSHA256(r.att.row.Evidence), nil
}

// collect runs the TPM's half of the proof and checks it. The evidence is returned whenever something was gathered,
// with the error that failed the step (the TPM contradicting itself, a TPM bound to another unit, or an untrusted EK
// under required).
func (r *run) collect(ctx context.Context, k *tpm.Key, roots *attest.Roots, policy string) (*attest.Evidence, error) {
	ev := &attest.Evidence{Version: 1, Time: r.att.row.Time, Policy: policy}
	if r.att.nv == nil {
		certs, chain, err := r.dev.EKCertificates(ctx)
		if err != nil {
			return nil, err
		}
		r.att.nv = &ekNV{certs: certs, chain: chain}
	}
	var intermediates []*x509.Certificate
	for _, c := range r.att.nv.chain {
		if ic, err := attest.ParseEKCertificate(c.Data); err == nil {
			intermediates = append(intermediates, ic)
			ev.Chain = append(ev.Chain, ic.Raw)
		} else {
			ev.Warnings = append(ev.Warnings, fmt.Sprintf("chain certificate at NV %#x does not parse: %v", c.Index, err))
		}
	}
	ekCert, index, parseErrs := pickEKCert(r.att.nv.certs)
	if ekCert != nil {
		ev.EKIndex, ev.EKCertificate = index, ekCert.Raw
	}
	// The TPM holds three objects at a time (swtpm, the simulator, many discrete TPMs): the device key is loaded, so the
	// AK comes next and then the EK (EndorsementKey makes room by unloading the storage root key); the EK goes before
	// Certify.
	ak, err := r.dev.CreateAK(ctx)
	if err != nil {
		return nil, err
	}
	defer ak.Close()
	ek, err := r.dev.EndorsementKey(ctx, ev.EKIndex, certKey(ekCert))
	if err != nil {
		return nil, err
	}
	defer ek.Close()
	ev.EKPublic, ev.EKSource = ek.Public, ek.Template
	row := &r.att.row
	if row.EKSHA256, err = attest.KeySHA256(ek.PublicKey); err != nil {
		return nil, fmt.Errorf("EK public key: %w", err)
	}
	if r.att.ekURI, err = attest.EKURI(ek.PublicKey); err != nil {
		return nil, fmt.Errorf("EK public key: %w", err)
	}
	if info, err := r.dev.Info(ctx); err == nil {
		ev.TPMManufacturer, ev.TPMVendorString, ev.TPMFirmware = info.Manufacturer, info.VendorString, info.FirmwareVersion
	} else {
		return nil, err
	}
	switch {
	case ekCert != nil:
		sum := sha256.Sum256(ekCert.Raw)
		row.EKCertSHA256, row.EKIssuer = hex.EncodeToString(sum[:]), ekCert.Issuer.String()
		ev.Warnings = append(ev.Warnings, parseErrs...)
		if chain, err := roots.Verify(ekCert, intermediates, ev.Time); err != nil {
			ev.Status, ev.Cause = attest.StatusUntrusted, err.Error()
		} else {
			ev.Status = attest.StatusTrusted
			for _, c := range chain[1:] {
				if !slices.ContainsFunc(ev.Chain, func(b []byte) bool { return string(b) == string(c.Raw) }) {
					ev.Chain = append(ev.Chain, c.Raw)
				}
			}
		}
		id := attest.IdentityOf(ekCert)
		if known, match := attest.ManufacturerMatch(id.Manufacturer, ev.TPMManufacturer); known && !match {
			ev.Warnings = append(ev.Warnings, fmt.Sprintf("the EK certificate names TPM manufacturer %s, the TPM says %s",
				id.Manufacturer, vendorLabel(ev.TPMManufacturer)))
		}
	case len(parseErrs) > 0:
		ev.Status, ev.Cause = attest.StatusUntrusted, strings.Join(parseErrs, "; ")
	default:
		ev.Status, ev.Cause = attest.StatusAbsent, attest.ErrNoEKCertificate.Error()
	}
	// From here on the TPM must agree with itself, whatever the policy.
	if ekCert != nil && !publicEqual(ekCert.PublicKey, ek.PublicKey) {
		return ev, fmt.Errorf("%w (NV %#x, EK from %s)", attest.ErrKeyMismatch, ev.EKIndex, ek.Template)
	}
	if err := r.checkBinding(ctx, row.EKSHA256); err != nil {
		return ev, err
	}
	if err := r.s.checkCentralEK(ctx, row.EKSHA256, r.req.Serial); err != nil {
		return ev, err
	}
	ev.AKPublic = ak.Public()
	secret := make([]byte, 32)
	rand.Read(secret)
	blob, enc, err := attest.MakeCredential(ek.Public, ak.Name(), secret)
	if err != nil {
		return ev, fmt.Errorf("credential for the attestation key: %w", err)
	}
	ev.Activation = attest.Activation{AKName: ak.Name(), CredentialBlob: blob, EncryptedSecret: enc}
	got, err := r.dev.ActivateCredential(ctx, ak, ek, blob, enc)
	if err != nil {
		if isEnvironment(err) {
			return ev, err
		}
		return ev, fmt.Errorf("credential activation: the TPM could not prove it holds this EK and the attestation key: %w", err)
	}
	if subtle.ConstantTimeCompare(got, secret) != 1 {
		return ev, errors.New("credential activation: the TPM returned another secret: it does not hold this EK")
	}
	sum := sha256.Sum256(secret)
	ev.Activation.SecretSHA256, ev.Activation.Activated = hex.EncodeToString(sum[:]), true
	ek.Close() // room for Certify
	ev.Nonce = make([]byte, 32)
	rand.Read(ev.Nonce)
	ev.KeyPublic = k.PublicArea()
	if ev.CertifyAttest, ev.CertifySignature, err = r.dev.Certify(ctx, k, ak, ev.Nonce); err != nil {
		if isEnvironment(err) {
			return ev, err
		}
		return ev, fmt.Errorf("certify the device key: %w", err)
	}
	if err := attest.VerifyCertify(ev.AKPublic, ev.CertifyAttest, ev.CertifySignature, ev.Nonce, ev.KeyPublic); err != nil {
		return ev, err
	}
	if pub, err := attest.PublicKey(ev.KeyPublic); err != nil || !publicEqual(pub, k.Public()) {
		return ev, fmt.Errorf("%w: the certified key is not the device key", attest.ErrBadEvidence)
	}
	if policy == AttestRequired && ev.Status != attest.StatusTrusted {
		return ev, fmt.Errorf("attestation required: %s: %s", ev.Status, ev.Cause)
	}
	if prof, err := r.profile(); err == nil && prof.UsesAK() {
		if err := r.certifyAK(ak, ekCert, ev); err != nil {
			return ev, err
		}
	}
	return ev, nil
}

// certifyAK makes the station the attestation authority of the unit's AK: a certificate in the form an ACME CA's TPM
// device attestation (step-ca device-attest-01) accepts, naming the TPM as its EK certificate does (or, without one,
// as the TPM reports itself), and the AK's key file, for the profile to write into the image.
func (r *run) certifyAK(ak *tpm.AK, ekCert *x509.Certificate, ev *attest.Evidence) error {
	id := attest.IdentityFromTPM(ev.TPMManufacturer, ev.TPMVendorString, ev.TPMFirmware)
	if ekCert != nil {
		if eid := attest.IdentityOf(ekCert); eid.Manufacturer != "" {
			id = eid
		}
	}
	validity := time.Duration(r.s.Config.Certificate.ValidityDays) * 24 * time.Hour
	tmpl := attest.AKCertificateTemplate(ak.PublicKey(), id, time.Now(), time.Now().Add(validity), big.NewInt(1), r.att.ekURI)
	cert, err := r.s.CA.SignAttestationKey(*tmpl, ak.PublicKey(), validity)
	if err != nil {
		if errors.Is(err, ca.ErrExpired) {
			return fmt.Errorf("%w: %w", ErrCA, err)
		}
		return err
	}
	key, err := ak.PEM()
	if err != nil {
		return fmt.Errorf("attestation key file: %w", err)
	}
	r.att.akCert, r.att.akKey = cert, key
	return nil
}

// checkBinding refuses a TPM already bound to another unit.
func (r *run) checkBinding(ctx context.Context, ekSHA string) error {
	u, err := r.s.Inv.UnitByEK(ctx, ekSHA)
	if errors.Is(err, inventory.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if u.Serial == r.req.Serial {
		return nil
	}
	return boundError(u)
}

func boundError(u inventory.Unit) error {
	return fmt.Errorf("this TPM is already unit %s, %s on %s at station %s: %w", u.Serial, u.State,
		u.Updated.UTC().Format("2006-01-02"), u.Station, ErrTPMBound)
}

// pickEKCert is the EK certificate a unit is attested with, and its session salted to: the first that parses, in the
// order of ekCertOrder. The others' problems are returned, for the evidence's warnings.
func pickEKCert(certs []tpm.NVCertificate) (cert *x509.Certificate, index uint32, parseErrs []string) {
	certs = slices.Clone(certs)
	slices.SortStableFunc(certs, func(a, b tpm.NVCertificate) int {
		return certRank(a.Index) - certRank(b.Index)
	})
	for _, c := range certs {
		pc, err := attest.ParseEKCertificate(c.Data)
		if err != nil {
			parseErrs = append(parseErrs, fmt.Sprintf("EK certificate at NV %#x does not parse: %v", c.Index, err))
			continue
		}
		if cert == nil {
			cert, index = pc, c.Index
		}
	}
	return cert, index, parseErrs
}

func certRank(index uint32) int {
	if i := slices.Index(ekCertOrder, index); i >= 0 {
		return i
	}
	return len(ekCertOrder)
}

func certKey(c *x509.Certificate) any {
	if c == nil {
		return nil
	}
	return c.PublicKey
}

func vendorLabel(id uint32) string {
	if n := attest.VendorName(id); n != "" {
		return fmt.Sprintf("%s (%08X)", n, id)
	}
	return fmt.Sprintf("%08X", id)
}

func manufacturerName(ev *attest.Evidence) string {
	if ev.TPMManufacturer == 0 {
		return ""
	}
	return vendorLabel(ev.TPMManufacturer)
}
