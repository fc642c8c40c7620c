package main

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"provision/central"
	"provision/station"
)

func newCentralCmd(g *globals) *cobra.Command {
	c := groupCmd(&cobra.Command{
		Use:   "central",
		Short: "The factory's central store (PostgreSQL) that stations forward their records to",
		Long: `Stations keep writing their own inventory first and forward units, certificates, audit entries and attestation
evidence to the central store named in station.yaml (central: dsn, mode), so the whole factory is one record: a
serial or a TPM taken at one station is refused at the others, and provision serve shows every station. The password
is never in station.yaml or on the command line: set PGPASSWORD or use a pgpass file (~/.pgpass).`,
	})
	var dsn string
	initCmd := &cobra.Command{
		Use:   "init [--dsn DSN]",
		Short: "Create or upgrade the central store's tables (idempotent)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if station.DSNHasPassword(dsn) {
				return usagef("central init: --dsn holds a password, which would show in ps and shell history: remove it and set PGPASSWORD or use a pgpass file (~/.pgpass)")
			}
			if dsn == "" {
				st, err := g.openStation(cmd.Context())
				if err != nil {
					return err
				}
				defer st.Exit() // one-shot command: see Station.Exit
				if dsn = st.Config.Central.DSN; dsn == "" {
					return usagef("central init: no central store: set central: dsn in station.yaml, or give --dsn")
				}
			}
			if err := central.Init(cmd.Context(), dsn); err != nil {
				return fmt.Errorf("central init: %w", err)
			}
			fmt.Fprintln(g.stdout, "✓ central store ready")
			return nil
		},
	}
	initCmd.Flags().StringVar(&dsn, "dsn", "", "the store's connection string, without a password (default: station.yaml central: dsn)")
	c.AddCommand(initCmd)
	return c
}

// syncStatusJSON is `provision sync --status --json` and `provision sync --json` (docs/json.md).
type syncStatusJSON struct {
	Station   string `json:"station"`
	Mode      string `json:"mode"`
	Cursor    int64  `json:"cursor"`
	Head      int64  `json:"head"`
	Backlog   int64  `json:"backlog"`
	LagMS     int64  `json:"lag_ms"` // age of the oldest entry not yet sent; 0 when none
	LastSync  string `json:"last_sync,omitempty"`
	Sent      int    `json:"sent,omitempty"`
	Conflicts int    `json:"conflicts,omitempty"`
	CRL       int64  `json:"crl,omitempty"` // the number of the CRL this sync sent to the store; 0 when none
}

func newSyncCmd(g *globals) *cobra.Command {
	var status, asJSON bool
	c := &cobra.Command{
		Use:   "sync [--status] [--json]",
		Short: "Forward this station's records to the central store now, or show the backlog",
		Long: `sync sends every audit entry the central store has not acknowledged, in order, with the current rows of the units
they touch (their certificates and attestation evidence too). A repeat is a no-op in the store, so a sync that was
killed is simply run again. tui, unit and batch sync in the background; this command is for after an outage, or to
check. --status only reads the local backlog (it needs no network).

Exit 0: everything sent (or --status). Exit 1: conflicts were reported (printed; nothing is overwritten). Exit 4: the
store is unreachable or not initialised.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := g.openStation(cmd.Context())
			if err != nil {
				return err
			}
			defer st.Exit() // one-shot command: see Station.Exit
			if !st.HasCentral() {
				return usagef("sync: no central store: set central: dsn in station.yaml")
			}
			out := syncStatusJSON{Station: st.Config.StationID, Mode: st.Config.Central.CentralMode()}
			var res station.SyncResult
			if !status {
				ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Minute)
				defer cancel()
				if res, err = st.SyncCentral(ctx); err != nil {
					return err
				}
				out.Sent, out.Conflicts, out.CRL = res.Events, len(res.Conflicts), res.CRL
			}
			ss, err := st.SyncStatus(cmd.Context())
			if err != nil {
				return err
			}
			out.Cursor, out.Head, out.Backlog, out.LastSync = ss.Cursor, ss.Head, ss.Backlog, fmtTime(ss.LastSync)
			if !ss.Oldest.IsZero() {
				out.LagMS = time.Since(ss.Oldest).Milliseconds()
			}
			if asJSON {
				if err := json.NewEncoder(g.stdout).Encode(out); err != nil {
					return err
				}
			} else {
				for _, c := range res.Conflicts {
					fmt.Fprintf(g.stdout, "✗ %s\n", conflictLine(c))
				}
				if !status {
					fmt.Fprintf(g.stdout, "sent %d entries\n", res.Events)
					if res.CRL > 0 {
						fmt.Fprintf(g.stdout, "sent CRL number %d\n", res.CRL)
					}
				}
				last := "never"
				if !ss.LastSync.IsZero() {
					last = ss.LastSync.UTC().Format(time.RFC3339)
				}
				fmt.Fprintf(g.stdout, "station %s: %d of %d entries in the central store, backlog %d, last sync %s\n",
					out.Station, ss.Cursor, ss.Head, ss.Backlog, last)
			}
			if len(res.Conflicts) > 0 {
				return &exitError{code: exitFailed, err: fmt.Errorf("sync: %d conflicts with other stations' records (nothing was overwritten)", len(res.Conflicts))}
			}
			return nil
		},
	}
	c.Flags().BoolVar(&status, "status", false, "only show the backlog (no network)")
	c.Flags().BoolVar(&asJSON, "json", false, "print the status as JSON")
	return c
}

// conflictLine says what the central store refused to overwrite, and what happens next.
func conflictLine(c central.Conflict) string {
	return fmt.Sprintf("conflict: %s %s is held by %s: %s (the store kept that record and overwrote nothing: the supervisor decides which is right)",
		c.Kind, c.Key, c.Other, c.Detail)
}

// reportSync says on stderr how a sync after units (unit, enroll, batch) ended: not done (the units are safe here and
// go with the next sync), conflicts, or a backlog left for provision sync. Nothing when everything was sent.
func reportSync(g *globals, res station.SyncResult, err error) {
	switch {
	case err != nil:
		fmt.Fprintf(g.stderr, "central store: not synced (%v): the units are recorded in this station's inventory and go to the central store with the next sync (provision sync)\n", err)
	case len(res.Conflicts) > 0:
		for _, c := range res.Conflicts {
			fmt.Fprintf(g.stderr, "central store: %s\n", conflictLine(c))
		}
	case res.Backlog > 0:
		fmt.Fprintf(g.stderr, "central store: %d entries not yet sent: run provision sync\n", res.Backlog)
	}
}
