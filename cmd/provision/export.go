package main

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"provision/export"
	"provision/internal/fsutil"
	"provision/station"
)

// newExportCmd is `provision export`: the hand-off of the station's units to a fleet backend (docs/exports.md).
func newExportCmd(g *globals) *cobra.Command {
	var format, serial, since, out, bundles, batch string
	var fromCentral bool
	c := &cobra.Command{
		Use:   "export --format mender|aws|azure|manifest [--serial S | --since DATE] [--central [--batch ID]] [--out FILE]",
		Short: "Hand the units off to a fleet backend: Mender, AWS IoT, Azure DPS, or a signed manifest",
		Long: `export writes the station's certified and shippable units (each with its active certificate) in a fleet
backend's import format, from the local inventory, without network access (docs/exports.md), or with --central the
units of every station from the central store named in station.yaml (central: dsn):
  mender     JSON Lines: one preauthorization body per unit for POST /api/management/v2/devauth/devices
             ({"identity_data":{"serial":...},"pubkey":"-----BEGIN PUBLIC KEY-----..."})
  aws        JSON Lines: one AWS IoT bulk registration line per unit (ThingName, SerialNumber, CertificatePem,
             CACertificatePem = the station's issuing CA, which register-ca-certificate registers once)
  azure      JSON Lines: one Azure DPS individual enrollment per unit (TPM attestation with the EK public area where
             the attestation evidence holds an RSA EK, else X.509 attestation with the device certificate)
  manifest   JSON of the units, with a detached Ed25519 signature FILE.sig (raw 64 bytes) by the station audit key:
             openssl pkeyutl -verify -pubin -inkey ca/audit.pub -rawin -in FILE -sigfile FILE.sig
--serial exports one unit (exit 3 when the inventory has no such exportable unit); --since DATE (RFC 3339, or
YYYY-MM-DD in UTC) exports the units changed at or after it. --out FILE is written atomically (mode 0644; the manifest
needs it); without it the output goes to stdout. Certificates come from the inventory, or from enroll bundles under
--bundles DIR (DIR/<serial>/device.crt, used only when it is the inventory's active certificate). A unit a format cannot
export (no certificate copy, no public key) is left out and named on stderr: exit 1, with the others written.
--central: --batch ID narrows the export to a distributed batch's units (batch --central); the manifest is signed by
this station's audit key (it states what this station exported); aws leaves out units whose certificate another
issuing CA signed (export them at their station); certificates pushed before the store kept them have no copy there.
The store unreachable or not initialised: exit 4.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if !slices.Contains(export.Formats, format) {
				return usagef("export: --format %q: use %s", format, strings.Join(export.Formats, ", "))
			}
			if serial != "" && since != "" {
				return usagef("export: give --serial or --since, not both")
			}
			if batch != "" && !fromCentral {
				return usagef("export: --batch needs --central: distributed batches are in the central store")
			}
			if batch != "" && serial != "" {
				return usagef("export: give --serial or --batch, not both")
			}
			if format == "manifest" && out == "" {
				return usagef("export: --format manifest needs --out FILE: its signature is written to FILE.sig")
			}
			opt := station.ExportOptions{Serial: serial, Batch: batch, BundlesDir: bundles}
			if since != "" {
				t, err := parseSince(since)
				if err != nil {
					return usagef("export: --since %q: use RFC 3339 (2026-12-01T00:00:00Z) or a date (2026-12-01)", since)
				}
				opt.Since = t
			}
			st, err := g.openStation(cmd.Context())
			if err != nil {
				return err
			}
			defer st.Exit() // one-shot command: see Station.Exit
			units, err := exportUnits(cmd.Context(), st, opt, fromCentral)
			if err != nil {
				return err
			}
			if format == "manifest" {
				doc, sig, err := st.ExportManifest(units, time.Now())
				if err != nil {
					return err
				}
				if err := writeOutput(g, out, doc); err != nil {
					return err
				}
				return writeOutput(g, out+".sig", sig)
			}
			var caPEM []byte
			var foreign []export.Skipped
			total := len(units)
			if format == "aws" {
				if caPEM, err = st.IssuingCertPEM(); err != nil {
					return err
				}
				if fromCentral {
					if units, foreign, err = st.IssuedHere(units); err != nil {
						return err
					}
				}
			}
			var buf bytes.Buffer
			skipped, err := export.Write(&buf, format, units, caPEM)
			if err != nil {
				return err
			}
			if err := writeOutput(g, out, buf.Bytes()); err != nil {
				return err
			}
			hint := ""
			switch {
			case bundles != "", len(skipped) == 0: // no hint: no unit was left out for want of a certificate copy
			case fromCentral:
				hint = " (certificates the central store holds no copy of: --bundles DIR)"
			default:
				hint = " (certificates from enroll bundles: --bundles DIR)"
			}
			return skippedError(format, total, append(foreign, skipped...), hint)
		},
	}
	c.Flags().StringVar(&format, "format", "", "mender, aws, azure or manifest")
	c.Flags().StringVar(&serial, "serial", "", "export this unit only")
	c.Flags().StringVar(&since, "since", "", "export the units changed at or after this time (RFC 3339 or YYYY-MM-DD, UTC)")
	c.Flags().StringVar(&out, "out", "", "write to FILE (atomically, mode 0644) instead of stdout; the manifest's signature goes to FILE.sig")
	c.Flags().StringVar(&bundles, "bundles", "", "take certificates from the enroll bundles in DIR (DIR/<serial>/device.crt)")
	c.Flags().BoolVar(&fromCentral, "central", false, "export the units of every station from the central store (station.yaml central: dsn)")
	c.Flags().StringVar(&batch, "batch", "", "with --central: export the units of this distributed batch (its id, batch-…)")
	return c
}

// exportUnits gathers the units to export: from the local inventory, or every station's from the central store.
func exportUnits(ctx context.Context, st *station.Station, opt station.ExportOptions, fromCentral bool) ([]export.Unit, error) {
	if !fromCentral {
		return st.ExportUnits(ctx, opt)
	}
	if !st.HasCentral() {
		return nil, usagef("export --central: no central store: set central: dsn in station.yaml")
	}
	store, err := st.CentralStore(ctx)
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	return st.ExportCentralUnits(ctx, store, opt)
}

// parseSince reads --since: RFC 3339, or a date taken as midnight UTC.
func parseSince(s string) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	return time.Parse(time.DateOnly, s)
}

// writeOutput writes data to stdout, or to path atomically (temp file, sync, rename) with mode 0644.
func writeOutput(g *globals, path string, data []byte) error {
	if path == "" {
		_, err := g.stdout.Write(data)
		return err
	}
	if err := fsutil.WriteFileSync(path, data, 0o644); err != nil {
		return fmt.Errorf("export: write %s: %w", path, err)
	}
	return nil
}

// skippedError is exit 1 naming the units a format left out (one line: the first three with their reason), then hint
// (where certificates can come from).
func skippedError(format string, total int, skipped []export.Skipped, hint string) error {
	if len(skipped) == 0 {
		return nil
	}
	var why []string
	for i, s := range skipped {
		if i == 3 {
			why = append(why, fmt.Sprintf("and %d more", len(skipped)-3))
			break
		}
		why = append(why, s.String())
	}
	return &exitError{code: exitFailed, err: fmt.Errorf("export %s: %d of %d units left out (the others are written): %s%s",
		format, len(skipped), total, strings.Join(why, "; "), hint)}
}
