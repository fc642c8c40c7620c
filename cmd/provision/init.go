package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"provision/station"
	"provision/station/ca"
)

func newInitCmd(g *globals) *cobra.Command {
	var (
		id, tpmURI                string
		force, asJSON             bool
		caCert, caKey, caRootFile string
	)
	c := &cobra.Command{
		Use:   "init",
		Short: "Create a station directory: CA, inventory and a commented station.yaml",
		Long: `init creates the station directory (--station):
  station.yaml       the configuration, commented; edit it, it is checked whenever it is loaded
  ca/root.crt        the root CA (P-384, 20 years); ca/root.key only when this station made the root
  ca/issuing.crt     the issuing CA (P-256, 5 years, path length 0) and ca/issuing.key (mode 0600)
  inventory.db       the SQLite inventory and audit log; audit.head guards the log's tail

Set PROVISION_CA_PASSPHRASE to encrypt the CA keys at rest (PKCS#8, PBKDF2-SHA256, AES-256).

A station that made its own root keeps ca/root.key next to the issuing key: move it offline after init.
The usual factory setup imports an issuing CA whose root stays offline:
  provision init --ca-cert issuing.crt --ca-key issuing.key --ca-root root.crt

init refuses to touch an existing station (exit 2); --force replaces one only while its inventory is empty.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			opt := station.InitOptions{StationID: id, TPM: tpmURI, Force: force, Passphrase: passphrase()}
			if tpmURI != "" && !station.ValidTPMURI(tpmURI) {
				return usagef("init: --tpm %q is not a TPM URI (use /dev/tpmrm0, mssim://HOST:PORT, sim or soft)", tpmURI)
			}
			if caCert != "" || caKey != "" || caRootFile != "" {
				if caCert == "" || caKey == "" || caRootFile == "" {
					return usagef("init: --ca-cert, --ca-key and --ca-root go together")
				}
				var err error
				for _, f := range []struct {
					flag, path string
					dst        *[]byte
				}{{"--ca-cert", caCert, &opt.ImportCert}, {"--ca-key", caKey, &opt.ImportKey}, {"--ca-root", caRootFile, &opt.ImportRoot}} {
					if *f.dst, err = os.ReadFile(f.path); err != nil {
						return usagef("init: %s: %v", f.flag, err)
					}
				}
			}
			res, err := station.Init(cmd.Context(), g.stationDir, opt)
			if err != nil {
				return err
			}
			if asJSON {
				out := map[string]any{"station": res.Dir, "root": map[string]string{"sha256": ca.Fingerprint(res.Root),
					"not_after": res.Root.NotAfter.UTC().Format("2006-01-02T15:04:05Z")}, "issuing": map[string]string{
					"sha256": ca.Fingerprint(res.Issuing), "not_after": res.Issuing.NotAfter.UTC().Format("2006-01-02T15:04:05Z")},
					"root_key": res.RootKeyFile, "keys_encrypted": res.KeyEncrypted}
				return json.NewEncoder(g.stdout).Encode(out)
			}
			w := g.stdout
			fmt.Fprintf(w, "station initialised in %s\n", res.Dir)
			fmt.Fprintf(w, "  root CA     %s  (expires %s)\n", res.Root.Subject.CommonName, res.Root.NotAfter.Format("2006-01-02"))
			fmt.Fprintf(w, "  issuing CA  %s  (expires %s)\n", res.Issuing.Subject.CommonName, res.Issuing.NotAfter.Format("2006-01-02"))
			if !res.KeyEncrypted {
				fmt.Fprintln(w, "  CA keys are NOT encrypted: set PROVISION_CA_PASSPHRASE at init to encrypt them at rest")
			}
			if res.RootKeyFile != "" {
				fmt.Fprintf(w, "  move %s offline: the station only needs the issuing key\n", res.RootKeyFile)
			}
			fmt.Fprintf(w, "next: review %s, then `provision enroll --serial SERIAL`\n", station.Layout{Dir: res.Dir}.Config())
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&id, "id", "", "station id recorded with every unit (default: host name)")
	f.StringVar(&tpmURI, "tpm", "", "default TPM URI written to station.yaml (default /dev/tpmrm0)")
	f.BoolVar(&force, "force", false, "replace an existing station, only while its inventory is empty")
	f.StringVar(&caCert, "ca-cert", "", "import this issuing CA certificate (PEM) instead of generating a CA")
	f.StringVar(&caKey, "ca-key", "", "the imported issuing CA's private key (PEM; encrypted PKCS#8 uses PROVISION_CA_PASSPHRASE)")
	f.StringVar(&caRootFile, "ca-root", "", "the root CA that issued --ca-cert (PEM)")
	f.BoolVar(&asJSON, "json", false, "print the result as JSON")
	return c
}
