package attest

import (
	"crypto"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"math/big"
	"net/url"
	"time"
)

// AKCertificateTemplate is the template of an AK certificate in the form step-ca's device-attest-01 "tpm" format
// accepts (smallstep certificates, acme/challenge.go: doTPMAttestationFormat and validateAKCertificate, after the
// WebAuthn TPM attestation rules): X.509 v3, an empty subject, extended key usage tcg-kp-AIKCertificate (2.23.133.8.3)
// as its first value, a critical SubjectAltName whose DirectoryName holds the TPM manufacturer, model and version (TCG
// OIDs 2.23.133.2.1/2/3, UTF8String; step-ca refuses an AK certificate missing any of the three), KeyUsage
// digitalSignature, and not a CA.
//
// ekURIs (normally one, EKURI of the unit's EK) go into the same SubjectAltName as URIs: smallstep's clients (step
// CLI, tpmkms) use an AK certificate only when one of its URI SANs is the TPM's urn:ek:sha256: name. The caller signs
// the template with x509.CreateCertificate(rand, tmpl, issuer, akPub, issuerKey).
func AKCertificateTemplate(akPub crypto.PublicKey, id TPMIdentity, notBefore, notAfter time.Time, serial *big.Int, ekURIs ...*url.URL) *x509.Certificate {
	return &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		PublicKey:             akPub,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		UnknownExtKeyUsage:    []asn1.ObjectIdentifier{OIDAKCertificate},
		BasicConstraintsValid: true,
		IsCA:                  false,
		ExtraExtensions: []pkix.Extension{{
			Id:       oidSubjectAltName,
			Critical: true, // the subject is empty (RFC 5280 4.2.1.6)
			Value:    tcgSANValue(id, ekURIs),
		}},
	}
}

// tcgSANValue encodes GeneralNames: one directoryName ([4], explicit: Name is a CHOICE) with the three TCG
// attributes, one RDN each as swtpm and the TCG profile's examples write them, then a uniformResourceIdentifier ([6])
// per URI.
func tcgSANValue(id TPMIdentity, uris []*url.URL) []byte {
	attr := func(oid asn1.ObjectIdentifier, v string) []pkix.AttributeTypeAndValue {
		return []pkix.AttributeTypeAndValue{{Type: oid, Value: asn1.RawValue{Tag: asn1.TagUTF8String, Bytes: []byte(v)}}}
	}
	rdns := pkix.RDNSequence{
		attr(oidTPMManufacturer, id.Manufacturer),
		attr(oidTPMModel, id.Model),
		attr(oidTPMVersion, id.Version),
	}
	name, err := asn1.Marshal(rdns)
	if err != nil {
		panic("attest: encode TPM identity: " + err.Error()) // strings always encode as UTF8String
	}
	names := []asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: name}}
	for _, u := range uris {
		if u != nil {
			names = append(names, asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 6, Bytes: []byte(u.String())})
		}
	}
	value, err := asn1.Marshal(names)
	if err != nil {
		panic("attest: encode SubjectAltName: " + err.Error())
	}
	return value
}
