package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"provision/inventory"
	"provision/station"
)

func newAuditCmd(g *globals) *cobra.Command {
	c := groupCmd(&cobra.Command{
		Use:   "audit",
		Short: "Check the hash-chained, signed audit log",
		Long: `The audit log is a table in the inventory: each entry carries the hash of the one before it. audit.head holds the
entry count and last hash, signed with the station audit key (ca/audit.key, Ed25519, made by init; ca/audit.pub beside
it), so a removed tail, a rewritten log with a recomputed head, or a missing or truncated head is detected.`,
	})
	verify := &cobra.Command{
		Use:   "verify",
		Short: "Check the audit log, its signed head and the units and certificates tables: exit 1 on any mismatch",
		Long: `verify recomputes the whole hash chain, checks audit.head's signature with ca/audit.pub, and checks the units and
certificates tables against the log (every certificate has its issuing entry, every unit the state its last entry says).
It writes nothing: not the inventory, its WAL or shared-memory files, nor audit.head.

Exit 1 on an edited, removed (also from the end), reordered or appended entry; a missing, truncated, unsigned or
foreign-signed head; a units or certificates row changed without the log. A station made before audit keys has an
unsigned head: verify says so (exit 1) until ` + "`provision audit adopt-key`" + ` signs it.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			rep, err := station.VerifyAudit(cmd.Context(), g.stationDir)
			for _, p := range rep.Problems {
				if p.Seq > 0 {
					fmt.Fprintf(g.stdout, "✗ entry %d: %s\n", p.Seq, p.Reason)
				} else {
					fmt.Fprintf(g.stdout, "✗ %s\n", p.Reason)
				}
			}
			if errors.Is(err, inventory.ErrAudit) {
				return &exitError{code: exitFailed, err: fmt.Errorf("audit verify: %s: %w", g.stationDir, err)}
			}
			if err != nil {
				return err
			}
			if rep.Interrupted {
				fmt.Fprintf(g.stdout, "! the last write (entries %d to %d) committed but stopped before it settled audit.head; the next write settles it\n",
					rep.Head.Count+1, rep.Pending.Count)
			}
			fmt.Fprintf(g.stdout, "✓ audit log verifies: %d entries, head %d %s, signed by audit key %.16s\n", rep.Entries, rep.Entries, lastHash(rep), rep.KeyID)
			return nil
		},
	}
	adopt := &cobra.Command{
		Use:   "adopt-key",
		Short: "Give a station made before audit keys its audit key: check the log, then sign its head from now on",
		Long: `adopt-key is for a station initialised before audit keys existed (its audit.head is unsigned). It checks the whole
log against the unsigned head first (exit 1 if it does not verify: investigate, nothing is signed), then makes
ca/audit.key (0600) and ca/audit.pub and signs the head. From then on every write signs the head, and audit verify
detects a rewritten log with a recomputed head. A station whose head is already signed is refused.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			rep, err := station.AdoptAuditKey(cmd.Context(), g.stationDir)
			for _, p := range rep.Problems {
				fmt.Fprintf(g.stdout, "✗ %s\n", p.Reason)
			}
			if errors.Is(err, inventory.ErrAudit) {
				return &exitError{code: exitFailed, err: fmt.Errorf("audit adopt-key: %s: %w", g.stationDir, err)}
			}
			if err != nil {
				return err
			}
			l := station.Layout{Dir: g.stationDir}
			fmt.Fprintf(g.stdout, "✓ audit log checked (%d entries); head signed with the new audit key %s\n", rep.Entries, l.AuditKey())
			return nil
		},
	}
	c.AddCommand(verify, adopt)
	return c
}

// lastHash is the hash of the log's last entry as the report saw it: the settled head, or the pending one it reached.
func lastHash(rep inventory.AuditReport) string {
	if rep.Interrupted && rep.Pending != nil {
		return rep.Pending.Hash
	}
	return rep.Head.Hash
}
