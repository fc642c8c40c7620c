package main

import (
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"provision/inventory"
)

type certStatusJSON struct {
	Serial   string `json:"serial"`
	SHA256   string `json:"sha256"`
	NotAfter string `json:"not_after"`
	Status   string `json:"status"`
}

type eventJSON struct {
	Time    string `json:"time"`
	Step    string `json:"step"`
	Outcome string `json:"outcome"`
	Detail  string `json:"detail"`
}

// unitListJSON is `inventory list --json` and `inventory export --format json`.
type unitListJSON struct {
	Units []unitJSON `json:"units"`
}

// unitJSON is a unit's record: `inventory show --json` (with events), and each unit of `inventory list --json` and
// `inventory export --format json` (without). docs/json.md documents it.
type unitJSON struct {
	Serial       string           `json:"serial"`
	State        inventory.State  `json:"state"`
	FailedStep   string           `json:"failed_step,omitempty"`
	Error        string           `json:"error,omitempty"`
	Operator     string           `json:"operator"`
	Station      string           `json:"station"`
	KeyKind      string           `json:"key_kind,omitempty"`
	PublicSHA256 string           `json:"public_sha256,omitempty"`
	EKCertSHA256 string           `json:"ek_certificate_sha256,omitempty"`
	Updated      string           `json:"updated"`
	Certificates []certStatusJSON `json:"certificates"`
	Attestation  *attestationJSON `json:"attestation,omitempty"`
	Events       []eventJSON      `json:"events,omitempty"`
}

// attestationRecord is an attest run as inventory show --json and attest verify --json print it.
func attestationRecord(a inventory.Attestation) attestationJSON {
	return attestationJSON{Status: a.Status, Outcome: a.Outcome, EKSHA256: a.EKSHA256, EKCertSHA256: a.EKCertSHA256,
		EKIssuer: a.EKIssuer, TPMManufacturer: a.TPMManufacturer, Policy: a.Policy, Cause: a.Cause, Warnings: a.Warnings,
		Time: fmtTime(a.Time)}
}

// attestationJSON is the unit's latest attest run (docs/json.md): absent for units never attested.
type attestationJSON struct {
	Status          string   `json:"status"` // trusted | untrusted | absent | off | soft
	Outcome         string   `json:"outcome"`
	EKSHA256        string   `json:"ek_sha256,omitempty"`
	EKCertSHA256    string   `json:"ek_certificate_sha256,omitempty"`
	EKIssuer        string   `json:"ek_issuer,omitempty"`
	TPMManufacturer string   `json:"tpm_manufacturer,omitempty"`
	Policy          string   `json:"policy"`
	Cause           string   `json:"cause,omitempty"`
	Warnings        []string `json:"warnings,omitempty"`
	Time            string   `json:"time"`
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}

func newInventoryCmd(g *globals) *cobra.Command {
	c := groupCmd(&cobra.Command{
		Use:   "inventory",
		Short: "List, show and export the units the station has provisioned",
	})
	c.AddCommand(newInventoryListCmd(g), newInventoryShowCmd(g), newInventoryExportCmd(g))
	return c
}

func validState(s string) bool {
	switch inventory.State(s) {
	case "", inventory.StateNew, inventory.StateKeyed, inventory.StateCertified, inventory.StateImaged, inventory.StateVerified,
		inventory.StateShippable, inventory.StateFailed, inventory.StateReturned:
		return true
	}
	return false
}

func newInventoryListCmd(g *globals) *cobra.Command {
	var state string
	var asJSON bool
	c := &cobra.Command{
		Use:   "list [--state S] [--json]",
		Short: "One line per unit: serial, state, failed step, operator, last change",
		Long: `list prints one line per unit (serial, state, failed step, operator, last change), in serial order.
--json prints one JSON document {"units":[...]}: each unit with the fields of "inventory show --json" except its
events (serial, state, failed_step, error, operator, station, key_kind, public_sha256, ek_certificate_sha256, updated,
certificates), in serial order. An empty inventory prints {"units":[]}.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if !validState(state) {
				return usagef("inventory list: --state %q: use new, keyed, certified, imaged, verified, shippable or failed", state)
			}
			recs, err := unitRecords(g, cmd, state)
			if err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(g.stdout).Encode(unitListJSON{Units: recs})
			}
			tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SERIAL\tSTATE\tFAILED STEP\tOPERATOR\tUPDATED")
			for _, r := range recs {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.Serial, r.State, r.FailedStep, r.Operator, r.Updated)
			}
			return tw.Flush()
		},
	}
	c.Flags().StringVar(&state, "state", "", "only units in this state")
	c.Flags().BoolVar(&asJSON, "json", false, `print {"units":[...]} as one JSON document`)
	return c
}

// unitRecords opens the station and reads every unit (in state, when not empty) with its certificates, in serial order.
func unitRecords(g *globals, cmd *cobra.Command, state string) ([]unitJSON, error) {
	st, err := g.openStation(cmd.Context())
	if err != nil {
		return nil, err
	}
	defer st.Exit() // one-shot command: see Station.Exit
	units, err := st.Inv.Units(cmd.Context(), inventory.State(state))
	if err != nil {
		return nil, err
	}
	recs := make([]unitJSON, 0, len(units))
	for _, u := range units {
		rec, err := unitRecord(g, cmd, st.Inv, u, false)
		if err != nil {
			return nil, err
		}
		recs = append(recs, rec)
	}
	return recs, nil
}

func unitRecord(g *globals, cmd *cobra.Command, inv *inventory.DB, u inventory.Unit, withEvents bool) (unitJSON, error) {
	ctx := cmd.Context()
	out := unitJSON{Serial: u.Serial, State: u.State, FailedStep: u.FailedStep, Error: u.Error, Operator: u.Operator,
		Station: u.Station, KeyKind: u.KeyKind, PublicSHA256: u.PublicSHA256, EKCertSHA256: u.EKCertSHA256,
		Updated: fmtTime(u.Updated), Certificates: []certStatusJSON{}}
	certs, err := inv.Certificates(ctx, u.Serial)
	if err != nil {
		return out, err
	}
	for _, c := range certs {
		out.Certificates = append(out.Certificates, certStatusJSON{c.Serial, c.SHA256, fmtTime(c.NotAfter), c.Status})
	}
	a, err := inv.Attestation(ctx, u.Serial)
	switch {
	case err == nil:
		rec := attestationRecord(a)
		out.Attestation = &rec
	case !errors.Is(err, inventory.ErrNotFound):
		return out, err
	}
	if withEvents {
		events, err := inv.Events(ctx, u.Serial)
		if err != nil {
			return out, err
		}
		out.Events = []eventJSON{}
		for _, e := range events {
			out.Events = append(out.Events, eventJSON{fmtTime(e.Time), e.Step, e.Outcome, e.Detail})
		}
	}
	return out, nil
}

func newInventoryShowCmd(g *globals) *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "show SERIAL [--json]",
		Short: "A unit's record: state, certificates (active, superseded, revoked) and its event history",
		Args: func(c *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usagef("inventory show: give one serial")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := g.openStation(cmd.Context())
			if err != nil {
				return err
			}
			defer st.Exit() // one-shot command: see Station.Exit
			u, err := st.Inv.Unit(cmd.Context(), args[0])
			if errors.Is(err, inventory.ErrNotFound) {
				return &exitError{code: exitRefused, err: fmt.Errorf("inventory show: no unit %q in %s: check the serial, or --station", args[0], st.Inv.Path())}
			}
			if err != nil {
				return err
			}
			rec, err := unitRecord(g, cmd, st.Inv, u, true)
			if err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(g.stdout).Encode(rec)
			}
			w := g.stdout
			fmt.Fprintf(w, "unit      %s\nstate     %s", rec.Serial, rec.State)
			if rec.FailedStep != "" {
				fmt.Fprintf(w, " (at %s: %s)", rec.FailedStep, rec.Error)
			}
			fmt.Fprintf(w, "\noperator  %s\nstation   %s\nkey       %s %s\n", rec.Operator, rec.Station, rec.KeyKind, rec.PublicSHA256)
			if rec.EKCertSHA256 != "" {
				fmt.Fprintf(w, "EK cert   %s\n", rec.EKCertSHA256)
			}
			if a := rec.Attestation; a != nil {
				fmt.Fprintf(w, "attest    %s (%s, policy %s)", a.Status, a.Outcome, a.Policy)
				if a.EKSHA256 != "" {
					fmt.Fprintf(w, " EK %s", a.EKSHA256)
				}
				if a.TPMManufacturer != "" {
					fmt.Fprintf(w, " TPM %s", a.TPMManufacturer)
				}
				if a.Cause != "" {
					fmt.Fprintf(w, ": %s", a.Cause)
				}
				fmt.Fprintln(w)
				for _, warn := range a.Warnings {
					fmt.Fprintf(w, "          warning: %s\n", warn)
				}
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "\nCERTIFICATE\tSTATUS\tNOT AFTER\tSHA-256")
			for _, c := range rec.Certificates {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Serial, c.Status, c.NotAfter, c.SHA256)
			}
			fmt.Fprintln(tw, "\nTIME\tSTEP\tOUTCOME\tDETAIL")
			for _, e := range rec.Events {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", e.Time, e.Step, e.Outcome, e.Detail)
			}
			return tw.Flush()
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print the record as JSON")
	return c
}

func newInventoryExportCmd(g *globals) *cobra.Command {
	var format, state string
	c := &cobra.Command{
		Use:   "export --format csv|json",
		Short: "Every unit with its certificates, for ERP/MES import or an auditor",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if format != "csv" && format != "json" {
				return usagef("inventory export: --format %q: use csv or json", format)
			}
			if !validState(state) {
				return usagef("inventory export: --state %q is not a unit state", state)
			}
			recs, err := unitRecords(g, cmd, state)
			if err != nil {
				return err
			}
			if format == "json" {
				enc := json.NewEncoder(g.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(unitListJSON{Units: recs})
			}
			w := csv.NewWriter(g.stdout)
			w.Write([]string{"serial", "state", "failed_step", "operator", "station", "key_kind", "public_sha256",
				"ek_certificate_sha256", "certificate_serial", "certificate_sha256", "not_after", "updated",
				"attestation", "ek_sha256", "ek_issuer", "tpm_manufacturer"})
			for _, r := range recs {
				var active certStatusJSON
				for _, c := range r.Certificates {
					if c.Status == inventory.CertActive {
						active = c
					}
				}
				var att attestationJSON
				if r.Attestation != nil {
					att = *r.Attestation
				}
				w.Write([]string{r.Serial, string(r.State), r.FailedStep, r.Operator, r.Station, r.KeyKind, r.PublicSHA256,
					r.EKCertSHA256, active.Serial, active.SHA256, active.NotAfter, r.Updated,
					att.Status, att.EKSHA256, att.EKIssuer, att.TPMManufacturer})
			}
			w.Flush()
			return w.Error()
		},
	}
	c.Flags().StringVar(&format, "format", "csv", "csv (one row per unit, its active certificate) or json (every certificate)")
	c.Flags().StringVar(&state, "state", "", "only units in this state")
	return c
}
