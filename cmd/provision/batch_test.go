package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"provision/internal/testutil"
)

func fileSum(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

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
			goldenSum, goldenAlloc := fileSum(t, golden), allocated(t, golden)
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
			if fileSum(t, golden) != goldenSum {
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
	testutil.RequireTool(t, "sfdisk", "mke2fs", "mkfs.fat", "mcopy")
	dir := t.TempDir()
	st := filepath.Join(dir, "station")
	mustCLI(t, st, "init", "--id", "batch")
	golden := filepath.Join(dir, "golden.img")
	mustCLI(t, st, "sample-image", golden)
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
