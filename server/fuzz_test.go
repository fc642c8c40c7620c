package server

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"unicode/utf8"
)

// FuzzUnitsQuery feeds /api/units arbitrary query strings: the parser either refuses them or returns a filter within
// the documented bounds, and the handler answers 200 or a 400 JSON error (always 400 for a malformed query string).
func FuzzUnitsQuery(f *testing.F) {
	for _, seed := range []string{"", "state=shippable", "station=line1-a&q=SN-00&limit=2", "limit=1000", "limit=1001",
		"limit=-1", "limit=0x10", "after=SN-0002&limit=2", "q=SN%2F1", "q=%ff", "state=&station=&q=&limit=", "a=b", "q=a&q=b",
		"limit=%201", "q=%zz&limit=5", "q=a;limit=5", "station=" + string(make([]byte, 70))} {
		f.Add(seed)
	}
	s, err := New(newFake(), Config{})
	if err != nil {
		f.Fatal(err)
	}
	h := s.Handler()
	f.Fuzz(func(t *testing.T, raw string) {
		v, perr := url.ParseQuery(raw)
		if perr == nil {
			if flt, err := unitsQuery(v); err == nil {
				if flt.Limit < 1 || flt.Limit > MaxLimit || !utf8.ValidString(flt.Q+flt.State+flt.Station+flt.After) ||
					(flt.Q != "" && !validSerial(flt.Q)) || (flt.Station != "" && !validStation(flt.Station)) {
					t.Fatalf("%q: accepted out of bounds: %+v", raw, flt)
				}
			}
		}
		req := httptest.NewRequest("GET", "/api/units", nil)
		req.URL.RawQuery = raw
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		var e struct{ Error string }
		switch rec.Code {
		case http.StatusOK:
			if perr != nil {
				t.Fatalf("%q: a malformed query string was accepted", raw)
			}
		case http.StatusBadRequest:
			if json.Unmarshal(rec.Body.Bytes(), &e) != nil || e.Error == "" {
				t.Fatalf("%q: 400 without a JSON error: %s", raw, rec.Body)
			}
		default:
			t.Fatalf("%q: status %d", raw, rec.Code)
		}
	})
}
