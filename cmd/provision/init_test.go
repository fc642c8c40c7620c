package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// init's next step is a command that works here as printed: with --station when the directory is not the default,
// by the name PATH finds (or the path the binary was started by), with a software key when there is no TPM device.
func TestInitNextStepWorks(t *testing.T) {
	self, err := exec.LookPath("provision")
	if err != nil {
		t.Fatal(err)
	}
	run := func(t *testing.T, path string, cmd *exec.Cmd) string {
		t.Helper()
		cmd.Env = append(os.Environ(), "PATH="+path, "PROVISION_STATION=", "PROVISION_OPERATOR=tester")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v\n%s", cmd.Args, err, out)
		}
		return string(out)
	}
	next := func(t *testing.T, out string) string {
		t.Helper()
		_, after, ok := strings.Cut(out, "next: ")
		lines := strings.Split(after, "\n")
		if !ok || len(lines) < 2 {
			t.Fatalf("no next step:\n%s", out)
		}
		return strings.TrimSpace(lines[1])
	}
	sysPath := "/usr/sbin:/usr/bin:/sbin:/bin"
	t.Run("on PATH", func(t *testing.T) {
		st := filepath.Join(t.TempDir(), "my station")
		path := filepath.Dir(self) + ":" + sysPath
		hint := next(t, run(t, path, exec.Command("provision", "--station", st, "init")))
		if !strings.HasPrefix(hint, "provision --station '"+st+"' enroll") {
			t.Fatalf("hint %q", hint)
		}
		run(t, path, exec.Command("sh", "-c", hint))
		if _, err := os.Stat(filepath.Join(st, "bundles", "SN-0001", "device.crt")); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("not on PATH", func(t *testing.T) {
		st := filepath.Join(t.TempDir(), "station")
		hint := next(t, run(t, sysPath, exec.Command(self, "--station", st, "init")))
		if !strings.HasPrefix(hint, self+" --station "+st+" enroll") {
			t.Fatalf("hint %q", hint)
		}
		run(t, sysPath, exec.Command("sh", "-c", hint))
	})
	t.Run("json", func(t *testing.T) {
		st := filepath.Join(t.TempDir(), "station")
		path := filepath.Dir(self) + ":" + sysPath
		var res struct {
			Next     string   `json:"next"`
			Warnings []string `json:"warnings"`
			ServerCA string   `json:"server_ca"`
		}
		if err := json.Unmarshal([]byte(run(t, path, exec.Command("provision", "--station", st, "init", "--json"))), &res); err != nil {
			t.Fatal(err)
		}
		if res.ServerCA != "ca/root.crt" || len(res.Warnings) != 1 || !strings.Contains(res.Warnings[0], "server_ca") {
			t.Fatalf("%+v", res)
		}
		run(t, path, exec.Command("sh", "-c", res.Next))
	})
}
