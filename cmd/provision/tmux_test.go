package main

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"provision/simulator"
)

// The real binary in a real terminal (tmux, 80x24): a scanned serial becomes SHIPPABLE and its image verifies; an
// invalid serial is rejected on screen; a duplicate shows "already"; a missing image fails and the next unit passes;
// q quits.
func TestTUIInTmux(t *testing.T) {
	simulator.RequireTool(t, "tmux", "sfdisk", "mke2fs", "mkfs.fat", "mcopy")
	dir := t.TempDir()
	st := filepath.Join(dir, "station")
	mustCLI(t, st, "init", "--id", "line-7")
	for _, s := range []string{"TX-0001", "TX-0003"} {
		mustCLI(t, st, "sample-image", filepath.Join(dir, s+".img"))
	}
	bin, err := exec.LookPath("provision")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "tmux.sock")
	tmux := func(args ...string) string {
		out, err := exec.Command("tmux", append([]string{"-S", sock}, args...)...).CombinedOutput()
		if err != nil && args[0] != "kill-server" {
			t.Fatalf("tmux %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	t.Cleanup(func() { tmux("kill-server") })
	cmdline := bin + " --station " + st + " tui --tpm sim --operator carol --image '" + filepath.Join(dir, "{serial}.img") + "'; sleep 30"
	tmux("new-session", "-d", "-s", "line", "-x", "80", "-y", "24", "env NO_COLOR=1 "+cmdline)
	screen := func() string { return tmux("capture-pane", "-t", "line", "-p") }
	waitFor := func(want string) string {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			if s := screen(); strings.Contains(s, want) {
				return s
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("screen never showed %q:\n%s", want, screen())
		return ""
	}
	scan := func(serial string) {
		tmux("send-keys", "-t", "line", serial)
		tmux("send-keys", "-t", "line", "Enter")
	}
	waitFor("scan or type a serial")
	scan("TX-0001")
	s := waitFor("SHIPPABLE  TX-0001")
	if !strings.Contains(s, "provision  station line-7  operator carol") {
		t.Fatalf("header missing:\n%s", s)
	}
	mustCLI(t, st, "verify", "--image", filepath.Join(dir, "TX-0001.img"), "--serial", "TX-0001")

	tmux("send-keys", "-t", "line", "bad/serial")
	waitFor("contains '/'")
	tmux("send-keys", "-t", "line", "Escape")

	scan("TX-0001")
	waitFor("already provisioned")

	scan("TX-0002") // no image for it
	waitFor("FAILED  TX-0002")
	if flag := strings.TrimSpace(tmux("display-message", "-p", "-t", "line", "#{window_bell_flag}")); flag != "1" {
		t.Errorf("no terminal bell on failure (window_bell_flag %q)", flag)
	}
	scan("TX-0003")
	waitFor("SHIPPABLE  TX-0003")
	if s := showUnit(t, st, "TX-0002"); s.State != "failed" {
		t.Fatalf("TX-0002 recorded as %s", s.State)
	}

	tmux("send-keys", "-t", "line", "q")
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if out, _ := exec.Command("pgrep", "-f", "^"+bin+" --station "+st+" tui").Output(); len(out) == 0 {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("q did not quit the TUI")
}
