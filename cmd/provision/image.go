package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"provision/station"
	"provision/station/ca"
	"provision/station/profile"
)

func newInjectCmd(g *globals) *cobra.Command {
	var img, bundle, profile string
	c := &cobra.Command{
		Use:   "inject --image IMG --bundle DIR/SERIAL [--profile P]",
		Short: "Write an enroll bundle into a unit's disk image, in place, and read it back",
		Long: `inject writes a unit's certificate, chain, key and client configuration into its disk image (a raw .img/.sdimg
file or a block device; MBR or GPT; ext2/3/4 through libext2fs, FAT16/32), as the profile (--profile, default from
station.yaml) says: which partitions, which paths, modes, owners, JSON merges and rendered templates.

Before the first byte is written every target is checked: a partition table that is damaged or truncated, a missing
partition, an unsupported or unclean file system, or too little space in any target refuses the whole write and leaves
the image byte-identical (exit 1). Edits are in place (only changed blocks are written) and crash safe: the original of
every block is journaled first, and an interrupted edit is rolled back on the next open. Every file is read back and
compared, and the image is synced before inject reports success.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if img == "" || bundle == "" {
				return usagef("inject: --image and --bundle are required")
			}
			ctx := cmd.Context()
			s, err := g.openSession(ctx, "inject")
			if err != nil {
				return err
			}
			defer s.close()
			if err := s.loadCA(); err != nil {
				return err
			}
			st := s.st
			m, err := readBundle(st, bundle)
			if err != nil {
				return err
			}
			defer clear(m.Key)
			name := profile
			if name == "" {
				name = st.Config.Profile
			}
			prof, err := st.Config.ResolveProfile(name)
			if err != nil {
				return usageError{err}
			}
			plan, err := prof.Plan(name, st.Layout, m)
			if err != nil {
				return usageError{err}
			}
			if err := station.Inject(ctx, img, plan, st.ImageOptions(img)...); err != nil {
				return &exitError{code: exitFailed, err: fmt.Errorf("inject: %w", err)}
			}
			for _, f := range plan.Files {
				fmt.Fprintf(g.stdout, "✓ %s:%s  %04o %d:%d  %d bytes\n", f.Part, f.DevicePath, f.Mode, f.UID, f.GID, len(f.Data))
			}
			for _, mg := range plan.Merges {
				fmt.Fprintf(g.stdout, "✓ %s:%s  JSON merged\n", mg.Part, mg.Path)
			}
			fmt.Fprintf(g.stdout, "%s: %s written with profile %s, read back and synced\n", img, m.Serial, name)
			return nil
		},
	}
	c.Flags().StringVar(&img, "image", "", "the unit's disk image or block device")
	c.Flags().StringVar(&bundle, "bundle", "", "an enroll bundle directory (OUT/<serial>)")
	c.Flags().StringVar(&profile, "profile", "", "image profile (default: station.yaml profile)")
	return c
}

// readBundle loads an enroll bundle and checks it belongs to this station.
func readBundle(st *station.Station, dir string) (profile.Material, error) {
	serial := filepath.Base(filepath.Clean(dir))
	if err := st.Config.SerialRule().Check(serial); err != nil {
		return profile.Material{}, fmt.Errorf("inject: bundle directory name: %w", err)
	}
	read := func(name string) ([]byte, error) { return os.ReadFile(filepath.Join(dir, name)) }
	cert, err := read(station.BundleCert)
	if err != nil {
		return profile.Material{}, usagef("inject: --bundle %s: %v", dir, err)
	}
	certs, err := ca.ParseCerts(cert)
	if err != nil {
		return profile.Material{}, usagef("inject: %s: %v", filepath.Join(dir, station.BundleCert), err)
	}
	if err := certs[0].CheckSignatureFrom(st.CA.Issuing); err != nil {
		return profile.Material{}, usagef("inject: %s was not issued by this station's CA: %v", filepath.Join(dir, station.BundleCert), err)
	}
	kind, key := "tpm", []byte(nil)
	if key, err = read("device.tss2.pem"); errors.Is(err, os.ErrNotExist) {
		kind = "soft"
		key, err = read("device.key")
	}
	if err != nil {
		return profile.Material{}, usagef("inject: --bundle %s: no key file: %v", dir, err)
	}
	serverCA, err := st.ServerCA()
	if err != nil {
		return profile.Material{}, err
	}
	return profile.Material{Serial: serial, KeyKind: kind, Cert: cert, Issuing: ca.EncodeCerts(st.CA.Issuing),
		Root: ca.EncodeCerts(st.CA.Root), ServerCA: serverCA, Key: key}, nil
}

func newVerifyCmd(g *globals) *cobra.Command {
	var img, serial, profile string
	var asJSON bool
	c := &cobra.Command{
		Use:   "verify --image IMG --serial S [--profile P] [--json]",
		Short: "Read a unit's identity back from its image and run the checklist",
		Long: `verify reads back what inject (or unit) wrote and checks, one line each (✓/✗):
  each file present with the expected mode and owner, identical in every partition it goes to (A/B root file systems);
  the certificate's CN and SAN name the serial, it is valid now, chains to the station CA for client authentication,
  and is the unit's active certificate in the inventory;
  the key matches the certificate (for a TSS2 key file, its public part equals the certificate's key);
  the CA files are the station's; JSON configs parse and point at the written paths.
Exit 1 when any check fails. The image is opened read-only (an interrupted edit is still rolled back first).`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if img == "" || serial == "" {
				return usagef("verify: --image and --serial are required")
			}
			ctx := cmd.Context()
			s, err := g.openSession(ctx, "verify")
			if err != nil {
				return err
			}
			defer s.close()
			if err := s.checkSerial(serial); err != nil {
				return err
			}
			if err := s.loadCA(); err != nil {
				return err
			}
			checks, verr := s.st.VerifyImage(ctx, img, serial, station.VerifyOptions{Profile: profile})
			if errors.Is(verr, station.ErrProfile) {
				return usageError{verr}
			}
			if asJSON {
				if checks == nil {
					checks = []station.Check{}
				}
				out := map[string]any{"serial": serial, "image": img, "ok": verr == nil, "checks": checks}
				if verr != nil {
					out["error"] = verr.Error()
				}
				if err := json.NewEncoder(g.stdout).Encode(out); err != nil {
					return err
				}
			} else {
				for _, c := range checks {
					if c.OK {
						fmt.Fprintf(g.stdout, "✓ %s\n", c.Name)
					} else {
						fmt.Fprintf(g.stdout, "✗ %s: %s\n", c.Name, c.Detail)
					}
				}
			}
			if verr != nil {
				return &exitError{code: exitFailed, err: fmt.Errorf("verify: %w", verr)}
			}
			return nil
		},
	}
	c.Flags().StringVar(&img, "image", "", "the unit's disk image or block device")
	c.Flags().StringVar(&serial, "serial", "", "the unit's serial")
	c.Flags().StringVar(&profile, "profile", "", "image profile (default: station.yaml profile)")
	c.Flags().BoolVar(&asJSON, "json", false, "print the checks as JSON")
	return c
}
