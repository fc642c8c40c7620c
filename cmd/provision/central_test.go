package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"provision/central"
	"provision/internal/testutil"
)

// centralCLIStation initialises a station with id forwarding to dsn in mode, with a sample image.
func centralCLIStation(t *testing.T, id, dsn, mode string) (st, img string) {
	t.Helper()
	_, st, img = sampleStation(t, id, "unit.img")
	f, err := os.OpenFile(filepath.Join(st, "station.yaml"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(f, "\ncentral:\n  dsn: %q\n  mode: %s\n", dsn, mode)
	f.Close()
	return st, img
}

// Two stations on one central store through the CLI: a unit shipped at one is refused at the other (exit 3, naming
// the station); provision serve shows it in the API, in /metrics (parsed by the Prometheus text parser) and on the
// dashboard in a real headless Chromium, where the search finds it; a non-loopback listen address without TLS is
// refused (exit 2); a sync killed in the middle loses and duplicates nothing.
func TestCentralCLI(t *testing.T) {
	testutil.RequireTool(t, "chromium")
	dsn := testutil.PostgresDB(t)
	st1, img1 := centralCLIStation(t, "line-1", dsn, "required")
	st2, img2 := centralCLIStation(t, "line-2", dsn, "required")
	mustCLI(t, st1, "central", "init")
	mustCLI(t, st1, "unit", "--serial", "CEN-0001", "--image", img1, "--tpm", "soft")
	_, errs, code := cli(t, st2, "unit", "--serial", "CEN-0001", "--image", img2, "--tpm", "soft")
	if code != 3 || !strings.Contains(errs, "CEN-0001 is shippable at station line-1") {
		t.Fatalf("the same serial at the second station: exit %d\n%s", code, errs)
	}
	var status struct{ Backlog int64 }
	if err := json.Unmarshal([]byte(mustCLI(t, st1, "sync", "--status", "--json")), &status); err != nil || status.Backlog != 0 {
		t.Fatalf("sync --status: %+v %v", status, err)
	}

	// provision serve on a free loopback port.
	cmd := exec.Command("provision", "--station", st1, "serve", "--listen", "127.0.0.1:0")
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if m := regexp.MustCompile(`serving (http://\S+?)/? `).FindStringSubmatch(sc.Text()); m != nil {
				addr <- m[1]
			}
		}
		io.Copy(io.Discard, stderr)
	}()
	var base string
	select {
	case base = <-addr:
	case <-time.After(20 * time.Second):
		t.Fatal("serve did not start")
	}
	get := func(path string) []byte {
		t.Helper()
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			t.Fatalf("GET %s: %d %s", path, resp.StatusCode, b)
		}
		return b
	}
	var detail struct {
		Unit struct{ Serial, State, Station string }
	}
	if err := json.Unmarshal(get("/api/units/CEN-0001"), &detail); err != nil || detail.Unit.State != "shippable" || detail.Unit.Station != "line-1" {
		t.Fatalf("/api/units/CEN-0001: %+v %v", detail, err)
	}
	tp := expfmt.NewTextParser(model.LegacyValidation)
	families, err := tp.TextToMetricFamilies(strings.NewReader(string(get("/metrics"))))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	found := false
	for _, m := range families["provision_units"].GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["station"] == "line-1" && labels["state"] == "shippable" && m.GetGauge().GetValue() == 1 {
			found = true
		}
	}
	if !found {
		t.Fatalf("/metrics: no provision_units{station=line-1,state=shippable} 1 in %v", families["provision_units"])
	}

	// The dashboard in a real browser: the station and the unit on first render; the search finds its history.
	bctx := testutil.Browser(t)
	ctx, cancel := context.WithTimeout(bctx, 30*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"/"), chromedp.WaitVisible(chromedp.CSS("#stations"))); err != nil {
		t.Fatal(err)
	}
	page, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("body")))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(page, "line-1") || !strings.Contains(page, "CEN-0001") {
		t.Fatalf("dashboard without the station or the unit:\n%s", page)
	}
	if err := chromedp.Do(ctx, chromedp.SendKeys(chromedp.CSS("#q"), "CEN-0001"), chromedp.Submit(chromedp.CSS("#q")),
		chromedp.WaitVisible(chromedp.CSS("#unit"))); err != nil {
		t.Fatal(err)
	}
	history, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("#unit")))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(history, "handshake") || !strings.Contains(history, "shippable") {
		t.Fatalf("the unit's history:\n%s", history)
	}

	if _, errs, code := cli(t, st1, "serve", "--listen", "0.0.0.0:0"); code != 2 || !strings.Contains(errs, "insecure") {
		t.Fatalf("serve on 0.0.0.0 without TLS: exit %d\n%s", code, errs)
	}

	// A backlog of 300 units at a third station, synced by a provision sync killed mid-way, then again.
	_, st3, _ := sampleStation(t, "line-3", "unused.img")
	serials := filepath.Join(t.TempDir(), "serials.txt")
	var list strings.Builder
	for i := 1; i <= 300; i++ {
		fmt.Fprintf(&list, "BL-%04d\n", i)
	}
	os.WriteFile(serials, []byte(list.String()), 0o644)
	mustCLI(t, st3, "enroll", "--serials", serials, "--tpm", "soft", "--out", filepath.Join(t.TempDir(), "b"))
	f, _ := os.OpenFile(filepath.Join(st3, "station.yaml"), os.O_APPEND|os.O_WRONLY, 0)
	fmt.Fprintf(f, "\ncentral:\n  dsn: %q\n", dsn)
	f.Close()
	kill := exec.Command("provision", "--station", st3, "sync")
	kill.Start()
	time.Sleep(300 * time.Millisecond)
	kill.Process.Kill()
	kill.Wait()
	mustCLI(t, st3, "sync")
	store, err := central.Open(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	seq, _, err := store.StationHead(context.Background(), "line-3")
	if err != nil {
		t.Fatal(err)
	}
	var local struct{ Head, Backlog int64 }
	json.Unmarshal([]byte(mustCLI(t, st3, "sync", "--status", "--json")), &local)
	if seq != local.Head || local.Backlog != 0 {
		t.Fatalf("after a killed sync and another: the store holds %d entries of line-3, the station %d (backlog %d)", seq, local.Head, local.Backlog)
	}
	units, _, err := store.Units(context.Background(), central.UnitFilter{Station: "line-3", Q: "BL-"})
	if err != nil || len(units) != 300 {
		t.Fatalf("the store holds %d units of line-3 (%v), want 300", len(units), err)
	}
}
