package export

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"time"
)

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// ManifestVersion is the version field of a manifest; fields may be added, never renamed or removed.
const ManifestVersion = 1

// ManifestDoc is the station's manifest of shipped units: what it made, for an auditor or a fleet backend that
// checks what arrives against what left the line. Its detached signature (Sign) is by the station audit key.
type ManifestDoc struct {
	Version int            `json:"version"`
	Station string         `json:"station"` // station_id of the station that wrote it
	Created string         `json:"created"` // RFC 3339 UTC
	Units   []ManifestUnit `json:"units"`
}

// ManifestUnit is one unit of the manifest.
type ManifestUnit struct {
	Serial      string              `json:"serial"`
	State       string              `json:"state"`
	Station     string              `json:"station"`
	Operator    string              `json:"operator"`
	Time        string              `json:"time"` // the unit's last change, RFC 3339 UTC
	KeyKind     string              `json:"key_kind"`
	EKSHA256    string              `json:"ek_sha256"`
	Certificate ManifestCertificate `json:"certificate"`
}

// ManifestCertificate is the unit's active certificate.
type ManifestCertificate struct {
	Serial   string `json:"serial"`
	SHA256   string `json:"sha256"`
	NotAfter string `json:"not_after"`
}

func rfc3339(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}

// Manifest is the manifest document of units, as written to the file (indented JSON, final newline): the signature
// covers exactly these bytes.
func Manifest(station string, created time.Time, units []Unit) ([]byte, error) {
	doc := ManifestDoc{Version: ManifestVersion, Station: station, Created: rfc3339(created), Units: []ManifestUnit{}}
	for _, u := range units {
		doc.Units = append(doc.Units, ManifestUnit{Serial: u.Serial, State: u.State, Station: u.Station, Operator: u.Operator,
			Time: rfc3339(u.Updated), KeyKind: u.KeyKind, EKSHA256: u.EKSHA256, Certificate: ManifestCertificate{
				Serial: u.Certificate.Serial, SHA256: u.Certificate.SHA256, NotAfter: rfc3339(u.Certificate.NotAfter)}})
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(doc); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Sign is the detached signature of a manifest file: Ed25519 (pure, RFC 8032) over the file's bytes, the raw 64-byte
// signature, as `openssl pkeyutl -verify -pubin -inkey ca/audit.pub -rawin -in FILE -sigfile FILE.sig` checks it.
func Sign(key ed25519.PrivateKey, manifest []byte) ([]byte, error) {
	if len(key) != ed25519.PrivateKeySize {
		return nil, errors.New("export manifest: no station audit key (ca/audit.key): run `provision audit adopt-key`")
	}
	return ed25519.Sign(key, manifest), nil
}

// Verify checks a manifest against its detached signature and the station audit public key.
func Verify(pub ed25519.PublicKey, manifest, sig []byte) bool {
	return len(pub) == ed25519.PublicKeySize && ed25519.Verify(pub, manifest, sig)
}
