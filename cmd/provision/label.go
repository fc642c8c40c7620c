package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"

	"provision/inventory"
	"provision/label"
)

// unitLabel is the label of a unit from the inventory: its serial, its active certificate's fingerprint, the date that
// certificate was issued, and the station. A unit without an active certificate has no label (exit 3).
func unitLabel(ctx context.Context, inv *inventory.DB, serial, title string) (label.Label, error) {
	u, err := inv.Unit(ctx, serial)
	if errors.Is(err, inventory.ErrNotFound) {
		return label.Label{}, &exitError{code: exitRefused, err: fmt.Errorf("label: no unit %q in %s: check the serial, or --station", serial, inv.Path())}
	}
	if err != nil {
		return label.Label{}, err
	}
	c, err := inv.ActiveCertificate(ctx, serial)
	if errors.Is(err, inventory.ErrNotFound) {
		return label.Label{}, &exitError{code: exitRefused, err: fmt.Errorf(
			"label: unit %s (%s) has no active certificate: a label carries the certificate's fingerprint; provision the unit first", serial, u.State)}
	}
	if err != nil {
		return label.Label{}, err
	}
	date := c.Issued
	if date.IsZero() {
		date = time.Now()
	}
	return label.Label{Serial: u.Serial, CertSHA256: c.SHA256, Date: date.Local(), Station: u.Station, Title: title}, nil
}

// isTerminal reports whether w is a terminal (a character device).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func newLabelCmd(g *globals) *cobra.Command {
	var format, out, title string
	c := &cobra.Command{
		Use:   "label SERIAL --format zpl|png [--out FILE] [--title TEXT]",
		Short: "A unit's label: serial, date and a QR code with the serial and certificate fingerprint (ZPL or PNG)",
		Long: `label renders the label of a provisioned unit: its serial, the date its certificate was issued, the station, and a
QR code holding P1/<serial>/<certificate sha256> (the unit's active certificate), which the TUI checks when the label is
scanned after printing.

--format zpl is for thermal printers (2"×1" at 203 dpi; send it with lpr -o raw or to port 9100); --format png is a
2"×1" image at 300 dpi for any printer. The label goes to --out FILE, else to standard output (a PNG is not written to a
terminal: give --out). A unit without an active certificate (never provisioned that far, or revoked) has no label:
exit 3.`,
		Args: func(c *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usagef("label: give one serial")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			f, err := label.ParseFormat(format)
			if err != nil {
				return usageError{err}
			}
			if f == label.PNG && out == "" && isTerminal(g.stdout) {
				return usagef("label: a PNG is not written to a terminal: give --out FILE or redirect standard output")
			}
			st, err := g.openStation(cmd.Context())
			if err != nil {
				return err
			}
			defer st.Exit() // one-shot command: see Station.Exit
			l, err := unitLabel(cmd.Context(), st.Inv, args[0], title)
			if err != nil {
				return err
			}
			b, err := l.Render(f)
			if err != nil {
				return err
			}
			if out == "" {
				_, err = g.stdout.Write(b)
				return err
			}
			return label.FilePrinter{Path: out}.Print(cmd.Context(), l.Serial, b)
		},
	}
	c.Flags().StringVar(&format, "format", "zpl", "zpl (thermal printers) or png (any printer)")
	c.Flags().StringVar(&out, "out", "", "write the label to FILE ({serial} is replaced by the serial); default standard output")
	c.Flags().StringVar(&title, "title", "", "a product name printed above the serial")
	return c
}
