package attest

// EK certificates as TPMs store them. Quirks handled here, each seen in real TPMs:
//   - a TCG PC Client header (tag 0x1001, 2-byte big-endian length) before the DER;
//   - padding after the DER (NV indices are often defined larger than the certificate): cut by the DER length;
//   - a critical SubjectAltName made only of a DirectoryName with the TCG TPM attributes, which crypto/x509 leaves in
//     UnhandledCriticalExtensions (and Verify then refuses): read here and marked handled, that extension only;
//   - a serial number crypto/x509 refuses (Nuvoton: negative, or with redundant leading zero bytes): parsed from a
//     copy with the serial re-encoded, then the original bytes put back, so signatures are checked over what the
//     vendor signed and the serial keeps its real value;
//   - an RSA key under the id-RSAES-OAEP algorithm (older Infineon certificates), which crypto/x509 leaves without a
//     public key: read as the RSA key it is.

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"
)

// TCG object identifiers (TCG EK Credential Profile).
var (
	oidSubjectAltName  = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidTPMManufacturer = asn1.ObjectIdentifier{2, 23, 133, 2, 1}
	oidTPMModel        = asn1.ObjectIdentifier{2, 23, 133, 2, 2}
	oidTPMVersion      = asn1.ObjectIdentifier{2, 23, 133, 2, 3}
	oidRSAESOAEP       = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 7}
	// OIDEKCertificate is the extended key usage of EK certificates (tcg-kp-EKCertificate).
	OIDEKCertificate = asn1.ObjectIdentifier{2, 23, 133, 8, 1}
	// OIDAKCertificate is the extended key usage of AK certificates (tcg-kp-AIKCertificate).
	OIDAKCertificate = asn1.ObjectIdentifier{2, 23, 133, 8, 3}
)

// tcgHeaderTag starts the TCG PC Client header some TPMs put before the DER in NV.
const tcgHeaderTag = 0x1001

// ParseEKCertificate parses an EK certificate as a TPM stores it: plain DER, DER with trailing bytes (padding), or DER
// behind the TCG PC Client header (tag 0x1001, 2-byte length). The critical SubjectAltName of DirectoryName form that
// EK certificates carry (TPM manufacturer, model, version) is read and marked handled, so crypto/x509 verifies it.
// The returned certificate's Raw is the DER alone (what Evidence.EKCertificate stores).
func ParseEKCertificate(data []byte) (*x509.Certificate, error) {
	der, err := cutDER(data)
	if err != nil {
		return nil, fmt.Errorf("attest: EK certificate: %w", err)
	}
	c, err := parseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("attest: EK certificate: %w", err)
	}
	return c, nil
}

// cutDER finds the DER certificate in data: behind a TCG header if there is one, without trailing bytes.
func cutDER(data []byte) ([]byte, error) {
	if len(data) == 0 {
		return nil, errors.New("empty")
	}
	if len(data) >= 4 && binary.BigEndian.Uint16(data) == tcgHeaderTag {
		n := int(binary.BigEndian.Uint16(data[2:]))
		if 4+n > len(data) {
			return nil, fmt.Errorf("TCG header announces %d bytes, %d follow", n, len(data)-4)
		}
		data = data[4 : 4+n]
	}
	n, err := derLength(data)
	if err != nil {
		return nil, err
	}
	return data[:n], nil
}

// derLength is the length of the DER SEQUENCE at the start of b, header included. Long-form lengths are read as
// written (not necessarily minimal), so a certificate that is not strict DER still gets cut at its end.
func derLength(b []byte) (int, error) {
	if len(b) < 2 || b[0] != 0x30 {
		return 0, errors.New("not a DER certificate (no SEQUENCE at the start)")
	}
	length, header := int(b[1]), 2
	if length&0x80 != 0 {
		n := length & 0x7f
		if n == 0 || n > 3 || len(b) < 2+n {
			return 0, errors.New("malformed DER length")
		}
		length = 0
		for _, c := range b[2 : 2+n] {
			length = length<<8 | int(c)
		}
		header += n
	}
	if header+length > len(b) {
		return 0, fmt.Errorf("truncated: the DER announces %d bytes, %d present", header+length, len(b))
	}
	return header + length, nil
}

// parseCertificate parses one DER certificate with the quirks of TPM vendors' certificates (see the top of this file).
// EK certificates, their chain and vendor roots all go through it.
func parseCertificate(der []byte) (*x509.Certificate, error) {
	c, err := x509.ParseCertificate(der)
	if err != nil {
		fixed, ok := parseWithRewrittenSerial(der)
		if !ok {
			return nil, err
		}
		c = fixed
	}
	markTCGSANHandled(c)
	readOAEPKey(c)
	return c, nil
}

// parseWithRewrittenSerial parses a certificate whose serial number crypto/x509 refuses (negative, or not minimally
// encoded) from a copy with the serial re-encoded as a minimal positive INTEGER. Raw and RawTBSCertificate are then
// the original bytes again (signatures are over those), and SerialNumber the value the certificate really holds.
func parseWithRewrittenSerial(der []byte) (*x509.Certificate, bool) {
	var cert, tbs, first, serial asn1.RawValue
	if rest, err := asn1.Unmarshal(der, &cert); err != nil || len(rest) != 0 || cert.Tag != asn1.TagSequence {
		return nil, false
	}
	sigPart, err := asn1.Unmarshal(cert.Bytes, &tbs) // sigPart: signature algorithm and value, as they are
	if err != nil || tbs.Tag != asn1.TagSequence {
		return nil, false
	}
	inner, err := asn1.Unmarshal(tbs.Bytes, &first)
	if err != nil {
		return nil, false
	}
	var version []byte
	if first.Class == asn1.ClassContextSpecific && first.Tag == 0 { // explicit [0] version
		version = first.FullBytes
	} else {
		inner = tbs.Bytes
	}
	tail, err := asn1.Unmarshal(inner, &serial)
	if err != nil || serial.Class != asn1.ClassUniversal || serial.Tag != asn1.TagInteger ||
		len(serial.Bytes) == 0 || len(serial.Bytes) > 64 {
		return nil, false
	}
	magnitude := new(big.Int).SetBytes(serial.Bytes)
	positive := magnitude.Bytes()
	if len(positive) == 0 || positive[0]&0x80 != 0 {
		positive = append([]byte{0}, positive...)
	}
	if string(positive) == string(serial.Bytes) {
		return nil, false // the serial is fine: the certificate fails for another reason
	}
	value := magnitude
	if serial.Bytes[0]&0x80 != 0 { // two's complement: a negative serial
		value = new(big.Int).Sub(magnitude, new(big.Int).Lsh(big.NewInt(1), uint(8*len(serial.Bytes))))
	}
	serialDER, err := asn1.Marshal(asn1.RawValue{Tag: asn1.TagInteger, Bytes: positive})
	if err != nil {
		return nil, false
	}
	tbsContent := append(append(append([]byte{}, version...), serialDER...), tail...)
	tbsDER, err := asn1.Marshal(asn1.RawValue{Tag: asn1.TagSequence, IsCompound: true, Bytes: tbsContent})
	if err != nil {
		return nil, false
	}
	rewritten, err := asn1.Marshal(asn1.RawValue{Tag: asn1.TagSequence, IsCompound: true, Bytes: append(tbsDER, sigPart...)})
	if err != nil {
		return nil, false
	}
	c, err := x509.ParseCertificate(rewritten)
	if err != nil {
		return nil, false
	}
	c.Raw = der
	c.RawTBSCertificate = tbs.FullBytes
	c.SerialNumber = value
	return c, true
}

// markTCGSANHandled removes the SubjectAltName from UnhandledCriticalExtensions when it holds the TCG TPM attributes
// in a DirectoryName: this package reads them (IdentityOf). Any other unhandled critical extension stays, and keeps
// crypto/x509 from verifying the certificate.
func markTCGSANHandled(c *x509.Certificate) {
	if len(c.UnhandledCriticalExtensions) == 0 {
		return
	}
	if _, found, err := tcgSAN(c); err != nil || !found {
		return
	}
	kept := make([]asn1.ObjectIdentifier, 0, len(c.UnhandledCriticalExtensions))
	for _, oid := range c.UnhandledCriticalExtensions {
		if !oid.Equal(oidSubjectAltName) {
			kept = append(kept, oid)
		}
	}
	c.UnhandledCriticalExtensions = kept
}

// withTCGSANHandled is c, or a copy of c with its TCG SubjectAltName marked handled, for certificates that did not
// come through parseCertificate. c itself is never changed.
func withTCGSANHandled(c *x509.Certificate) *x509.Certificate {
	for _, oid := range c.UnhandledCriticalExtensions {
		if oid.Equal(oidSubjectAltName) {
			cp := *c
			markTCGSANHandled(&cp)
			return &cp
		}
	}
	return c
}

// readOAEPKey fills in the RSA public key of a certificate whose key is labelled id-RSAES-OAEP (crypto/x509 knows
// only rsaEncryption and leaves PublicKey nil).
func readOAEPKey(c *x509.Certificate) {
	if c.PublicKey != nil {
		return
	}
	var spki struct {
		Algorithm pkix.AlgorithmIdentifier
		PublicKey asn1.BitString
	}
	if rest, err := asn1.Unmarshal(c.RawSubjectPublicKeyInfo, &spki); err != nil || len(rest) != 0 {
		return
	}
	if !spki.Algorithm.Algorithm.Equal(oidRSAESOAEP) {
		return
	}
	if pub, err := x509.ParsePKCS1PublicKey(spki.PublicKey.RightAlign()); err == nil {
		c.PublicKey, c.PublicKeyAlgorithm = pub, x509.RSA
	}
}

// TPMIdentity is what an EK certificate's SubjectAltName says of its TPM (TCG OIDs 2.23.133.2.1/2/3), as written there
// ("id:49424D00", "swtpm", "id:20191023").
type TPMIdentity struct {
	Manufacturer, Model, Version string
}

// IdentityOf reads the TPM identity from an EK certificate's SubjectAltName (zero when it has none).
func IdentityOf(c *x509.Certificate) TPMIdentity {
	if c == nil {
		return TPMIdentity{}
	}
	id, _, _ := tcgSAN(c)
	return id
}

// IdentityFromTPM is the identity of a TPM from what it reports of itself (TPM_PT_MANUFACTURER, the vendor string,
// TPM_PT_FIRMWARE_VERSION_1 || _2), in the form EK certificates write it: for an AK certificate when the TPM has no EK
// certificate to copy it from.
func IdentityFromTPM(manufacturer uint32, vendorString string, firmware uint64) TPMIdentity {
	model := vendorString
	if model == "" {
		model = "unknown"
	}
	return TPMIdentity{
		Manufacturer: fmt.Sprintf("id:%08X", manufacturer),
		Model:        model,
		Version:      fmt.Sprintf("id:%08X", uint32(firmware>>32)),
	}
}

// tcgSAN reads the TCG attributes from c's SubjectAltName: found is true when a DirectoryName holds at least one.
func tcgSAN(c *x509.Certificate) (id TPMIdentity, found bool, err error) {
	for _, ext := range c.Extensions {
		if ext.Id.Equal(oidSubjectAltName) {
			return parseTCGSAN(ext.Value)
		}
	}
	return TPMIdentity{}, false, nil
}

// parseTCGSAN reads GeneralNames, taking the TCG attributes from its directoryName entries ([4], explicitly tagged:
// Name is a CHOICE). The attributes may be one RDN each or share one; values are UTF8String or PrintableString.
func parseTCGSAN(value []byte) (id TPMIdentity, found bool, err error) {
	var names []asn1.RawValue
	rest, err := asn1.Unmarshal(value, &names)
	if err != nil {
		return id, false, fmt.Errorf("malformed SubjectAltName: %w", err)
	}
	if len(rest) != 0 {
		return id, false, errors.New("malformed SubjectAltName: trailing data")
	}
	for _, gn := range names {
		if gn.Class != asn1.ClassContextSpecific || gn.Tag != 4 || !gn.IsCompound {
			continue
		}
		var rdns pkix.RDNSequence
		if rest, err := asn1.Unmarshal(gn.Bytes, &rdns); err != nil || len(rest) != 0 {
			return id, false, errors.New("malformed DirectoryName in SubjectAltName")
		}
		for _, rdn := range rdns {
			for _, atv := range rdn {
				s, ok := atv.Value.(string)
				if !ok {
					continue
				}
				switch {
				case atv.Type.Equal(oidTPMManufacturer):
					id.Manufacturer, found = s, true
				case atv.Type.Equal(oidTPMModel):
					id.Model, found = s, true
				case atv.Type.Equal(oidTPMVersion):
					id.Version, found = s, true
				}
			}
		}
	}
	return id, found, nil
}
