package attest

import (
	"bytes"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"strings"
	"time"
)

// Evidence is what the station keeps of one attest run: everything needed to re-check it offline. It is stored as
// JSON (byte fields base64) in the inventory's attestations table and exported as is.
type Evidence struct {
	Version int       `json:"version"` // 1
	Time    time.Time `json:"time"`    // when the station attested (chains are verified at this time)
	Policy  string    `json:"policy"`  // off | record | required

	EKCertificate []byte   `json:"ek_certificate,omitempty"` // DER, as ParseEKCertificate cleaned it
	EKIndex       uint32   `json:"ek_index,omitempty"`       // the NV index it came from
	Chain         [][]byte `json:"chain,omitempty"`          // DER: the NV chain certificates, then the verified chain above the EK certificate
	EKPublic      []byte   `json:"ek_public"`                // TPMT_PUBLIC of the EK the TPM used
	EKSource      string   `json:"ek_source"`                // EK.Template

	AKPublic   []byte     `json:"ak_public"` // TPMT_PUBLIC
	Activation Activation `json:"activation"`

	Nonce            []byte `json:"nonce"`             // the certify qualifying data
	KeyPublic        []byte `json:"key_public"`        // TPMT_PUBLIC of the device key
	CertifyAttest    []byte `json:"certify_attest"`    // TPMS_ATTEST
	CertifySignature []byte `json:"certify_signature"` // TPMT_SIGNATURE

	TPMManufacturer uint32 `json:"tpm_manufacturer"` // TPM_PT_MANUFACTURER
	TPMVendorString string `json:"tpm_vendor_string,omitempty"`
	TPMFirmware     uint64 `json:"tpm_firmware,omitempty"`

	Status   string   `json:"status"`          // trusted | untrusted | absent
	Cause    string   `json:"cause,omitempty"` // why not trusted, in words
	Warnings []string `json:"warnings,omitempty"`
}

// EvidenceVersion is the Evidence format this package writes and reads.
const EvidenceVersion = 1

// Activation records credential activation: what the station sealed to the EK for the AK's Name, and that the TPM
// gave the secret back (its SHA-256, lowercase hex; the secret itself protects nothing afterwards and need not be
// kept). Offline, only its form can be re-checked: opening the blob takes the EK's private key.
type Activation struct {
	AKName          []byte `json:"ak_name"`
	CredentialBlob  []byte `json:"credential_blob"`
	EncryptedSecret []byte `json:"encrypted_secret"`
	SecretSHA256    string `json:"secret_sha256"`
	Activated       bool   `json:"activated"`
}

// Check is the offline verdict on stored evidence.
type Check struct {
	Status   string   // recomputed: trusted | untrusted | absent
	Cause    string   // why not trusted
	Problems []string // mismatches and unparseable parts; empty when the evidence verifies
}

// VerifyEvidence re-checks stored evidence offline: the EK certificate parses and certifies EKPublic's key; the
// activation names the AK (Name of AKPublic) and was completed; the AK is a restricted signing key of a TPM; the
// certify attestation verifies (VerifyCertify) for KeyPublic, whose key's SHA-256 must be keySHA256 (the unit's
// recorded key fingerprint, "" to skip); the chain verifies against roots at ev.Time, and the status it gives is the
// recorded one (a recorded "trusted" that no longer chains is a problem).
//
// Stored chain certificates are used as intermediates only, never as anchors: the anchors are roots (nil: the
// built-in set). A recorded "untrusted" or "absent" that now chains is not a problem (roots may have been added since);
// Cause then says what was recorded. The TPM manufacturer named by certificate and TPM is not compared here: a
// mismatch is a warning at attest time, never a failure.
func VerifyEvidence(ev *Evidence, roots *Roots, keySHA256 string) Check {
	var chk Check
	problem := func(format string, args ...any) { chk.Problems = append(chk.Problems, fmt.Sprintf(format, args...)) }
	if ev == nil {
		chk.Status, chk.Cause = StatusAbsent, ErrNoEKCertificate.Error()
		problem("no attestation evidence")
		return chk
	}
	if roots == nil {
		roots = BuiltinRoots()
	}
	if ev.Version != EvidenceVersion {
		problem("evidence version %d is not %d", ev.Version, EvidenceVersion)
	}
	if ev.Time.IsZero() {
		problem("the evidence has no attestation time")
	}
	switch ev.Policy {
	case "off", "record", "required":
	default:
		problem("unknown attestation policy %q", ev.Policy)
	}

	ekPub, err := PublicKey(ev.EKPublic)
	if err != nil {
		problem("the EK public area does not parse: %v", trimPrefix(err))
	} else if ek, _ := decodePublic("EK", ev.EKPublic); ek != nil {
		if a := ek.ObjectAttributes; !a.Restricted || !a.Decrypt || a.SignEncrypt {
			problem("the EK is not a restricted decryption key")
		}
	}

	// The EK certificate, and what chains it.
	var ekCert *x509.Certificate
	keyMismatch := false
	if len(ev.EKCertificate) > 0 {
		if ekCert, err = ParseEKCertificate(ev.EKCertificate); err != nil {
			problem("the EK certificate does not parse: %v", trimPrefix(err))
		} else if ekPub != nil && !samePublicKey(ekCert.PublicKey, ekPub) {
			keyMismatch = true
			problem("%v", ErrKeyMismatch)
		}
	}
	var chain []*x509.Certificate
	for i, der := range ev.Chain {
		c, err := ParseEKCertificate(der)
		if err != nil {
			problem("chain certificate %d does not parse: %v", i+1, trimPrefix(err))
			continue
		}
		chain = append(chain, c)
	}

	// Activation, AK, certify.
	if name, err := Name(ev.AKPublic); err != nil {
		problem("the AK public area does not parse: %v", trimPrefix(err))
	} else if !bytes.Equal(name, ev.Activation.AKName) {
		problem("the credential activation names another key than the AK")
	}
	if !ev.Activation.Activated {
		problem("credential activation was not completed")
	}
	if len(ev.Activation.CredentialBlob) == 0 || len(ev.Activation.EncryptedSecret) == 0 {
		problem("the credential activation record has no credential blob or encrypted secret")
	}
	if s := ev.Activation.SecretSHA256; len(s) != 64 || !isHex(s) {
		problem("the credential activation record has no SHA-256 of the secret")
	}
	if err := CheckAK(ev.AKPublic); err != nil {
		problem("%v", trimPrefix(err))
	} else if err := VerifyCertify(ev.AKPublic, ev.CertifyAttest, ev.CertifySignature, ev.Nonce, ev.KeyPublic); err != nil {
		problem("%v", trimPrefix(err))
	}
	// The firmware version inside the attestation is not compared with the recorded one: for a signing key outside
	// the endorsement and platform hierarchies (our AK is under the owner's storage root key), the TPM obfuscates
	// firmwareVersion, resetCount and restartCount (TPM 2.0 Part 1, "Privacy": attestation of non-privacy-sensitive
	// data only).
	if keySHA256 != "" {
		if key, err := PublicKey(ev.KeyPublic); err != nil {
			problem("the device key public area does not parse: %v", trimPrefix(err))
		} else if sum, err := KeySHA256(key); err != nil || !strings.EqualFold(sum, keySHA256) {
			problem("the certified key is not the unit's key (SHA-256 %s, the unit's is %s)", sum, keySHA256)
		}
	}

	// Status, recomputed.
	switch {
	case len(ev.EKCertificate) == 0:
		chk.Status, chk.Cause = StatusAbsent, ErrNoEKCertificate.Error()
	case ekCert == nil:
		chk.Status, chk.Cause = StatusUntrusted, "the EK certificate does not parse"
	case keyMismatch:
		chk.Status, chk.Cause = StatusUntrusted, ErrKeyMismatch.Error()
	default:
		if _, err := roots.Verify(ekCert, chain, ev.Time); err != nil {
			chk.Status, chk.Cause = StatusUntrusted, err.Error()
		} else {
			chk.Status = StatusTrusted
		}
	}
	switch ev.Status {
	case chk.Status:
	case StatusTrusted:
		problem("recorded as trusted, but now %s: %s", chk.Status, chk.Cause)
	case StatusUntrusted, StatusAbsent:
		note := fmt.Sprintf("recorded as %s", ev.Status)
		if ev.Cause != "" {
			note += " (" + ev.Cause + ")"
		}
		if chk.Cause != "" {
			chk.Cause = chk.Cause + "; " + note
		} else {
			chk.Cause = note + "; chains to a trusted root now"
		}
	default:
		problem("unknown recorded status %q", ev.Status)
	}
	return chk
}

// samePublicKey compares two public keys by their SPKI DER.
func samePublicKey(a, b any) bool {
	x, err1 := KeySHA256(a)
	y, err2 := KeySHA256(b)
	return err1 == nil && err2 == nil && x == y
}

// trimPrefix drops the package's "attest: " and the ErrBadEvidence words from a message that goes into a Problems
// line (which says that much already).
func trimPrefix(err error) string {
	s := strings.TrimPrefix(err.Error(), "attest: ")
	return strings.TrimPrefix(s, ErrBadEvidence.Error()+": ")
}

func isHex(s string) bool {
	_, err := hex.DecodeString(s)
	return err == nil
}
