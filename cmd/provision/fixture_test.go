package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"provision/internal/testutil"
	"provision/station"
)

// The operator's screen with a fixture whose command never answers (a provisioning environment that hangs): Esc
// cancels the unit within a second, the unit counts as cancelled, not failed, and the command's process is gone.
func TestTUIFixtureSilentCancel(t *testing.T) {
	dir := t.TempDir()
	stDir := filepath.Join(dir, "station")
	mustCLI(t, stDir, "init", "--id", "fixture-1")
	st, err := station.Open(context.Background(), stDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.LoadCA(nil); err != nil {
		t.Fatal(err)
	}
	pidFile := filepath.Join(dir, "pid")
	b := &tuiBackend{st: st, fixture: "port-1",
		tpmURI: "cmd:sh -c 'echo $$ > " + pidFile + "; exec sleep 600' {fixture}"}
	if err := b.ProbeTPM(context.Background()); err == nil {
		// The probe reaches nothing either: it must not hang past its own deadline.
		t.Fatal("probe of a silent fixture answered")
	}
	os.Remove(pidFile)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	var last station.Event
	go func() {
		_, err := b.Provision(ctx, station.ProvisionRequest{Serial: "SN-FIXTURE-1", Image: filepath.Join(dir, "x.img"), Fixture: "port-1"},
			func(e station.Event) { last = e })
		done <- err
	}()
	var pid int
	for i := 0; i < 500 && pid == 0; i++ { // the command has started
		time.Sleep(10 * time.Millisecond)
		if b, err := os.ReadFile(pidFile); err == nil {
			pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		}
	}
	if pid == 0 {
		t.Fatal("the fixture command never started")
	}
	cancel() // Esc
	select {
	case err = <-done:
	case <-time.After(time.Second):
		t.Fatal("the unit did not stop within a second of Esc")
	}
	if !errors.Is(err, station.ErrInterrupted) || last.Status != station.StatusCancelled {
		t.Fatalf("got %v (last event %+v), want a cancelled unit", err, last)
	}
	for i := 0; i < 200 && syscall.Kill(pid, 0) == nil; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Fatalf("the fixture command (pid %d) outlived its unit: %v", pid, err)
	}
}

// A batch whose TPM command names {serial}: each unit's TPM is opened with its own serial filled in (here each serial
// is the port of its own swtpm, as a fixture per unit would be its address), each unit attested on its own TPM.
func TestBatchFixturePerUnit(t *testing.T) {
	testutil.RequireTool(t, "tpm2_send", "swtpm", "swtpm_setup", "swtpm_localca")
	dir, st, golden := sampleStation(t, "fixture-batch", "golden.img")
	var serials []string
	for range 2 {
		sw := testutil.StartSwtpm(t, testutil.WithEKCert())
		serials = append(serials, strconv.Itoa(sw.Port))
	}
	list := filepath.Join(dir, "serials.txt")
	if err := os.WriteFile(list, []byte(strings.Join(serials, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, errs, code := inProcess(t, st, "batch", "--serials", list, "--image", golden, "--out", filepath.Join(dir, "out"),
		"--tpm", "cmd:tpm2_send --tcti=swtpm:host=127.0.0.1,port={serial}")
	if code != 0 {
		t.Fatalf("batch: exit %d\n%s%s", code, out, errs)
	}
	for _, s := range serials {
		if u := showUnit(t, st, s); u.State != "shippable" {
			t.Fatalf("unit %s: %+v", s, u)
		}
	}
}
