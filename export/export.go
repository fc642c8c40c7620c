// Package export owns the hand-off files `provision export` writes for a fleet backend: Mender preauthorization,
// AWS IoT bulk registration input, Azure DPS individual enrollments, and the station's signed manifest of shipped units
// (docs/exports.md). It works on its own Unit values, filled by the station from the inventory: it reads no database,
// CA or TPM, needs no network, and imports no other package of the project.
package export

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"time"
)

// Formats are the names --format takes.
var Formats = []string{"mender", "aws", "azure", "manifest"}

// Unit is one unit as an export needs it. Fields that are unknown are left empty; a format that needs one skips the
// unit (Skipped says why).
type Unit struct {
	Serial   string
	State    string
	Station  string
	Operator string
	Updated  time.Time
	KeyKind  string // "tpm" or "soft"
	// PublicKey is the device public key, PKIX DER: from the certificate, or for TPM units from the attestation
	// evidence (the key the TPM certified).
	PublicKey   []byte
	Certificate Certificate // the unit's active certificate
	EKSHA256    string      // SHA-256 of the EK public key (SPKI DER); "" when never attested
	// EKPublic is the TPMT_PUBLIC of the TPM's endorsement key, from the attestation evidence; nil when absent.
	EKPublic []byte
	Fields   map[string]string // the unit's own placeholders (batch CSV columns)
}

// Certificate is a unit's certificate as the inventory records it; DER is nil when the station has no copy of it.
type Certificate struct {
	Serial   string // lowercase hex
	SHA256   string // of the DER, lowercase hex
	NotAfter time.Time
	DER      []byte
}

// PEM is the certificate as PEM, or nil without DER.
func (c Certificate) PEM() []byte {
	if len(c.DER) == 0 {
		return nil
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.DER})
}

// Skipped is a unit a format could not export, and why.
type Skipped struct {
	Serial string
	Reason string
}

func (s Skipped) String() string { return s.Serial + ": " + s.Reason }

// ErrFormat: an unknown format name.
var ErrFormat = errors.New("unknown export format")

// checkCertificate checks that DER is there and is the certificate the inventory names.
func checkCertificate(u Unit) string {
	if len(u.Certificate.DER) == 0 {
		return "the station holds no copy of its certificate " + u.Certificate.Serial
	}
	sum := sha256.Sum256(u.Certificate.DER)
	if hex.EncodeToString(sum[:]) != u.Certificate.SHA256 {
		return "the certificate copy does not match the inventory's fingerprint " + u.Certificate.SHA256
	}
	return ""
}

// publicKeyPEM is the unit's public key as PEM ("PUBLIC KEY", PKIX), taken from the certificate when there is one,
// else PublicKey.
func publicKeyPEM(u Unit) ([]byte, string) {
	der := u.PublicKey
	if checkCertificate(u) == "" {
		c, err := x509.ParseCertificate(u.Certificate.DER)
		if err != nil {
			return nil, "its certificate does not parse: " + err.Error()
		}
		der = c.RawSubjectPublicKeyInfo
	}
	if len(der) == 0 {
		return nil, "no public key: the station holds neither its certificate nor attestation evidence naming its key"
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), ""
}

// jsonLines writes one JSON object per line.
func jsonLines[T any](w io.Writer, objs []T) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	for _, o := range objs {
		if err := enc.Encode(o); err != nil {
			return err
		}
	}
	return nil
}

// MenderDevice is the body of Mender's preauthorization request, POST /api/management/v2/devauth/devices.
type MenderDevice struct {
	IdentityData map[string]string `json:"identity_data"`
	PubKey       string            `json:"pubkey"`
}

// MenderIdentity is the identity the project's Mender devices report: their serial, as the device's identity script
// (/usr/share/mender/identity/mender-device-identity) prints `serial=<serial>`.
func MenderIdentity(u Unit) map[string]string { return map[string]string{"serial": u.Serial} }

// Mender writes one preauthorization request body per unit, as JSON Lines.
func Mender(w io.Writer, units []Unit) ([]Skipped, error) {
	var out []MenderDevice
	var skipped []Skipped
	for _, u := range units {
		pub, why := publicKeyPEM(u)
		if why != "" {
			skipped = append(skipped, Skipped{u.Serial, why})
			continue
		}
		out = append(out, MenderDevice{IdentityData: MenderIdentity(u), PubKey: string(pub)})
	}
	return skipped, jsonLines(w, out)
}

// AWSThing is one line of an AWS IoT bulk registration input file (StartThingRegistrationTask): the parameters of
// the provisioning template in docs/exports.md.
type AWSThing struct {
	ThingName        string `json:"ThingName"`
	SerialNumber     string `json:"SerialNumber"`
	CertificatePem   string `json:"CertificatePem"`
	CACertificatePem string `json:"CACertificatePem"`
}

// AWS writes one bulk registration line per unit: its certificate and the issuing CA certificate that signed it
// (caPEM, which `aws iot register-ca-certificate` registers once).
func AWS(w io.Writer, units []Unit, caPEM []byte) ([]Skipped, error) {
	if len(caPEM) == 0 {
		return nil, errors.New("export aws: no CA certificate")
	}
	var out []AWSThing
	var skipped []Skipped
	for _, u := range units {
		if why := checkCertificate(u); why != "" {
			skipped = append(skipped, Skipped{u.Serial, why})
			continue
		}
		out = append(out, AWSThing{ThingName: u.Serial, SerialNumber: u.Serial, CertificatePem: string(u.Certificate.PEM()),
			CACertificatePem: string(caPEM)})
	}
	return skipped, jsonLines(w, out)
}

// AzureEnrollment is an Azure DPS individual enrollment (service API 2021-10-01, IndividualEnrollment), the body of
// PUT /enrollments/{registrationId}.
type AzureEnrollment struct {
	RegistrationID     string            `json:"registrationId"`
	DeviceID           string            `json:"deviceId"`
	Attestation        AzureAttestation  `json:"attestation"`
	ProvisioningStatus string            `json:"provisioningStatus"`
	InitialTwin        *AzureInitialTwin `json:"initialTwin,omitempty"`
}

// AzureAttestation is DPS's AttestationMechanism: type "tpm" or "x509".
type AzureAttestation struct {
	Type string                `json:"type"`
	TPM  *AzureTPMAttestation  `json:"tpm,omitempty"`
	X509 *AzureX509Attestation `json:"x509,omitempty"`
}

// AzureTPMAttestation: the EK public area, TPM2B_PUBLIC, base64.
type AzureTPMAttestation struct {
	EndorsementKey string `json:"endorsementKey"`
}

// AzureX509Attestation: the device certificate as the primary client certificate.
type AzureX509Attestation struct {
	ClientCertificates AzureX509Certificates `json:"clientCertificates"`
}

// AzureX509Certificates holds the primary certificate.
type AzureX509Certificates struct {
	Primary AzureX509Certificate `json:"primary"`
}

// AzureX509Certificate is the certificate, base64 of its DER (a PEM body without its header lines).
type AzureX509Certificate struct {
	Certificate string `json:"certificate"`
}

// AzureInitialTwin carries the station's record of the unit as device twin tags.
type AzureInitialTwin struct {
	Tags map[string]string `json:"tags"`
}

// tpmAlgRSA is TPM_ALG_RSA, the first field of an RSA key's TPMT_PUBLIC.
const tpmAlgRSA = 0x0001

// Azure writes one individual enrollment per unit, as JSON Lines. A unit whose attestation evidence holds an RSA EK
// (what DPS's TPM attestation takes) is enrolled with TPM attestation; any other with X.509 attestation of its
// certificate.
func Azure(w io.Writer, units []Unit) ([]Skipped, error) {
	var out []AzureEnrollment
	var skipped []Skipped
	for _, u := range units {
		e := AzureEnrollment{RegistrationID: u.Serial, DeviceID: u.Serial, ProvisioningStatus: "enabled",
			InitialTwin: &AzureInitialTwin{Tags: map[string]string{"serial": u.Serial, "station": u.Station,
				"certificateSha256": u.Certificate.SHA256}}}
		switch {
		case len(u.EKPublic) >= 2 && binary.BigEndian.Uint16(u.EKPublic) == tpmAlgRSA && len(u.EKPublic) <= 0xffff:
			tpm2b := binary.BigEndian.AppendUint16(nil, uint16(len(u.EKPublic)))
			e.Attestation = AzureAttestation{Type: "tpm", TPM: &AzureTPMAttestation{EndorsementKey: b64(append(tpm2b, u.EKPublic...))}}
		case checkCertificate(u) == "":
			e.Attestation = AzureAttestation{Type: "x509", X509: &AzureX509Attestation{ClientCertificates: AzureX509Certificates{
				Primary: AzureX509Certificate{Certificate: b64(u.Certificate.DER)}}}}
		default:
			skipped = append(skipped, Skipped{u.Serial, "no RSA EK in its attestation evidence, and " + checkCertificate(u)})
			continue
		}
		out = append(out, e)
	}
	return skipped, jsonLines(w, out)
}

// Write writes format for units; caPEM is the issuing CA certificate (aws). The manifest is not written here: see
// Manifest and Sign.
func Write(w io.Writer, format string, units []Unit, caPEM []byte) ([]Skipped, error) {
	switch format {
	case "mender":
		return Mender(w, units)
	case "aws":
		return AWS(w, units, caPEM)
	case "azure":
		return Azure(w, units)
	}
	return nil, fmt.Errorf("%w %q: use mender, aws or azure (manifest is signed: Manifest)", ErrFormat, format)
}
