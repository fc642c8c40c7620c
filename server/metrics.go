package server

import (
	"cmp"
	"context"
	"math"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"provision/central"
)

// maxCauses bounds the cause label's values: the most frequent causes keep their own series, the rest add up in
// cause="other".
const maxCauses = 30

// cacheFor: scrapes closer together than this share one reading of the store.
const cacheFor = time.Second

var (
	descUp = prometheus.NewDesc("provision_central_up",
		"Whether the last scrape could read the central store (1) or not (0).", nil, nil)
	descUnits = prometheus.NewDesc("provision_units",
		"Units in the central store by the station that provisioned them and their state.", []string{"station", "state"}, nil)
	descStepDuration = prometheus.NewDesc("provision_step_duration_seconds",
		"Durations of the steps that succeeded in the last hour, by station and step.", []string{"station", "step"}, nil)
	descStepFailures = prometheus.NewDesc("provision_step_failures",
		"Failed step events recorded in the central store, by station and step.", []string{"station", "step"}, nil)
	descCauses = prometheus.NewDesc("provision_failure_causes",
		"Failed step events by cause (the first words of the failure), all stations.", []string{"cause"}, nil)
	descBacklog = prometheus.NewDesc("provision_sync_backlog",
		"Records a station still had to send at its last sync.", []string{"station"}, nil)
	descLastSync = prometheus.NewDesc("provision_sync_last_timestamp_seconds",
		"Unix time of a station's last sync (push) to the central store.", []string{"station"}, nil)
	descLag = prometheus.NewDesc("provision_sync_lag_seconds",
		"Time from a station recording an event to the central store receiving it, over recent events.", []string{"station"}, nil)
	descStationConflicts = prometheus.NewDesc("provision_station_conflicts",
		"Conflicts recorded against a station: records the central store refused to overwrite.", []string{"station"}, nil)
	descConflicts = prometheus.NewDesc("provision_conflicts",
		"Conflicts recorded in the central store, all stations.", nil, nil)
	descLastHour = prometheus.NewDesc("provision_units_shippable_last_hour",
		"Units a station made shippable in the last hour.", []string{"station"}, nil)
)

// quantiles reported for the step duration and sync lag summaries.
var quantiles = []float64{0.5, 0.9, 0.99}

// collector reads the store on each scrape (bounded by Config.Timeout, one reading at a time, reused for cacheFor).
type collector struct {
	s *Server

	mu       sync.Mutex
	at       time.Time
	stats    central.Stats
	stations []central.StationInfo
	err      error
}

// metricsHandler serves the private registry holding only the collector.
func (s *Server) metricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(&collector{s: s})
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError,
		MaxRequestsInFlight: 4, Timeout: s.cfg.Timeout + 5*time.Second})
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descUp, descUnits, descStepDuration, descStepFailures, descCauses, descBacklog,
		descLastSync, descLag, descStationConflicts, descConflicts, descLastHour} {
		ch <- d
	}
}

// read returns the store's figures, reading them again when the last reading is older than cacheFor.
func (c *collector) read() (central.Stats, []central.StationInfo, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if now := time.Now(); now.Sub(c.at) >= cacheFor {
		ctx, cancel := context.WithTimeout(context.Background(), c.s.cfg.Timeout)
		defer cancel()
		c.stats, c.err = c.s.src.Stats(ctx)
		if c.err == nil {
			c.stations, c.err = c.s.src.Stations(ctx)
		}
		if c.err != nil {
			c.s.cfg.Logger.Error("serve: metrics: central store", "err", c.err)
		}
		c.at = time.Now()
	}
	return c.stats, c.stations, c.err
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	stats, stations, err := c.read()
	if err != nil {
		emit(ch, descUp, prometheus.GaugeValue, 0)
		return
	}
	emit(ch, descUp, prometheus.GaugeValue, 1)
	for station, byState := range stats.UnitsByState {
		for state, n := range byState {
			emit(ch, descUnits, prometheus.GaugeValue, float64(n), station, state)
		}
	}
	for station, bySteps := range stats.StepMS {
		for step, ms := range bySteps {
			emitSummary(ch, descStepDuration, ms, station, step)
		}
	}
	for station, bySteps := range stats.FailuresByStep {
		for step, n := range bySteps {
			emit(ch, descStepFailures, prometheus.GaugeValue, float64(n), station, step)
		}
	}
	for _, cc := range topCauses(stats.FailureCauses, maxCauses) {
		emit(ch, descCauses, prometheus.GaugeValue, float64(cc.n), cc.cause)
	}
	for station, ms := range stats.SyncLagMS {
		emitSummary(ch, descLag, ms, station)
	}
	for station, hours := range stats.UnitsPerHour {
		if len(hours) > 0 {
			emit(ch, descLastHour, prometheus.GaugeValue, float64(hours[len(hours)-1]), station)
		}
	}
	emit(ch, descConflicts, prometheus.GaugeValue, float64(stats.Conflicts))
	for _, st := range stations {
		emit(ch, descBacklog, prometheus.GaugeValue, float64(st.Backlog), st.ID)
		emit(ch, descStationConflicts, prometheus.GaugeValue, float64(st.Conflicts), st.ID)
		if !st.LastSync.IsZero() {
			emit(ch, descLastSync, prometheus.GaugeValue, float64(st.LastSync.UnixMilli())/1000, st.ID)
		}
	}
}

// emit sends one sample, dropping it when a label value is unusable (not UTF-8): one bad station id must not fail
// the whole scrape.
func emit(ch chan<- prometheus.Metric, d *prometheus.Desc, t prometheus.ValueType, v float64, labels ...string) {
	if m, err := prometheus.NewConstMetric(d, t, v, labels...); err == nil {
		ch <- m
	}
}

// emitSummary sends durations in milliseconds as a summary in seconds (count, sum, quantiles).
func emitSummary(ch chan<- prometheus.Metric, d *prometheus.Desc, ms []int64, labels ...string) {
	if len(ms) == 0 {
		return
	}
	sorted := slices.Clone(ms)
	slices.Sort(sorted)
	var sum float64
	for _, v := range sorted {
		sum += float64(v) / 1000
	}
	q := make(map[float64]float64, len(quantiles))
	for _, p := range quantiles {
		q[p] = float64(percentile(sorted, p)) / 1000
	}
	if m, err := prometheus.NewConstSummary(d, uint64(len(sorted)), sum, q, labels...); err == nil {
		ch <- m
	}
}

// percentile is the nearest-rank percentile p (0..1] of sorted values.
func percentile(sorted []int64, p float64) int64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

type causeCount struct {
	cause string
	n     int
}

// topCauses lists causes by count (then name), the ones past limit summed into "other".
func topCauses(causes map[string]int, limit int) []causeCount {
	out := make([]causeCount, 0, len(causes))
	for c, n := range causes {
		out = append(out, causeCount{c, n})
	}
	slices.SortFunc(out, func(a, b causeCount) int { return cmp.Or(cmp.Compare(b.n, a.n), cmp.Compare(a.cause, b.cause)) })
	if len(out) <= limit {
		return out
	}
	rest := 0
	for _, c := range out[limit:] {
		rest += c.n
	}
	out = out[:limit]
	if i := slices.IndexFunc(out, func(c causeCount) bool { return c.cause == "other" }); i >= 0 {
		out[i].n += rest // a cause named "other" already has its series
		return out
	}
	return append(out, causeCount{"other", rest})
}
