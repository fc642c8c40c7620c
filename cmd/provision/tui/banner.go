package tui

// font is a 5-row block-letter font for the result words: at 80 columns each letter is about 6% of the screen wide and
// a fifth of its height tall, readable from two metres.
var font = map[rune][5]string{
	'P': {"████ ", "█   █", "████ ", "█    ", "█    "},
	'A': {" ███ ", "█   █", "█████", "█   █", "█   █"},
	'S': {" ████", "█    ", " ███ ", "    █", "████ "},
	'F': {"█████", "█    ", "████ ", "█    ", "█    "},
	'I': {"███", " █ ", " █ ", " █ ", "███"},
	'L': {"█    ", "█    ", "█    ", "█    ", "█████"},
	'O': {" ███ ", "█   █", "█   █", "█   █", " ███ "},
	'K': {"█   █", "█  █ ", "███  ", "█  █ ", "█   █"},
}

// blockWord renders word in the block font (5 rows), or nil when word is empty or has a letter the font lacks.
func blockWord(word string) []string {
	if word == "" {
		return nil
	}
	rows := make([]string, 5)
	for i, r := range word {
		g, ok := font[r]
		if !ok {
			return nil
		}
		for j := range rows {
			if i > 0 {
				rows[j] += "  "
			}
			rows[j] += g[j]
		}
	}
	return rows
}
