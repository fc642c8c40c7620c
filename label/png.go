package label

import (
	"bytes"
	"fmt"
	"image"
	"image/color"
	"image/png"

	qrcode "github.com/skip2/go-qrcode"
	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

// The PNG label: 2"×1" at 300 dpi (600×300 pixels), black on white. The QR code (with its quiet zone) on the left, the
// text on the right in a bitmap font scaled up by whole pixels, so every edge stays sharp.
const (
	pngWidth  = 600
	pngHeight = 300
	pngMargin = 8
)

var face = basicfont.Face7x13

const (
	glyphW = 7
	glyphH = 13
)

func (l Label) png() ([]byte, error) {
	q, err := qrcode.New(l.Payload(), qrcode.Medium)
	if err != nil {
		return nil, fmt.Errorf("label: qr code: %w", err)
	}
	bits := q.Bitmap() // with the 4-module quiet zone
	n := len(bits)
	scale := (pngHeight - 2*pngMargin) / n
	if scale < 1 {
		return nil, fmt.Errorf("label: qr code of %d modules does not fit", n)
	}
	img := image.NewGray(image.Rect(0, 0, pngWidth, pngHeight))
	for i := range img.Pix {
		img.Pix[i] = 0xff
	}
	top := (pngHeight - n*scale) / 2
	for y, row := range bits {
		for x, on := range row {
			if on {
				fill(img, pngMargin+x*scale, top+y*scale, scale, scale)
			}
		}
	}
	x := pngMargin + n*scale + 4
	w := pngWidth - x - pngMargin
	y := 24
	if l.Title != "" {
		y += drawText(img, x, y, w, 2, 1, l.Title) + 10
	}
	y += drawText(img, x, y, w, 4, 3, l.Serial) + 16
	if d := l.date(); d != "" {
		y += drawText(img, x, y, w, 3, 1, d) + 12
	}
	y += drawText(img, x, y, w, 2, 1, "cert "+l.CertSHA256[:12]) + 10
	if l.Station != "" {
		drawText(img, x, y, w, 2, 1, l.Station)
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		return nil, fmt.Errorf("label: png: %w", err)
	}
	return buf.Bytes(), nil
}

func fill(img *image.Gray, x, y, w, h int) {
	for j := y; j < y+h; j++ {
		for i := x; i < x+w; i++ {
			img.SetGray(i, j, color.Gray{})
		}
	}
}

// drawText draws s at (x, y) within width w in the largest scale up to maxScale at which it takes at most maxLines
// lines (cut into lines by characters; at scale 1 it takes as many as it needs), and returns the height it used.
func drawText(img *image.Gray, x, y, w, maxScale, maxLines int, s string) int {
	r := []rune(s)
	scale, per := 1, max(w/glyphW, 1)
	for sc := maxScale; sc >= 1; sc-- {
		p := max(w/(glyphW*sc), 1)
		if (len(r)+p-1)/p <= maxLines {
			scale, per = sc, p
			break
		}
	}
	lines := 0
	for len(r) > 0 {
		k := min(per, len(r))
		drawLine(img, x, y+lines*(glyphH+2)*scale, scale, string(r[:k]))
		r = r[k:]
		lines++
	}
	return lines * (glyphH + 2) * scale
}

// drawLine renders one line in the bitmap font at scale 1, then copies it scaled up by whole pixels.
func drawLine(img *image.Gray, x, y, scale int, s string) {
	small := image.NewAlpha(image.Rect(0, 0, glyphW*len([]rune(s)), glyphH))
	d := font.Drawer{Dst: small, Src: image.Opaque, Face: face, Dot: fixed.P(0, face.Ascent)}
	d.DrawString(s)
	b := small.Bounds()
	for j := b.Min.Y; j < b.Max.Y; j++ {
		for i := b.Min.X; i < b.Max.X; i++ {
			if small.AlphaAt(i, j).A >= 0x80 {
				fill(img, x+i*scale, y+j*scale, scale, scale)
			}
		}
	}
}
