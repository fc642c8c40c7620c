package station

import (
	"bufio"
	"bytes"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// ErrSerialFile: the serial list has bad lines (each is listed in the error).
var ErrSerialFile = errors.New("bad serial file")

// LineError is one bad line of a serial list.
type LineError struct {
	Line   int
	Reason string
}

// SerialFileError lists every bad line of a serial list.
type SerialFileError struct {
	Name  string
	Lines []LineError
}

func (e *SerialFileError) Error() string {
	parts := make([]string, 0, len(e.Lines))
	for i, l := range e.Lines {
		if i == 10 {
			parts = append(parts, fmt.Sprintf("and %d more", len(e.Lines)-10))
			break
		}
		if l.Line == 0 {
			parts = append(parts, l.Reason) // the file as a whole
			continue
		}
		parts = append(parts, fmt.Sprintf("line %d: %s", l.Line, l.Reason))
	}
	return fmt.Sprintf("%s: %d bad line(s): %s", e.Name, len(e.Lines), strings.Join(parts, "; "))
}

func (e *SerialFileError) Unwrap() error { return ErrSerialFile }

// MaxSerialFile bounds a serial list (a million units at 64 bytes a line).
const MaxSerialFile = 64 << 20

// ParseSerialList reads a list of units: either one serial per line (blank lines and lines starting with '#' are
// skipped), or CSV whose header has a "serial" column (a first line that is just "serial", in any case, is the header
// of a one-column list); the other columns become unit fields for templates (names are
// lowercased; they must be letters, digits and '_'). Every line is checked against rule, duplicates included, and all
// problems are reported together, before anything is done.
func ParseSerialList(name string, r io.Reader, rule *SerialRule) ([]UnitRequest, error) {
	data, err := io.ReadAll(io.LimitReader(r, MaxSerialFile+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if len(data) > MaxSerialFile {
		return nil, &SerialFileError{Name: name, Lines: []LineError{{0, fmt.Sprintf("file larger than %d MiB", MaxSerialFile>>20)}}}
	}
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf")) // a BOM from spreadsheet exports
	var units []UnitRequest
	var bad []LineError
	header, isCSV := csvHeader(data)
	if isCSV {
		units, bad = parseCSV(data, header)
	} else {
		units, bad = parseLines(data)
	}
	check := newSerialCheck(rule)
	for _, u := range units {
		if why := check.refuse(u.Serial, u.line); why != "" {
			bad = append(bad, LineError{u.line, why})
		}
	}
	if len(bad) > 0 {
		sortLineErrors(bad)
		return nil, &SerialFileError{Name: name, Lines: bad}
	}
	if len(units) == 0 {
		reason := "no serials"
		if isCSV {
			reason = "only a header line, no serials"
		}
		return nil, &SerialFileError{Name: name, Lines: []LineError{{0, reason}}}
	}
	for i := range units {
		units[i].line = 0
	}
	return units, nil
}

// serialCheck checks the serials of a list as they are read: each against the station's rule, and against the ones
// before it.
type serialCheck struct {
	rule *SerialRule
	seen map[string]int // serial -> its line
}

func newSerialCheck(rule *SerialRule) *serialCheck {
	return &serialCheck{rule: rule, seen: map[string]int{}}
}

// refuse says why the serial on line is refused (a LineError's reason), or "" when it is taken.
func (c *serialCheck) refuse(serial string, line int) string {
	if err := c.rule.Check(serial); err != nil {
		return strings.TrimSuffix(err.Error(), ": "+ErrBadSerial.Error())
	}
	if first, dup := c.seen[serial]; dup {
		return fmt.Sprintf("serial %q repeats line %d", serial, first)
	}
	c.seen[serial] = line
	return ""
}

// ParseTargets reads a --targets CSV: serial,image per line (a header line "serial,image" is optional; '#' starts a
// comment). Every serial is checked as in ParseSerialList and every image must exist; all problems are reported
// together.
func ParseTargets(name string, data []byte, rule *SerialRule) ([]BatchUnit, error) {
	r := csv.NewReader(bytes.NewReader(data))
	r.Comment = '#'
	r.FieldsPerRecord = -1
	var units []BatchUnit
	var bad []LineError
	check := newSerialCheck(rule)
	for {
		rec, err := r.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			bad = append(bad, LineError{Reason: err.Error()})
			break
		}
		line, _ := r.FieldPos(0)
		if len(rec) == 2 && strings.EqualFold(strings.TrimSpace(rec[0]), "serial") && strings.EqualFold(strings.TrimSpace(rec[1]), "image") {
			continue
		}
		if len(rec) != 2 {
			bad = append(bad, LineError{Line: line, Reason: "want serial,image"})
			continue
		}
		serial, img := strings.TrimSpace(rec[0]), strings.TrimSpace(rec[1])
		if why := check.refuse(serial, line); why != "" {
			bad = append(bad, LineError{Line: line, Reason: why})
			continue
		}
		if _, err := os.Stat(img); err != nil {
			bad = append(bad, LineError{Line: line, Reason: err.Error()})
			continue
		}
		units = append(units, BatchUnit{UnitRequest: UnitRequest{Serial: serial}, Target: img})
	}
	if len(bad) > 0 {
		return nil, &SerialFileError{Name: name, Lines: bad}
	}
	if len(units) == 0 {
		return nil, &SerialFileError{Name: name, Lines: []LineError{{Reason: "no targets"}}}
	}
	return units, nil
}

func sortLineErrors(l []LineError) {
	for i := 1; i < len(l); i++ {
		for j := i; j > 0 && l[j].Line < l[j-1].Line; j-- {
			l[j], l[j-1] = l[j-1], l[j]
		}
	}
}

// csvHeader reports whether the first non-comment line is a CSV header with a "serial" column.
func csvHeader(data []byte) ([]string, bool) {
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, MaxSerialFile)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if !strings.Contains(line, ",") {
			// A one-column list whose first line is "serial" (any case): a header, not a unit called "serial".
			if strings.EqualFold(strings.Trim(line, "\" \t"), "serial") {
				return []string{"serial"}, true
			}
			return nil, false
		}
		rec, err := csv.NewReader(strings.NewReader(line)).Read()
		if err != nil {
			return nil, false
		}
		for _, f := range rec {
			if strings.EqualFold(strings.TrimSpace(f), "serial") {
				return rec, true
			}
		}
		return nil, false
	}
	return nil, false
}

func parseLines(data []byte) ([]UnitRequest, []LineError) {
	var units []UnitRequest
	var bad []LineError
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, MaxSerialFile)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(strings.TrimSuffix(sc.Text(), "\r"))
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		units = append(units, UnitRequest{Serial: line, line: n})
	}
	if err := sc.Err(); err != nil {
		bad = append(bad, LineError{n + 1, err.Error()})
	}
	return units, bad
}

func parseCSV(data []byte, _ []string) ([]UnitRequest, []LineError) {
	r := csv.NewReader(bytes.NewReader(data))
	r.Comment = '#'
	r.FieldsPerRecord = -1
	var units []UnitRequest
	var bad []LineError
	var cols []string
	serialCol := -1
	for {
		rec, err := r.Read()
		if err == io.EOF {
			break
		}
		line := 0
		if err == nil {
			line, _ = r.FieldPos(0)
		} else {
			var pe *csv.ParseError
			if errors.As(err, &pe) {
				line = pe.Line
			}
			reason := err
			if pe != nil {
				reason = pe.Err
			}
			bad = append(bad, LineError{line, "not valid CSV: " + reason.Error()})
			if pe == nil || pe.Err == csv.ErrQuote || pe.Err == csv.ErrBareQuote {
				break // the reader cannot resynchronise after a broken quote
			}
			continue
		}
		if cols == nil {
			seenCol := map[string]bool{}
			for i, c := range rec {
				c = strings.ToLower(strings.TrimSpace(c))
				if c == "serial" {
					serialCol = i
				} else if !fieldNameRE.MatchString(c) {
					bad = append(bad, LineError{line, fmt.Sprintf("column %q: names are lowercase letters, digits and '_'", c)})
				}
				if seenCol[c] {
					bad = append(bad, LineError{line, fmt.Sprintf("column %q appears twice", c)})
				}
				seenCol[c] = true
				cols = append(cols, c)
			}
			continue
		}
		if len(rec) == 1 && strings.TrimSpace(rec[0]) == "" {
			continue
		}
		if len(rec) != len(cols) {
			bad = append(bad, LineError{line, fmt.Sprintf("%d fields, the header has %d", len(rec), len(cols))})
			continue
		}
		u := UnitRequest{Serial: strings.TrimSpace(rec[serialCol]), line: line}
		for i, c := range cols {
			if i != serialCol {
				if u.Fields == nil {
					u.Fields = map[string]string{}
				}
				u.Fields[c] = strings.TrimSpace(rec[i])
			}
		}
		units = append(units, u)
	}
	return units, bad
}
