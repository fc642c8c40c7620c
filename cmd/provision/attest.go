package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"provision/inventory"
	"provision/station"
	"provision/tpm/attest"
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
				return noAttestation("attest verify", args[0], st)
			}
			if err != nil && !errors.Is(err, station.ErrAttestation) {
				return err
			}
			a := rep.Attestation
			if asJSON {
				out := attestVerifyJSON{Serial: rep.Serial, Verified: err == nil, Recomputed: rep.Check.Status, Problems: rep.Problems,
					Attestation: attestationRecord(a)}
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
				if err == nil && (a.Status == inventory.AttestOff || a.Status == inventory.AttestSoft) {
					fmt.Fprintf(g.stdout, "✓ %s: attestation %s: no TPM evidence to verify\n", rep.Serial, a.Status)
				} else if err == nil {
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
	c.AddCommand(verify, newAttestExportCmd(g))
	return c
}

// noAttestation is exit 3 for a serial without attestation: not in the inventory, or never attested.
func noAttestation(cmd, serial string, st *station.Station) error {
	return &exitError{code: exitRefused, err: fmt.Errorf("%s: %s has no attestation in %s: check the serial (a unit "+
		"provisioned before attestation, or not yet past its key step, has none), or --station", cmd, serial, st.Inv.Path())}
}

// newAttestExportCmd writes a unit's evidence as files other tools read: tpm2_print, openssl.
func newAttestExportCmd(g *globals) *cobra.Command {
	var out string
	c := &cobra.Command{
		Use:   "export SERIAL --out DIR",
		Short: "Write a unit's attestation evidence as files for other tools (tpm2_print, openssl)",
		Long: `export writes the unit's latest attestation evidence into DIR (created, 0755; files 0644, none is secret):

  evidence.json       the evidence as stored
  ek.crt              the EK certificate (PEM), chain.crt the chain stored with it (PEM), when there is one
  ek.pub.pem          the EK public key (PKIX PEM)
  ak.pub              the attestation key's TPMT_PUBLIC (binary), ak.pem its public key (PKIX PEM)
  certify.attest      the TPMS_ATTEST the AK signed (tpm2_print -t TPMS_ATTEST certify.attest)
  certify.sig         its TPMT_SIGNATURE (binary); certify.sig.der the signature as DER (ECDSA-Sig-Value)
  device.pub          the device key's TPMT_PUBLIC (binary)

Check the certify signature with OpenSSL alone:
  openssl dgst -sha256 -verify ak.pem -signature certify.sig.der certify.attest`,
		Args: func(c *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usagef("attest export: give one serial")
			}
			if out == "" {
				return usagef("attest export: --out DIR is required")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := g.openStation(cmd.Context())
			if err != nil {
				return err
			}
			defer st.Exit() // one-shot command: see Station.Exit
			a, err := st.Inv.Attestation(cmd.Context(), args[0])
			if errors.Is(err, inventory.ErrNotFound) {
				return noAttestation("attest export", args[0], st)
			}
			if err != nil {
				return err
			}
			if len(a.Evidence) == 0 {
				return &exitError{code: exitFailed, err: fmt.Errorf("attest export: %s: no evidence (attestation %s)", args[0], a.Status)}
			}
			files, err := attest.ExportFiles(a.Evidence)
			if err != nil {
				return &exitError{code: exitFailed, err: fmt.Errorf("attest export: %s: %w", args[0], err)}
			}
			if err := os.MkdirAll(out, 0o755); err != nil {
				return fmt.Errorf("attest export: %w", err)
			}
			names := slices.Sorted(maps.Keys(files))
			for _, name := range names {
				if err := os.WriteFile(filepath.Join(out, name), files[name], 0o644); err != nil {
					return fmt.Errorf("attest export: %w", err)
				}
			}
			fmt.Fprintf(g.stdout, "%s: %s\n", out, strings.Join(names, " "))
			return nil
		},
	}
	c.Flags().StringVar(&out, "out", "", "directory to write the files into")
	return c
}
