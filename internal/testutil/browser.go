package testutil

import (
	"context"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// Browser starts a headless Chromium for the test (no sandbox: the tests run as root) and returns a tab's context;
// both end at cleanup. A missing chromium skips the test, or fails it under CI (RequireTool).
func Browser(tb testing.TB) context.Context {
	tb.Helper()
	RequireTool(tb, "chromium")
	path, err := exec.LookPath("chromium")
	if err != nil {
		tb.Fatal(err)
	}
	// Not tb.TempDir: Chromium's helper processes can still write there for a moment after the browser stops, and
	// the test would fail on "directory not empty".
	dir, err := os.MkdirTemp("", "provision-chromium-")
	if err != nil {
		tb.Fatal(err)
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(path), chromedp.NoSandbox,
		chromedp.Headless, chromedp.DisableGPU, chromedp.UserDataDir(dir), chromedp.WindowSize(1280, 900))
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelTab := chromedp.NewContext(actx, chromedp.WithErrorf(tb.Logf))
	tb.Cleanup(func() {
		cancelTab()
		cancelAlloc()
		for range 50 {
			if os.RemoveAll(dir) == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	if err := chromedp.Do(ctx); err != nil { // start the browser without a deadline: a deadline would stop it
		tb.Fatalf("start chromium: %v", err)
	}
	return ctx
}
