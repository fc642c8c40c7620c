package label

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Printer sends one rendered label somewhere.
type Printer interface {
	// Print sends the label of the unit serial (already rendered in the printer's format).
	Print(ctx context.Context, serial string, data []byte) error
	// String names the printer for the operator ("file labels/{serial}.zpl", "lpr queue zebra", "tcp 10.0.0.5:9100").
	String() string
}

// TCPTimeout bounds connecting to a raw TCP printer and sending it one label.
const TCPTimeout = 10 * time.Second

// ParsePrinter reads a printer specification for labels in format f:
//
//	file:PATH        write the label to PATH ({serial} in PATH is replaced by the unit's serial)
//	lpr:QUEUE        lpr -P QUEUE (lpr: the default queue); ZPL goes with -o raw, a PNG through the queue's filters
//	tcp:HOST:PORT    raw TCP, as Zebra printers take ZPL on port 9100 (ZPL only)
func ParsePrinter(spec string, f Format) (Printer, error) {
	if _, err := ParseFormat(string(f)); err != nil {
		return nil, err
	}
	kind, arg, ok := strings.Cut(spec, ":")
	if !ok {
		return nil, fmt.Errorf("label: printer %q: use file:PATH, lpr:QUEUE or tcp:HOST:PORT", spec)
	}
	switch kind {
	case "file":
		if arg == "" {
			return nil, fmt.Errorf("label: printer %q: file: needs a path", spec)
		}
		return FilePrinter{Path: arg}, nil
	case "lpr":
		if strings.HasPrefix(arg, "-") || strings.ContainsAny(arg, " \t/") {
			return nil, fmt.Errorf("label: printer %q: not a queue name", spec)
		}
		return LPRPrinter{Queue: arg, Raw: f == ZPL}, nil
	case "tcp":
		if f != ZPL {
			return nil, fmt.Errorf("label: printer %q: a raw TCP printer takes ZPL, not %s", spec, f)
		}
		if _, _, err := net.SplitHostPort(arg); err != nil {
			return nil, fmt.Errorf("label: printer %q: %w", spec, err)
		}
		return TCPPrinter{Addr: arg, Timeout: TCPTimeout}, nil
	}
	return nil, fmt.Errorf("label: printer %q: use file:PATH, lpr:QUEUE or tcp:HOST:PORT", spec)
}

// Check says whether a printer can be used at all, before the first label: a file printer's directory exists, lpr is
// installed. A TCP printer is not contacted (it may be switched on later); its labels fail one by one instead.
func Check(p Printer) error {
	switch p := p.(type) {
	case FilePrinter:
		dir := filepath.Dir(strings.ReplaceAll(p.Path, "{serial}", "x"))
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			return fmt.Errorf("label: %s: no directory %s", p, dir)
		}
	case LPRPrinter:
		name := p.Command
		if name == "" {
			name = "lpr"
		}
		if _, err := exec.LookPath(name); err != nil {
			return fmt.Errorf("label: %s: %w (Debian: apt-get install cups-bsd)", p, err)
		}
	}
	return nil
}

// FilePrinter writes each label to a file; {serial} in Path is replaced by the unit's serial.
type FilePrinter struct{ Path string }

// Print writes the label (replacing the file: another program may watch it).
func (p FilePrinter) Print(ctx context.Context, serial string, data []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	path := strings.ReplaceAll(p.Path, "{serial}", serial)
	tmp, err := os.CreateTemp(filepath.Dir(path), ".label-*")
	if err != nil {
		return fmt.Errorf("label: print to %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("label: print to %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("label: print to %s: %w", path, err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("label: print to %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("label: print to %s: %w", path, err)
	}
	return nil
}

func (p FilePrinter) String() string { return "file " + p.Path }

// LPRPrinter hands each label to lpr. Raw sends it untouched (-o raw: ZPL to a thermal printer's queue).
type LPRPrinter struct {
	Queue   string // "" is the default queue
	Raw     bool
	Command string // "" is lpr (tests name a stand-in)
}

// Print runs lpr with the label on its standard input.
func (p LPRPrinter) Print(ctx context.Context, serial string, data []byte) error {
	name := p.Command
	if name == "" {
		name = "lpr"
	}
	var args []string
	if p.Queue != "" {
		args = append(args, "-P", p.Queue)
	}
	if p.Raw {
		args = append(args, "-o", "raw")
	}
	args = append(args, "-T", "label "+serial)
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = bytes.NewReader(data)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		if msg := strings.TrimSpace(stderr.String()); msg != "" {
			return fmt.Errorf("label: %s: %w: %s", p, err, msg)
		}
		return fmt.Errorf("label: %s: %w", p, err)
	}
	return nil
}

func (p LPRPrinter) String() string {
	if p.Queue == "" {
		return "lpr (default queue)"
	}
	return "lpr queue " + p.Queue
}

// TCPPrinter sends each label over a raw TCP connection (port 9100), within Timeout (TCPTimeout when zero).
type TCPPrinter struct {
	Addr    string
	Timeout time.Duration
}

// Print connects, writes the label and closes the connection.
func (p TCPPrinter) Print(ctx context.Context, serial string, data []byte) error {
	timeout := p.Timeout
	if timeout <= 0 {
		timeout = TCPTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", p.Addr)
	if err != nil {
		return fmt.Errorf("label: %s: %w", p, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	if _, err := conn.Write(data); err != nil {
		return fmt.Errorf("label: %s: send: %w", p, err)
	}
	if err := conn.Close(); err != nil {
		return fmt.Errorf("label: %s: %w", p, err)
	}
	return nil
}

func (p TCPPrinter) String() string { return "tcp " + p.Addr }
