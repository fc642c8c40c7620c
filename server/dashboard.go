package server

import (
	"cmp"
	"context"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"net/http"
	"slices"
	"strings"
	"time"

	"provision/central"
)

// web holds the dashboard's templates, stylesheet and the few lines of polling script. Nothing comes from elsewhere:
// the page works offline.
//
//go:embed web
var web embed.FS

var pages = template.Must(template.New("").Funcs(template.FuncMap{
	"ts":    func(t time.Time) string { return orNever(t, t.UTC().Format("2006-01-02 15:04:05Z")) },
	"short": func(s string) string { return s[:min(len(s), 12)] },
}).ParseFS(web, "web/*.html"))

// staticHandler serves web/static (the stylesheet and the polling script), cached briefly.
func staticHandler() http.Handler {
	sub, _ := fs.Sub(web, "web")
	files := http.FileServerFS(sub)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/") {
			http.NotFound(w, r) // no directory listings
			return
		}
		w.Header().Set("Cache-Control", "max-age=300")
		files.ServeHTTP(w, r)
	})
}

// searchLimit is how many prefix matches the dashboard lists.
const searchLimit = 50

// conflictLimit is how many recent conflicts the dashboard lists; recentLimit how many latest units.
const conflictLimit, recentLimit = 20, 20

type (
	dashboard struct {
		Now           time.Time
		Refresh       int // seconds
		Q             string
		Err           string // the store could not be read
		Conflicts     []central.Conflict
		ConflictTotal int
		Stations      []stationView
		Recent        []recentUnit
		Hours         []hourBar
		HoursPeak     int
		HoursTotal    int
		Causes        []bar
		Steps         []bar
		Search        *search
	}
	stationView struct {
		central.StationInfo
		SyncAge, EventAge string
		LastUnit          string // "" when unknown
		Silent            bool
		LastHour          int
	}
	hourBar struct {
		X, Y, H int
		Label   string
		N       int
	}
	recentUnit struct {
		central.Unit
		Age string
	}
	bar struct {
		Name   string
		N, Max int
	}
	search struct {
		Q      string
		Err    string
		Units  []central.Unit
		More   bool
		Detail *central.UnitDetail // the exact match
	}
)

// handleDashboard renders the whole page from the store, so it is complete on first render; the page then polls.
func (s *Server) handleDashboard(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := s.queryContext(r)
	defer cancel()
	d := dashboard{Now: s.cfg.Now(), Refresh: max(1, int(s.cfg.Refresh.Seconds())),
		Q: strings.TrimSpace(r.URL.Query().Get("q"))}
	code := http.StatusOK
	fail := func(what string, err error) {
		s.cfg.Logger.Error("serve: dashboard: central store", "query", what, "err", err)
		d.Err, code = "The central store cannot be read right now; the figures below may be missing.", http.StatusServiceUnavailable
	}
	stations, err := s.src.Stations(ctx)
	if err != nil {
		fail("stations", err)
	}
	stats, err := s.src.Stats(ctx)
	if err != nil {
		fail("stats", err)
	}
	if d.Conflicts, err = s.src.Conflicts(ctx, conflictLimit); err != nil {
		fail("conflicts", err)
	}
	d.ConflictTotal = max(stats.Conflicts, len(d.Conflicts))
	var recent []central.Unit
	if rs, ok := s.src.(RecentSource); ok {
		if recent, err = rs.RecentUnits(ctx, recentLimit); err != nil {
			fail("recent units", err)
		}
	}
	for _, u := range recent {
		d.Recent = append(d.Recent, recentUnit{Unit: u, Age: age(d.Now, u.Updated)})
	}
	d.Stations = s.stationViews(stations, stats, recent)
	d.Hours, d.HoursPeak, d.HoursTotal = hourBars(stats.UnitsPerHour, d.Now)
	d.Causes = causeBars(stats.FailureCauses)
	d.Steps = stepBars(stats.FailuresByStep)
	if r.URL.Query().Has("q") {
		d.Search = s.search(ctx, d.Q)
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	if err := pages.ExecuteTemplate(w, "dashboard.html", d); err != nil {
		s.cfg.Logger.Error("serve: dashboard: render", "err", err)
	}
}

// search lists the units whose serial starts with q and, when one is exactly q, its history.
func (s *Server) search(ctx context.Context, q string) *search {
	if q == "" {
		return &search{Err: "Type a serial, or the first characters of one."}
	}
	if !validSerial(q) {
		return &search{Err: "A serial has no '/' or spaces."}
	}
	out := &search{Q: q}
	units, next, err := s.src.Units(ctx, central.UnitFilter{Q: q, Limit: searchLimit})
	if err != nil {
		s.cfg.Logger.Error("serve: search: central store", "err", err)
		return &search{Err: "The central store cannot be searched right now."}
	}
	out.Units, out.More = units, next != ""
	d, err := s.src.Unit(ctx, q)
	switch {
	case err == nil:
		out.Detail = &d
	case !errors.Is(err, central.ErrNotFound):
		s.cfg.Logger.Error("serve: search: central store", "err", err)
		out.Err = "The unit's history cannot be read right now."
	}
	return out
}

// stationViews sorts stations by id and adds what the page shows of each;
// recent (newest first) gives each station's last unit when it is among them.
func (s *Server) stationViews(stations []central.StationInfo, stats central.Stats, recent []central.Unit) []stationView {
	now := s.cfg.Now()
	out := make([]stationView, 0, len(stations))
	for _, st := range stations {
		v := stationView{StationInfo: st, SyncAge: age(now, st.LastSync), EventAge: age(now, st.LastEvent),
			Silent: s.silent(st)}
		if i := slices.IndexFunc(recent, func(u central.Unit) bool { return u.Station == st.ID }); i >= 0 {
			v.LastUnit = recent[i].Serial
		}
		if h := stats.UnitsPerHour[st.ID]; len(h) > 0 {
			v.LastHour = h[len(h)-1]
		}
		out = append(out, v)
	}
	slices.SortFunc(out, func(a, b stationView) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// Size of the units-per-hour chart (SVG user units): 24 bars of barW, barGap apart, up to chartH tall.
const (
	barW, barGap, chartH = 8, 2, 50
)

// hourBars sums the stations' shippable units per hour (the last 24 hours, oldest first) into the chart's bars.
func hourBars(perStation map[string][]int, now time.Time) (bars []hourBar, peak, total int) {
	var sums [24]int
	for _, hours := range perStation {
		off := len(sums) - len(hours) // align the newest hours on the right
		for i, n := range hours {
			if i+off >= 0 {
				sums[i+off] += n
			}
		}
	}
	for _, n := range sums {
		peak, total = max(peak, n), total+n
	}
	hour := now.UTC().Truncate(time.Hour)
	for i, n := range sums {
		h := 0
		if peak > 0 {
			h = max(n*chartH/peak, min(n, 1)) // a non-zero hour is never invisible
		}
		start := hour.Add(time.Duration(i-len(sums)+1) * time.Hour)
		bars = append(bars, hourBar{X: i * (barW + barGap), Y: chartH - h, H: h, N: n,
			Label: fmt.Sprintf("%s–%s UTC: %d shippable", start.Format("15:04"), start.Add(time.Hour).Format("15:04"), n)})
	}
	return bars, peak, total
}

// causeBars lists failure causes by count (the most frequent 15).
func causeBars(causes map[string]int) []bar {
	top := topCauses(causes, 15)
	out := make([]bar, 0, len(top))
	for _, c := range top {
		out = append(out, bar{Name: c.cause, N: c.n})
	}
	return withMax(out)
}

// stepBars sums failures by step over the stations.
func stepBars(byStation map[string]map[string]int) []bar {
	sums := map[string]int{}
	for _, steps := range byStation {
		for step, n := range steps {
			sums[step] += n
		}
	}
	out := make([]bar, 0, len(sums))
	for step, n := range sums {
		out = append(out, bar{Name: step, N: n})
	}
	slices.SortFunc(out, func(a, b bar) int { return cmp.Or(cmp.Compare(b.N, a.N), cmp.Compare(a.Name, b.Name)) })
	return withMax(out)
}

func withMax(bars []bar) []bar {
	m := 0
	for _, b := range bars {
		m = max(m, b.N)
	}
	for i := range bars {
		bars[i].Max = m
	}
	return bars
}

// age says how long ago t was, in the largest unit that fits ("never" for the zero time).
func age(now, t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	d := now.Sub(t)
	switch {
	case d < 0:
		return "just now"
	case d < time.Minute:
		return fmt.Sprintf("%d s ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%d min ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%d h ago", int(d.Hours()))
	}
	return fmt.Sprintf("%d days ago", int(d.Hours()/24))
}

func orNever(t time.Time, s string) string {
	if t.IsZero() {
		return "never"
	}
	return s
}

// renderLogin shows the token form (token authentication, for browsers).
func (s *Server) renderLogin(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	pages.ExecuteTemplate(w, "login.html", struct{ Msg string }{msg})
}
