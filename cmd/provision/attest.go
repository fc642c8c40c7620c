package main

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"provision/inventory"
	"provision/station"
)

// attestVerifyJSON is `attest verify --json` (docs/json.md).
type attestVerifyJSON struct {
	Serial      string          `json:"serial"`
	Verified    bool            `json:"verified"`
	Attestation attestationJSON `json:"attestation"`
	Recomputed  string          `json:"recomputed_status,omitempty"` // the status the evidence gives with today's roots
	Problems    []string        `json:"problems"`
}

func newAttestCmd(g *globals) *cobra.Command {
	c := groupCmd(&cobra.Command{
		Use:   "attest",
		Short: "Genuine-TPM evidence of the units: re-verify it offline",
		Long: `The attest step (after key) proves a unit's key lives in a genuine TPM: its EK certificate chains to a TPM vendor
root, the TPM activates a credential sealed to its EK for a fresh attestation key, and certifies the device key with
it. The evidence is kept in the inventory (table attestations); attest verify re-checks it without the unit.`,
	})
	var asJSON bool
	verify := &cobra.Command{
		Use:   "verify SERIAL [--json]",
		Short: "Re-check a unit's stored attestation evidence offline: exit 1 on any mismatch or unparseable evidence",
		Long: `verify re-checks the unit's latest attestation: the EK certificate certifies the EK the TPM used; the attestation key
was activated with that EK; the TPM2_Certify of the device key verifies with the attestation key (magic, type, nonce,
the device key's Name, signature, fixedTPM/fixedParent/sensitiveDataOrigin) and names the key recorded for the unit;
the EK certificate chains, at the time of the attestation, to the stored chain and the station's roots (built in,
tpm_roots, --tpm-roots); the evidence is the one the audit log's attest entry names. It writes nothing.

Exit 0: it verifies. Exit 1: a mismatch or unparseable evidence (each problem is printed). Exit 3: no such unit, or a
unit never attested.`,
		Args: func(c *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usagef("attest verify: give one serial")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := g.openStation(cmd.Context())
			if err != nil {
				return err
			}
			defer st.Exit() // one-shot command: see Station.Exit
			rep, err := st.VerifyAttestation(cmd.Context(), args[0])
			if errors.Is(err, inventory.ErrNotFound) {
				return &exitError{code: exitRefused, err: fmt.Errorf("attest verify: %s has no attestation in %s: check the serial, or --station", args[0], st.Inv.Path())}
			}
			if err != nil && !errors.Is(err, station.ErrAttestation) {
				return err
			}
			a := rep.Attestation
			if asJSON {
				out := attestVerifyJSON{Serial: rep.Serial, Verified: err == nil, Recomputed: rep.Check.Status, Problems: rep.Problems,
					Attestation: attestationJSON{Status: a.Status, Outcome: a.Outcome, EKSHA256: a.EKSHA256, EKCertSHA256: a.EKCertSHA256,
						EKIssuer: a.EKIssuer, TPMManufacturer: a.TPMManufacturer, Policy: a.Policy, Cause: a.Cause, Warnings: a.Warnings,
						Time: fmtTime(a.Time)}}
				if out.Problems == nil {
					out.Problems = []string{}
				}
				if jerr := json.NewEncoder(g.stdout).Encode(out); jerr != nil {
					return jerr
				}
			} else {
				for _, p := range rep.Problems {
					fmt.Fprintf(g.stdout, "✗ %s\n", p)
				}
				if err == nil {
					fmt.Fprintf(g.stdout, "✓ %s: attestation %s verifies (EK %.16s", rep.Serial, a.Status, a.EKSHA256)
					if a.EKIssuer != "" {
						fmt.Fprintf(g.stdout, ", issued by %s", a.EKIssuer)
					}
					fmt.Fprintln(g.stdout, ")")
					if rep.Check.Status != "" && rep.Check.Status != a.Status {
						fmt.Fprintf(g.stdout, "! with today's roots the evidence would be %s: %s\n", rep.Check.Status, rep.Check.Cause)
					}
				}
			}
			if err != nil {
				return &exitError{code: exitFailed, err: fmt.Errorf("attest verify: %w", err)}
			}
			return nil
		},
	}
	verify.Flags().BoolVar(&asJSON, "json", false, "print the verdict as JSON")
	c.AddCommand(verify)
	return c
}
