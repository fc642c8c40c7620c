package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"provision/internal/testutil"
)

// tuiTerm is the real binary's tui in a real terminal: a tmux session of 80x24, with NO_COLOR.
type tuiTerm struct {
	t       *testing.T
	sock    string
	station string
	bin     string
}

// startTUI runs `provision --station st tui ARGS` in a fresh tmux server; env entries (NAME=value, or -u NAME) go to
// env(1) first. When the program ends, the pane shows EXIT=<its exit code>.
func startTUI(t *testing.T, st string, env []string, args ...string) *tuiTerm {
	t.Helper()
	testutil.RequireTool(t, "tmux")
	bin, err := exec.LookPath("provision")
	if err != nil {
		t.Fatal(err)
	}
	tt := &tuiTerm{t: t, sock: filepath.Join(t.TempDir(), "tmux.sock"), station: st, bin: bin}
	t.Cleanup(func() { exec.Command("tmux", "-S", tt.sock, "kill-server").Run() })
	var quoted []string
	for _, a := range append([]string{bin, "--station", st, "tui"}, args...) {
		quoted = append(quoted, "'"+a+"'")
	}
	cmdline := "env " + strings.Join(append(env, "NO_COLOR=1"), " ") + " " + strings.Join(quoted, " ") + "; echo EXIT=$?; sleep 60"
	tt.tmux("new-session", "-d", "-s", "line", "-x", "80", "-y", "24", cmdline)
	return tt
}

func (tt *tuiTerm) tmux(args ...string) string {
	tt.t.Helper()
	out, err := exec.Command("tmux", append([]string{"-S", tt.sock}, args...)...).CombinedOutput()
	if err != nil {
		tt.t.Fatalf("tmux %v: %v\n%s", args, err, out)
	}
	return string(out)
}

func (tt *tuiTerm) screen() string { return tt.tmux("capture-pane", "-t", "line", "-p") }

// waitFor waits until the screen shows every one of want at once.
func (tt *tuiTerm) waitFor(want ...string) string {
	tt.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		s := tt.screen()
		ok := true
		for _, w := range want {
			ok = ok && strings.Contains(s, w)
		}
		if ok {
			return s
		}
		if strings.Contains(s, "EXIT=") {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	tt.t.Fatalf("screen never showed %q:\n%s", want, tt.screen())
	return ""
}

// waitBand waits for the result band of serial: mark ("✓ SHIPPABLE" or "✗ FAILED") and a block-letter row naming
// the serial (the serial typed into the field alone, with an earlier unit's band still shown, does not count).
func (tt *tuiTerm) waitBand(mark, serial string) string {
	tt.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		s := tt.screen()
		if strings.Contains(s, mark) {
			for _, l := range strings.Split(s, "\n") {
				if strings.Contains(l, "█") && strings.HasSuffix(strings.TrimSpace(l), " "+serial) {
					return s
				}
			}
		}
		if strings.Contains(s, "EXIT=") {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	tt.t.Fatalf("screen never showed %s for %s:\n%s", mark, serial, tt.screen())
	return ""
}

// waitGone waits until the screen no longer shows s.
func (tt *tuiTerm) waitGone(s string) {
	tt.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if !strings.Contains(tt.screen(), s) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	tt.t.Fatalf("screen still shows %q:\n%s", s, tt.screen())
}

// typeChars types s one character at a time, as a barcode scanner does.
func (tt *tuiTerm) typeChars(s string) {
	tt.t.Helper()
	for _, r := range s {
		tt.tmux("send-keys", "-t", "line", "-l", string(r))
	}
}

// scan types s character by character, then Enter.
func (tt *tuiTerm) scan(s string) {
	tt.t.Helper()
	tt.typeChars(s)
	tt.key("Enter")
}

func (tt *tuiTerm) key(k string) { tt.t.Helper(); tt.tmux("send-keys", "-t", "line", k) }

// signal sends sig to the provision process.
func (tt *tuiTerm) signal(sig syscall.Signal) {
	tt.t.Helper()
	out, _ := exec.Command("pgrep", "-f", "^"+tt.bin+" --station "+tt.station+" tui").Output()
	pids := strings.Fields(string(out))
	if len(pids) != 1 {
		tt.t.Fatalf("provision tui processes: %q", pids)
	}
	pid, _ := strconv.Atoi(pids[0])
	if err := syscall.Kill(pid, sig); err != nil {
		tt.t.Fatal(err)
	}
}

// exited waits for the program to end and checks its exit code.
func (tt *tuiTerm) exited(code int) {
	tt.t.Helper()
	tt.waitFor(fmt.Sprintf("EXIT=%d", code))
}

// colourSGR matches an escape sequence that sets a foreground or background colour (not the defaults, 39 and 49).
var colourSGR = regexp.MustCompile(`\x1b\[(?:[0-9;]*;)?(?:3[0-7]|4[0-7]|9[0-7]|10[0-7]|38;|48;)[0-9;]*m`)

// setStationYAML replaces the station.yaml line that starts with prefix (after indentation) by line.
func setStationYAML(t *testing.T, st, prefix, line string) {
	t.Helper()
	p := filepath.Join(st, "station.yaml")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`(?m)^[ \t]*` + regexp.QuoteMeta(prefix) + `.*$`)
	if !re.Match(b) {
		t.Fatalf("station.yaml has no line %q", prefix)
	}
	if err := os.WriteFile(p, re.ReplaceAll(b, []byte(line)), 0o644); err != nil {
		t.Fatal(err)
	}
}

// The real binary in a real terminal, typed as a barcode scanner types (one character at a time, then Enter): serials
// that start with q, r and ? are units like any other (nothing quits, re-runs or opens help); a unit passes and its
// image verifies; a missing image fails with the bell and the next unit passes; a rejected scan is cleared and the
// next good scan starts alone; an already shippable unit is not touched until ctrl+r twice; the counters count units;
// F1 shows help; ctrl+c quits with exit 0.
func TestTUIInTmux(t *testing.T) {
	testutil.RequireTool(t, "tmux", "sfdisk", "mke2fs", "mkfs.fat", "mcopy")
	dir := t.TempDir()
	st := filepath.Join(dir, "station")
	mustCLI(t, st, "init", "--id", "line-7")
	setStationYAML(t, st, "pattern:", `  pattern: '^[A-Za-z0-9?][A-Za-z0-9._?-]{2,63}$'`)
	for _, s := range []string{"q-0001", "r-0003", "?-0004", "TX-0001"} {
		mustCLI(t, st, "sample-image", filepath.Join(dir, s+".img"))
	}
	tt := startTUI(t, st, nil, "--tpm", "sim", "--operator", "carol", "--image", filepath.Join(dir, "{serial}.img"))
	s := tt.waitFor("scan or type a serial", "TPM sim (answers)")
	for _, want := range []string{"provision  station line-7  operator carol", "handshake built-in loopback server"} {
		if !strings.Contains(s, want) {
			t.Fatalf("header lacks %q:\n%s", want, s)
		}
	}

	tt.scan("q-0001") // q once quit the screen
	tt.waitBand("✓ SHIPPABLE", "q-0001")
	// NO_COLOR: no colour at all; the block letters and words carry PASS and FAIL.
	if raw := tt.tmux("capture-pane", "-t", "line", "-p", "-e"); colourSGR.MatchString(raw) {
		t.Fatalf("colours under NO_COLOR: %q", colourSGR.FindString(raw))
	}
	mustCLI(t, st, "verify", "--image", filepath.Join(dir, "q-0001.img"), "--serial", "q-0001")

	tt.scan("r-0002") // no image for it
	tt.waitBand("✗ FAILED", "r-0002")
	if flag := strings.TrimSpace(tt.tmux("display-message", "-p", "-t", "line", "#{window_bell_flag}")); flag != "1" {
		t.Errorf("no terminal bell on failure (window_bell_flag %q)", flag)
	}
	tt.scan("r-0003") // r after a failure once re-ran the failed unit
	tt.waitBand("✓ SHIPPABLE", "r-0003")
	tt.scan("?-0004") // ? once opened the help
	s = tt.waitBand("✓ SHIPPABLE", "?-0004")
	if strings.Contains(s, "Keys:") {
		t.Fatalf("help opened by a scan:\n%s", s)
	}
	if u := showUnit(t, st, "r-0002"); u.State != "failed" {
		t.Fatalf("r-0002 is %s", u.State)
	}

	// A rejected scan is shown with its value and cleared; the next good scan starts alone.
	tt.scan("../evilTUI-0001")
	s = tt.waitFor("rejected", `"../evilTUI-0001"`)
	if strings.Contains(s, "✓ SHIPPABLE") {
		t.Fatalf("the previous unit's band stayed after a new scan:\n%s", s)
	}
	tt.scan("TX-0001")
	tt.waitBand("✓ SHIPPABLE", "TX-0001")

	// Already shippable: not touched; ctrl+r asks, ctrl+r again re-provisions; the unit is counted once.
	tt.scan("q-0001")
	tt.waitFor("already provisioned", "ALREADY SHIPPABLE  q-0001")
	tt.key("C-r")
	tt.waitFor("ctrl+r again")
	tt.key("C-r")
	s = tt.waitBand("✓ SHIPPABLE", "q-0001")
	if !strings.Contains(s, "today: 4 shippable, 1 failed") {
		t.Fatalf("counters are not units:\n%s", s)
	}

	tt.key("F1")
	tt.waitFor("Keys:", "ctrl+r")
	tt.key("Escape")
	tt.waitGone("Keys:")

	tt.key("C-c")
	tt.exited(0)
}

// The handshake the TUI runs is the one `provision unit` runs, configured here ONLY in station.yaml (endpoints:,
// endpoint_ca:): a mosquitto broker whose cafile does not hold the station CA rejects the unit: FAIL on screen with the
// cause, and the header names the target.
func TestTUIBrokerRejectsInTmux(t *testing.T) {
	dir, st, _ := sampleStation(t, "line-8", "MQ-0001.img", "tmux", "mosquitto")
	srvCA, srvCert, srvKey := testutil.ServerIdentity(t, dir)
	m := testutil.StartMosquitto(t, srvCert, srvKey, srvCA) // trusts only the server CA, not the station's
	if err := os.WriteFile(filepath.Join(st, "fleet-ca.pem"), []byte(mustReadFile(t, srvCA)), 0o644); err != nil {
		t.Fatal(err)
	}
	ep := fmt.Sprintf("mqtts://127.0.0.1:%d", m.Port)
	setStationYAML(t, st, "# endpoints:", `endpoints: ["`+ep+`"]`)
	setStationYAML(t, st, "# endpoint_ca:", `endpoint_ca: "fleet-ca.pem"`)

	tt := startTUI(t, st, nil, "--tpm", "sim", "--operator", "dave", "--image", filepath.Join(dir, "{serial}.img"))
	tt.waitFor("handshake "+ep+" (server CA fleet-ca.pem)", "scan or type a serial")
	tt.scan("MQ-0001")
	tt.waitBand("✗ FAILED", "MQ-0001")
	s := tt.waitFor("rejected our certificate")
	if !strings.Contains(s, "at handshake with "+ep) {
		t.Fatalf("the cause does not name the handshake:\n%s", s)
	}
	if u := showUnit(t, st, "MQ-0001"); u.State != "failed" || u.FailedStep != "handshake" {
		t.Fatalf("inventory: %+v", u)
	}
	tt.key("C-c")
	tt.exited(0)
}

// A TPM that accepts and never answers freezes nothing: the header says so within seconds, keys are taken meanwhile,
// Esc cancels a unit waiting for the TPM ("cancelled", not FAILED at key), and SIGTERM stops one and exits 130.
func TestTUISilentTPMInTmux(t *testing.T) {
	dir, st, _ := sampleStation(t, "line-9", "SL-0001.img", "tmux")
	uri := testutil.StartSilentTPM(t)
	tt := startTUI(t, st, nil, "--tpm", uri, "--operator", "erin", "--image", filepath.Join(dir, "{serial}.img"))
	tt.waitFor("TPM not answering", uri)
	tt.typeChars("AB-1")
	tt.waitFor("serial › AB-1")
	tt.key("Escape")
	tt.waitGone("serial › AB-1")

	tt.scan("SL-0001")
	tt.waitFor("unit SL-0001", "opening the TPM")
	tt.key("Escape")
	s := tt.waitFor("CANCELLED  SL-0001", "cancelled")
	if strings.Contains(s, "FAIL") {
		t.Fatalf("a cancelled unit shown as failed:\n%s", s)
	}

	tt.scan("SL-0002")
	tt.waitFor("unit SL-0002", "opening the TPM")
	tt.signal(syscall.SIGTERM)
	tt.exited(130)
}

// SIGTERM while a unit runs: the unit stops between steps (here during its handshake with a server that never
// answers), is recorded as interrupted with the state of its last completed step, and the command exits 130.
func TestTUISignalInTmux(t *testing.T) {
	dir, st, _ := sampleStation(t, "line-10", "SG-0001.img", "tmux")
	addr, _ := testutil.SilentListener(t)
	silent := "tls://" + addr
	tt := startTUI(t, st, nil, "--tpm", "sim", "--operator", "fay", "--image", filepath.Join(dir, "{serial}.img"),
		"--endpoint", silent)
	tt.waitFor("handshake " + silent)
	tt.scan("SG-0001")
	tt.waitFor("checks passed")
	tt.signal(syscall.SIGTERM)
	tt.exited(130)
	var shown struct {
		State  string `json:"state"`
		Events []struct {
			Step    string `json:"step"`
			Outcome string `json:"outcome"`
		} `json:"events"`
	}
	if err := json.Unmarshal([]byte(mustCLI(t, st, "inventory", "show", "SG-0001", "--json")), &shown); err != nil {
		t.Fatal(err)
	}
	last := shown.Events[len(shown.Events)-1]
	if shown.State != "verified" || last.Step != "handshake" || last.Outcome != "interrupted" {
		t.Fatalf("state %s, last event %+v: want verified, interrupted at handshake", shown.State, last)
	}
}

// An encrypted CA key without PROVISION_CA_PASSPHRASE: the screen asks for the passphrase (not shown as typed), a
// wrong one is asked again, the right one unlocks the CA and units are signed.
func TestTUIAsksCAPassphraseInTmux(t *testing.T) {
	testutil.RequireTool(t, "tmux", "sfdisk", "mke2fs", "mkfs.fat", "mcopy")
	dir := t.TempDir()
	st := filepath.Join(dir, "station")
	const pass = "line-secret-42"
	init := exec.Command("provision", "--station", st, "init", "--id", "line-11")
	init.Env = append(os.Environ(), "PROVISION_CA_PASSPHRASE="+pass)
	if out, err := init.CombinedOutput(); err != nil {
		t.Fatalf("init: %v\n%s", err, out)
	}
	mustCLI(t, st, "sample-image", filepath.Join(dir, "PP-0001.img"))
	tt := startTUI(t, st, []string{"-u", "PROVISION_CA_PASSPHRASE"}, "--tpm", "sim", "--operator", "gus",
		"--image", filepath.Join(dir, "{serial}.img"))
	tt.waitFor("passphrase", "CA locked")
	tt.scan("wrong-one")
	tt.waitFor("wrong CA key passphrase")
	tt.typeChars(pass)
	if s := tt.screen(); strings.Contains(s, pass) {
		t.Fatalf("the passphrase is shown:\n%s", s)
	}
	tt.key("Enter")
	s := tt.waitFor("scan or type a serial", "CA until")
	if strings.Contains(s, pass) {
		t.Fatalf("the passphrase is shown:\n%s", s)
	}
	tt.scan("PP-0001")
	tt.waitBand("✓ SHIPPABLE", "PP-0001")
	tt.key("C-c")
	tt.exited(0)
}
