package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"provision/inventory"
	"provision/station"
)

type stepJSON struct {
	Name   station.Step `json:"name"`
	Status string       `json:"status"`
	MS     int64        `json:"ms"`
	Error  string       `json:"error,omitempty"`
}

type handshakeJSON struct {
	Endpoint   string `json:"endpoint"`
	Protocol   string `json:"protocol"`
	TLSVersion string `json:"tls_version"`
	MS         int64  `json:"ms"`
}

type unitResultJSON struct {
	Serial      string          `json:"serial"`
	State       inventory.State `json:"state"`
	Steps       []stepJSON      `json:"steps"`
	Certificate *certJSON       `json:"certificate,omitempty"`
	Handshake   *handshakeJSON  `json:"handshake,omitempty"`
	Attestation *attestRunJSON  `json:"attestation,omitempty"`
	Error       string          `json:"error,omitempty"`
}

// attestRunJSON is the attest step's verdict in `unit --json` (docs/json.md).
type attestRunJSON struct {
	Status   string `json:"status"`
	EKSHA256 string `json:"ek_sha256,omitempty"`
	Cause    string `json:"cause,omitempty"`
}

func toUnitJSON(res station.Result, err error) unitResultJSON {
	out := unitResultJSON{Serial: res.Serial, State: res.State, Steps: []stepJSON{}}
	seen := map[station.Step]bool{}
	for _, s := range res.Steps {
		sj := stepJSON{Name: s.Name, Status: s.Status, MS: s.Duration.Milliseconds()}
		if s.Err != nil {
			sj.Error = s.Err.Error()
		}
		out.Steps = append(out.Steps, sj)
		seen[s.Name] = true
	}
	for _, name := range station.Steps {
		if !seen[name] {
			out.Steps = append(out.Steps, stepJSON{Name: name, Status: station.StatusSkipped})
		}
	}
	if c := res.Certificate; c != nil {
		out.Certificate = &certJSON{Serial: station.CertSerial(c), SHA256: res.CertSHA256, NotAfter: c.NotAfter.UTC().Format(rfc3339)}
	}
	if len(res.Handshakes) > 0 {
		h := res.Handshakes[0]
		out.Handshake = &handshakeJSON{Endpoint: h.Endpoint, Protocol: h.Protocol, TLSVersion: h.TLSVersion, MS: h.Duration.Milliseconds()}
	}
	if a := res.Attestation; a != nil && a.Status != "" {
		out.Attestation = &attestRunJSON{Status: a.Status, EKSHA256: a.EKSHA256, Cause: a.Cause}
	}
	if err != nil {
		out.Error = err.Error()
	}
	return out
}

// stepPrinter renders pipeline events as the operator's step lines.
func stepPrinter(w io.Writer) func(station.Event) {
	return func(e station.Event) {
		switch e.Status {
		case station.StatusOK:
			fmt.Fprintf(w, "  ✓ %-10s %6d ms  %s\n", e.Step, e.Duration.Milliseconds(), e.Detail)
		case station.StatusFailed:
			fmt.Fprintf(w, "  ✗ %-10s %6d ms  %v\n", e.Step, e.Duration.Milliseconds(), e.Err)
		case station.StatusSkipped:
			fmt.Fprintf(w, "  - %-10s %9s  %s\n", e.Step, "", e.Detail)
		case station.StatusSoft:
			fmt.Fprintf(w, "  - %-10s %9s  %s\n", e.Step, "soft", e.Detail)
		case station.StatusCancelled:
			fmt.Fprintf(w, "  ■ %-10s %6d ms  cancelled\n", e.Step, e.Duration.Milliseconds())
		}
	}
}

// handshakeFlags are --endpoint and --endpoint-ca, shared by unit, tui and batch so all three test the same thing.
type handshakeFlags struct {
	endpoints []string
	ca        string
}

func (h *handshakeFlags) register(f *pflag.FlagSet) {
	f.StringArrayVar(&h.endpoints, "endpoint", nil, "handshake endpoint (repeatable): tls://host:port, mqtts://host:port, https://host[:port]/path (default: station.yaml endpoints, else the built-in server)")
	f.StringVar(&h.ca, "endpoint-ca", "", "CA file the endpoints' server certificates must chain to (default: station.yaml endpoint_ca, else server_ca)")
}

// check validates the flags before anything else happens (exit 2 on a bad endpoint).
func (h *handshakeFlags) check(cmd string) error {
	for _, e := range h.endpoints {
		if err := station.CheckEndpoint(e); err != nil {
			return usagef("%s: --endpoint: %v", cmd, err)
		}
	}
	return nil
}

// resolve is the handshake configuration: flags over station.yaml (Station.HandshakeConfig).
func (h *handshakeFlags) resolve(cmd string, st *station.Station) (station.HandshakeConfig, error) {
	hc, err := st.HandshakeConfig(h.endpoints, h.ca)
	if err != nil {
		return hc, usagef("%s: %v", cmd, err)
	}
	return hc, nil
}

func newUnitCmd(g *globals) *cobra.Command {
	var (
		serial, img, tpmURI, profile, operator, fixture string
		hf                                              handshakeFlags
		asJSON, reprovision                             bool
	)
	c := &cobra.Command{
		Use:   "unit --serial S --image IMG [--tpm URI] [--profile P] [--endpoint URL --endpoint-ca FILE]",
		Short: "Provision one unit end to end: key, certificate, image, read-back, live mTLS handshake",
		Long: `unit runs the station's job for one unit: validate the serial, create the key in the unit's TPM, CSR, sign,
write the image, verify it by reading back, and a live mTLS handshake with the issued certificate and the TPM-resident
key. Each step prints with its time; the inventory records each as it happens, and the unit is shippable only when all
passed (exit 0). A failed step is exit 1 and names the step; a shippable unit is refused (exit 3) unless --reprovision.

The handshake goes to a built-in loopback mTLS server (TLS 1.3, client certificate required and checked to be exactly
the issued one) unless --endpoint is given (repeatable): tls://host:port, mqtts://host:port (MQTT 5 CONNECT, CONNACK 0),
https://host[:port]/path (2xx). The server is always verified, against --endpoint-ca (default: the station root) and
its host name.

An interrupted or failed unit is run again with the same command: it resumes (a unit whose image holds its key and
certificate is re-verified and re-tested; earlier interruptions start over with a new key, the old certificate is
superseded).

On a fixture the unit's TPM is reached through a command (--tpm 'cmd:ssh -o BatchMode=yes root@{fixture} tpm2_send',
{serial} and {fixture} filled in from --serial and --fixture), and station.yaml unit_serial: compares the unit's own
serial with --serial before anything is created (a mismatch is exit 3).`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if serial == "" || img == "" {
				return usagef("unit: --serial and --image are required")
			}
			if err := hf.check("unit"); err != nil {
				return err
			}
			s, err := g.openSession(ctx, "unit")
			if err != nil {
				return err
			}
			defer s.close()
			if err := s.checkSerial(serial); err != nil {
				return err
			}
			effective := tpmURI
			if effective == "" {
				effective = s.st.Config.TPM
			}
			if err := s.st.CheckFixture(effective, fixture); err != nil {
				return usagef("unit: --fixture: %v", err)
			}
			s.serial, s.fixture = serial, fixture
			if err := s.openUnit(ctx, tpmURI, s.st.Config.TPM, &hf); err != nil {
				return err
			}
			var report func(station.Event)
			if asJSON {
				report = func(station.Event) {}
			} else {
				fmt.Fprintf(g.stdout, "unit %s  (tpm %s, image %s, handshake %s)\n", serial, s.tpmURI, img, s.hc)
				report = stepPrinter(g.stdout)
			}
			start := time.Now()
			res, perr := s.st.Provision(ctx, s.dev, station.ProvisionRequest{Serial: serial, Image: img, Profile: profile,
				Handshake: s.hc, Reprovision: reprovision, Operator: operatorName(operator), Fixture: fixture}, report)
			if asJSON {
				if err := json.NewEncoder(g.stdout).Encode(toUnitJSON(res, perr)); err != nil {
					return err
				}
			} else if perr == nil {
				fmt.Fprintf(g.stdout, "SHIPPABLE  %s  certificate %s  in %s\n", serial, station.CertSerial(res.Certificate),
					time.Since(start).Round(time.Millisecond))
			} else if errors.Is(perr, station.ErrInterrupted) {
				fmt.Fprintf(g.stdout, "INTERRUPTED  %s  (state %s kept: run the same command again to resume)\n", serial, res.State)
			} else if !errors.Is(perr, station.ErrRefused) {
				fmt.Fprintf(g.stdout, "FAILED  %s\n", serial)
			}
			syncAfterUnit(ctx, g, s.st)
			if perr != nil {
				return fmt.Errorf("unit: %w", perr)
			}
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&serial, "serial", "", "the unit's serial")
	f.StringVar(&img, "image", "", "the unit's disk image or block device")
	f.StringVar(&tpmURI, "tpm", "", "the unit's TPM: /dev/tpmrm0, mssim://HOST:PORT, cmd:COMMAND, sim or soft (default: station.yaml)")
	f.StringVar(&fixture, "fixture", "", "the fixture the unit sits on (a host name or address): fills {fixture} in a cmd: TPM URI and unit_serial's command")
	f.StringVar(&profile, "profile", "", "image profile (default: station.yaml profile)")
	hf.register(f)
	f.StringVar(&operator, "operator", "", "operator recorded with the unit (default $PROVISION_OPERATOR, else the user name)")
	f.BoolVar(&reprovision, "reprovision", false, "provision a shippable unit again (new key and certificate)")
	f.BoolVar(&asJSON, "json", false, "print the result as JSON")
	return c
}

// syncAfterUnit forwards what the unit's run recorded to the central store, if the station has one, within a few
// seconds. A store that is down changes nothing for the unit: it is recorded here and goes with the next sync.
func syncAfterUnit(ctx context.Context, g *globals, st *station.Station) {
	if !st.HasCentral() {
		return
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	res, err := st.SyncCentral(sctx)
	reportSync(g, res, err)
}
