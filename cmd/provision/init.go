package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

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
  ca/issuing.crt     the issuing CA (P-256, 5 years, path length 0, client authentication only) and ca/issuing.key
                     (mode 0600): the station's online key can sign device certificates, never a server's
  ca/audit.key       the station audit key (Ed25519, mode 0600) signing audit.head; ca/audit.pub beside it
  inventory.db       the SQLite inventory and audit log; audit.head (signed) guards the log against rewrites

server_ca in station.yaml is the CA devices use to verify the fleet's servers (MQTT broker, Mender server); the
profiles write it into each image, and the handshake step verifies servers with it (endpoint_ca, default server_ca).
It starts at the station root (ca/root.crt): set it to your servers' CA (a PEM file inside the station directory).

Set PROVISION_CA_PASSPHRASE to encrypt the CA keys at rest (PKCS#8, PBKDF2-SHA256, AES-256).

A station that made its own root keeps ca/root.key next to the issuing key: move it offline after init.
The usual factory setup imports an issuing CA whose root stays offline:
  provision init --ca-cert issuing.crt --ca-key issuing.key --ca-root root.crt

init refuses to touch an existing station (exit 2); --force replaces one only while its inventory is empty.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			opt := station.InitOptions{StationID: id, TPM: tpmURI, Force: force, Passphrase: passphrase()}
			if tpmURI != "" {
				if _, err := tpmFlag("init", tpmURI, ""); err != nil {
					return err
				}
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
				out["audit_pub"], out["server_ca"], out["warnings"] = res.AuditPub, res.ServerCA, initWarnings(res)
				out["next"] = nextStep(g, res)
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
			fmt.Fprintf(w, "  audit key   ca/audit.key signs audit.head; %s verifies it (`provision audit verify`)\n", res.AuditPub)
			fmt.Fprintf(w, "  server_ca   %s: the CA devices use to verify your servers (broker, Mender server)\n", res.ServerCA)
			for _, warn := range initWarnings(res) {
				fmt.Fprintf(w, "warning: %s\n", warn)
			}
			fmt.Fprintf(w, "next: review %s, then try a unit:\n  %s\n", station.Layout{Dir: res.Dir}.Config(), nextStep(g, res))
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

// initWarnings are what the operator should act on after init.
func initWarnings(res *station.InitResult) []string {
	out := append([]string{}, res.Warnings...)
	if res.ServerCA == "ca/root.crt" {
		out = append(out, "server_ca is the station root (ca/root.crt): devices will verify your servers against the CA that "+
			"signs device certificates; set server_ca in station.yaml to the CA that issued your servers' certificates "+
			"(a PEM file inside the station directory)")
	}
	return out
}

// nextStep is a command that works on this machine as typed: this binary as the shell finds it (else its full path),
// --station unless the directory is the default even without $PROVISION_STATION (a new shell may not have it), and a
// software key when the configured TPM device is not here.
func nextStep(g *globals, res *station.InitResult) string {
	words := []string{selfCommand()}
	plain := ""
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		plain = filepath.Join(d, "provision")
	} else if home, err := os.UserHomeDir(); err == nil {
		plain = filepath.Join(home, ".local", "state", "provision")
	}
	if dir := absPath(g.stationDir); plain == "" || dir != absPath(plain) {
		words = append(words, "--station", dir)
	}
	words = append(words, "enroll", "--serial", "SN-0001")
	if strings.HasPrefix(res.TPM, "/") {
		if _, err := os.Stat(res.TPM); err != nil {
			words = append(words, "--tpm", "soft") // no TPM device on this machine: a software key to try it
		}
	}
	words = append(words, "--out", filepath.Join(absPath(res.Dir), "bundles"))
	for i, w := range words {
		words[i] = shellQuote(w)
	}
	return strings.Join(words, " ")
}

// selfCommand is how to run this binary from a shell here: its name when PATH finds this very binary, else the path
// it was started by (made absolute), else the executable's path.
func selfCommand() string {
	arg0 := os.Args[0]
	if !strings.Contains(arg0, string(filepath.Separator)) {
		found, err := exec.LookPath(arg0)
		exe, exeErr := os.Executable()
		if err == nil && exeErr == nil {
			a, errA := os.Stat(found)
			b, errB := os.Stat(exe)
			if errA == nil && errB == nil && os.SameFile(a, b) {
				return arg0
			}
		}
		if exeErr == nil {
			return exe
		}
		return arg0
	}
	return absPath(arg0)
}

func absPath(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return filepath.Clean(a)
	}
	return p
}

// shellQuote quotes a word for a POSIX shell when it needs it.
func shellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./=:,+@%", r))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
