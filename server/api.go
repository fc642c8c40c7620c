package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"provision/central"
)

// MaxLimit is the largest page of units the API returns (and the default).
const MaxLimit = 1000

// routes builds the mux, behind the token check when a token is configured.
func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/units", s.handleUnits)
	mux.HandleFunc("GET /api/units/{serial}", s.handleUnit)
	mux.HandleFunc("GET /api/stations", s.handleStations)
	mux.HandleFunc("/api/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "no such API path")
	})
	mux.Handle("GET /metrics", s.metricsHandler())
	mux.HandleFunc("GET /crl/{station}", s.handleCRL)
	mux.Handle("GET /static/", staticHandler())
	mux.HandleFunc("GET /{$}", s.handleDashboard)
	var h http.Handler = mux
	if s.token != nil {
		h = s.requireToken(h)
	}
	return securityHeaders(h)
}

// securityHeaders keeps pages from being framed or sniffed, from loading anything but their own files, and (over
// TLS) browsers from falling back to plain HTTP.
func securityHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Content-Security-Policy", "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "+
			"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
		if r.TLS != nil {
			h.Set("Strict-Transport-Security", "max-age=31536000")
		}
		next.ServeHTTP(w, r)
	})
}

// unitsQuery parses and checks /api/units' parameters: state, station, q (serial prefix), limit (1..MaxLimit,
// default MaxLimit) and after (the "next" cursor of the previous page). Unknown or repeated parameters are errors.
func unitsQuery(v url.Values) (central.UnitFilter, error) {
	f := central.UnitFilter{Limit: MaxLimit}
	for k, vs := range v {
		if len(vs) != 1 {
			return f, fmt.Errorf("parameter %q given %d times", k, len(vs))
		}
		val := vs[0]
		switch k {
		case "state":
			if val != "" && !validState(val) {
				return f, fmt.Errorf("state %q: lower-case letters and '_' only", val)
			}
			f.State = val
		case "station":
			if val != "" && !validStation(val) {
				return f, fmt.Errorf("station %q: up to 64 letters, digits, '.', '_' or '-'", val)
			}
			f.Station = val
		case "q":
			if val != "" && !validSerial(val) {
				return f, fmt.Errorf("q: a serial prefix of up to 128 characters, without '/' or white space")
			}
			f.Q = val
		case "limit":
			n, err := strconv.Atoi(val)
			if err != nil || n < 1 || n > MaxLimit {
				return f, fmt.Errorf("limit %q: a number from 1 to %d", val, MaxLimit)
			}
			f.Limit = n
		case "after":
			if len(val) > 512 || !utf8.ValidString(val) || strings.ContainsFunc(val, unicode.IsControl) {
				return f, errors.New("after: not a cursor this API returned")
			}
			f.After = val
		default:
			return f, fmt.Errorf("unknown parameter %q (state, station, q, limit, after)", k)
		}
	}
	return f, nil
}

func validState(s string) bool {
	return len(s) <= 32 && strings.Trim(s, "abcdefghijklmnopqrstuvwxyz_") == ""
}

// validStation is the station id rule of station.yaml.
func validStation(s string) bool {
	return len(s) <= 64 && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") == ""
}

// validSerial accepts what a serial (or its prefix) may be: never '/', white space or control characters.
func validSerial(s string) bool {
	return len(s) <= 128 && utf8.ValidString(s) && !strings.ContainsFunc(s, func(r rune) bool {
		return r == '/' || unicode.IsSpace(r) || unicode.IsControl(r) || r == utf8.RuneError
	})
}

// queryContext bounds the store queries of one request.
func (s *Server) queryContext(r *http.Request) (context.Context, context.CancelFunc) {
	return context.WithTimeout(r.Context(), s.cfg.Timeout)
}

func (s *Server) handleUnits(w http.ResponseWriter, r *http.Request) {
	v, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		writeError(w, http.StatusBadRequest, "malformed query string")
		return
	}
	f, err := unitsQuery(v)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	ctx, cancel := s.queryContext(r)
	defer cancel()
	units, next, err := s.src.Units(ctx, f)
	if err != nil {
		s.storeError(w, "units", err)
		return
	}
	out := unitsJSON{Units: make([]unitJSON, 0, len(units)), Next: next}
	for _, u := range units {
		out.Units = append(out.Units, toUnitJSON(u))
	}
	writeJSON(w, out)
}

func (s *Server) handleUnit(w http.ResponseWriter, r *http.Request) {
	serial := r.PathValue("serial")
	if !validSerial(serial) || serial == "" {
		writeError(w, http.StatusBadRequest, "not a serial")
		return
	}
	ctx, cancel := s.queryContext(r)
	defer cancel()
	d, err := s.src.Unit(ctx, serial)
	if errors.Is(err, central.ErrNotFound) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no unit %q in the central store", serial))
		return
	}
	if err != nil {
		s.storeError(w, "unit", err)
		return
	}
	writeJSON(w, toDetailJSON(d))
}

func (s *Server) handleStations(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := s.queryContext(r)
	defer cancel()
	sts, err := s.src.Stations(ctx)
	if err != nil {
		s.storeError(w, "stations", err)
		return
	}
	out := stationsJSON{Stations: make([]stationJSON, 0, len(sts))}
	for _, st := range sts {
		out.Stations = append(out.Stations, s.toStationJSON(st))
	}
	writeJSON(w, out)
}

// handleCRL serves a station's DER CRL through Config.CRL (issue #13); without it, 404.
func (s *Server) handleCRL(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("station")
	if s.cfg.CRL == nil || !validStation(id) || id == "" {
		http.NotFound(w, r)
		return
	}
	der, err := s.cfg.CRL(id)
	if errors.Is(err, central.ErrNotFound) {
		http.NotFound(w, r)
		return
	}
	if err != nil {
		s.cfg.Logger.Error("serve: crl", "station", id, "err", err)
		http.Error(w, "CRL unavailable", http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "application/pkix-crl")
	w.Write(der)
}

// storeError logs a store failure and answers 503 without its details (they may name hosts or users).
func (s *Server) storeError(w http.ResponseWriter, what string, err error) {
	s.cfg.Logger.Error("serve: central store", "query", what, "err", err)
	writeError(w, http.StatusServiceUnavailable, "central store unavailable")
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(w)
	enc.SetIndent("", " ")
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(errorJSON{Error: msg})
}

// The JSON documents (docs/api.md describes each field).
type (
	errorJSON struct {
		Error string `json:"error"`
	}
	unitsJSON struct {
		Units []unitJSON `json:"units"`
		Next  string     `json:"next"`
	}
	unitJSON struct {
		Serial       string    `json:"serial"`
		Station      string    `json:"station"`
		State        string    `json:"state"`
		FailedStep   string    `json:"failed_step"`
		Error        string    `json:"error"`
		KeyKind      string    `json:"key_kind"`
		PublicSHA256 string    `json:"public_sha256"`
		EKSHA256     string    `json:"ek_sha256"`
		EKCertSHA256 string    `json:"ek_certificate_sha256"`
		Operator     string    `json:"operator"`
		Created      time.Time `json:"created"`
		Updated      time.Time `json:"updated"`
	}
	certificateJSON struct {
		Serial    string    `json:"serial"`
		Unit      string    `json:"unit"`
		Station   string    `json:"station"`
		SHA256    string    `json:"sha256"`
		Status    string    `json:"status"`
		NotBefore time.Time `json:"not_before"`
		NotAfter  time.Time `json:"not_after"`
		Issued    time.Time `json:"issued"`
	}
	eventJSON struct {
		Station    string    `json:"station"`
		Seq        int64     `json:"seq"`
		Time       time.Time `json:"time"`
		Serial     string    `json:"serial"`
		Step       string    `json:"step"`
		Outcome    string    `json:"outcome"`
		Detail     string    `json:"detail"`
		MS         int64     `json:"ms"`
		Operator   string    `json:"operator"`
		CertSHA256 string    `json:"cert_sha256"`
		PrevHash   string    `json:"prev_hash"`
		Hash       string    `json:"hash"`
	}
	attestationJSON struct {
		Station         string          `json:"station"`
		LocalID         int64           `json:"local_id"`
		Serial          string          `json:"serial"`
		Time            time.Time       `json:"time"`
		Policy          string          `json:"policy"`
		Outcome         string          `json:"outcome"`
		Status          string          `json:"status"`
		EKSHA256        string          `json:"ek_sha256"`
		EKCertSHA256    string          `json:"ek_certificate_sha256"`
		EKIssuer        string          `json:"ek_issuer"`
		TPMManufacturer string          `json:"tpm_manufacturer"`
		Cause           string          `json:"cause"`
		Warnings        []string        `json:"warnings"`
		Evidence        json.RawMessage `json:"evidence"`
		EvidenceSHA256  string          `json:"evidence_sha256"`
	}
	detailJSON struct {
		Unit         unitJSON          `json:"unit"`
		Certificates []certificateJSON `json:"certificates"`
		Events       []eventJSON       `json:"events"`
		Attestation  *attestationJSON  `json:"attestation"`
	}
	stationsJSON struct {
		Stations []stationJSON `json:"stations"`
	}
	stationJSON struct {
		ID        string     `json:"id"`
		LastSync  *time.Time `json:"last_sync"`
		LastSeq   int64      `json:"last_seq"`
		LastEvent *time.Time `json:"last_event"`
		Backlog   int64      `json:"backlog"`
		Units     int        `json:"units"`
		Shippable int        `json:"shippable"`
		Failed    int        `json:"failed"`
		Conflicts int        `json:"conflicts"`
		Silent    bool       `json:"silent"`
	}
)

func toUnitJSON(u central.Unit) unitJSON {
	return unitJSON{Serial: u.Serial, Station: u.Station, State: u.State, FailedStep: u.FailedStep, Error: u.Error,
		KeyKind: u.KeyKind, PublicSHA256: u.PublicSHA256, EKSHA256: u.EKSHA256, EKCertSHA256: u.EKCertSHA256,
		Operator: u.Operator, Created: u.Created.UTC(), Updated: u.Updated.UTC()}
}

func toDetailJSON(d central.UnitDetail) detailJSON {
	out := detailJSON{Unit: toUnitJSON(d.Unit), Certificates: []certificateJSON{}, Events: []eventJSON{}}
	for _, c := range d.Certificates {
		out.Certificates = append(out.Certificates, certificateJSON{Serial: c.Serial, Unit: c.Unit, Station: c.Station,
			SHA256: c.SHA256, Status: c.Status, NotBefore: c.NotBefore.UTC(), NotAfter: c.NotAfter.UTC(), Issued: c.Issued.UTC()})
	}
	for _, e := range d.Events {
		out.Events = append(out.Events, eventJSON{Station: e.Station, Seq: e.Seq, Time: e.Time.UTC(), Serial: e.Serial,
			Step: e.Step, Outcome: e.Outcome, Detail: e.Detail, MS: e.MS, Operator: e.Operator, CertSHA256: e.CertSHA256,
			PrevHash: e.PrevHash, Hash: e.Hash})
	}
	if a := d.Attestation; a != nil {
		ev := json.RawMessage("null")
		if len(a.Evidence) > 0 && json.Valid(a.Evidence) {
			ev = json.RawMessage(a.Evidence)
		}
		warnings := a.Warnings
		if warnings == nil {
			warnings = []string{}
		}
		out.Attestation = &attestationJSON{Station: a.Station, LocalID: a.LocalID, Serial: a.Serial, Time: a.Time.UTC(),
			Policy: a.Policy, Outcome: a.Outcome, Status: a.Status, EKSHA256: a.EKSHA256, EKCertSHA256: a.EKCertSHA256,
			EKIssuer: a.EKIssuer, TPMManufacturer: a.TPMManufacturer, Cause: a.Cause, Warnings: warnings, Evidence: ev,
			EvidenceSHA256: a.EvidenceSHA256}
	}
	return out
}

// optTime is nil for the zero time (JSON null: never happened).
func optTime(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	t = t.UTC()
	return &t
}

func (s *Server) toStationJSON(st central.StationInfo) stationJSON {
	return stationJSON{ID: st.ID, LastSync: optTime(st.LastSync), LastSeq: st.LastSeq, LastEvent: optTime(st.LastEvent),
		Backlog: st.Backlog, Units: st.Units, Shippable: st.Shippable, Failed: st.Failed, Conflicts: st.Conflicts,
		Silent: s.silent(st)}
}

// silent says whether a station has not synced within SilentAfter (or never).
func (s *Server) silent(st central.StationInfo) bool {
	return st.LastSync.IsZero() || s.cfg.Now().Sub(st.LastSync) > s.cfg.SilentAfter
}
