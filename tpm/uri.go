package tpm

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"

	"mvdan.cc/sh/v3/syntax"
)

// URIForms names the TPM URI forms in words, for messages that say what to use instead.
const URIForms = "/dev/tpmrm0, mssim://HOST:PORT, cmd:COMMAND, sim or soft"

// Kinds of TPM URI.
const (
	URISoft   = "soft"   // the software fallback: no TPM
	URISim    = "sim"    // the in-process simulator (WithSimulator)
	URIMssim  = "mssim"  // a TPM speaking the TCP simulator protocol (swtpm, Microsoft's simulator, a forwarded TPM)
	URIDevice = "device" // a TPM character device (/dev/tpmrm0)
	URICmd    = "cmd"    // a command that streams TPM commands on stdin and responses on stdout (ssh UNIT tpm2_send)
)

// Placeholders a cmd: URI template (station.yaml, --tpm) may hold; the station fills them in before Open.
const (
	PlaceholderSerial  = "{serial}"  // the unit's serial
	PlaceholderFixture = "{fixture}" // the fixture's name (--fixture)
)

// URI is a TPM URI taken apart.
type URI struct {
	Kind string   // one of the URI* kinds
	Addr string   // mssim: HOST:PORT; device: the path; cmd: the command as written; empty otherwise
	Args []string // cmd: the command split into words (Args[0] is the program); nil otherwise
}

// ParseURI checks s against the TPM URI grammar (docs/station.md), the one Open takes: soft, sim, mssim://HOST:PORT
// (PORT 1 to 65534: PORT+1 is the simulator's control port), an absolute, clean device path, or cmd:COMMAND with its
// placeholders filled (a placeholder left in is refused: ParseURITemplate takes those). Errors wrap ErrBadURI.
func ParseURI(s string) (URI, error) {
	u, err := ParseURITemplate(s)
	if err == nil && u.Kind == URICmd {
		for _, p := range [...]string{PlaceholderSerial, PlaceholderFixture} {
			if strings.Contains(u.Addr, p) {
				return URI{}, fmt.Errorf("tpm: %q: placeholder %s must be filled before the TPM is opened: %w", s, p, ErrBadURI)
			}
		}
	}
	return u, err
}

// ParseURITemplate is ParseURI for a URI as configured: a cmd: URI may still hold the placeholders {serial} and
// {fixture} (PlaceholderSerial, PlaceholderFixture). For checking station.yaml and flags before any unit is known.
func ParseURITemplate(s string) (URI, error) {
	switch {
	case s == "soft":
		return URI{Kind: URISoft}, nil
	case s == "sim":
		return URI{Kind: URISim}, nil
	case strings.HasPrefix(s, "mssim://"):
		addr := strings.TrimPrefix(s, "mssim://")
		host, port, serr := net.SplitHostPort(addr)
		if p, perr := strconv.Atoi(port); serr != nil || perr != nil || host == "" || p <= 0 || p > 65534 {
			return URI{}, fmt.Errorf("tpm: %q: want mssim://HOST:PORT: %w", s, ErrBadURI)
		}
		return URI{Kind: URIMssim, Addr: addr}, nil
	case strings.HasPrefix(s, "cmd:"):
		command := strings.TrimPrefix(s, "cmd:")
		args, err := SplitCommand(command)
		if err != nil {
			return URI{}, fmt.Errorf("tpm: %q: %v: %w", s, err, ErrBadURI)
		}
		return URI{Kind: URICmd, Addr: command, Args: args}, nil
	case filepath.IsAbs(s) && filepath.Clean(s) == s:
		return URI{Kind: URIDevice, Addr: s}, nil
	}
	return URI{}, fmt.Errorf("tpm: %q: use %s: %w", s, URIForms, ErrBadURI)
}

// ValidURI reports whether s is a TPM URI (ParseURI takes it).
func ValidURI(s string) bool {
	_, err := ParseURI(s)
	return err == nil
}

// ValidURITemplate reports whether s is a TPM URI once its placeholders are filled (ParseURITemplate takes it).
func ValidURITemplate(s string) bool {
	_, err := ParseURITemplate(s)
	return err == nil
}

// SplitCommand splits a command (a cmd: URI's, or any the station runs without a shell) into words as a POSIX shell would (blanks separate words; '…', "…" and \
// quote) and removes the quotes; nothing else: no shell ever runs it, so what would need one (expansions such as $VAR,
// $(…), `…`, ~, operators such as ; | > &) is refused rather than passed on literally. Globs and braces ({serial}) are
// ordinary characters. mvdan.cc/sh's parser finds the words; its expander is not used (it would expand $VAR from the
// station's environment, ~user from the user database, {a,b}, and panics on <(…)).
func SplitCommand(command string) ([]string, error) {
	if strings.IndexByte(command, 0) >= 0 {
		return nil, errors.New("command: a NUL byte") // the parser would drop it silently
	}
	p := syntax.NewParser(syntax.Variant(syntax.LangPOSIX))
	var args []string
	for w, err := range p.WordsSeq(strings.NewReader(command)) {
		if err != nil {
			return nil, fmt.Errorf("command: %v", err)
		}
		var b strings.Builder
		for i, part := range w.Parts {
			switch part := part.(type) {
			case *syntax.Lit:
				if i == 0 && strings.HasPrefix(part.Value, "~") {
					return nil, errors.New("command: ~ is not expanded (no shell runs the command): write the path out")
				}
				v, err := unescape(part.Value, func(byte) bool { return true })
				if err != nil {
					return nil, err
				}
				b.WriteString(v)
			case *syntax.SglQuoted:
				b.WriteString(part.Value)
			case *syntax.DblQuoted:
				for _, dp := range part.Parts {
					lit, ok := dp.(*syntax.Lit)
					if !ok {
						return nil, expansionError(command, dp)
					}
					v, err := unescape(lit.Value, func(c byte) bool { return strings.IndexByte("$`\"\\", c) >= 0 })
					if err != nil {
						return nil, err
					}
					b.WriteString(v)
				}
			default:
				return nil, expansionError(command, part)
			}
		}
		args = append(args, b.String())
	}
	if len(args) == 0 {
		return nil, errors.New("empty command")
	}
	return args, nil
}

// unescape removes the backslashes that quote a character (escaped(c): unquoted every character, in "…" only $ ` " \)
// and backslash-newline pairs (line continuations). A $ left unquoted is refused: shells differ on what it starts
// ($'…' in bash).
func unescape(s string, escaped func(byte) bool) (string, error) {
	if !strings.ContainsAny(s, `\$`) {
		return s, nil
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '$' {
			return "", errors.New(`command: a $ must be quoted ('$' or \$): no shell runs the command`)
		}
		if s[i] == '\\' && i+1 < len(s) {
			switch c := s[i+1]; {
			case c == '\n':
				i++
				continue
			case escaped(c):
				b.WriteByte(c)
				i++
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String(), nil
}

func expansionError(command string, n syntax.Node) error {
	start, end := int(n.Pos().Offset()), int(n.End().Offset())
	what := "an expansion"
	if start >= 0 && end <= len(command) && start < end {
		what = command[start:end]
	}
	return fmt.Errorf("command: %s is not expanded (no shell runs the command; to use one, run sh -c '…')", what)
}
