package main

import (
	"errors"
	"fmt"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"provision/server"
)

func newServeCmd(g *globals) *cobra.Command {
	var cfg server.Config
	c := &cobra.Command{
		Use:   "serve [--listen 127.0.0.1:8080] [--tls-cert F --tls-key F (--client-ca F | --token-file F)]",
		Short: "The supervisor's dashboard, a read-only JSON API and Prometheus metrics, from the central store",
		Long: `serve answers, from the central store named in station.yaml (central: dsn):

  /                      the line supervisor's dashboard: every station's status, units per hour, failures by cause,
                         search by serial (/?q=SERIAL), a unit's history; refreshed by polling, works offline
  /api/units             ?state=&station=&q=&limit= → {"units":[…],"next":"…"} (limit default and maximum 1000)
  /api/units/SERIAL      one unit with its certificates, events and attestation
  /api/stations          every station with its last sync, backlog and conflicts
  /metrics               Prometheus text (provision_* series, labelled station)
  /crl/STATION_ID        that station's CRL (DER): this station's own (renewed past half its validity when the CA
                         key can be read), any other's as its last sync pushed it to the central store

It listens on loopback by default. Any other address needs TLS (--tls-cert, --tls-key) and authentication: client
certificates from --client-ca, or a bearer token in --token-file (mode 0600); without them it is refused (exit 2).`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := g.openStation(cmd.Context())
			if err != nil {
				return err
			}
			defer st.Close()
			if !st.HasCentral() {
				return usagef("serve: no central store: set central: dsn in station.yaml (provision central init creates its tables)")
			}
			store, err := st.CentralStore(cmd.Context())
			if err != nil {
				return fmt.Errorf("serve: %w", err)
			}
			cfg.Logger = g.logger()
			_ = st.LoadCA(passphrase()) // optional: lets serve renew this station's CRL past half its validity
			cfg.CRL = func(id string) ([]byte, error) { return st.StationCRL(cmd.Context(), store, id) }
			srv, err := server.New(store, cfg)
			if errors.Is(err, server.ErrInsecure) {
				return usageError{fmt.Errorf("serve: %w", err)}
			}
			if err != nil {
				return fmt.Errorf("serve: %w", err)
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			ln, err := srv.Listen(ctx)
			if err != nil {
				return usagef("serve: --listen %s: %v", cfg.Listen, err)
			}
			scheme := "http"
			if cfg.TLSCert != "" {
				scheme = "https"
			}
			fmt.Fprintf(g.stderr, "serving %s://%s/ (the central store of station %s's station.yaml); Ctrl-C stops\n", scheme, ln.Addr(), st.Config.StationID)
			return srv.Serve(ctx, ln)
		},
	}
	f := c.Flags()
	f.StringVar(&cfg.Listen, "listen", server.DefaultListen, "address to listen on (anything but loopback needs TLS and authentication)")
	f.StringVar(&cfg.TLSCert, "tls-cert", "", "server certificate (PEM)")
	f.StringVar(&cfg.TLSKey, "tls-key", "", "its private key (PEM, mode 0600)")
	f.StringVar(&cfg.ClientCA, "client-ca", "", "CA whose client certificates may connect (mutual TLS)")
	f.StringVar(&cfg.TokenFile, "token-file", "", "file holding the bearer token clients must send (mode 0600)")
	c.MarkFlagsRequiredTogether("tls-cert", "tls-key")
	c.MarkFlagsMutuallyExclusive("client-ca", "token-file")
	return c
}
