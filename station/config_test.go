package station

import (
	"errors"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestDefaultConfigRoundTrip(t *testing.T) {
	want := DefaultConfig("line-3")
	got, err := ParseConfig("station.yaml", want.Marshal())
	if err != nil {
		t.Fatal(err)
	}
	if got.StationID != want.StationID || got.TPM != want.TPM || got.Serial != want.Serial || got.Subject != want.Subject ||
		got.Key != want.Key || got.Certificate != want.Certificate {
		t.Fatalf("round trip: got %+v, want %+v", got, want)
	}
	if got.SerialRule() == nil || got.SubjectTemplate() == nil {
		t.Fatal("compiled rules missing")
	}
}

func TestParseConfigErrors(t *testing.T) {
	base := string(DefaultConfig("st").Marshal())
	tests := []struct {
		name       string
		edit       func(string) string
		wantSubstr []string
	}{
		{"bad algorithm", func(s string) string { return strings.Replace(s, `algorithm: "ecc-p256"`, `algorithm: "ed25519"`, 1) },
			[]string{"station.yaml:", "key.algorithm", `"ed25519"`, "ecc-p256, rsa-2048"}},
		{"bad pattern", func(s string) string { return strings.Replace(s, `pattern: "^[`, `pattern: "^([`, 1) },
			[]string{"serial.pattern", "regular expression"}},
		{"validity zero", func(s string) string { return strings.Replace(s, "validity_days: 825", "validity_days: 0", 1) },
			[]string{"certificate.validity_days", "required"}},
		{"validity too long", func(s string) string { return strings.Replace(s, "validity_days: 825", "validity_days: 99999", 1) },
			[]string{"certificate.validity_days", "maximum 9125"}},
		{"bad tpm", func(s string) string { return strings.Replace(s, `tpm: "/dev/tpmrm0"`, `tpm: "tcp://x"`, 1) },
			[]string{"tpm:", "mssim://HOST:PORT"}},
		{"subject without CN", func(s string) string {
			return strings.Replace(s, `subject: "CN=device-{serial}, O=Example Devices, OU=Manufacturing"`, `subject: "O=Acme"`, 1)
		}, []string{"subject", "needs a CN"}},
		{"unknown field", func(s string) string { return s + "\nbogus: 1\n" }, []string{"station.yaml:", "bogus"}},
		{"not yaml", func(s string) string { return "key: [unclosed\n" }, []string{"station.yaml:"}},
		{"unit_serial mode without command", func(s string) string { return s + "\nunit_serial: {mode: required}\n" },
			[]string{"unit_serial", "needs a command"}},
		{"unit_serial bad mode", func(s string) string { return s + "\nunit_serial: {command: \"echo x\", mode: maybe}\n" },
			[]string{"unit_serial.mode", "required, warn, off"}},
		{"station id with space", func(s string) string { return strings.Replace(s, `station_id: "st"`, `station_id: "a b"`, 1) },
			[]string{"station_id", "letters, digits"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseConfig("station.yaml", []byte(tt.edit(base)))
			if !errors.Is(err, ErrConfig) {
				t.Fatalf("got %v, want ErrConfig", err)
			}
			msg := err.Error()
			if strings.Contains(msg, "\n") {
				t.Errorf("message is not one line: %q", msg)
			}
			for _, s := range tt.wantSubstr {
				if !strings.Contains(msg, s) {
					t.Errorf("message %q lacks %q", msg, s)
				}
			}
		})
	}
}

func TestConfigErrorNamesLine(t *testing.T) {
	base := string(DefaultConfig("st").Marshal())
	bad := strings.Replace(base, `algorithm: "ecc-p256"`, `algorithm: "dsa"`, 1)
	line := 0
	for i, l := range strings.Split(bad, "\n") {
		if strings.Contains(l, "algorithm:") && !strings.HasPrefix(strings.TrimSpace(l), "#") {
			line = i + 1
		}
	}
	_, err := ParseConfig("station.yaml", []byte(bad))
	if want := "station.yaml:" + strconv.Itoa(line) + ":"; err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("got %v, want prefix %q", err, want)
	}
}

func TestSerialRule(t *testing.T) {
	r, err := NewSerialRule(DefaultSerialPattern)
	if err != nil {
		t.Fatal(err)
	}
	loose, _ := NewSerialRule(`.+`) // a careless pattern must still not let paths through
	tests := []struct {
		serial string
		rule   *SerialRule
		ok     bool
	}{
		{"SN-0001", r, true},
		{"a.b_c-d", r, true},
		{"ab", r, false},
		{"-abc", r, false},
		{"abc/def", r, false},
		{strings.Repeat("a", 65), r, false},
		{"../../etc", loose, false},
		{"..", loose, false},
		{"a b", loose, false},
		{"a\x00b", loose, false},
		{"ok:serial", loose, true},
		{strings.Repeat("x", 129), loose, false},
	}
	for _, tt := range tests {
		err := tt.rule.Check(tt.serial)
		if (err == nil) != tt.ok {
			t.Errorf("Check(%q) = %v, want ok=%v", tt.serial, err, tt.ok)
		}
		if err != nil && !errors.Is(err, ErrBadSerial) {
			t.Errorf("Check(%q) error %v does not wrap ErrBadSerial", tt.serial, err)
		}
	}
	// The pattern is anchored even when written without anchors.
	unanchored, _ := NewSerialRule(`[0-9]{3}`)
	if err := unanchored.Check("x123x"); err == nil {
		t.Error("unanchored pattern matched part of a serial")
	}
	if err := r.Check("a/b"); err == nil || !strings.Contains(err.Error(), "a/b") {
		t.Errorf("message should quote the serial: %v", err)
	}
	if err := r.Check("ab"); err == nil || !strings.Contains(err.Error(), DefaultSerialPattern) {
		t.Errorf("message should quote the pattern: %v", err)
	}
}

func TestSubjectTemplate(t *testing.T) {
	tests := []struct {
		tmpl    string
		fields  map[string]string
		wantCN  string
		wantO   string
		wantC   string
		wantErr string
	}{
		{tmpl: DefaultSubject, wantCN: "device-SN1", wantO: "Example Devices"},
		{tmpl: `CN={serial}, O=Acme\, Inc., C=de`, wantCN: "SN1", wantO: "Acme, Inc.", wantC: "DE"},
		{tmpl: "CN={hostname}-{serial}", fields: map[string]string{"hostname": "gw"}, wantCN: "gw-SN1"},
		{tmpl: "CN={hostname}", wantErr: "no value for {hostname}"},
		{tmpl: "CN=x, C=DEU", wantErr: "two-letter"},
		{tmpl: "CN=" + strings.Repeat("x", 62) + "{serial}", wantErr: "longer than 64"},
	}
	for _, tt := range tests {
		t.Run(tt.tmpl, func(t *testing.T) {
			st, err := ParseSubjectTemplate(tt.tmpl)
			if err != nil {
				t.Fatal(err)
			}
			n, err := st.Render("SN1", tt.fields)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got %v, want error with %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if n.CommonName != tt.wantCN {
				t.Errorf("CN %q, want %q", n.CommonName, tt.wantCN)
			}
			if tt.wantO != "" && (len(n.Organization) != 1 || n.Organization[0] != tt.wantO) {
				t.Errorf("O %q, want %q", n.Organization, tt.wantO)
			}
			if tt.wantC != "" && (len(n.Country) != 1 || n.Country[0] != tt.wantC) {
				t.Errorf("C %q, want %q", n.Country, tt.wantC)
			}
		})
	}
	for _, bad := range []string{"", "O=Acme", "CN=a, CN=b", "XX=1", "CN=", "CN={bad name}", "CN=a\\", "CN={serial"} {
		if _, err := ParseSubjectTemplate(bad); err == nil {
			t.Errorf("ParseSubjectTemplate(%q) accepted", bad)
		}
	}
}

func FuzzSerialRule(f *testing.F) {
	for _, s := range []string{"SN-0001", "../x", "a\x00", "..", "-x", "ü-serial", strings.Repeat("9", 200)} {
		f.Add(DefaultSerialPattern, s)
		f.Add(`.*`, s)
	}
	safe := regexp.MustCompile(`[/\\\s\x00-\x1f]`)
	f.Fuzz(func(t *testing.T, pattern, serial string) {
		r, err := NewSerialRule(pattern)
		if err != nil {
			return
		}
		if r.Check(serial) != nil {
			return
		}
		if safe.MatchString(serial) || serial == "." || serial == ".." || len(serial) > MaxSerialLen || !utf8.ValidString(serial) ||
			strings.HasPrefix(serial, "-") || strings.HasPrefix(serial, ".") {
			t.Fatalf("unsafe serial %q accepted by pattern %q", serial, pattern)
		}
	})
}

func FuzzSubjectTemplate(f *testing.F) {
	for _, s := range []string{DefaultSubject, `CN={serial}, O=Acme\, Inc., C=DE`, "CN={a}{b}", "CN=\\\\", "OU=x,CN=y,L=z"} {
		f.Add(s, "SN-1")
	}
	f.Fuzz(func(t *testing.T, tmpl, serial string) {
		st, err := ParseSubjectTemplate(tmpl)
		if err != nil {
			return
		}
		n, err := st.Render(serial, map[string]string{"a": "1", "b": "2"})
		if err != nil {
			return
		}
		if n.CommonName == "" || utf8.RuneCountInString(n.CommonName) > 64 {
			t.Fatalf("rendered CN %q from %q", n.CommonName, tmpl)
		}
	})
}
