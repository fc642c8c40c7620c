package station

import (
	"bytes"
	"errors"
	"fmt"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"text/template"
	"time"

	"github.com/go-playground/validator/v10"
	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/parser"

	"provision/station/profile"
	"provision/tpm"
)

// ErrConfig: station.yaml is malformed or invalid.
var ErrConfig = errors.New("invalid station configuration")

// Config is station.yaml.
type Config struct {
	StationID   string            `yaml:"station_id" validate:"required,max=64,stationid"`
	TPM         string            `yaml:"tpm" validate:"required,tpmuri"`
	Serial      SerialConfig      `yaml:"serial"`
	Subject     string            `yaml:"subject" validate:"required,subject"`
	Key         KeyConfig         `yaml:"key"`
	Certificate CertificateConfig `yaml:"certificate"`
	// ServerCA is the CA devices use to verify the fleet's servers (PEM file, relative to the station directory);
	// default: the station root.
	ServerCA string `yaml:"server_ca"`
	// Profile is the default image profile (built-in: mender, mqtt, edge).
	Profile string `yaml:"profile" validate:"required"`
	// Profiles are the station's own profiles (docs/profiles.md), optionally starting from a built-in with base:.
	Profiles map[string]profile.Profile `yaml:"profiles"`
	// Endpoints are the handshake test's targets (tls://, mqtts://, https://); empty: the built-in test server.
	Endpoints []string `yaml:"endpoints" validate:"dive,endpoint"`
	// EndpointCA is the CA the handshake step verifies the endpoints' servers with (PEM file, relative to the station
	// directory); default: ServerCA, so the station checks what the device will check.
	EndpointCA string `yaml:"endpoint_ca"`
	// Attestation is the genuine-TPM policy of the attest step (docs/attestation.md): off, record (default: evidence
	// kept, the unit fails only when its TPM contradicts itself) or required (the EK certificate must chain to a
	// trusted TPM vendor root).
	Attestation string `yaml:"attestation" validate:"omitempty,oneof=off record required"`
	// TPMRoots is a folder of PEM files (relative to the station directory) with TPM vendor roots and intermediates
	// trusted besides the built-in ones; used when it exists.
	TPMRoots string `yaml:"tpm_roots"`
	// Central is the factory's central store (docs/central.md); empty: this station's inventory is its only record.
	Central CentralConfig `yaml:"central"`
	// CRL is where this station's CRL is published and how long each one is valid (docs/lifecycle.md).
	CRL CRLConfig `yaml:"crl"`
	// UnitSerial reads the unit's own serial over its fixture and compares it with the scanned one (docs/station.md).
	UnitSerial UnitSerialConfig `yaml:"unit_serial"`

	serialRule *SerialRule
	subject    *SubjectTemplate
	profiles   *profileCache
}

// SerialConfig says which serials the station accepts.
type SerialConfig struct {
	Pattern string `yaml:"pattern" validate:"required,serialpattern"`
}

// KeyConfig chooses the device key.
type KeyConfig struct {
	Algorithm string `yaml:"algorithm" validate:"required,oneof=ecc-p256 rsa-2048"`
}

// CertificateConfig shapes issued certificates.
type CertificateConfig struct {
	ValidityDays int `yaml:"validity_days" validate:"required,min=1,max=9125"`
}

// CentralConfig names the central PostgreSQL store and how the line depends on it.
type CentralConfig struct {
	// DSN is a PostgreSQL URL or key=value string without a password (it comes from PGPASSWORD or a pgpass file).
	DSN string `yaml:"dsn" validate:"omitempty,max=1024,nopassword"`
	// Mode: required (no unit starts while the store is unreachable) or preferred (default: the line goes on with the
	// local inventory and forwards later).
	Mode string `yaml:"mode" validate:"omitempty,oneof=required preferred"`
}

// CRLConfig: the URL written into issued certificates as their CRL distribution point (empty: none), and the hours
// until a CRL's nextUpdate (default 24).
type CRLConfig struct {
	URL             string `yaml:"url" validate:"omitempty,max=1024,url"`
	NextUpdateHours int    `yaml:"next_update_hours" validate:"omitempty,min=1,max=8760"`
}

// NextUpdate is the validity of a CRL: next_update_hours, 24 hours when not set.
func (c CRLConfig) NextUpdate() time.Duration {
	if c.NextUpdateHours == 0 {
		return 24 * time.Hour
	}
	return time.Duration(c.NextUpdateHours) * time.Hour
}

// Central modes.
const (
	CentralRequired  = "required"
	CentralPreferred = "preferred"
)

// CentralMode is the mode, preferred when not set.
func (c CentralConfig) CentralMode() string {
	if c.Mode == "" {
		return CentralPreferred
	}
	return c.Mode
}

// DSNHasPassword reports whether a PostgreSQL connection string carries a password: in a URL's user information, as
// a password= parameter of a URL, or as a password= pair of the key=value form.
func DSNHasPassword(dsn string) bool {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return strings.Contains(strings.ToLower(dsn), "password")
		}
		if _, ok := u.User.Password(); ok {
			return true
		}
		return u.Query().Has("password")
	}
	for _, f := range strings.Fields(dsn) {
		if k, _, _ := strings.Cut(f, "="); strings.EqualFold(strings.TrimSpace(k), "password") {
			return true
		}
	}
	return false
}

// Attestation policies (station.yaml attestation:).
const (
	AttestOff      = "off"
	AttestRecord   = "record"
	AttestRequired = "required"
)

// AttestationPolicy is the attest step's policy: station.yaml's, record when it is not set.
func (c *Config) AttestationPolicy() string {
	if c.Attestation == "" {
		return AttestRecord
	}
	return c.Attestation
}

// SerialRule is the compiled serial pattern.
func (c *Config) SerialRule() *SerialRule { return c.serialRule }

// SubjectTemplate is the compiled subject template.
func (c *Config) SubjectTemplate() *SubjectTemplate { return c.subject }

// DefaultConfig is the configuration `provision init` writes.
func DefaultConfig(stationID string) Config {
	return Config{
		StationID:   stationID,
		TPM:         "/dev/tpmrm0",
		Serial:      SerialConfig{Pattern: DefaultSerialPattern},
		Subject:     DefaultSubject,
		Key:         KeyConfig{Algorithm: "ecc-p256"},
		Certificate: CertificateConfig{ValidityDays: 825},
		ServerCA:    "ca/root.crt",
		Profile:     "mender",
		Attestation: AttestRecord,
		TPMRoots:    "tpm_roots",
	}
}

var configTemplate = template.Must(template.New("station.yaml").Funcs(template.FuncMap{"q": strconv.Quote}).Parse(
	`# provision station configuration. Checked every time it is loaded; an error names the line and the field.

# Names this station in the inventory and the audit log (letters, digits, '.', '_', '-').
station_id: {{q .StationID}}

# The unit's TPM as this station reaches it (overridden by --tpm):
#   /dev/tpmrm0         a TPM through the kernel resource manager (the unit booted on the fixture)
#   mssim://HOST:PORT   a TPM speaking the TCP simulator protocol (swtpm, a forwarded TPM); control port PORT+1
#   cmd:COMMAND         the unit on its fixture: a command carrying TPM commands on stdin/stdout, run without a
#                       shell, {serial} and {fixture} (--fixture) filled in per unit, e.g.
#                       cmd:ssh -o BatchMode=yes root@{fixture} tpm2_send --tcti=device:/dev/tpmrm0
#   sim                 the in-process simulator: tests and demos only, its keys die with the process
#   soft                no TPM: a software key, written only to the unit's bundle or image
tpm: {{q .TPM}}

serial:
  # A regular expression every serial must match in full. Whatever it allows, a serial never contains '/', white space
  # or control characters and is at most 128 bytes: it names files.
  pattern: {{q .Serial.Pattern}}

# The certificate subject. Attributes: CN (required), O, OU, C, L, ST, STREET, POSTALCODE, SERIALNUMBER.
# Placeholders: {serial}, and in batch mode any CSV column as {name}. A literal comma is written "\,".
subject: {{q .Subject}}

key:
  # ecc-p256 (default; fast, works with every TLS stack) or rsa-2048.
  algorithm: {{q .Key.Algorithm}}

certificate:
  # Validity of device certificates in days (clipped to the issuing CA's own expiry).
  validity_days: {{.Certificate.ValidityDays}}

# The CA devices use to verify the fleet's servers (broker, Mender server), written into images as from: server_ca.
# A PEM file, relative to this directory. Default: the station root.
server_ca: {{q .ServerCA}}

# The default image profile: mender, mqtt, edge (built in), or one of yours below. --profile overrides.
profile: {{q .Profile}}

# The live mTLS test after imaging: empty for the built-in loopback server, or real endpoints (--endpoint overrides):
#   tls://host:port   mqtts://host:port (MQTT 5 CONNECT, CONNACK 0)   https://host[:port]/path (2xx)
# endpoints: ["mqtts://broker.factory.example:8883"]
# The CA the handshake verifies those servers with (a PEM file relative to this directory). Default: server_ca above, so
# the station checks the broker with exactly what the device will check it with.
# endpoint_ca: "ca/fleet-server-ca.pem"

# Genuine-TPM proof (step attest, after key): the unit's EK certificate is read from its TPM and chained to a TPM
# vendor's root, the TPM proves it holds that EK (credential activation) and certifies the new device key.
#   off        no attestation, no TPM binding
#   record     (default) evidence kept and shown; the unit fails only when its TPM contradicts itself
#   required   the EK certificate must also chain to a trusted root (built-in vendor roots, tpm_roots, --tpm-roots)
attestation: {{q .Attestation}}
# A folder (relative to this directory) of PEM files: TPM vendor roots/intermediates you trust besides the built-in set.
tpm_roots: {{q .TPMRoots}}

# The factory's central store (PostgreSQL) that every station forwards its records to (docs/central.md). The password
# never goes here: set PGPASSWORD or use a pgpass file (~/.pgpass, PGPASSFILE).
#   mode: preferred   (default) the line goes on with this station's inventory while the store is down; forwarded later
#   mode: required    no unit starts while the store is unreachable
# central:
#   dsn: "postgres://provision@db.factory.example:5432/provision?sslmode=verify-full"
#   mode: preferred

# Revocation (docs/lifecycle.md): the URL where this station's CRL is published (written into every certificate issued
# from then on as its CRL distribution point; provision serve answers /crl/<station_id>), and how many hours each CRL
# made by provision crl is valid (default 24: run provision crl at least that often).
# crl:
#   url: "http://provision.factory.example:8080/crl/{{.StationID}}"
#   next_update_hours: 24

# The unit's own serial, read over its fixture before anything is created and compared with the scanned serial
# (docs/station.md "Fixtures"). command: run without a shell; {serial} and {fixture} are filled in; its trimmed stdout
# is the unit's serial. mode: required (default with a command: a mismatch is refused, exit 3) | warn | off.
# unit_serial:
#   command: "ssh -o BatchMode=yes root@{fixture} cat /sys/class/dmi/id/product_serial"
#   mode: required

# Your own profiles. Each maps what the station produces to files in the image; "base" starts from a built-in.
#   from: cert | cert+chain (leaf + issuing) | chain (issuing + root) | root | server_ca | key
#         | ak_cert | ak_key (the unit's TPM attestation key, certified by the station: with when: tpm)
#         | template:<file> (Go text/template, relative to this directory) | builtin:<name>
#   when: tpm | soft | tpm-provider | tpm-engine      mode: octal (keys must not be group/other readable)
#   owner: "uid:gid" (default 0:0)                    json_merge: keys set into an existing JSON file
#   allow_unprotected_key: true   lets a from: key file go to a FAT partition (no modes: anyone who mounts it reads it)
#   tpm_openssl: auto (default: from the image's /var/lib/dpkg/status) | provider | provider-abrmd | engine | none
# template: files, server_ca and endpoint_ca are relative paths inside this directory; a CA key is never a source.
# profiles:
#   mender-emmc:
#     base: mender
#     partitions:
#       data: {select: "label=data", mount: /data}
#     tpm_openssl: engine          # OpenSSL 1.1 clients: HttpsClient.SSLEngine = tpm2tss
#   broker:
#     base: mqtt
#     vars: {broker_host: mqtt.factory.example, broker_port: "8883"}
`))

// Marshal renders the configuration as a commented station.yaml.
func (c Config) Marshal() []byte {
	var buf bytes.Buffer
	if err := configTemplate.Execute(&buf, c); err != nil {
		panic(err) // the template is fixed and the values are plain strings and ints
	}
	return buf.Bytes()
}

// ParseConfig reads and validates station.yaml. name is used in error messages ("station.yaml:7: ...").
func ParseConfig(name string, data []byte) (*Config, error) {
	c := Config{profiles: &profileCache{}}
	if err := yaml.UnmarshalWithOptions(data, &c, yaml.DisallowUnknownField()); err != nil {
		var ye yaml.Error
		if errors.As(err, &ye) && ye.GetToken() != nil {
			p := ye.GetToken().Position
			return nil, fmt.Errorf("%s:%d:%d: %s: %w", name, p.Line, p.Column, ye.GetMessage(), ErrConfig)
		}
		return nil, fmt.Errorf("%s: %v: %w", name, err, ErrConfig)
	}
	if err := configValidator.Struct(&c); err != nil {
		var ve validator.ValidationErrors
		if errors.As(err, &ve) && len(ve) > 0 {
			fe := ve[0]
			field := strings.TrimPrefix(fe.Namespace(), "Config.")
			return nil, fmt.Errorf("%s:%d: %s: %s: %w", name, lineOf(data, field), field, explain(fe), ErrConfig)
		}
		return nil, fmt.Errorf("%s: %v: %w", name, err, ErrConfig)
	}
	for _, f := range []struct{ field, val string }{{"server_ca", c.ServerCA}, {"endpoint_ca", c.EndpointCA}, {"tpm_roots", c.TPMRoots}} {
		if f.val != "" {
			if err := CheckStationPath(f.field, f.val); err != nil {
				return nil, fmt.Errorf("%s:%d: %w", name, lineOf(data, f.field), err)
			}
		}
	}
	if err := c.UnitSerial.check(); err != nil {
		return nil, fmt.Errorf("%s:%d: unit_serial: %v: %w", name, lineOf(data, "unit_serial"), err, ErrConfig)
	}
	if c.Profile != "" {
		if _, err := c.ResolveProfile(c.Profile); err != nil {
			return nil, fmt.Errorf("%s:%d: profile: %v: %w", name, lineOf(data, "profile"), err, ErrConfig)
		}
	}
	for pname := range c.Profiles {
		if _, err := c.ResolveProfile(pname); err != nil {
			return nil, fmt.Errorf("%s:%d: profiles.%s: %v: %w", name, lineOf(data, "profiles."+pname), pname, err, ErrConfig)
		}
	}
	c.serialRule, _ = NewSerialRule(c.Serial.Pattern)
	c.subject, _ = ParseSubjectTemplate(c.Subject)
	return &c, nil
}

// lineOf finds the line of a dotted YAML field path; 0 when it is absent from the file.
func lineOf(data []byte, field string) int {
	f, err := parser.ParseBytes(data, 0)
	if err != nil {
		return 0
	}
	for p := field; p != ""; {
		path, err := yaml.PathString("$." + p)
		if err == nil {
			if n, err := path.FilterFile(f); err == nil && n != nil && n.GetToken() != nil {
				return n.GetToken().Position.Line
			}
		}
		i := strings.LastIndex(p, ".")
		if i < 0 {
			break
		}
		p = p[:i]
	}
	return 0
}

// explain says in words what a field allows.
func explain(fe validator.FieldError) string {
	got := fmt.Sprintf("%v", fe.Value())
	switch fe.Tag() {
	case "required":
		return "is required"
	case "oneof":
		return fmt.Sprintf("%q is not allowed; use one of: %s", got, strings.ReplaceAll(fe.Param(), " ", ", "))
	case "min":
		return fmt.Sprintf("%s is below the minimum %s", got, fe.Param())
	case "max":
		if fe.Kind() == reflect.String {
			return fmt.Sprintf("longer than %s characters", fe.Param())
		}
		return fmt.Sprintf("%s is above the maximum %s", got, fe.Param())
	case "stationid":
		return fmt.Sprintf("%q may hold only letters, digits, '.', '_' and '-'", got)
	case "nopassword":
		return "holds a password: remove it, and set PGPASSWORD or use a pgpass file (~/.pgpass) instead"
	case "tpmuri":
		return fmt.Sprintf("%q is not a TPM URI; use %s", got, tpm.URIForms)
	case "endpoint":
		return strings.TrimSuffix(CheckEndpoint(got).Error(), ": "+ErrEndpoint.Error())
	case "serialpattern":
		_, err := NewSerialRule(got)
		return fmt.Sprintf("not a valid regular expression: %v", errors.Unwrap(err))
	case "subject":
		_, err := ParseSubjectTemplate(got)
		return err.Error()
	}
	return fmt.Sprintf("%q fails %s", got, fe.Tag())
}

var configValidator = newValidator()

func newValidator() *validator.Validate {
	v := validator.New(validator.WithRequiredStructEnabled())
	v.RegisterTagNameFunc(func(f reflect.StructField) string {
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" {
			return ""
		}
		return name
	})
	must := func(tag string, fn validator.Func) {
		if err := v.RegisterValidation(tag, fn); err != nil {
			panic(err)
		}
	}
	must("stationid", func(fl validator.FieldLevel) bool {
		s := fl.Field().String()
		return s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") == ""
	})
	must("tpmuri", func(fl validator.FieldLevel) bool { return ValidTPMURI(fl.Field().String()) })
	must("nopassword", func(fl validator.FieldLevel) bool { return !DSNHasPassword(fl.Field().String()) })
	must("endpoint", func(fl validator.FieldLevel) bool { return CheckEndpoint(fl.Field().String()) == nil })
	must("serialpattern", func(fl validator.FieldLevel) bool {
		_, err := NewSerialRule(fl.Field().String())
		return err == nil
	})
	must("subject", func(fl validator.FieldLevel) bool {
		_, err := ParseSubjectTemplate(fl.Field().String())
		return err == nil
	})
	return v
}

// ValidTPMURI reports whether s is one of the TPM URI forms in docs/station.md (tpm.ParseURI, the grammar tpm.Open
// takes).
func ValidTPMURI(s string) bool {
	// A cmd: URI may hold {serial} and {fixture}, filled per unit.
	return tpm.ValidURITemplate(s)
}

// DistributionPoints are the CRL URLs issued certificates name: crl.url, or none.
func (c CRLConfig) DistributionPoints() []string {
	if c.URL == "" {
		return nil
	}
	return []string{c.URL}
}
