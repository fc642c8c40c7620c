package attest

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
)

// ExportFiles lays stored evidence (Evidence as JSON) out as files other tools read: the evidence itself, the EK
// certificate and its chain (PEM), the EK and AK public keys (PKIX PEM), the AK's and the device key's TPMT_PUBLIC,
// the certify TPMS_ATTEST (tpm2_print -t TPMS_ATTEST) and its TPMT_SIGNATURE, and that signature in the form
// `openssl dgst -sha256 -verify ak.pem -signature certify.sig.der certify.attest` checks. None of it is secret.
func ExportFiles(evidenceJSON []byte) (map[string][]byte, error) {
	var ev Evidence
	if err := json.Unmarshal(evidenceJSON, &ev); err != nil {
		return nil, fmt.Errorf("evidence does not parse: %w", err)
	}
	files := map[string][]byte{"evidence.json": evidenceJSON, "ak.pub": ev.AKPublic, "device.pub": ev.KeyPublic,
		"certify.attest": ev.CertifyAttest, "certify.sig": ev.CertifySignature}
	pemKey := func(name string, public []byte) error {
		pub, err := PublicKey(public)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		files[name] = pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
		return nil
	}
	if err := pemKey("ak.pem", ev.AKPublic); err != nil {
		return nil, err
	}
	if err := pemKey("ek.pub.pem", ev.EKPublic); err != nil {
		return nil, err
	}
	sig, err := SignatureForOpenSSL(ev.CertifySignature)
	if err != nil {
		return nil, fmt.Errorf("certify signature: %w", err)
	}
	files["certify.sig.der"] = sig
	if len(ev.EKCertificate) > 0 {
		files["ek.crt"] = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ev.EKCertificate})
	}
	var chain []byte
	for _, c := range ev.Chain {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c})...)
	}
	if len(chain) > 0 {
		files["chain.crt"] = chain
	}
	return files, nil
}
