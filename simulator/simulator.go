// Package simulator provides the in-process TPM the binary offers as `--tpm sim` and the demo uses: the Microsoft
// reference simulator (go-tpm-tools). Test helpers (swtpm processes, stalling TPMs, brokers) live in internal/testutil.
package simulator

import (
	"github.com/google/go-tpm/tpm2/transport"
	gotpmsim "github.com/google/go-tpm/tpm2/transport/simulator"
)

// Open starts the in-process simulator. Only one runs per process at a time: a second Open blocks until the first is
// closed. Its keys die with it.
func Open() (transport.TPMCloser, error) { return gotpmsim.OpenSimulator() }
