package server

import (
	"bytes"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// scrape fetches /metrics and parses it with Prometheus' own text parser.
func scrape(t *testing.T, src Source) map[string]*dto.MetricFamily {
	t.Helper()
	ts := newTestServer(t, src, Config{})
	code, ctype, body := get(t, ts.Client(), ts.URL+"/metrics")
	if code != 200 || !strings.HasPrefix(ctype, "text/plain") {
		t.Fatalf("status %d %s: %s", code, ctype, body)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("the Prometheus parser refuses /metrics: %v\n%s", err, body)
	}
	return fams
}

// labels is a metric's labels as a map.
func labels(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, l := range m.GetLabel() {
		out[l.GetName()] = l.GetValue()
	}
	return out
}

// find returns the metric of family name whose labels include want, or nil.
func find(fams map[string]*dto.MetricFamily, name string, want map[string]string) *dto.Metric {
	for _, m := range fams[name].GetMetric() {
		got := labels(m)
		ok := true
		for k, v := range want {
			ok = ok && got[k] == v
		}
		if ok {
			return m
		}
	}
	return nil
}

func TestMetrics(t *testing.T) {
	fams := scrape(t, newFake())
	for name, f := range fams {
		if !strings.HasPrefix(name, "provision_") {
			t.Errorf("metric %s is not prefixed provision_", name)
		}
		perStation := !slices.Contains([]string{"provision_central_up", "provision_conflicts", "provision_failure_causes"}, name)
		for _, m := range f.GetMetric() {
			if _, ok := labels(m)["station"]; perStation && !ok {
				t.Errorf("%s%v has no station label", name, labels(m))
			}
		}
	}
	for _, name := range []string{"provision_central_up", "provision_units", "provision_step_duration_seconds",
		"provision_step_failures", "provision_failure_causes", "provision_sync_backlog", "provision_sync_lag_seconds",
		"provision_sync_last_timestamp_seconds", "provision_station_conflicts", "provision_conflicts",
		"provision_units_shippable_last_hour"} {
		if fams[name] == nil {
			t.Errorf("no %s; have %v", name, slices.Sorted(maps.Keys(fams)))
		}
	}
	checks := []struct {
		name   string
		labels map[string]string
		value  func(*dto.Metric) float64
		want   float64
	}{
		{"provision_central_up", nil, gauge, 1},
		{"provision_units", map[string]string{"station": "line1-a", "state": "shippable"}, gauge, 2},
		{"provision_units", map[string]string{"station": "line1-b", "state": "keyed"}, gauge, 1},
		{"provision_step_failures", map[string]string{"station": "line1-b", "step": "handshake"}, gauge, 2},
		{"provision_failure_causes", map[string]string{"cause": "partition not found"}, gauge, 1},
		{"provision_sync_backlog", map[string]string{"station": "line1-b"}, gauge, 12},
		{"provision_station_conflicts", map[string]string{"station": "line1-b"}, gauge, 1},
		{"provision_conflicts", nil, gauge, 1},
		{"provision_units_shippable_last_hour", map[string]string{"station": "line1-a"}, gauge, 2},
		{"provision_sync_last_timestamp_seconds", map[string]string{"station": "line1-a"}, gauge, float64(now.Unix() - 30)},
		{"provision_step_duration_seconds", map[string]string{"station": "line1-a", "step": "key"}, count, 3},
		{"provision_step_duration_seconds", map[string]string{"station": "line1-a", "step": "key"}, sum, 3.102},
		{"provision_step_duration_seconds", map[string]string{"station": "line1-a", "step": "key"}, quantile(0.5), 0.812},
		{"provision_step_duration_seconds", map[string]string{"station": "line1-a", "step": "key"}, quantile(0.99), 1.5},
		{"provision_sync_lag_seconds", map[string]string{"station": "line1-b"}, quantile(0.99), 4},
	}
	for _, c := range checks {
		t.Run(fmt.Sprint(c.name, c.labels), func(t *testing.T) {
			m := find(fams, c.name, c.labels)
			if m == nil {
				t.Fatal("missing")
			}
			if got := c.value(m); got < c.want-1e-9 || got > c.want+1e-9 {
				t.Errorf("got %v, want %v", got, c.want)
			}
		})
	}
}

func gauge(m *dto.Metric) float64 { return m.GetGauge().GetValue() }
func count(m *dto.Metric) float64 { return float64(m.GetSummary().GetSampleCount()) }
func sum(m *dto.Metric) float64   { return m.GetSummary().GetSampleSum() }
func quantile(q float64) func(*dto.Metric) float64 {
	return func(m *dto.Metric) float64 {
		for _, x := range m.GetSummary().GetQuantile() {
			if x.GetQuantile() == q {
				return x.GetValue()
			}
		}
		return -1
	}
}

func TestMetricsCauseCardinalityIsBounded(t *testing.T) {
	src := newFake()
	src.stats.FailureCauses = map[string]int{"other": 1}
	for i := range 100 {
		src.stats.FailureCauses[fmt.Sprintf("cause %03d", i)] = i + 1
	}
	src.stats.UnitsByState["bad\xffstation"] = map[string]int{"failed": 1} // not UTF-8: dropped, the scrape survives
	fams := scrape(t, src)
	ms := fams["provision_failure_causes"].GetMetric()
	if len(ms) != maxCauses+1 {
		t.Errorf("%d cause series, want %d", len(ms), maxCauses+1)
	}
	// The 70 least frequent causes (1..70) and the cause named "other" (1) add up in "other".
	if m := find(fams, "provision_failure_causes", map[string]string{"cause": "other"}); m == nil || gauge(m) != 70*71/2+1 {
		t.Errorf("other = %v", m)
	}
}

func TestPercentile(t *testing.T) {
	v := []int64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	for _, tt := range []struct {
		p    float64
		want int64
	}{{0.5, 5}, {0.9, 9}, {0.99, 10}, {1, 10}, {0.01, 1}} {
		if got := percentile(v, tt.p); got != tt.want {
			t.Errorf("percentile(%v) = %d, want %d", tt.p, got, tt.want)
		}
	}
}
