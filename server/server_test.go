package server

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"provision/central"
)

// now is the fixed time of the test data.
var now = time.Date(2026, 12, 2, 6, 0, 0, 0, time.UTC)

// fakeSource is a test double of the central store for the HTTP layer: fixed data, filtered and paged as the store
// documents it (by serial; After the last serial of the previous page). The end-to-end test with PostgreSQL is
// elsewhere.
type fakeSource struct {
	units     []central.Unit // sorted by serial
	details   map[string]central.UnitDetail
	stations  []central.StationInfo
	stats     central.Stats
	conflicts []central.Conflict
	err       error       // every query fails with it
	down      atomic.Bool // every query fails (set while a server runs)

	mu      sync.Mutex
	filters []central.UnitFilter
}

func (f *fakeSource) Units(ctx context.Context, flt central.UnitFilter) ([]central.Unit, string, error) {
	f.mu.Lock()
	f.filters = append(f.filters, flt)
	f.mu.Unlock()
	if f.failure() != nil {
		return nil, "", f.failure()
	}
	var out []central.Unit
	for _, u := range f.units {
		if (flt.State == "" || u.State == flt.State) && (flt.Station == "" || u.Station == flt.Station) &&
			strings.HasPrefix(u.Serial, flt.Q) && u.Serial > flt.After {
			out = append(out, u)
		}
	}
	if len(out) > flt.Limit {
		return out[:flt.Limit], out[flt.Limit-1].Serial, nil
	}
	return out, "", nil
}

func (f *fakeSource) Unit(ctx context.Context, serial string) (central.UnitDetail, error) {
	if f.failure() != nil {
		return central.UnitDetail{}, f.failure()
	}
	d, ok := f.details[serial]
	if !ok {
		return d, central.ErrNotFound
	}
	return d, nil
}

func (f *fakeSource) Stations(ctx context.Context) ([]central.StationInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.stations), f.failure()
}

// setBacklog changes a station's backlog while the server runs.
func (f *fakeSource) setBacklog(station string, n int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := range f.stations {
		if f.stations[i].ID == station {
			f.stations[i].Backlog = n
		}
	}
}
func (f *fakeSource) Stats(ctx context.Context) (central.Stats, error) { return f.stats, f.failure() }
func (f *fakeSource) Conflicts(ctx context.Context, limit int) ([]central.Conflict, error) {
	return f.conflicts[:min(limit, len(f.conflicts))], f.failure()
}

// failure is the error every query returns: err, or a store that went down.
func (f *fakeSource) failure() error {
	if f.down.Load() {
		return errors.New("connection refused")
	}
	return f.err
}

// RecentUnits makes fakeSource a RecentSource: newest first.
func (f *fakeSource) RecentUnits(ctx context.Context, limit int) ([]central.Unit, error) {
	out := slices.Clone(f.units)
	slices.SortFunc(out, func(a, b central.Unit) int { return b.Updated.Compare(a.Updated) })
	return out[:min(limit, len(out))], f.failure()
}

// newFake is two stations of one line: line1-a syncing, with a trusted unit SN-0001 and its full history; line1-b
// silent for 10 minutes with one conflict.
func newFake() *fakeSource {
	unit := func(serial, station, state string, ago time.Duration) central.Unit {
		return central.Unit{Serial: serial, Station: station, State: state, KeyKind: "tpm", PublicSHA256: strings.Repeat("ab", 32),
			Operator: "alice", Created: now.Add(-ago - time.Minute), Updated: now.Add(-ago)}
	}
	units := []central.Unit{
		unit("SN-0001", "line1-a", "shippable", 2*time.Minute),
		unit("SN-0002", "line1-a", "shippable", 20*time.Minute),
		unit("SN-0003", "line1-a", "failed", 30*time.Minute),
		unit("SN-0004", "line1-b", "shippable", 40*time.Minute),
		unit("SN-0005", "line1-b", "keyed", 50*time.Minute),
		unit("XY-0001", "line1-b", "shippable", 60*time.Minute),
	}
	units[0].EKSHA256, units[0].EKCertSHA256 = strings.Repeat("e1", 32), strings.Repeat("c1", 32)
	units[2].FailedStep, units[2].Error = "image", "image: partition 2 not found"
	ev := func(seq int64, step, outcome string, ms int64) central.Event {
		return central.Event{Station: "line1-a", Seq: seq, Time: now.Add(-3*time.Minute + time.Duration(seq)*time.Second),
			Serial: "SN-0001", Step: step, Outcome: outcome, MS: ms, Operator: "alice", Hash: strings.Repeat("0", 63) + "1"}
	}
	detail := central.UnitDetail{
		Unit: units[0],
		Certificates: []central.Certificate{{Serial: "7f01", Unit: "SN-0001", Station: "line1-a", SHA256: strings.Repeat("cd", 32),
			Status: "active", NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(10, 0, 0), Issued: now.Add(-3 * time.Minute)}},
		Events: []central.Event{ev(41, "key", "ok", 812), ev(42, "attest", "ok", 95), ev(43, "csr", "ok", 40),
			ev(44, "image", "ok", 2200), ev(45, "verify", "ok", 310), ev(46, "handshake", "ok", 120)},
		Attestation: &central.Attestation{Station: "line1-a", LocalID: 7, Serial: "SN-0001", Time: now.Add(-3 * time.Minute),
			Policy: "record", Outcome: "ok", Status: "trusted", EKSHA256: strings.Repeat("e1", 32), EKIssuer: "swtpm-localca",
			TPMManufacturer: "IBM", Evidence: []byte(`{"ek":"AAEC"}`), EvidenceSHA256: strings.Repeat("ef", 32)},
	}
	return &fakeSource{
		units:   units,
		details: map[string]central.UnitDetail{"SN-0001": detail, "SN-0003": {Unit: units[2]}},
		stations: []central.StationInfo{
			{ID: "line1-b", LastSync: now.Add(-10 * time.Minute), LastSeq: 90, LastEvent: now.Add(-11 * time.Minute), Backlog: 12,
				Units: 3, Shippable: 2, Conflicts: 1},
			{ID: "line1-a", LastSync: now.Add(-30 * time.Second), LastSeq: 46, LastEvent: now.Add(-2 * time.Minute),
				Units: 3, Shippable: 2, Failed: 1},
		},
		stats: central.Stats{
			UnitsByState: map[string]map[string]int{"line1-a": {"shippable": 2, "failed": 1},
				"line1-b": {"shippable": 2, "keyed": 1}},
			FailuresByStep: map[string]map[string]int{"line1-a": {"image": 1}, "line1-b": {"handshake": 2}},
			FailureCauses:  map[string]int{"partition not found": 1, "handshake: certificate unknown": 2},
			StepMS: map[string]map[string][]int64{"line1-a": {"key": {812, 790, 1500}, "image": {2200}},
				"line1-b": {"key": {900}}},
			UnitsPerHour: map[string][]int{"line1-a": append(make([]int, 22), 1, 2), "line1-b": {3, 0}},
			SyncLagMS:    map[string][]int64{"line1-a": {120, 80, 300}, "line1-b": {4000}},
			Conflicts:    1,
		},
		conflicts: []central.Conflict{{Kind: "unit", Key: "SN-0004", Station: "line1-b", Other: "line1-a",
			Detail: "shippable at both stations", Time: now.Add(-15 * time.Minute)}},
	}
}

// newTestServer serves src with the fixed clock on an httptest server (plain HTTP, loopback).
func newTestServer(t *testing.T, src Source, cfg Config) *httptest.Server {
	t.Helper()
	cfg.Now = func() time.Time { return now }
	s, err := New(src, cfg)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	t.Cleanup(ts.Close)
	return ts
}

// get fetches url and returns the status, the Content-Type and the body.
func get(t *testing.T, c *http.Client, url string) (int, string, []byte) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header.Get("Content-Type"), b
}

func TestUnitsAPI(t *testing.T) {
	ts := newTestServer(t, newFake(), Config{})
	tests := []struct {
		query    string
		want     []string
		wantNext string
	}{
		{"", []string{"SN-0001", "SN-0002", "SN-0003", "SN-0004", "SN-0005", "XY-0001"}, ""},
		{"?state=failed", []string{"SN-0003"}, ""},
		{"?station=line1-b", []string{"SN-0004", "SN-0005", "XY-0001"}, ""},
		{"?q=SN-000&state=shippable", []string{"SN-0001", "SN-0002", "SN-0004"}, ""},
		{"?q=XY", []string{"XY-0001"}, ""},
		{"?q=ZZ", []string{}, ""},
		{"?limit=2", []string{"SN-0001", "SN-0002"}, "SN-0002"},
		{"?limit=2&after=SN-0002", []string{"SN-0003", "SN-0004"}, "SN-0004"},
		{"?limit=2&after=SN-0004", []string{"SN-0005", "XY-0001"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.query, func(t *testing.T) {
			code, ctype, body := get(t, ts.Client(), ts.URL+"/api/units"+tt.query)
			if code != http.StatusOK || ctype != "application/json" {
				t.Fatalf("status %d %s, want 200 application/json: %s", code, ctype, body)
			}
			var got struct {
				Units []map[string]any `json:"units"`
				Next  *string          `json:"next"`
			}
			if err := json.Unmarshal(body, &got); err != nil {
				t.Fatal(err)
			}
			if got.Units == nil || got.Next == nil {
				t.Fatalf("units or next missing (an empty page is [] and \"\"): %s", body)
			}
			serials := []string{}
			for _, u := range got.Units {
				serials = append(serials, u["serial"].(string))
			}
			if !slices.Equal(serials, tt.want) || *got.Next != tt.wantNext {
				t.Errorf("got %v next %q, want %v next %q", serials, *got.Next, tt.want, tt.wantNext)
			}
		})
	}
}

func TestUnitsAPIDefaultLimitAndFields(t *testing.T) {
	src := newFake()
	ts := newTestServer(t, src, Config{})
	_, _, body := get(t, ts.Client(), ts.URL+"/api/units?q=SN-0001")
	if got := src.filters[len(src.filters)-1]; got.Limit != MaxLimit || got.Q != "SN-0001" {
		t.Errorf("filter %+v, want limit %d and q SN-0001", got, MaxLimit)
	}
	var got struct{ Units []map[string]any }
	if err := json.Unmarshal(body, &got); err != nil || len(got.Units) != 1 {
		t.Fatalf("%v: %s", err, body)
	}
	for _, k := range []string{"serial", "station", "state", "failed_step", "error", "key_kind", "public_sha256",
		"ek_sha256", "ek_certificate_sha256", "operator", "created", "updated"} {
		if _, ok := got.Units[0][k]; !ok {
			t.Errorf("unit has no field %q: %v", k, got.Units[0])
		}
	}
	if got.Units[0]["updated"] != "2026-12-02T05:58:00Z" {
		t.Errorf("updated = %v, want RFC 3339 UTC", got.Units[0]["updated"])
	}
}

func TestAPIErrors(t *testing.T) {
	ts := newTestServer(t, newFake(), Config{})
	tests := []struct {
		path string
		code int
	}{
		{"/api/units?limit=0", 400},
		{"/api/units?limit=1001", 400},
		{"/api/units?limit=ten", 400},
		{"/api/units?limit=1&limit=2", 400},
		{"/api/units?state=Ship!", 400},
		{"/api/units?station=a/b", 400},
		{"/api/units?station=" + strings.Repeat("s", 65), 400},
		{"/api/units?q=SN%2F1", 400},
		{"/api/units?q=SN%201", 400},
		{"/api/units?after=%00", 400},
		{"/api/units?sort=serial", 400},
		{"/api/units?q=%zz", 400},
		{"/api/units/NOPE-1", 404},
		{"/api/units/SN%200001", 400},
		{"/api/nothing", 404},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			code, ctype, body := get(t, ts.Client(), ts.URL+tt.path)
			var e struct{ Error string }
			if code != tt.code || ctype != "application/json" || json.Unmarshal(body, &e) != nil || e.Error == "" {
				t.Errorf("status %d %s %s, want %d and a JSON error", code, ctype, body, tt.code)
			}
		})
	}
}

func TestUnitAPI(t *testing.T) {
	ts := newTestServer(t, newFake(), Config{})
	code, _, body := get(t, ts.Client(), ts.URL+"/api/units/SN-0001")
	if code != 200 {
		t.Fatalf("status %d: %s", code, body)
	}
	var d struct {
		Unit         map[string]any
		Certificates []map[string]any
		Events       []map[string]any
		Attestation  map[string]any
	}
	if err := json.Unmarshal(body, &d); err != nil {
		t.Fatal(err)
	}
	if d.Unit["serial"] != "SN-0001" || len(d.Certificates) != 1 || len(d.Events) != 6 {
		t.Fatalf("got %s", body)
	}
	if d.Certificates[0]["serial"] != "7f01" || d.Certificates[0]["not_after"] == nil || d.Events[0]["step"] != "key" ||
		d.Events[0]["seq"] != 41.0 || d.Events[3]["ms"] != 2200.0 {
		t.Errorf("certificate or events wrong: %s", body)
	}
	if d.Attestation["status"] != "trusted" || d.Attestation["tpm_manufacturer"] != "IBM" ||
		d.Attestation["evidence"].(map[string]any)["ek"] != "AAEC" {
		t.Errorf("attestation wrong: %v", d.Attestation)
	}
	// A unit without attestation or certificates: null and [] (never missing).
	_, _, body = get(t, ts.Client(), ts.URL+"/api/units/SN-0003")
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(body, &raw); err != nil {
		t.Fatal(err)
	}
	if string(raw["attestation"]) != "null" || string(raw["certificates"]) != "[]" || string(raw["events"]) != "[]" {
		t.Errorf("SN-0003: %s", body)
	}
}

func TestStationsAPI(t *testing.T) {
	src := newFake()
	src.stations = append(src.stations, central.StationInfo{ID: "line2-new"})
	ts := newTestServer(t, src, Config{})
	code, _, body := get(t, ts.Client(), ts.URL+"/api/stations")
	var got struct{ Stations []map[string]any }
	if err := json.Unmarshal(body, &got); err != nil || code != 200 || len(got.Stations) != 3 {
		t.Fatalf("status %d, %v: %s", code, err, body)
	}
	byID := map[string]map[string]any{}
	for _, st := range got.Stations {
		byID[st["id"].(string)] = st
	}
	if a := byID["line1-a"]; a["silent"] != false || a["last_sync"] != "2026-12-02T05:59:30Z" || a["failed"] != 1.0 {
		t.Errorf("line1-a: %v", a)
	}
	if b := byID["line1-b"]; b["silent"] != true || b["backlog"] != 12.0 || b["conflicts"] != 1.0 {
		t.Errorf("line1-b: %v", b)
	}
	if n := byID["line2-new"]; n["last_sync"] != nil || n["silent"] != true {
		t.Errorf("a station that never synced: %v", n)
	}
}

func TestStoreDownIs503WithoutDetails(t *testing.T) {
	src := newFake()
	src.err = errors.New("dial tcp 10.1.2.3:5432: password authentication failed for user secretuser")
	ts := newTestServer(t, src, Config{})
	for _, p := range []string{"/api/units", "/api/units/SN-0001", "/api/stations", "/"} {
		code, _, body := get(t, ts.Client(), ts.URL+p)
		if code != http.StatusServiceUnavailable || strings.Contains(string(body), "secretuser") {
			t.Errorf("%s: status %d, want 503 without the store's message: %s", p, code, body)
		}
	}
	code, _, body := get(t, ts.Client(), ts.URL+"/metrics")
	if code != 200 || !strings.Contains(string(body), "provision_central_up 0") {
		t.Errorf("/metrics with the store down: %d %s", code, body)
	}
}

func TestCRL(t *testing.T) {
	ts := newTestServer(t, newFake(), Config{})
	if code, _, _ := get(t, ts.Client(), ts.URL+"/crl/line1-a"); code != 404 {
		t.Errorf("without a CRL hook: %d, want 404", code)
	}
	crl := func(id string) ([]byte, error) {
		if id == "line1-a" {
			return []byte{0x30, 0x03, 0x01, 0x01, 0xff}, nil
		}
		return nil, central.ErrNotFound
	}
	ts = newTestServer(t, newFake(), Config{CRL: crl})
	if code, ctype, body := get(t, ts.Client(), ts.URL+"/crl/line1-a"); code != 200 || ctype != "application/pkix-crl" || len(body) != 5 {
		t.Errorf("CRL: %d %s %x", code, ctype, body)
	}
	if code, _, _ := get(t, ts.Client(), ts.URL+"/crl/line9"); code != 404 {
		t.Errorf("unknown station: %d, want 404", code)
	}
}

func TestDashboardHTML(t *testing.T) {
	src := newFake()
	src.stations[0].ID = `<script>alert(1)</script>`
	ts := newTestServer(t, src, Config{})
	code, ctype, body := get(t, ts.Client(), ts.URL+"/?q=SN-0001")
	page := string(body)
	if code != 200 || ctype != "text/html; charset=utf-8" {
		t.Fatalf("status %d %s", code, ctype)
	}
	for _, want := range []string{
		`<noscript><meta http-equiv="refresh" content="10"></noscript>`, // works without JavaScript
		`&lt;script&gt;alert(1)&lt;/script&gt;`,                         // escaped
		`id="conflicts"`, `id="unit"`, `id="events"`, `trusted`, `partition not found`,
	} {
		if !strings.Contains(page, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	if strings.Contains(page, "<script>alert(1)") || strings.Contains(page, "http://") || strings.Contains(page, "https://") {
		t.Error("page holds an unescaped value or an external reference")
	}
	for _, p := range []string{"/static/style.css", "/static/poll.js"} {
		if code, _, _ := get(t, ts.Client(), ts.URL+p); code != 200 {
			t.Errorf("%s: %d", p, code)
		}
	}
	if code, _, _ := get(t, ts.Client(), ts.URL+"/static/"); code != 404 {
		t.Errorf("/static/ lists a directory: %d", code)
	}
}

func TestAge(t *testing.T) {
	for _, tt := range []struct {
		ago  time.Duration
		want string
	}{{30 * time.Second, "30 s ago"}, {5 * time.Minute, "5 min ago"}, {3 * time.Hour, "3 h ago"}, {72 * time.Hour, "3 days ago"}} {
		if got := age(now, now.Add(-tt.ago)); got != tt.want {
			t.Errorf("age(%v) = %q, want %q", tt.ago, got, tt.want)
		}
	}
	if got := age(now, time.Time{}); got != "never" {
		t.Errorf("age(zero) = %q", got)
	}
}
