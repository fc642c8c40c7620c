package tpm

import (
	"errors"
	"net"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"mvdan.cc/sh/v3/shell"
)

func TestParseURI(t *testing.T) {
	cmd := func(addr string, args ...string) URI { return URI{Kind: URICmd, Addr: addr, Args: args} }
	for _, tt := range []struct {
		in   string
		want URI
		ok   bool
	}{
		{"soft", URI{Kind: URISoft}, true},
		{"sim", URI{Kind: URISim}, true},
		{"mssim://127.0.0.1:2321", URI{Kind: URIMssim, Addr: "127.0.0.1:2321"}, true},
		{"mssim://[::1]:2321", URI{Kind: URIMssim, Addr: "[::1]:2321"}, true},
		{"mssim://tpm.line4:65534", URI{Kind: URIMssim, Addr: "tpm.line4:65534"}, true},
		{"/dev/tpmrm0", URI{Kind: URIDevice, Addr: "/dev/tpmrm0"}, true},
		{"cmd:tpm2_send", cmd("tpm2_send", "tpm2_send"), true},
		{"cmd:ssh -o BatchMode=yes root@10.0.0.2 tpm2_send", cmd("ssh -o BatchMode=yes root@10.0.0.2 tpm2_send",
			"ssh", "-o", "BatchMode=yes", "root@10.0.0.2", "tpm2_send"), true},
		{`cmd:sh -c 'echo "x y" >&2; exit 255'`, cmd(`sh -c 'echo "x y" >&2; exit 255'`, "sh", "-c", `echo "x y" >&2; exit 255`), true},
		{`cmd:a\ b "c\"d\h" '$x' "" *.go {a,b}`, cmd(`a\ b "c\"d\h" '$x' "" *.go {a,b}`, "a b", `c"d\h`, "$x", "", "*.go", "{a,b}"), true},
		{"cmd:  tpm2_send   --tcti=swtpm:host=127.0.0.1,port=2321  # the local swtpm", cmd("  tpm2_send   --tcti=swtpm:host=127.0.0.1,port=2321  # the local swtpm",
			"tpm2_send", "--tcti=swtpm:host=127.0.0.1,port=2321"), true},
		{"mssim://h:65535", URI{}, false}, // its control port would be 65536
		{"mssim://h:0", URI{}, false},
		{"mssim://:1", URI{}, false},
		{"mssim://nohostport", URI{}, false},
		{"mssim://h:port", URI{}, false},
		{"/dev/../dev/tpmrm0", URI{}, false},
		{"/dev/tpmrm0/", URI{}, false},
		{"relative/path", URI{}, false},
		{"tcp://x", URI{}, false},
		{"SIM", URI{}, false},
		{"", URI{}, false},
		{"cmd:", URI{}, false},
		{"cmd:   ", URI{}, false},
		{"cmd:# nothing", URI{}, false},
		{"cmd:ssh root@{fixture} tpm2_send", URI{}, false}, // a template: ParseURITemplate takes it
		{"cmd:tpm2_send --serial={serial}", URI{}, false},
		{"cmd:tpm2_send $TCTI", URI{}, false},
		{`cmd:tpm2_send "$TCTI"`, URI{}, false},
		{"cmd:tpm2_send $(cat /etc/tcti)", URI{}, false},
		{"cmd:tpm2_send `cat /etc/tcti`", URI{}, false},
		{"cmd:tpm2_send $((1+2))", URI{}, false},
		{"cmd:tpm2_send a$", URI{}, false},
		{"cmd:tpm2_send $'a'", URI{}, false}, // bash would make it a, sh $a
		{"cmd:tpm2_send <(id)", URI{}, false},
		{"cmd:~/bin/tpm2_send", URI{}, false},
		{"cmd:tpm2_send | tee log", URI{}, false},
		{"cmd:tpm2_send; reboot", URI{}, false},
		{"cmd:tpm2_send 2>/dev/null", URI{}, false},
		{"cmd:tpm2_send &", URI{}, false},
		{"cmd:tpm2_send 'unterminated", URI{}, false},
		{"cmd:tpm2_send \"a\x00b\"", URI{}, false},
	} {
		got, err := ParseURI(tt.in)
		if !reflect.DeepEqual(got, tt.want) || (err == nil) != tt.ok {
			t.Errorf("ParseURI(%q) = %#v, %v; want %#v, ok %v", tt.in, got, err, tt.want, tt.ok)
		}
		if err != nil && !errors.Is(err, ErrBadURI) {
			t.Errorf("ParseURI(%q): %v does not wrap ErrBadURI", tt.in, err)
		}
		if ValidURI(tt.in) != tt.ok {
			t.Errorf("ValidURI(%q) = %v, want %v", tt.in, !tt.ok, tt.ok)
		}
	}
}

func TestParseURIMessages(t *testing.T) {
	for in, want := range map[string]string{
		"cmd:ssh root@{fixture} tpm2_send": "placeholder {fixture} must be filled",
		"cmd:x --serial={serial}":          "placeholder {serial} must be filled",
		"cmd:":                             "empty command",
		"cmd:tpm2_send $(cat f)":           "$(cat f) is not expanded (no shell runs the command",
		`cmd:tpm2_send "--tcti=$T"`:        "$T is not expanded",
		"cmd:~/tpm2_send":                  "~ is not expanded",
		"cmd:a | b":                        "command: ",
		"tcp://x":                          "use /dev/tpmrm0, mssim://HOST:PORT, cmd:COMMAND, sim or soft",
	} {
		if _, err := ParseURI(in); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseURI(%q) = %v, want an error saying %q", in, err, want)
		}
	}
}

// A configured URI may hold the placeholders; everything ParseURI refuses for another reason stays refused.
func TestParseURITemplate(t *testing.T) {
	u, err := ParseURITemplate("cmd:ssh -o BatchMode=yes root@{fixture} tpm2_send --serial '{serial}'")
	want := []string{"ssh", "-o", "BatchMode=yes", "root@{fixture}", "tpm2_send", "--serial", "{serial}"}
	if err != nil || u.Kind != URICmd || !reflect.DeepEqual(u.Args, want) {
		t.Fatalf("ParseURITemplate = %#v, %v; want args %q", u, err, want)
	}
	for _, s := range []string{"cmd:ssh root@{fixture} tpm2_send", "soft", "mssim://127.0.0.1:2321", "/dev/tpmrm0"} {
		if !ValidURITemplate(s) {
			t.Errorf("ValidURITemplate(%q) = false", s)
		}
	}
	for _, s := range []string{"cmd:", "cmd:ssh $HOST tpm2_send", "tcp://x", ""} {
		if ValidURITemplate(s) {
			t.Errorf("ValidURITemplate(%q) = true", s)
		}
	}
}

func FuzzParseURI(f *testing.F) {
	for _, s := range []string{"soft", "sim", "mssim://127.0.0.1:2321", "/dev/tpmrm0", "mssim://h:65535", "/dev/../x", "tcp://x",
		"cmd:ssh -o BatchMode=yes root@{fixture} tpm2_send", `cmd:sh -c 'echo "x y" >&2; exit 255'`, `cmd:a\ b "c\"d\h" '$x' ""`,
		"cmd:tpm2_send $(id)", "cmd:a <(id)", "cmd:~x", "cmd:a\\\nb", "cmd:a # c", "cmd:"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			if !errors.Is(err, ErrBadURI) || !reflect.DeepEqual(u, URI{}) {
				t.Fatalf("ParseURI(%q) = %+v, %v", s, u, err)
			}
			return
		}
		if u.Kind != URICmd && u.Args != nil {
			t.Fatalf("ParseURI(%q) = %+v", s, u)
		}
		switch u.Kind {
		case URISoft, URISim:
			if u.Addr != "" || s != u.Kind {
				t.Fatalf("ParseURI(%q) = %+v", s, u)
			}
		case URIMssim:
			if host, _, err := net.SplitHostPort(u.Addr); err != nil || host == "" || "mssim://"+u.Addr != s {
				t.Fatalf("ParseURI(%q) = %+v", s, u)
			}
		case URIDevice:
			if !filepath.IsAbs(u.Addr) || filepath.Clean(u.Addr) != u.Addr || u.Addr != s {
				t.Fatalf("ParseURI(%q) = %+v", s, u)
			}
		case URICmd:
			if "cmd:"+u.Addr != s || len(u.Args) == 0 || strings.Contains(s, PlaceholderSerial) || strings.Contains(s, PlaceholderFixture) {
				t.Fatalf("ParseURI(%q) = %+v", s, u)
			}
			// The words are the ones a shell would pass (mvdan.cc/sh's own expander, which also expands braces).
			if !strings.ContainsAny(u.Addr, "{") {
				if want, err := shell.Fields(u.Addr, func(string) string { return "" }); err != nil || !reflect.DeepEqual(u.Args, want) {
					t.Fatalf("ParseURI(%q) = %q, a shell splits it into %q (%v)", s, u.Args, want, err)
				}
			}
		default:
			t.Fatalf("ParseURI(%q): kind %q", s, u.Kind)
		}
	})
}
