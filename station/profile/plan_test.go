package profile

import (
	"errors"
	"io/fs"
	"strings"
	"testing"
)

// templateFiles is a Templates over a map, as package station's Layout is over the station directory.
type templateFiles map[string]string

func (t templateFiles) ReadTemplate(name string) ([]byte, error) {
	s, ok := t[name]
	if !ok {
		return nil, fs.ErrNotExist
	}
	return []byte(s), nil
}

// template:<file> entries are read through Templates and rendered with the unit's values; without Templates they are
// refused, and a reader's error comes back as it was.
func TestPlanTemplates(t *testing.T) {
	own := map[string]Profile{"p": {Partitions: map[string]PartitionSpec{"rootfs": {Select: "2", Mount: "/"}},
		Files: []FileSpec{{To: "rootfs:/etc/id", From: "template:id.txt"}}}}
	p, err := Resolve("p", own)
	if err != nil {
		t.Fatal(err)
	}
	plan, err := p.Plan("p", templateFiles{"id.txt": "serial {{.Serial}} key {{.KeyKind}}\n"}, testMaterial(KeySoft))
	if err != nil || string(plan.Files[0].Data) != "serial SN-1 key soft\n" {
		t.Fatalf("plan: %v %+v", err, plan)
	}
	if _, err := p.Plan("p", nil, testMaterial(KeySoft)); err == nil || !strings.Contains(err.Error(), "no template files") {
		t.Errorf("no Templates: %v", err)
	}
	if _, err := p.Plan("p", templateFiles{}, testMaterial(KeySoft)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing template: %v, want fs.ErrNotExist", err)
	}
}

// A plan for tpm_openssl auto is provisional until settled: Settle re-renders it with the form the image calls for.
// Forced forms and software keys are not provisional, and Settle leaves them as they are.
func TestPlanSettle(t *testing.T) {
	const cnf = "/etc/mender/openssl-tpm2.cnf"
	auto := planFor(t, nil, "mender", KeyTPM)
	if !auto.Provisional() {
		t.Fatal("mender with a TPM key: not provisional")
	}
	if err := auto.Settle(OpenSSLFromDpkg([]byte(readStatus(t, "debian12.status")), DpkgStatus)); err != nil {
		t.Fatal(err)
	}
	if auto.Provisional() || auto.OpenSSL.Form != OpenSSLProviderABRMD {
		t.Fatalf("settled: provisional %v, choice %+v", auto.Provisional(), auto.OpenSSL)
	}
	if f := findFile(auto, cnf); f == nil || !strings.Contains(string(f.Data), "default_properties") {
		t.Errorf("settled to provider-abrmd, openssl config: %+v", f)
	}
	forced := planFor(t, map[string]Profile{"e": {Base: "mender", TPMOpenSSL: OpenSSLEngine}}, "e", KeyTPM)
	if forced.Provisional() {
		t.Error("forced form is provisional")
	}
	if err := forced.Settle(OpenSSLChoice{Form: OpenSSLProvider}); err != nil || forced.OpenSSL.Form != OpenSSLEngine {
		t.Errorf("Settle changed a forced form: %v %+v", err, forced.OpenSSL)
	}
}
