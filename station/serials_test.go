package station

import (
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
)

func TestParseSerialList(t *testing.T) {
	rule, _ := NewSerialRule(DefaultSerialPattern)
	tests := []struct {
		name      string
		in        string
		want      []string
		wantField map[string]string // fields of the first unit
		badLines  []int
	}{
		{name: "plain", in: "SN-001\n\n# comment\nSN-002\r\n", want: []string{"SN-001", "SN-002"}},
		{name: "csv", in: "serial,hostname\nSN-001,gw-1\nSN-002,gw-2\n", want: []string{"SN-001", "SN-002"},
			wantField: map[string]string{"hostname": "gw-1"}},
		{name: "csv with BOM and spaces", in: "\xef\xbb\xbfHostname , Serial\n gw-1 , SN-001\n", want: []string{"SN-001"},
			wantField: map[string]string{"hostname": "gw-1"}},
		{name: "bad serials listed by line", in: "SN-001\nx\nSN-003\nbad/serial\n", badLines: []int{2, 4}},
		{name: "duplicate", in: "SN-001\nSN-002\nSN-001\n", badLines: []int{3}},
		{name: "csv short row", in: "serial,mac\nSN-001\n", badLines: []int{2}},
		{name: "csv bad column name", in: "serial,MAC address\nSN-001,aa\n", badLines: []int{1}},
		{name: "empty", in: "# nothing\n", badLines: []int{0}},
		// A one-column list with a header line: the header is not a unit called "serial" (any case, CRLF, BOM).
		{name: "one column with header", in: "serial\nSN-001\nSN-002\n", want: []string{"SN-001", "SN-002"}},
		{name: "one column header CRLF", in: "Serial\r\nSN-001\r\n\r\nSN-002\r\n", want: []string{"SN-001", "SN-002"}},
		{name: "one column header BOM", in: "\xef\xbb\xbf# units\nSERIAL \r\nSN-001\r\n", want: []string{"SN-001"}},
		{name: "header only CRLF", in: "serial\r\n", badLines: []int{0}},
		{name: "header only", in: "Serial", badLines: []int{0}},
		{name: "serial later in a plain list is a unit", in: "SN-001\nserial\n", want: []string{"SN-001", "serial"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			units, err := ParseSerialList("serials.txt", strings.NewReader(tt.in), rule)
			if tt.badLines != nil {
				var sfe *SerialFileError
				if !errors.As(err, &sfe) || !errors.Is(err, ErrSerialFile) {
					t.Fatalf("got %v, want SerialFileError", err)
				}
				var got []int
				for _, l := range sfe.Lines {
					got = append(got, l.Line)
				}
				if len(got) != len(tt.badLines) {
					t.Fatalf("bad lines %v, want %v (%v)", got, tt.badLines, err)
				}
				for i := range got {
					if got[i] != tt.badLines[i] {
						t.Fatalf("bad lines %v, want %v (%v)", got, tt.badLines, err)
					}
				}
				if strings.Contains(tt.in, "serial") && !strings.Contains(tt.in, "SN-") && !strings.Contains(err.Error(), "only a header") {
					t.Errorf("header-only list: %v does not say so", err)
				}
				if strings.Contains(err.Error(), "\n") {
					t.Errorf("error is not one line: %q", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, u := range units {
				got = append(got, u.Serial)
			}
			if strings.Join(got, ",") != strings.Join(tt.want, ",") {
				t.Fatalf("serials %v, want %v", got, tt.want)
			}
			for k, v := range tt.wantField {
				if units[0].Fields[k] != v {
					t.Errorf("field %s = %q, want %q", k, units[0].Fields[k], v)
				}
			}
		})
	}
}

func FuzzParseSerialList(f *testing.F) {
	for _, s := range []string{"SN-001\nSN-002\n", "serial,host\nSN-001,h\n", "a\"b,serial\n\"x", "#\n\n", "serial\nSN-1\nSN-1"} {
		f.Add(s)
	}
	rule, _ := NewSerialRule(DefaultSerialPattern)
	f.Fuzz(func(t *testing.T, in string) {
		units, err := ParseSerialList("f", strings.NewReader(in), rule)
		if err != nil {
			if !errors.Is(err, ErrSerialFile) {
				t.Fatalf("error %v is not ErrSerialFile", err)
			}
			return
		}
		seen := map[string]bool{}
		for _, u := range units {
			if rule.Check(u.Serial) != nil || seen[u.Serial] {
				t.Fatalf("accepted bad or repeated serial %q", u.Serial)
			}
			seen[u.Serial] = true
		}
	})
}

func TestParseTargets(t *testing.T) {
	rule, _ := NewSerialRule(DefaultSerialPattern)
	dir := t.TempDir()
	img := dir + "/u.img"
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		in       string
		want     []string
		badLines []int
		reason   string // a part of the first bad line's reason
	}{
		{name: "header and rows", in: "serial,image\nSN-001," + img + "\n# c\nSN-002 , " + img + "\n", want: []string{"SN-001", "SN-002"}},
		{name: "no header", in: "SN-001," + img + "\n", want: []string{"SN-001"}},
		{name: "bad serial", in: "x," + img + "\n", badLines: []int{1}},
		{name: "duplicate", in: "SN-001," + img + "\nSN-001," + img + "\n", badLines: []int{2}, reason: "repeats line 1"},
		{name: "missing image", in: "SN-001," + dir + "/nope.img\n", badLines: []int{1}, reason: "no such file"},
		{name: "one field", in: "SN-001\n", badLines: []int{1}, reason: "want serial,image"},
		{name: "empty", in: "serial,image\n", badLines: []int{0}, reason: "no targets"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			units, err := ParseTargets("t.csv", []byte(tt.in), rule)
			if tt.badLines != nil {
				var fe *SerialFileError
				if !errors.As(err, &fe) || !errors.Is(err, ErrSerialFile) {
					t.Fatalf("got %v, want a SerialFileError", err)
				}
				var lines []int
				for _, l := range fe.Lines {
					lines = append(lines, l.Line)
				}
				if !slices.Equal(lines, tt.badLines) || !strings.Contains(fe.Lines[0].Reason, tt.reason) {
					t.Fatalf("bad lines %v (%v), want %v with %q", lines, fe.Lines, tt.badLines, tt.reason)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, u := range units {
				if u.Target != img {
					t.Errorf("%s: target %q, want %q", u.Serial, u.Target, img)
				}
				got = append(got, u.Serial)
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("got %v, want %v", got, tt.want)
			}
		})
	}
}
