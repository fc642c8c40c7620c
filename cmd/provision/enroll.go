package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"provision/inventory"
	"provision/station"
)

type keyJSON struct {
	Kind         string `json:"kind"`
	PublicSHA256 string `json:"public_sha256"`
}

type certJSON struct {
	Serial   string `json:"serial"`
	SHA256   string `json:"sha256"`
	NotAfter string `json:"not_after"`
}

type enrollJSON struct {
	Serial       string          `json:"serial"`
	State        inventory.State `json:"state"`
	Key          *keyJSON        `json:"key,omitempty"`
	Certificate  *certJSON       `json:"certificate,omitempty"`
	EKCertSHA256 string          `json:"ek_certificate_sha256"`
	Bundle       string          `json:"bundle"`
	Error        string          `json:"error,omitempty"`
}

const rfc3339 = "2006-01-02T15:04:05Z"

func toEnrollJSON(r station.EnrollResult) enrollJSON {
	out := enrollJSON{Serial: r.Serial, State: r.State, EKCertSHA256: r.EKCertSHA256, Bundle: r.Bundle}
	if r.PublicSHA256 != "" {
		out.Key = &keyJSON{Kind: r.KeyKind, PublicSHA256: r.PublicSHA256}
	}
	if r.Certificate != nil && r.Err == nil {
		out.Certificate = &certJSON{Serial: station.CertSerial(r.Certificate), SHA256: r.CertSHA256,
			NotAfter: r.Certificate.NotAfter.UTC().Format(rfc3339)}
	}
	if r.Err != nil {
		out.Error = r.Err.Error()
	}
	return out
}

func newEnrollCmd(g *globals) *cobra.Command {
	var (
		serial, serials, tpmURI, out, operator string
		asJSON, reprovision                    bool
	)
	c := &cobra.Command{
		Use:   "enroll (--serial S | --serials FILE)",
		Short: "Create a unit's key in its TPM and have the station CA certify it",
		Long: `enroll creates each unit's private key inside its TPM (or in software with --tpm soft), builds a CSR signed by
that key, has the station's CA sign it and writes the bundle OUT/<serial>/:
  device.crt        the unit's certificate (client auth, CN and SAN URI urn:dev:serial:<serial>)
  chain.crt         issuing CA then root
  ca.crt            the root CA
  device.tss2.pem   the TPM key file (loads only on the TPM that made it), or
  device.key        the software key (mode 0600; the only copy: the station keeps none)

--serials FILE enrolls a list in one process: one serial per line (# comments), or CSV with a "serial" column whose
other columns fill {name} placeholders in the subject. The whole file is checked first: any bad line is exit 2 and
nothing is written. With --json a single unit prints one object, a list one object per line.

A unit holding an active certificate is refused (exit 3) unless --reprovision; the old certificate is then marked
superseded. A unit whose earlier enroll failed or was interrupted is simply enrolled again.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if (serial == "") == (serials == "") {
				return usagef("enroll: give exactly one of --serial or --serials")
			}
			s, err := g.openSession(ctx, "enroll")
			if err != nil {
				return err
			}
			defer s.close()
			var units []station.UnitRequest
			if serial != "" {
				if err := s.checkSerial(serial); err != nil {
					return err
				}
				units = []station.UnitRequest{{Serial: serial}}
			} else {
				f, err := os.Open(serials)
				if err != nil {
					return usagef("enroll: --serials: %v", err)
				}
				units, err = station.ParseSerialList(serials, f, s.st.Config.SerialRule())
				f.Close()
				if err != nil {
					return fmt.Errorf("enroll: %w", err)
				}
			}
			if len(units) == 1 {
				s.serial = units[0].Serial // fills {serial} in a cmd: TPM URI
			}
			if err := s.openUnit(ctx, tpmURI, s.st.Config.TPM, nil); err != nil {
				return err
			}
			start := time.Now()
			results, fatal := s.st.Enroll(ctx, s.dev, units, station.EnrollOptions{OutDir: out, Reprovision: reprovision, Operator: operatorName(operator)})
			took := time.Since(start)
			syncAfterUnit(ctx, g, s.st)
			return g.reportEnroll(results, fatal, len(units), took, asJSON)
		},
	}
	f := c.Flags()
	f.StringVar(&serial, "serial", "", "the unit's serial")
	f.StringVar(&serials, "serials", "", "a file listing serials (one per line, or CSV with a serial column)")
	f.StringVar(&tpmURI, "tpm", "", "the unit's TPM: /dev/tpmrm0, mssim://HOST:PORT, cmd:COMMAND, sim or soft (default: station.yaml)")
	f.StringVar(&out, "out", "bundles", "write bundles to OUT/<serial>/")
	f.StringVar(&operator, "operator", "", "operator recorded with the unit (default $PROVISION_OPERATOR, else the user name)")
	f.BoolVar(&reprovision, "reprovision", false, "replace the certificate of a unit that holds an active one")
	f.BoolVar(&asJSON, "json", false, "print results as JSON")
	return c
}

func (g *globals) reportEnroll(results []station.EnrollResult, fatal error, total int, took time.Duration, asJSON bool) error {
	failed, refused := 0, 0
	enc := json.NewEncoder(g.stdout)
	for _, r := range results {
		switch {
		case errors.Is(r.Err, station.ErrRefused):
			refused++
		case r.Err != nil:
			failed++
		}
		if asJSON {
			if err := enc.Encode(toEnrollJSON(r)); err != nil {
				return err
			}
			continue
		}
		if r.Err != nil {
			if total > 1 { // a single unit's error is the one line on stderr
				fmt.Fprintf(g.stdout, "✗ %s  %s\n", r.Serial, r.Err)
			}
			continue
		}
		fmt.Fprintf(g.stdout, "✓ %s  %s  %s key  certificate %s  → %s\n", r.Serial, r.State, r.KeyKind,
			station.CertSerial(r.Certificate), r.Bundle)
	}
	if total > 1 && !asJSON {
		fmt.Fprintf(g.stdout, "%d of %d units enrolled (%d failed, %d refused) in %s\n", len(results)-failed-refused, total,
			failed, refused, took.Round(time.Millisecond))
	}
	if fatal != nil {
		return fatal
	}
	// One unit: its own error is the message. Several: the lines above said it all.
	if total == 1 && len(results) == 1 && results[0].Err != nil {
		return results[0].Err
	}
	switch {
	case failed > 0:
		return &exitError{code: exitFailed}
	case refused > 0:
		return &exitError{code: exitRefused}
	}
	return nil
}
