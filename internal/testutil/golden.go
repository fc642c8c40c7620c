package testutil

import (
	"context"
	"path/filepath"
	"testing"

	"provision/image/golden"
)

// GoldenImage builds a golden disk image with the given options in a temp dir, after requiring golden.Tools and the
// extra tools the test needs besides.
func GoldenImage(tb testing.TB, o golden.Options, extraTools ...string) string {
	tb.Helper()
	RequireTool(tb, append(append([]string(nil), golden.Tools...), extraTools...)...)
	p := filepath.Join(tb.TempDir(), "golden.img")
	if err := golden.Build(context.Background(), p, o); err != nil {
		tb.Fatal(err)
	}
	return p
}
