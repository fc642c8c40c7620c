package label

import (
	"fmt"
	"strings"
)

// The ZPL label: 2"×1" at 203 dpi (406×203 dots). The QR code on the left, the text on the right.
const (
	zplWidth  = 406
	zplHeight = 203
	zplQRX    = 16
	zplQRY    = 10 // ^BQ adds its own offset of about 10 dots above the code
)

// zplQRMag is the QR code's module size in dots: 4 while the code is version 6 or less (41 modules, 164 dots; 106
// bytes at error correction M), else 3 (a 128-byte serial needs version 10, 57 modules: 171 dots).
func zplQRMag(payload string) int {
	if len(payload) <= 106 {
		return 4
	}
	return 3
}

// zplSerialHeight is the serial's font height: as large as its length allows in the text column.
func zplSerialHeight(serial string) (height, lines int) {
	switch n := len([]rune(serial)); {
	case n <= 9:
		return 34, 1
	case n <= 13:
		return 26, 1
	case n <= 18:
		return 20, 2
	}
	return 16, 4
}

func (l Label) zpl() []byte {
	var b strings.Builder
	p := l.Payload()
	mag := zplQRMag(p)
	x := zplQRX + 41*mag + 16 // the text column
	if mag == 3 {
		x = zplQRX + 57*mag + 12
	}
	w := zplWidth - x - 8
	line := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	line("^XA")
	line("^FXprovision label %s^FS", strings.TrimSuffix(Prefix, "/"))
	line("^CI28")
	line("^PW%d", zplWidth)
	line("^LL%d", zplHeight)
	line("^LH0,0")
	// QR code, model 2; field data "MA,": error correction M, automatic input mode.
	line("^FO%d,%d^BQN,2,%d%sMA,%s^FS", zplQRX, zplQRY, mag, zplFD(p), zplEscape(p))
	y := 12
	if l.Title != "" {
		line("^FO%d,%d^A0N,20,20^FB%d,1,0,L,0%s%s^FS", x, y, w, zplFD(l.Title), zplEscape(l.Title))
		y += 26
	}
	h, lines := zplSerialHeight(l.Serial)
	line("^FO%d,%d^A0N,%d,%d^FB%d,%d,0,L,0%s%s^FS", x, y, h, h, w, lines, zplFD(l.Serial), zplEscape(l.Serial))
	y = 118
	if d := l.date(); d != "" {
		line("^FO%d,%d^A0N,24,24%s^FS", x, y, "^FD"+d)
	}
	line("^FO%d,%d^A0N,18,18^FDcert %s^FS", x, y+30, l.CertSHA256[:12])
	if l.Station != "" {
		line("^FO%d,%d^A0N,18,18^FB%d,1,0,L,0%s%s^FS", x, y+54, w, zplFD(l.Station), zplEscape(l.Station))
	}
	line("^PQ1")
	line("^XZ")
	return []byte(b.String())
}

// zplFD starts a field's data: with ^FH (hexadecimal escapes, '_' as the indicator) when the text holds a character
// ZPL would read as a command.
func zplFD(s string) string {
	if strings.ContainsAny(s, "^~_") {
		return "^FH_^FD"
	}
	return "^FD"
}

// zplEscape escapes '^', '~' and '_' as _XX when the field uses ^FH.
func zplEscape(s string) string {
	if !strings.ContainsAny(s, "^~_") {
		return s
	}
	return strings.NewReplacer("_", "_5F", "^", "_5E", "~", "_7E").Replace(s)
}
