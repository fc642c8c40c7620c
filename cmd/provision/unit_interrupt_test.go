package main

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"provision/internal/testutil"
)

// SIGINT during a unit stops it between steps: exit 130, "INTERRUPTED" with the state kept, an interrupted event, and
// the next run resumes and ships it (before: exit 4 and "context canceled").
func TestUnitInterrupted(t *testing.T) {
	_, st, img := sampleStation(t, "int", "unit.img")
	// A broker that accepts and never answers keeps the unit in its handshake step until the signal.
	addr, _ := testutil.SilentListener(t)
	cmd := exec.Command("provision", "--station", st, "unit", "--serial", "INT-0001", "--image", img, "--tpm", "soft",
		"--endpoint", "tls://"+addr)
	cmd.Env = append(os.Environ(), "PROVISION_OPERATOR=tester")
	stdout, _ := cmd.StdoutPipe()
	var errb strings.Builder
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stdout)
	var out strings.Builder
	for sc.Scan() {
		out.WriteString(sc.Text() + "\n")
		if strings.Contains(sc.Text(), "✓ verify") {
			time.Sleep(200 * time.Millisecond) // inside the handshake's connect
			cmd.Process.Signal(syscall.SIGINT)
		}
	}
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 130 {
		t.Fatalf("exit %v, want 130\n%s%s", err, out.String(), errb.String())
	}
	if !strings.Contains(out.String(), "INTERRUPTED  INT-0001") || !strings.Contains(out.String(), "cancelled") {
		t.Fatalf("output:\n%s", out.String())
	}
	if s := showUnit(t, st, "INT-0001"); s.State != "verified" {
		t.Fatalf("state %q, want verified (the last completed step)", s.State)
	}
	if !strings.Contains(mustCLI(t, st, "inventory", "show", "INT-0001", "--json"), `"outcome":"interrupted"`) {
		t.Fatal("no interrupted event")
	}
	// The rerun (built-in server) resumes from the image and ships it.
	out2 := mustCLI(t, st, "unit", "--serial", "INT-0001", "--image", img, "--tpm", "soft")
	if !strings.Contains(out2, "SHIPPABLE") || !strings.Contains(out2, "resuming") {
		t.Fatalf("rerun:\n%s", out2)
	}
	checkConsistent(t, st, "INT-0001", img)
}
