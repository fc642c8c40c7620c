// Package deptest enforces the layering: leaf packages (tpm with tpm/attest, image, inventory, central, station/ca,
// station/handshake, station/profile) import the standard library, their own third-party dependencies and internal
// utilities only — never each other, never station, never cmd. server imports only central. station never imports
// cmd. internal/testutil is for tests only: no package's non-test code imports it, and the shipped binary
// (cmd/provision) does not link the testing package.
package deptest

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
)

const module = "provision"

var leaves = []string{"tpm", "image", "inventory", "station/ca", "station/handshake", "station/profile", "central", "export", "label"}

type pkg struct {
	ImportPath string
	Deps       []string
}

func listDeps(t *testing.T, pattern string) []pkg {
	t.Helper()
	out, err := exec.Command("go", "list", "-e", "-json=ImportPath,Deps", pattern).Output()
	if err != nil {
		t.Fatalf("go list %s: %v", pattern, err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for dec.More() {
		var p pkg
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	return pkgs
}

func owner(importPath string) string {
	rel := strings.TrimPrefix(importPath, module+"/")
	for _, l := range leaves {
		if rel == l || strings.HasPrefix(rel, l+"/") {
			return l
		}
	}
	return rel
}

func TestLeavesStayLeaves(t *testing.T) {
	for _, leaf := range leaves {
		for _, p := range listDeps(t, "../../"+leaf+"/...") {
			if !strings.HasPrefix(p.ImportPath, module+"/") {
				continue // the pattern matched nothing yet
			}
			for _, d := range p.Deps {
				if !strings.HasPrefix(d, module+"/") || strings.HasPrefix(d, module+"/internal/") {
					continue
				}
				if owner(d) != leaf {
					t.Errorf("%s imports %s: leaf packages must not import other project packages", p.ImportPath, d)
				}
			}
		}
	}
}

// server (provision serve's HTTP side) reads the central store and nothing else of the project: it never reaches a
// station's inventory, CA or TPM.
func TestServerImportsOnlyCentral(t *testing.T) {
	for _, p := range listDeps(t, "../../server/...") {
		if !strings.HasPrefix(p.ImportPath, module+"/") {
			continue
		}
		for _, d := range p.Deps {
			if !strings.HasPrefix(d, module+"/") || strings.HasPrefix(d, module+"/internal/") || d == module+"/central" {
				continue
			}
			t.Errorf("%s imports %s: server may import only central", p.ImportPath, d)
		}
	}
}

func TestStationDoesNotImportCmd(t *testing.T) {
	for _, p := range listDeps(t, "../../station/...") {
		for _, d := range p.Deps {
			if strings.HasPrefix(d, module+"/cmd/") {
				t.Errorf("%s imports %s", p.ImportPath, d)
			}
		}
	}
}

const testutilPkg = module + "/internal/testutil"

func TestTestutilOnlyFromTests(t *testing.T) {
	for _, p := range listDeps(t, "../../...") {
		if p.ImportPath == testutilPkg {
			continue
		}
		for _, d := range p.Deps {
			if d == testutilPkg {
				t.Errorf("%s imports %s: only tests may", p.ImportPath, d)
			}
		}
	}
}

func TestBinaryDoesNotLinkTesting(t *testing.T) {
	for _, p := range listDeps(t, "../../cmd/provision") {
		for _, d := range p.Deps {
			if d == "testing" {
				t.Errorf("%s links the testing package: a test helper reached non-test code", p.ImportPath)
			}
		}
	}
}
