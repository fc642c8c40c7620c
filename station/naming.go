package station

import (
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"unicode"
	"unicode/utf8"
)

// DefaultSerialPattern is the serial pattern of a new station.
const DefaultSerialPattern = `^[A-Za-z0-9][A-Za-z0-9._-]{2,63}$`

// DefaultSubject is the subject template of a new station.
const DefaultSubject = "CN=device-{serial}, O=Example Devices, OU=Manufacturing"

// MaxSerialLen bounds a serial whatever the pattern allows: it names files and directories.
const MaxSerialLen = 128

// ErrBadSerial: the serial does not match the station's pattern or is unsafe as a file name.
var ErrBadSerial = errors.New("invalid serial")

// SerialRule checks serials against the station's pattern. The whole serial must match (the pattern is anchored even
// when it was written without ^ and $), and whatever the pattern says a serial never contains a path separator, white
// space or a control character, is never "." or "..", never starts with "-" or "." and is at most MaxSerialLen bytes:
// serials name bundle directories and image files.
type SerialRule struct {
	pattern string
	re      *regexp.Regexp
}

// NewSerialRule compiles a serial pattern.
func NewSerialRule(pattern string) (*SerialRule, error) {
	if pattern == "" {
		return nil, errors.New("empty serial pattern")
	}
	re, err := regexp.Compile(`^(?:` + pattern + `)$`)
	if err != nil {
		return nil, fmt.Errorf("serial pattern %q: %w", pattern, err)
	}
	return &SerialRule{pattern: pattern, re: re}, nil
}

// Pattern is the pattern as configured.
func (r *SerialRule) Pattern() string { return r.pattern }

// Check returns nil when serial is acceptable, else an error wrapping ErrBadSerial that quotes the pattern.
func (r *SerialRule) Check(serial string) error {
	if reason := unsafeSerial(serial); reason != "" {
		return fmt.Errorf("serial %q %s: %w", serial, reason, ErrBadSerial)
	}
	if !r.re.MatchString(serial) {
		return fmt.Errorf("serial %q does not match the station's pattern %s: %w", serial, r.pattern, ErrBadSerial)
	}
	return nil
}

func unsafeSerial(s string) string {
	switch {
	case s == "":
		return "is empty"
	case len(s) > MaxSerialLen:
		return fmt.Sprintf("is longer than %d bytes", MaxSerialLen)
	case !utf8.ValidString(s):
		return "is not valid UTF-8"
	case s == "." || s == "..":
		return "is a relative path name"
	case s[0] == '-' || s[0] == '.':
		return "starts with '-' or '.'"
	}
	for _, c := range s {
		if c == '/' || c == '\\' || unicode.IsSpace(c) || unicode.IsControl(c) || c == utf8.RuneError {
			return fmt.Sprintf("contains %q", c)
		}
	}
	return ""
}

// SerialURI is the certificate's SAN URI for a serial.
func SerialURI(serial string) *url.URL {
	return &url.URL{Scheme: "urn", Opaque: "dev:serial:" + url.PathEscape(serial)}
}

// SubjectTemplate is a distinguished name with placeholders, such as "CN=device-{serial}, O=Acme, C=DE".
// Attributes: CN, O, OU, C, L, ST, STREET, POSTALCODE, SERIALNUMBER. Separate attributes with commas; write a literal
// comma as "\," and a backslash as "\\". Placeholders: {serial} and any unit field {name} (batch CSV columns).
type SubjectTemplate struct {
	text  string
	attrs []subjectAttr
}

type subjectAttr struct {
	key   string
	value string
}

var subjectKeys = map[string]bool{"CN": true, "O": true, "OU": true, "C": true, "L": true, "ST": true, "STREET": true,
	"POSTALCODE": true, "SERIALNUMBER": true}

var placeholderRE = regexp.MustCompile(`\{([^{}]*)\}`)
var fieldNameRE = regexp.MustCompile(`^[a-z][a-z0-9_]{0,31}$`)

// ParseSubjectTemplate parses a subject template; it needs a CN.
func ParseSubjectTemplate(text string) (*SubjectTemplate, error) {
	t := &SubjectTemplate{text: text}
	parts, err := splitEscaped(text)
	if err != nil {
		return nil, err
	}
	hasCN := false
	for _, p := range parts {
		k, v, ok := strings.Cut(p, "=")
		k, v = strings.ToUpper(strings.TrimSpace(k)), strings.TrimSpace(v)
		if !ok || k == "" {
			return nil, fmt.Errorf("subject %q: %q is not ATTRIBUTE=value", text, p)
		}
		if !subjectKeys[k] {
			return nil, fmt.Errorf("subject %q: unknown attribute %q (use CN, O, OU, C, L, ST, STREET, POSTALCODE, SERIALNUMBER)", text, k)
		}
		if v == "" {
			return nil, fmt.Errorf("subject %q: %s is empty", text, k)
		}
		if strings.Count(v, "{") != strings.Count(v, "}") {
			return nil, fmt.Errorf("subject %q: unbalanced braces in %s", text, k)
		}
		for _, m := range placeholderRE.FindAllStringSubmatch(v, -1) {
			if m[1] != "serial" && !fieldNameRE.MatchString(m[1]) {
				return nil, fmt.Errorf("subject %q: placeholder {%s} is not {serial} or a field name", text, m[1])
			}
		}
		if k == "CN" {
			if hasCN {
				return nil, fmt.Errorf("subject %q: more than one CN", text)
			}
			hasCN = true
		}
		t.attrs = append(t.attrs, subjectAttr{k, v})
	}
	if !hasCN {
		return nil, fmt.Errorf("subject %q: needs a CN", text)
	}
	return t, nil
}

func splitEscaped(s string) ([]string, error) {
	var parts []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '\\':
			if i+1 >= len(s) || (s[i+1] != ',' && s[i+1] != '\\') {
				return nil, fmt.Errorf("subject %q: a backslash must be followed by ',' or '\\'", s)
			}
			cur.WriteByte(s[i+1])
			i++
		case ',':
			parts = append(parts, cur.String())
			cur.Reset()
		default:
			cur.WriteByte(c)
		}
	}
	return append(parts, cur.String()), nil
}

// String is the template as written.
func (t *SubjectTemplate) String() string { return t.text }

// Render fills the placeholders and checks the result: values are valid UTF-8 without control characters, CN is at most
// 64 characters (RFC 5280 ub-common-name), C is two letters.
func (t *SubjectTemplate) Render(serial string, fields map[string]string) (pkix.Name, error) {
	var n pkix.Name
	for _, a := range t.attrs {
		var missing []string
		v := placeholderRE.ReplaceAllStringFunc(a.value, func(m string) string {
			name := m[1 : len(m)-1]
			if name == "serial" {
				return serial
			}
			if fv, ok := fields[name]; ok {
				return fv
			}
			missing = append(missing, name)
			return m
		})
		if len(missing) > 0 {
			return pkix.Name{}, fmt.Errorf("subject %s: no value for {%s}", a.key, missing[0])
		}
		if !utf8.ValidString(v) || strings.IndexFunc(v, unicode.IsControl) >= 0 || strings.TrimSpace(v) == "" {
			return pkix.Name{}, fmt.Errorf("subject %s %q: empty or has control characters", a.key, v)
		}
		switch a.key {
		case "CN":
			if utf8.RuneCountInString(v) > 64 {
				return pkix.Name{}, fmt.Errorf("subject CN %q is longer than 64 characters", v)
			}
			n.CommonName = v
		case "O":
			n.Organization = append(n.Organization, v)
		case "OU":
			n.OrganizationalUnit = append(n.OrganizationalUnit, v)
		case "C":
			if len(v) != 2 || !isLetters(v) {
				return pkix.Name{}, fmt.Errorf("subject C %q is not a two-letter country code", v)
			}
			n.Country = append(n.Country, strings.ToUpper(v))
		case "L":
			n.Locality = append(n.Locality, v)
		case "ST":
			n.Province = append(n.Province, v)
		case "STREET":
			n.StreetAddress = append(n.StreetAddress, v)
		case "POSTALCODE":
			n.PostalCode = append(n.PostalCode, v)
		case "SERIALNUMBER":
			n.SerialNumber = v
		}
	}
	return n, nil
}

func isLetters(s string) bool {
	for _, c := range s {
		if (c < 'A' || c > 'Z') && (c < 'a' || c > 'z') {
			return false
		}
	}
	return true
}
