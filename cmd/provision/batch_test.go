package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"provision/internal/testutil"
)

func allocated(t *testing.T, p string) int64 {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Blocks * 512
}

func readReport(t *testing.T, dir string) batchReport {
	t.Helper()
	var rep batchReport
	b, err := os.ReadFile(filepath.Join(dir, "report.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	return rep
}

func TestBatch(t *testing.T) {
	testutil.RequireTool(t, "e2fsck", "sfdisk", "mke2fs", "mkfs.fat", "mcopy")
	for _, table := range []string{"mbr", "gpt"} {
		t.Run(table, func(t *testing.T) {
			dir := t.TempDir()
			st := filepath.Join(dir, "station")
			mustCLI(t, st, "init", "--id", "batch")
			golden := filepath.Join(dir, "golden.img")
			mustCLI(t, st, "sample-image", golden, "--table", table)
			goldenSum, goldenAlloc := testutil.FileSum(t, golden), allocated(t, golden)
			var lines []string
			lines = append(lines, "serial,hostname")
			for i := 1; i <= 24; i++ {
				lines = append(lines, fmt.Sprintf("B%s-%04d,gw-%d", strings.ToUpper(table), i, i))
			}
			serials := filepath.Join(dir, "serials.csv")
			os.WriteFile(serials, []byte(strings.Join(lines, "\n")+"\n"), 0o644)
			out := filepath.Join(dir, "out")

			// Interrupt after a few units, then run again: the finished ones are skipped, the rest done.
			cmd := exec.Command("provision", "--station", st, "batch", "--serials", serials, "--image", golden, "--out", out,
				"--workers", "2", "--json")
			stdout, _ := cmd.StdoutPipe()
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			sc := bufio.NewScanner(stdout)
			firstRun := map[string]bool{}
			for sc.Scan() {
				var u batchUnitJSON
				if json.Unmarshal(sc.Bytes(), &u) == nil && u.Status == "ok" {
					firstRun[u.Serial] = true
				}
				if len(firstRun) == 5 {
					cmd.Process.Signal(os.Interrupt)
					break
				}
			}
			for sc.Scan() {
				var u batchUnitJSON
				if json.Unmarshal(sc.Bytes(), &u) == nil && u.Status == "ok" {
					firstRun[u.Serial] = true
				}
			}
			err := cmd.Wait()
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 130 {
				t.Fatalf("interrupted batch: %v, want exit 130", err)
			}
			if len(firstRun) >= 24 {
				t.Fatal("the interrupt came too late to test anything")
			}
			// The report says what happened: finished units ok, the running ones interrupted, the rest not started
			// (with no state: the inventory never saw them).
			notStarted := 0
			for _, u := range readReportView(t, out).Units {
				switch {
				case u.Status == "ok" && firstRun[u.Serial] && u.State == "shippable":
				case u.Status == "interrupted" && !firstRun[u.Serial] && u.State != "shippable":
				case u.Status == "not_started" && !firstRun[u.Serial] && u.State == "" && u.Certificate == nil:
					notStarted++
				default:
					t.Errorf("after the interrupt: %+v", u)
				}
			}
			if notStarted == 0 {
				t.Error("no unit reported not_started")
			}
			entries, _ := os.ReadDir(out)
			for _, e := range entries {
				if strings.HasSuffix(e.Name(), ".partial") {
					t.Errorf("partial image left after interrupt: %s", e.Name())
				}
			}
			mustCLI(t, st, "batch", "--serials", serials, "--image", golden, "--out", out, "--workers", "2", "--hash")
			rep := readReport(t, out)
			if rep.Summary.OK+rep.Summary.Skipped != 24 || rep.Summary.Failed != 0 || rep.Summary.Skipped != len(firstRun) {
				t.Fatalf("second run: %+v (first run finished %d)", rep.Summary, len(firstRun))
			}
			for _, u := range rep.Units {
				if firstRun[u.Serial] != (u.Status == "skipped") {
					t.Errorf("%s: status %s in the second run", u.Serial, u.Status)
				}
				if u.Status == "ok" && len(u.SHA256) != 64 {
					t.Errorf("%s: no image hash", u.Serial)
				}
			}
			if testutil.FileSum(t, golden) != goldenSum {
				t.Fatal("the golden image changed")
			}
			// Every output: shippable with one active certificate (the finished ones never redone), verified, fsck-clean,
			// still sparse.
			for i := 1; i <= 24; i++ {
				serial := fmt.Sprintf("B%s-%04d", strings.ToUpper(table), i)
				img := filepath.Join(out, serial+".img")
				checkConsistent(t, st, serial, img)
				s := showUnit(t, st, serial)
				if firstRun[serial] && len(s.Certificates) != 1 {
					t.Errorf("%s finished in the first run but has %d certificates", serial, len(s.Certificates))
				}
				if a := allocated(t, img); a > goldenAlloc+8<<20 {
					t.Errorf("%s: %d bytes allocated, golden %d: not sparse", serial, a, goldenAlloc)
				}
			}
			if csv, _ := os.ReadFile(filepath.Join(out, "report.csv")); !strings.HasPrefix(string(csv), "serial,status,state,image") {
				t.Fatalf("report.csv: %.100s", csv)
			}
		})
	}
}

func TestBatchTargetsAndBadInput(t *testing.T) {
	dir, st, golden := sampleStation(t, "batch", "golden.img")
	// Existing per-unit images personalised in place.
	var rows []string
	for i := 1; i <= 3; i++ {
		img := filepath.Join(dir, fmt.Sprintf("u%d.img", i))
		mustCLI(t, st, "sample-image", img)
		rows = append(rows, fmt.Sprintf("TG-%04d,%s", i, img))
	}
	targets := filepath.Join(dir, "targets.csv")
	os.WriteFile(targets, []byte("serial,image\n"+strings.Join(rows, "\n")+"\n"), 0o644)
	reports := filepath.Join(dir, "reports")
	mustCLI(t, st, "batch", "--targets", targets, "--workers", "2", "--out", reports)
	mustCLI(t, st, "verify", "--image", filepath.Join(dir, "u2.img"), "--serial", "TG-0002")
	// Bad serial files: every bad line listed, exit 2, nothing written.
	bad := filepath.Join(dir, "bad.txt")
	os.WriteFile(bad, []byte("OK-0001\nx\nOK-0001\n../etc\n"), 0o644)
	_, errs, code := cli(t, st, "batch", "--serials", bad, "--image", golden, "--out", filepath.Join(dir, "nothing"))
	if code != 2 || !strings.Contains(errs, "line 2") || !strings.Contains(errs, "line 3") || !strings.Contains(errs, "line 4") {
		t.Fatalf("exit %d: %s", code, errs)
	}
	if _, err := os.Stat(filepath.Join(dir, "nothing")); err == nil {
		t.Fatal("output directory created for a bad serial file")
	}
	badTargets := filepath.Join(dir, "bad-targets.csv")
	os.WriteFile(badTargets, []byte("TG-0009,"+filepath.Join(dir, "missing.img")+"\n"), 0o644)
	if _, _, code := cli(t, st, "batch", "--targets", badTargets, "--out", reports); code != 2 {
		t.Fatalf("missing target image: exit %d", code)
	}
	// A unit whose image is unusable fails; the others still pass; exit 1.
	os.WriteFile(filepath.Join(dir, "junk.img"), []byte("not an image"), 0o644)
	os.WriteFile(targets, []byte(fmt.Sprintf("TG-0010,%s\nTG-0011,%s\n", filepath.Join(dir, "junk.img"), filepath.Join(dir, "u3.img"))), 0o644)
	out, errs, code := cli(t, st, "batch", "--targets", targets, "--out", reports)
	if code != 1 || !strings.Contains(out, "1 ok, 1 failed") || !strings.Contains(out, "not a disk image") {
		t.Fatalf("exit %d:\n%s%s", code, out, errs)
	}
}

func waitAccepted(t *testing.T, accepted <-chan struct{}, cmd *exec.Cmd, stderr *testutil.LockedBuffer) {
	t.Helper()
	select {
	case <-accepted:
	case <-time.After(3 * time.Minute):
		cmd.Process.Kill()
		t.Fatalf("the batch never reached the handshake step: %s", stderr.String())
	}
}

func exitCodeOf(t *testing.T, err error) int {
	t.Helper()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0
}

type shownEvents struct {
	State  string `json:"state"`
	Events []struct {
		Step    string `json:"step"`
		Outcome string `json:"outcome"`
		Detail  string `json:"detail"`
	} `json:"events"`
}

// reportView is report.json as a user's script reads it (independent of the command's own types).
type reportView struct {
	Units   []reportRow `json:"units"`
	Summary struct {
		OK          int `json:"ok"`
		Failed      int `json:"failed"`
		Skipped     int `json:"skipped"`
		NotStarted  int `json:"not_started"`
		Interrupted int `json:"interrupted"`
	} `json:"summary"`
}

type reportRow struct {
	Serial      string     `json:"serial"`
	State       string     `json:"state"`
	Status      string     `json:"status"`
	Image       string     `json:"image"`
	SHA256      string     `json:"sha256"`
	Certificate *certJSON  `json:"certificate"`
	Steps       []stepJSON `json:"steps"`
	Error       string     `json:"error"`
	Detail      string     `json:"detail"`
}

func readReportView(t *testing.T, dir string) reportView {
	t.Helper()
	var rep reportView
	if err := json.Unmarshal([]byte(mustReadFile(t, filepath.Join(dir, "report.json"))), &rep); err != nil {
		t.Fatal(err)
	}
	return rep
}

func writeSerials(t *testing.T, path, header string, serials ...string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(header+strings.Join(serials, "\r\n")+"\r\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// A batch interrupted in the middle of a unit (SIGINT to the real binary while the unit waits in its handshake): the
// running unit is recorded as interrupted, the rest as not started, earlier units keep their rows, exit 130. While it
// runs, a second batch on the same --out is refused (exit 4, naming the holder); a holder killed with SIGKILL releases
// the lock. The run after that finishes everything and keeps every earlier row's certificate, image and hash.
func TestBatchInterruptAndRerun(t *testing.T) {
	dir, st, golden := sampleStation(t, "batch", "golden.img")
	var all []string
	for i := 1; i <= 7; i++ {
		all = append(all, fmt.Sprintf("IR-%04d", i))
	}
	first, list := filepath.Join(dir, "first.txt"), filepath.Join(dir, "all.csv")
	writeSerials(t, first, "", all[:2]...)
	writeSerials(t, list, "Serial\r\n", all...) // a one-column list with a header line (CRLF)
	out := filepath.Join(dir, "out")

	mustCLI(t, st, "batch", "--serials", first, "--image", golden, "--out", out, "--hash")
	before := map[string]reportRow{}
	for _, u := range readReportView(t, out).Units {
		if u.Status != "ok" || u.Certificate == nil || len(u.SHA256) != 64 {
			t.Fatalf("first run: %+v", u)
		}
		before[u.Serial] = u
	}

	ep, accepted := testutil.SilentListener(t)
	hang := []string{"--station", st, "batch", "--serials", list, "--image", golden, "--out", out, "--workers", "1",
		"--endpoint", "tls://" + ep, "--endpoint-ca", filepath.Join(st, "ca", "root.crt")}
	cmd := exec.Command("provision", hang...)
	var stderr testutil.LockedBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitAccepted(t, accepted, cmd, &stderr)

	// A second batch on the same --out while the first runs: refused, naming the other process; nothing touched.
	_, errs, code := cli(t, st, "batch", "--serials", list, "--image", golden, "--out", out)
	if code != 4 || !strings.Contains(errs, fmt.Sprintf("pid %d", cmd.Process.Pid)) || strings.Count(strings.TrimSpace(errs), "\n") != 0 {
		t.Fatalf("second batch on the same --out: exit %d: %q", code, errs)
	}

	cmd.Process.Signal(os.Interrupt)
	if code := exitCodeOf(t, cmd.Wait()); code != 130 {
		t.Fatalf("interrupted batch: exit %d, want 130: %s", code, stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
	if last := lines[len(lines)-1]; strings.Contains(stderr.String(), "audit head") ||
		!strings.HasPrefix(last, "provision: batch: interrupted: 1 interrupted, 4 not started") {
		t.Errorf("interrupted batch stderr: %q", stderr.String())
	}
	rep := readReportView(t, out)
	got := map[string]reportRow{}
	for _, u := range rep.Units {
		got[u.Serial] = u
		if u.State == "shippable" && u.Status != "ok" && u.Status != "skipped" {
			t.Errorf("%s: status %s with state shippable", u.Serial, u.Status)
		}
	}
	if len(rep.Units) != len(all) {
		t.Fatalf("%d rows, want %d", len(rep.Units), len(all))
	}
	for _, s := range all[:2] {
		u, b := got[s], before[s]
		if u.Status != "skipped" || u.State != "shippable" || u.Certificate == nil || *u.Certificate != *b.Certificate ||
			u.Image != b.Image || u.SHA256 != b.SHA256 {
			t.Errorf("%s: earlier row not kept:\n got %+v\nwant %+v", s, u, b)
		}
	}
	u := got[all[2]]
	if u.Status != "interrupted" || u.State != "verified" || strings.Contains(u.Error, "audit head") {
		t.Errorf("running unit: %+v", u)
	}
	cancelled := false
	for _, s := range u.Steps {
		cancelled = cancelled || (s.Name == "handshake" && s.Status == "cancelled")
	}
	if !cancelled {
		t.Errorf("running unit: no cancelled handshake step: %+v", u.Steps)
	}
	var ev shownEvents
	if err := json.Unmarshal([]byte(mustCLI(t, st, "inventory", "show", all[2], "--json")), &ev); err != nil {
		t.Fatal(err)
	}
	last := ev.Events[len(ev.Events)-1]
	if ev.State != "verified" || last.Outcome != "interrupted" || last.Step != "handshake" {
		t.Errorf("inventory after the interrupt: state %s, last event %+v", ev.State, last)
	}
	for _, s := range all[3:] {
		if u := got[s]; u.Status != "not_started" || u.State != "" || u.Certificate != nil || u.Image != "" {
			t.Errorf("%s: %+v, want not_started with no state", s, u)
		}
	}
	if rep.Summary.Skipped != 2 || rep.Summary.Interrupted != 1 || rep.Summary.NotStarted != 4 || rep.Summary.OK != 0 {
		t.Errorf("summary %+v", rep.Summary)
	}
	csv := mustReadFile(t, filepath.Join(out, "report.csv"))
	if !strings.Contains(csv, all[2]+",interrupted,verified,") || !strings.Contains(csv, all[6]+",not_started,,") {
		t.Errorf("report.csv:\n%s", csv)
	}
	if entries, _ := filepath.Glob(filepath.Join(out, "*.partial")); len(entries) != 0 {
		t.Errorf("partial images left: %v", entries)
	}

	// A holder killed outright: the kernel releases its lock, the next batch runs.
	cmd = exec.Command("provision", hang...)
	var stderr2 testutil.LockedBuffer
	cmd.Stderr = &stderr2
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitAccepted(t, accepted, cmd, &stderr2)
	cmd.Process.Kill()
	cmd.Wait()

	mustCLI(t, st, "batch", "--serials", list, "--image", golden, "--out", out, "--hash")
	rep = readReportView(t, out)
	if rep.Summary.OK != 5 || rep.Summary.Skipped != 2 || len(rep.Units) != len(all) {
		t.Fatalf("rerun: %+v", rep.Summary)
	}
	for _, u := range rep.Units {
		if u.State != "shippable" || u.Certificate == nil || len(u.SHA256) != 64 || u.Image != filepath.Join(out, u.Serial+".img") {
			t.Errorf("rerun row %+v", u)
		}
		if b, ok := before[u.Serial]; ok && (u.SHA256 != b.SHA256 || *u.Certificate != *b.Certificate) {
			t.Errorf("%s: earlier hash or certificate lost: %+v", u.Serial, u)
		}
	}
	for _, s := range all {
		checkConsistent(t, st, s, filepath.Join(out, s+".img"))
	}
}

// A unit already shippable (here: provisioned by an earlier batch into another directory) is not re-provisioned by a
// batch: it is reported as skipped, its certificate untouched. --reprovision does it again.
func TestBatchShippableNotReprovisioned(t *testing.T) {
	dir, st, golden := sampleStation(t, "batch", "golden.img")
	list := filepath.Join(dir, "serials.txt")
	writeSerials(t, list, "", "SH-0001", "SH-0002")
	mustCLI(t, st, "batch", "--serials", list, "--image", golden, "--out", filepath.Join(dir, "a"))

	other := filepath.Join(dir, "b")
	out := mustCLI(t, st, "batch", "--serials", list, "--image", golden, "--out", other)
	if !strings.Contains(out, "0 ok, 0 failed, 2 skipped") {
		t.Errorf("stdout: %s", out)
	}
	for _, u := range readReportView(t, other).Units {
		if u.Status != "skipped" || u.State != "shippable" || u.Certificate == nil || u.Image != "" ||
			!strings.Contains(u.Detail, "already shippable") {
			t.Errorf("%+v", u)
		}
		if n := len(showUnit(t, st, u.Serial).Certificates); n != 1 {
			t.Errorf("%s re-provisioned: %d certificates", u.Serial, n)
		}
		if _, err := os.Stat(filepath.Join(other, u.Serial+".img")); err == nil {
			t.Errorf("%s: an image was made for a shippable unit", u.Serial)
		}
	}

	mustCLI(t, st, "batch", "--serials", list, "--image", golden, "--out", other, "--reprovision")
	for _, u := range readReportView(t, other).Units {
		if u.Status != "ok" || u.State != "shippable" {
			t.Errorf("--reprovision: %+v", u)
		}
		checkConsistent(t, st, u.Serial, filepath.Join(other, u.Serial+".img"))
		if n := len(showUnit(t, st, u.Serial).Certificates); n != 2 {
			t.Errorf("%s: %d certificates after --reprovision, want 2", u.Serial, n)
		}
	}
}

// Images holding software keys are 0600 in a 0700 directory, whatever the golden image's mode and the umask.
func TestBatchImageModes(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	dir, st, golden := sampleStation(t, "batch", "golden.img")
	os.Chmod(golden, 0o644)
	list := filepath.Join(dir, "serials.txt")
	writeSerials(t, list, "", "MD-0001")
	mode := func(p string) os.FileMode {
		t.Helper()
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Mode().Perm()
	}
	fresh := filepath.Join(dir, "new", "out")
	mustCLI(t, st, "batch", "--serials", list, "--image", golden, "--out", fresh)
	existing := filepath.Join(dir, "existing")
	os.Mkdir(existing, 0o755)
	writeSerials(t, list, "", "MD-0001", "MD-0002")
	mustCLI(t, st, "batch", "--serials", list, "--image", golden, "--out", existing, "--reprovision")
	for _, out := range []string{fresh, existing} {
		if m := mode(out); m != 0o700 {
			t.Errorf("%s: mode %o, want 700", out, m)
		}
		imgs, _ := filepath.Glob(filepath.Join(out, "*.img"))
		if len(imgs) == 0 {
			t.Fatalf("no images in %s", out)
		}
		for _, img := range imgs {
			if m := mode(img); m != 0o600 {
				t.Errorf("%s: mode %o, want 600", img, m)
			}
		}
	}
	if m := mode(golden); m != 0o644 {
		t.Errorf("golden image mode changed to %o", m)
	}
}

// --fail-fast takes no new unit after a failure: the rest are not_started (no state), exit 1 (not 130: nobody
// interrupted the batch).
func TestBatchFailFast(t *testing.T) {
	dir, st, good := sampleStation(t, "batch", "good.img")
	junk := filepath.Join(dir, "junk.img")
	os.WriteFile(junk, []byte("not an image"), 0o644)
	targets := filepath.Join(dir, "targets.csv")
	os.WriteFile(targets, []byte(fmt.Sprintf("serial,image\nFF-0001,%s\nFF-0002,%s\n", junk, good)), 0o644)
	reports := filepath.Join(dir, "reports")
	_, errs, code := cli(t, st, "batch", "--targets", targets, "--out", reports, "--workers", "1", "--fail-fast")
	if code != 1 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	rep := readReportView(t, reports)
	if len(rep.Units) != 2 || rep.Units[0].Status != "failed" || rep.Units[1].Status != "not_started" || rep.Units[1].State != "" {
		t.Fatalf("%+v", rep.Units)
	}
	if m := mustStat(t, junk).Mode().Perm(); m != 0o600 {
		t.Errorf("target image mode %o, want 600", m)
	}
}

func mustStat(t *testing.T, p string) os.FileInfo {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi
}
