package station

import (
	"os"
	"testing"

	"provision/internal/testutil"
)

// TestMain lets the test binary stand in the middle of a cmd: TPM pipe (testutil.RunPipeMiddle) when a test starts it
// so; otherwise it runs the tests.
func TestMain(m *testing.M) {
	if os.Getenv(testutil.PipeMiddleEnv) != "" {
		os.Exit(testutil.RunPipeMiddle(os.Args[1:]))
	}
	os.Exit(m.Run())
}
