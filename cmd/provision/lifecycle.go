package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"provision/internal/fsutil"
	"provision/inventory"
	"provision/station"
	"provision/station/ca"
)

// Life after the line (docs/lifecycle.md): revoke, crl, rma, expiring, rotate, ca server-cert, ca broker-config.

// exactArgs is a positional-argument check that is a usage error (exit 2).
func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(c *cobra.Command, args []string) error {
		if len(args) != n {
			return usagef("%s: give %s (see %s --help)", commandName(c), what, c.CommandPath())
		}
		return nil
	}
}

// notInInventory turns "no such unit or certificate" into exit 3, as inventory show does.
func notInInventory(cmd string, err error) error {
	if errors.Is(err, inventory.ErrNotFound) {
		return &exitError{code: exitRefused, err: fmt.Errorf("%s: %w", cmd, err)}
	}
	return err
}

// refreshCRL makes a new CRL after a revocation when the CA key can be read, and says what happened.
func refreshCRL(ctx context.Context, g *globals, st *station.Station) {
	if err := st.LoadCA(passphrase()); err != nil {
		fmt.Fprintf(g.stdout, "the CRL was not renewed (%v): run provision crl\n", err)
		return
	}
	if _, n, err := st.CRL(ctx); err != nil {
		fmt.Fprintf(g.stdout, "the CRL was not renewed (%v): run provision crl\n", err)
	} else {
		fmt.Fprintf(g.stdout, "CRL %d written to %s\n", n, st.Layout.CRLPEMFile())
	}
}

func newRevokeCmd(g *globals) *cobra.Command {
	var reason, certSerial string
	c := &cobra.Command{
		Use:   "revoke [SERIAL] --reason REASON [--cert HEX]",
		Short: "Revoke a unit's certificate (recorded, audited, on the next CRL)",
		Long: `revoke marks certificates revoked in the inventory, with an audit entry each (step revoke), and renews the CRL
when the CA key can be read (else run provision crl). Without --cert: the unit's valid certificates (its active one,
and one a rotation replaced that is not revoked yet). With --cert HEX: that one certificate (SERIAL may be left out).

Reasons (RFC 5280): unspecified keyCompromise cACompromise affiliationChanged superseded cessationOfOperation
certificateHold privilegeWithdrawn aACompromise.

Exit 0 revoked; 2 bad reason or arguments; 3 no such unit or certificate, nothing left to revoke, or revoked already.`,
		Args: func(c *cobra.Command, args []string) error {
			if len(args) > 1 || (len(args) == 0 && certSerial == "") {
				return usagef("revoke: give a unit's serial, or --cert HEX (see provision revoke --help)")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if reason == "" {
				return usagef("revoke: --reason is required: one of %s", strings.Join(ca.ReasonNames(), ", "))
			}
			if _, err := ca.ReasonCode(reason); err != nil {
				return usagef("revoke: %v", err)
			}
			st, err := g.openStation(cmd.Context())
			if err != nil {
				return err
			}
			defer st.Exit()
			req := station.RevokeRequest{CertSerial: strings.ToLower(certSerial), Reason: reason, Operator: operatorName("")}
			if len(args) == 1 {
				req.Unit = args[0]
			}
			certs, err := st.Revoke(cmd.Context(), req)
			if err != nil {
				return notInInventory("revoke", err)
			}
			for _, c := range certs {
				fmt.Fprintf(g.stdout, "revoked certificate %s of %s (%s)\n", c.Serial, c.Unit, reason)
			}
			refreshCRL(cmd.Context(), g, st)
			return nil
		},
	}
	c.Flags().StringVar(&reason, "reason", "", "why (RFC 5280): keyCompromise, superseded, cessationOfOperation, …")
	c.Flags().StringVar(&certSerial, "cert", "", "revoke this one certificate (serial number, hex)")
	return c
}

func newCRLCmd(g *globals) *cobra.Command {
	var out string
	var der bool
	c := &cobra.Command{
		Use:   "crl [--out FILE] [--der]",
		Short: "Sign a new CRL (PEM on stdout, or --out FILE; --der for DER)",
		Long: `crl signs a new CRL with the issuing CA: every certificate revoked, or superseded by a resume or re-provision, that
has not expired yet (expired ones age out), the next CRL number (stored, never reused), nextUpdate
crl.next_update_hours (station.yaml, default 24) from now. It is also kept in the station directory (crl.der, crl.pem:
what provision serve answers /crl/<station_id> with, and a broker's crlfile). Run it more often than next_update_hours.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := g.openSession(cmd.Context(), "crl")
			if err != nil {
				return err
			}
			defer s.close()
			if err := s.loadCA(); err != nil {
				return err
			}
			b, _, err := s.st.CRL(cmd.Context())
			if err != nil {
				return err
			}
			if !der {
				b = station.CRLPEM(b)
			}
			if out == "" {
				_, err = g.stdout.Write(b)
				return err
			}
			return fsutil.WriteFileAtomic(out, b, 0o644)
		},
	}
	c.Flags().StringVar(&out, "out", "", "write the CRL to this file instead of stdout")
	c.Flags().BoolVar(&der, "der", false, "DER instead of PEM")
	return c
}

func newRMACmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "rma SERIAL",
		Short: "A shipped unit came back: state returned, its certificate revoked; the line provisions it again",
		Long: `rma takes back a shippable unit: its state becomes returned, its active certificate is revoked
(cessationOfOperation; revoke it as keyCompromise first if its key may be known), one audit entry (step rma) records
both, and the CRL is renewed when the CA key can be read. Its history and its TPM binding are kept. A returned unit
is provisioned again like a failed one (unit, tui, batch; no --reprovision): a new key in its TPM, a new certificate.

Exit 0 returned; 3 no such unit, or a unit that is not shippable.`,
		Args: exactArgs(1, "one serial"),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := g.openStation(cmd.Context())
			if err != nil {
				return err
			}
			defer st.Exit()
			c, err := st.RMA(cmd.Context(), args[0], operatorName(""))
			if err != nil {
				return notInInventory("rma", err)
			}
			msg := args[0] + " returned"
			if c != nil {
				msg += fmt.Sprintf("; certificate %s revoked (%s)", c.Serial, station.ReasonRMA)
			}
			fmt.Fprintln(g.stdout, msg+"; provision it again to give it a new key and certificate")
			refreshCRL(cmd.Context(), g, st)
			return nil
		},
	}
}

// expiringJSON is `expiring --json` (docs/lifecycle.md).
type expiringJSON struct {
	Units []expiringUnitJSON `json:"units"`
}

type expiringUnitJSON struct {
	Serial      string   `json:"serial"`
	State       string   `json:"state"`
	Certificate certJSON `json:"certificate"`
	DaysLeft    int      `json:"days_left"`
}

// parseWithin reads a window: Nd (days), Nw (weeks) or a Go duration (12h).
func parseWithin(s string) (time.Duration, error) {
	for suffix, unit := range map[string]time.Duration{"d": 24 * time.Hour, "w": 7 * 24 * time.Hour} {
		if n, ok := strings.CutSuffix(s, suffix); ok {
			v, err := strconv.Atoi(n)
			if err != nil || v < 0 {
				return 0, fmt.Errorf("%q is not a number of %s", s, map[string]string{"d": "days", "w": "weeks"}[suffix])
			}
			return time.Duration(v) * unit, nil
		}
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("%q is not a window: use 90d, 2w or 12h", s)
	}
	return d, nil
}

func newExpiringCmd(g *globals) *cobra.Command {
	var within string
	var asJSON bool
	c := &cobra.Command{
		Use:   "expiring --within 90d [--json]",
		Short: "Units whose active certificate expires within the window",
		Long: `expiring lists the units whose active certificate expires before now + --within (Nd days, Nw weeks, or 12h),
soonest first: provision rotate gives them a new certificate for the key they hold. Exit 0 (also when none).`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			d, err := parseWithin(within)
			if err != nil {
				return usagef("expiring: --within: %v", err)
			}
			st, err := g.openStation(cmd.Context())
			if err != nil {
				return err
			}
			defer st.Exit()
			list, err := st.ExpiringWithin(cmd.Context(), d)
			if err != nil {
				return err
			}
			out := expiringJSON{Units: []expiringUnitJSON{}}
			for _, e := range list {
				out.Units = append(out.Units, expiringUnitJSON{Serial: e.Unit.Serial, State: string(e.Unit.State),
					Certificate: certJSON{Serial: e.Certificate.Serial, SHA256: e.Certificate.SHA256, NotAfter: fmtTime(e.Certificate.NotAfter)},
					DaysLeft:    int(time.Until(e.Certificate.NotAfter).Hours() / 24)})
			}
			if asJSON {
				return json.NewEncoder(g.stdout).Encode(out)
			}
			if len(out.Units) == 0 {
				fmt.Fprintf(g.stdout, "no active certificate expires within %s\n", within)
			}
			for _, u := range out.Units {
				fmt.Fprintf(g.stdout, "%-20s %-10s certificate %s expires %s (%d days)\n", u.Serial, u.State, u.Certificate.Serial, u.Certificate.NotAfter, u.DaysLeft)
			}
			return nil
		},
	}
	c.Flags().StringVar(&within, "within", "90d", "the window: Nd (days), Nw (weeks) or a duration such as 12h")
	c.Flags().BoolVar(&asJSON, "json", false, `print {"units":[{"serial","state","certificate":{…},"days_left"}]}`)
	return c
}

func newRotateCmd(g *globals) *cobra.Command {
	var out, certFile string
	c := &cobra.Command{
		Use:   "rotate SERIAL --out DIR [--cert-file FILE]",
		Short: "A new certificate for the key a shipped unit holds, as a bundle for the device-side swap",
		Long: `rotate issues a new certificate for a shippable unit's existing key (in its TPM: nothing changes on the device's
key) with the same subject and names, and writes DIR/<serial>/: device.crt, chain.crt, ca.crt, manifest.json and a
README describing the swap (shadow directory, check, atomic switch). The new certificate is the unit's active one at
once; the old one stays valid until the swap is confirmed: then provision revoke SERIAL --cert OLD --reason
superseded (the README and manifest.json name the exact command).

The unit's public key is taken from its current certificate: the inventory's copy (kept for certificates issued by
this version on), else --cert-file (the unit's device.crt; it must be the unit's active certificate).

Exit 0 written; 3 no such unit, not shippable, no active certificate, or no copy of it (give --cert-file); 4 the CA.`,
		Args: exactArgs(1, "one serial"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return usagef("rotate: --out DIR is required")
			}
			var current []byte
			if certFile != "" {
				b, err := os.ReadFile(certFile)
				if err != nil {
					return usagef("rotate: --cert-file: %v", err)
				}
				current = b
			}
			s, err := g.openSession(cmd.Context(), "rotate")
			if err != nil {
				return err
			}
			defer s.close()
			if err := s.loadCA(); err != nil {
				return err
			}
			res, err := s.st.Rotate(cmd.Context(), args[0], current, out, operatorName(""))
			if err != nil {
				return notInInventory("rotate", err)
			}
			fmt.Fprintf(g.stdout, "%s: certificate %s (until %s) written to %s\nonce the device has switched: provision revoke %s --cert %s --reason superseded\n",
				args[0], station.CertSerial(res.New), fmtTime(res.New.NotAfter), res.Dir, args[0], station.CertSerial(res.Old))
			return nil
		},
	}
	c.Flags().StringVar(&out, "out", "", "directory for the rotation bundle (DIR/<serial>/)")
	c.Flags().StringVar(&certFile, "cert-file", "", "the unit's current certificate, when the inventory holds no copy of it")
	return c
}

func newCACmd(g *globals) *cobra.Command {
	c := groupCmd(&cobra.Command{
		Use:   "ca",
		Short: "The station's server CA: TLS server certificates for the fleet's broker, its mosquitto configuration",
		Long: `The server CA is a self-signed root of its own (ca/server-root.crt, key ca/server-root.key 0600, made on first
use), separate from the device root; the device issuing CA (client authentication only) never signs a server
certificate. Devices trust it when station.yaml says server_ca: ca/server-root.crt (profiles write it into images).`,
	})
	var names, ips []string
	var out string
	server := &cobra.Command{
		Use:   "server-cert --name DNS [--ip IP] --out DIR",
		Short: "Issue a TLS server certificate from the server CA: DIR/server.crt, server.key (0600), ca.crt, client-ca.crt",
		Long: `server-cert issues a TLS server certificate (serverAuth; SANs from --name and --ip; a new P-256 key) from the
station's server root, made first if the station has none. DIR receives server.crt, server.key (0600), ca.crt (the
server root: what devices verify the server with) and client-ca.crt (the device chain: what the server verifies
devices' certificates with). provision ca broker-config --dir DIR prints the matching mosquitto lines.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(names) == 0 && len(ips) == 0 {
				return usagef("ca server-cert: give --name DNS (repeatable) and/or --ip IP")
			}
			if out == "" {
				return usagef("ca server-cert: --out DIR is required")
			}
			var addrs []net.IP
			for _, s := range ips {
				ip := net.ParseIP(s)
				if ip == nil {
					return usagef("ca server-cert: --ip %q is not an IP address", s)
				}
				addrs = append(addrs, ip)
			}
			s, err := g.openSession(cmd.Context(), "ca server-cert")
			if err != nil {
				return err
			}
			defer s.close()
			if err := s.loadCA(); err != nil {
				return err
			}
			res, err := s.st.IssueServerCert(passphrase(), names, addrs, out)
			if err != nil {
				return fmt.Errorf("ca server-cert: %w", err)
			}
			if res.RootCreated {
				fmt.Fprintf(g.stdout, "made the server root %s (key %s, 0600)\n", s.st.Layout.ServerRootCert(), s.st.Layout.ServerRootKey())
			}
			fmt.Fprintf(g.stdout, "server certificate %s written to %s (server.crt, server.key, ca.crt, client-ca.crt)\n", res.Serial, res.Dir)
			if !res.ServerCAInUse {
				fmt.Fprintf(g.stdout, "devices do not trust it yet: station.yaml has server_ca: %s; set server_ca: ca/server-root.crt\n", res.ServerCAFile)
			}
			return nil
		},
	}
	server.Flags().StringArrayVar(&names, "name", nil, "a DNS name of the server (repeatable; the first is the CN)")
	server.Flags().StringArrayVar(&ips, "ip", nil, "an IP address of the server (repeatable)")
	server.Flags().StringVar(&out, "out", "", "directory for server.crt, server.key, ca.crt, client-ca.crt")
	var dir string
	var port int
	broker := &cobra.Command{
		Use:   "broker-config [--dir DIR] [--port 8883]",
		Short: "Print the mosquitto lines for a broker using the files of ca server-cert --out DIR",
		Long: `broker-config prints a mosquitto listener: cafile (the device chain), certfile and keyfile (the server
certificate), crlfile (the station's crl.pem, renewed by provision crl: reload mosquitto with SIGHUP after it),
require_certificate true, use_identity_as_username true.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := g.openStation(cmd.Context())
			if err != nil {
				return err
			}
			defer st.Exit()
			conf, err := st.BrokerConfig(dir, port)
			if err != nil {
				return err
			}
			_, err = fmt.Fprint(g.stdout, conf)
			return err
		},
	}
	broker.Flags().StringVar(&dir, "dir", ".", "the directory ca server-cert wrote")
	broker.Flags().IntVar(&port, "port", 8883, "the listener's port")
	c.AddCommand(server, broker)
	return c
}
