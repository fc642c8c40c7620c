package simulator

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"fmt"
	"math/big"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// The simulator is "manufactured" as a TPM vendor does it: its low-range ECC P-256 EK gets a certificate in NV
// 0x01c0000a, issued by a fixed root of our own (EKRoot), so `sim` units attest like real ones in the demo and CI.
// The root's key is derived from a public seed: it proves nothing outside this program, and stations trust it only
// when told to.

// EKCertIndex is where the simulator's EK certificate lives (TCG: low-range ECC P-256 EK certificate).
const EKCertIndex = 0x01c0000a

// TCG OIDs (EK Credential Profile): the TPM's manufacturer, model and version in the SAN's DirectoryName, and the EK
// certificate's extended key usage.
var (
	oidSAN             = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidTPMManufacturer = asn1.ObjectIdentifier{2, 23, 133, 2, 1}
	oidTPMModel        = asn1.ObjectIdentifier{2, 23, 133, 2, 2}
	oidTPMVersion      = asn1.ObjectIdentifier{2, 23, 133, 2, 3}
	oidEKCertificate   = asn1.ObjectIdentifier{2, 23, 133, 8, 1}
)

// Fixed validity of the root and the EK certificates: the same bytes on every run.
var (
	notBefore = time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)
	notAfter  = time.Date(2099, 12, 31, 23, 59, 59, 0, time.UTC)
)

type ekRoot struct {
	cert *x509.Certificate
	key  ed25519.PrivateKey
}

var rootOnce = sync.OnceValues(func() (ekRoot, error) {
	seed := sha256.Sum256([]byte("provision simulator TPM manufacturer EK root, not a secret"))
	key := ed25519.NewKeyFromSeed(seed[:])
	ski := sha256.Sum256(key.Public().(ed25519.PublicKey))
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{"provision"}, CommonName: "provision simulator TPM manufacturer"},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		SubjectKeyId:          ski[:20],
	}
	der, err := x509.CreateCertificate(nil, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return ekRoot{}, err
	}
	cert, err := x509.ParseCertificate(der)
	return ekRoot{cert, key}, err
})

// EKRoot is the certificate of the simulator's TPM manufacturer: a self-signed Ed25519 root, the same on every run.
// A station that trusts it (tpm_roots, --tpm-roots) sees `sim` TPMs as genuine.
func EKRoot() *x509.Certificate {
	r, err := rootOnce()
	if err != nil {
		panic(fmt.Sprintf("simulator: EK root: %v", err)) // fixed inputs: cannot happen
	}
	return r.cert
}

// EKRootPEM is EKRoot as PEM.
func EKRootPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: EKRoot().Raw})
}

// manufacture gives the freshly started simulator its EK certificate: it makes the EK from the low-range ECC template,
// certifies it with the root, writes the certificate into NV under platform authorization and flushes the EK.
func manufacture(t transport.TPM) error {
	props, err := tpm2.GetCapability{Capability: tpm2.TPMCapTPMProperties, Property: uint32(tpm2.TPMPTManufacturer),
		PropertyCount: uint32(tpm2.TPMPTFirmwareVersion1-tpm2.TPMPTManufacturer) + 1}.Execute(t)
	if err != nil {
		return fmt.Errorf("read TPM properties: %w", err)
	}
	tp, err := props.CapabilityData.Data.TPMProperties()
	if err != nil {
		return err
	}
	p := make(map[tpm2.TPMPT]uint32)
	for _, v := range tp.TPMProperty {
		p[v.Property] = v.Value
	}
	var model []byte
	for pt := tpm2.TPMPTVendorString1; pt <= tpm2.TPMPTVendorString4; pt++ {
		model = append(model, byte(p[pt]>>24), byte(p[pt]>>16), byte(p[pt]>>8), byte(p[pt]))
	}
	ek, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tpm2.ECCEKTemplate),
	}.Execute(t)
	if err != nil {
		return fmt.Errorf("create EK: %w", err)
	}
	if _, err := (tpm2.FlushContext{FlushHandle: ek.ObjectHandle}).Execute(t); err != nil {
		return fmt.Errorf("flush EK: %w", err)
	}
	pub, err := ek.OutPublic.Contents()
	if err != nil {
		return err
	}
	key, err := tpm2.Pub(*pub)
	if err != nil {
		return err
	}
	der, err := ekCertificate(key.(*ecdsa.PublicKey), fmt.Sprintf("id:%08X", p[tpm2.TPMPTManufacturer]),
		strings.Trim(string(model), "\x00 "), fmt.Sprintf("id:%08X", p[tpm2.TPMPTFirmwareVersion1]))
	if err != nil {
		return fmt.Errorf("issue EK certificate: %w", err)
	}
	return writeNV(t, EKCertIndex, der)
}

// ekCertificate issues the EK certificate in the TCG form: empty subject, a critical SAN holding only a DirectoryName
// with the TPM's manufacturer, model and version, key agreement (an ECC EK decrypts by ECDH), EKU "EK certificate".
func ekCertificate(ek *ecdsa.PublicKey, manufacturer, model, version string) ([]byte, error) {
	root, err := rootOnce()
	if err != nil {
		return nil, err
	}
	utf8 := func(s string) asn1.RawValue { return asn1.RawValue{Tag: asn1.TagUTF8String, Bytes: []byte(s)} }
	name, err := asn1.Marshal(pkix.RDNSequence{
		{{Type: oidTPMManufacturer, Value: utf8(manufacturer)}},
		{{Type: oidTPMModel, Value: utf8(model)}},
		{{Type: oidTPMVersion, Value: utf8(version)}},
	})
	if err != nil {
		return nil, err
	}
	san, err := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: name}})
	if err != nil {
		return nil, err
	}
	spki, err := x509.MarshalPKIXPublicKey(ek)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(spki)
	serial := new(big.Int).SetBytes(sum[:16])
	serial.SetBit(serial, 127, 1) // positive, 16 bytes, never zero
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageKeyAgreement,
		UnknownExtKeyUsage:    []asn1.ObjectIdentifier{oidEKCertificate},
		BasicConstraintsValid: true,
		ExtraExtensions:       []pkix.Extension{{Id: oidSAN, Critical: true, Value: san}},
	}
	return x509.CreateCertificate(nil, tmpl, root.cert, ek, root.key)
}

// writeNV defines index under platform authorization with the attributes TPM vendors give EK certificate indices
// (written by the platform only, read by anyone with the index's empty authValue, the owner or the platform) and
// writes data into it.
func writeNV(t transport.TPM, index uint32, data []byte) error {
	platform := tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)}
	pub := tpm2.TPMSNVPublic{
		NVIndex: tpm2.TPMHandle(index),
		NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{PPWrite: true, WriteDefine: true, PPRead: true, OwnerRead: true, AuthRead: true,
			NoDA: true, PlatformCreate: true, NT: tpm2.TPMNTOrdinary},
		DataSize: uint16(len(data)),
	}
	if _, err := (tpm2.NVDefineSpace{AuthHandle: platform, PublicInfo: tpm2.New2B(pub)}).Execute(t); err != nil {
		return fmt.Errorf("define NV index %#x: %w", index, err)
	}
	name, err := tpm2.NVName(&pub)
	if err != nil {
		return err
	}
	const chunk = 1024 // the simulator's MAX_NV_BUFFER_SIZE
	for off := 0; off < len(data); off += chunk {
		if _, err := (tpm2.NVWrite{
			AuthHandle: platform,
			NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: *name},
			Data:       tpm2.TPM2BMaxNVBuffer{Buffer: data[off:min(off+chunk, len(data))]},
			Offset:     uint16(off),
		}).Execute(t); err != nil {
			return fmt.Errorf("write NV index %#x: %w", index, err)
		}
	}
	return nil
}
