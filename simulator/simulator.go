// Package simulator provides the in-process TPM the binary offers as `--tpm sim` and the demo uses: the Microsoft
// reference simulator (go-tpm-tools), manufactured like a real TPM with an EK certificate from a fixed test root
// (EKRoot). Test helpers (swtpm processes, stalling TPMs, brokers) live in internal/testutil.
package simulator

import (
	"fmt"

	"github.com/google/go-tpm/tpm2/transport"
	gotpmsim "github.com/google/go-tpm/tpm2/transport/simulator"
)

// Open starts the in-process simulator, a fresh TPM with its own random seeds, and writes its EK certificate (signed
// by EKRoot) into NV. Only one runs per process at a time: a second Open blocks until the first is closed. Its keys
// die with it.
func Open() (transport.TPMCloser, error) {
	t, err := gotpmsim.OpenSimulator()
	if err != nil {
		return nil, err
	}
	if err := manufacture(t); err != nil {
		t.Close()
		return nil, fmt.Errorf("simulator: manufacture: %w", err)
	}
	return t, nil
}
