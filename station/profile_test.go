package station

import (
	"errors"
	"strings"
	"testing"

	"provision/station/profile"
)

func testMaterial(kind string) profile.Material {
	return profile.Material{Serial: "SN-1", KeyKind: kind, Cert: []byte("LEAF\n"), Issuing: []byte("ISSUING\n"), Root: []byte("ROOT\n"),
		ServerCA: []byte("SERVERCA\n"), Key: []byte("KEY\n")}
}

func findFile(plan *profile.Plan, devicePath string) *profile.PlannedFile {
	for i := range plan.Files {
		if plan.Files[i].DevicePath == devicePath {
			return &plan.Files[i]
		}
	}
	return nil
}

// A profile station.yaml cannot use is a configuration error with the line it is on (the profile package's own tests
// cover each reason).
func TestProfileErrors(t *testing.T) {
	base := string(DefaultConfig("st").Marshal())
	tests := []struct{ name, profiles, want string }{
		{"unknown partition", `{p: {partitions: {root: {select: "2", mount: /}}, files: [{to: "data:/x", from: cert}]}}`, `partition "data" is not defined`},
		{"unknown base", `{p: {base: nope}}`, `no built-in profile "nope"`},
		{"bad tpm_openssl", `{x: {base: mender, tpm_openssl: abrmd}}`, "use auto, provider, provider-abrmd, engine, none"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseConfig("station.yaml", []byte(base+"\nprofiles: "+tt.profiles+"\n"))
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tt.want) ||
				!strings.Contains(err.Error(), "station.yaml:") {
				t.Fatalf("got %v, want ErrConfig mentioning %q", err, tt.want)
			}
		})
	}
}
