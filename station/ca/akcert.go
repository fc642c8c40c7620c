package ca

import (
	"crypto"
	"crypto/x509"
	"encoding/asn1"
	"fmt"
	"slices"
	"time"
)

// oidAIKCertificate is tcg-kp-AIKCertificate (2.23.133.8.3): the extended key usage of a TPM attestation key's
// certificate.
var oidAIKCertificate = asn1.ObjectIdentifier{2, 23, 133, 8, 3}

// SignAttestationKey issues a certificate for a TPM attestation key whose TPM the station has just verified (the
// attest step), in the form an ACME CA's TPM device attestation accepts. tmpl gives the subject, SANs and extensions
// (tpm/attest.AKCertificateTemplate: empty subject, the TPM's identity in a critical SAN); the policy fixes the rest:
// the only extended key usage is tcg-kp-AIKCertificate (never clientAuth or serverAuth: the certificate cannot serve
// TLS), KeyUsage digitalSignature, CA:false, a random serial, SubjectKeyId/AuthorityKeyId as Sign makes them, NotBefore
// 5 minutes back, NotAfter now + validity clipped to the issuing CA's.
func (ca *CA) SignAttestationKey(tmpl x509.Certificate, pub crypto.PublicKey, validity time.Duration) (*x509.Certificate, error) {
	if len(tmpl.ExtKeyUsage) > 0 || slices.ContainsFunc(tmpl.UnknownExtKeyUsage, func(o asn1.ObjectIdentifier) bool { return !o.Equal(oidAIKCertificate) }) {
		return nil, fmt.Errorf("ca: sign attestation key: only the tcg-kp-AIKCertificate key usage is allowed")
	}
	t := tmpl
	t.ExtKeyUsage, t.UnknownExtKeyUsage = nil, []asn1.ObjectIdentifier{oidAIKCertificate}
	return issueLeaf("sign attestation key", ca.Issuing, ca.Signer, pub, t, time.Time{}, validity)
}
