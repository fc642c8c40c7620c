package server

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/emulation"
	"github.com/chromedp/chromedp"

	"provision/internal/testutil"
)

// text is the visible text of the first element sel matches.
func text(t *testing.T, ctx context.Context, sel string) string {
	t.Helper()
	s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
	if err != nil {
		t.Fatalf("text of %s: %v", sel, err)
	}
	return s
}

// wantText checks the text of sel holds each of wants.
func wantText(t *testing.T, ctx context.Context, sel string, wants ...string) {
	t.Helper()
	s := text(t, ctx, sel)
	for _, w := range wants {
		if !strings.Contains(s, w) {
			t.Errorf("%s lacks %q:\n%s", sel, w, s)
		}
	}
}

// tab opens a tab in the browser for one subtest, closed when it ends; its actions time out after 20 s.
func tab(t *testing.T, bctx context.Context) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(bctx, 20*time.Second)
	ctx, cancelTab := chromedp.NewContext(ctx)
	t.Cleanup(func() { cancelTab(); cancel() })
	return ctx
}

// TestDashboardInBrowser drives the dashboard in one headless Chromium, a tab per subtest.
func TestDashboardInBrowser(t *testing.T) {
	bctx := testutil.Browser(t)
	ts := newTestServer(t, newFake(), Config{})

	t.Run("first render", func(t *testing.T) {
		// The stations, their state, the latest unit, the loud conflicts, the charts.
		t.Parallel()
		ctx := tab(t, bctx)
		if err := chromedp.Do(ctx, chromedp.Navigate(ts.URL), chromedp.WaitVisible(chromedp.CSS("#stations"))); err != nil {
			t.Fatal(err)
		}
		wantText(t, ctx, "#stations", "line1-a", "line1-b", "silent", "1 conflict", "30 s ago", "SN-0001")
		wantText(t, ctx, "#recent", "SN-0001")
		wantText(t, ctx, "#conflicts", "SN-0004")
		wantText(t, ctx, "#causes", "handshake: certificate unknown")
		bars, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll("#hours rect[height]:not([height='0'])").length`))
		if err != nil || bars != 2 { // line1-b's two hours add to line1-a's last two
			t.Errorf("units per hour: %d non-empty bars (%v), want 2", bars, err)
		}
		// With scripting on, the polling script refreshes the page, not the <meta refresh>.
		if n, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll('noscript meta').length`)); err != nil || n != 0 {
			t.Errorf("with JavaScript, the meta refresh is in effect too (%d, %v)", n, err)
		}
	})

	t.Run("search", func(t *testing.T) {
		// Type a serial into the box and submit: the unit's history opens.
		t.Parallel()
		ctx := tab(t, bctx)
		if err := chromedp.Do(ctx, chromedp.Navigate(ts.URL), chromedp.SendKeys(chromedp.CSS("#q"), "SN-0001"),
			chromedp.Submit(chromedp.CSS("#q")), chromedp.WaitVisible(chromedp.CSS("#unit"))); err != nil {
			t.Fatal(err)
		}
		if loc, _ := chromedp.Run(ctx, chromedp.Location()); !strings.HasSuffix(loc, "/?q=SN-0001") {
			t.Errorf("location %s, want /?q=SN-0001", loc)
		}
		wantText(t, ctx, "#events", "key", "attest", "csr", "image", "verify", "handshake")
		wantText(t, ctx, "#attestation", "trusted")
		wantText(t, ctx, "#certificates", "7f01", "active")
		// A prefix lists the matching serials.
		if err := chromedp.Do(ctx, chromedp.Navigate(ts.URL+"/?q=SN-000"), chromedp.WaitVisible(chromedp.CSS("#search .results"))); err != nil {
			t.Fatal(err)
		}
		wantText(t, ctx, "#search", "5 serials start with “SN-000”", "SN-0005")
	})

	t.Run("without JavaScript", func(t *testing.T) {
		// The page is complete and the search form works (it submits natively on Enter).
		t.Parallel()
		ctx := tab(t, bctx)
		if err := chromedp.Do(ctx, chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
			_, err := cdp.Call(ctx, t, emulation.SetScriptExecutionDisabled, emulation.SetScriptExecutionDisabledParams{Value: true})
			return err
		}), chromedp.Navigate(ts.URL), chromedp.WaitVisible(chromedp.CSS("#stations")),
			chromedp.SendKeys(chromedp.CSS("#q"), "SN-0001\r"), chromedp.WaitVisible(chromedp.CSS("#unit"))); err != nil {
			t.Fatal(err)
		}
		wantText(t, ctx, "#events", "handshake")
		// With scripting off, <noscript>'s content is markup: the <meta refresh> reloads the page.
		if n, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll('noscript meta[http-equiv="refresh"]').length`)); err != nil || n != 1 {
			t.Errorf("no meta refresh in effect (%d, %v)", n, err)
		}
	})

	t.Run("phone", func(t *testing.T) {
		// Nothing wider than the screen, touch targets at least 44 px high.
		t.Parallel()
		ctx := tab(t, bctx)
		for _, page := range []string{"/", "/?q=SN-0001"} {
			if err := chromedp.Do(ctx, chromedp.EmulateViewport(390, 844, chromedp.EmulateScale(3), chromedp.EmulateMobile),
				chromedp.Navigate(ts.URL+page), chromedp.WaitVisible(chromedp.CSS("#stations"))); err != nil {
				t.Fatal(err)
			}
			fits, err := chromedp.Run(ctx, chromedp.Evaluate[[]float64](
				`[document.documentElement.scrollWidth, window.innerWidth,
				  Math.min(...[...document.querySelectorAll("header input, header button")].map(e => e.getBoundingClientRect().height))]`))
			if err != nil {
				t.Fatal(err)
			}
			if fits[0] > fits[1] {
				t.Errorf("%s: page %v px wide in a %v px screen", page, fits[0], fits[1])
			}
			if fits[2] < 44 {
				t.Errorf("%s: search box or button %v px high, want at least 44", page, fits[2])
			}
		}
	})

	t.Run("polling", func(t *testing.T) {
		// The page refreshes itself (the polling script, allowed by the page's CSP), keeps what is being typed in the
		// search box, and keeps its figures, marked stale, when the store goes down.
		src := newFake()
		ts := newTestServer(t, src, Config{Refresh: time.Second})
		t.Parallel()
		ctx := tab(t, bctx)
		if err := chromedp.Do(ctx, chromedp.Navigate(ts.URL), chromedp.WaitVisible(chromedp.CSS("#stations")),
			chromedp.SendKeys(chromedp.CSS("#q"), "SN-00")); err != nil {
			t.Fatal(err)
		}
		src.setBacklog("line1-b", 4321)
		if err := chromedp.Do(ctx, chromedp.WaitVisible(chromedp.CSS(`[data-station="line1-b"] [data-backlog="4321"]`))); err != nil {
			t.Fatalf("the page did not refresh: %v", err)
		}
		typed, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.getElementById("q").value`))
		if err != nil || typed != "SN-00" {
			t.Errorf("search box after a refresh: %q (%v), want what was typed", typed, err)
		}
		src.down.Store(true)
		if err := chromedp.Do(ctx, chromedp.WaitVisible(chromedp.CSS(".stale-note"))); err != nil {
			t.Fatalf("no stale note after a failed refresh: %v", err)
		}
		wantText(t, ctx, "#stations", "4321")
	})
}
