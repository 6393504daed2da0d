package cli

import (
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// MaxShown bounds an untrusted string shown to a person: a provider's
// error, a record's reason, a value or a name read from Redis. Reasons of
// megabytes have been seen, and /api/grants grew to 20 MB with them.
const MaxShown = 400

// Shown returns s fit to show a person on one line: line breaks and tabs
// become spaces; other control and format characters (ESC, BEL,
// bidirectional overrides, zero-width characters) and invalid UTF-8
// become '?', so nothing grows; and the result is cut to MaxShown bytes
// with a note of how much was cut. A terminal, a log viewer or a page then
// shows the text as it is, never as commands, and JSON carrying it stays
// small and valid.
func Shown(s string) string {
	if len(s) <= MaxShown && clean(s) {
		return s
	}
	var b strings.Builder
	for i, r := range s {
		switch {
		case r == '\t' || r == '\n' || r == '\r' || r == '\u0085' || r == '\u2028' || r == '\u2029':
			r = ' '
		case r == utf8.RuneError || unsafeRune(r):
			r = '?'
		}
		if b.Len()+utf8.RuneLen(r) > MaxShown {
			b.WriteString("… [" + strconv.Itoa(len(s)-i) + " bytes cut]")
			break
		}
		b.WriteRune(r)
	}
	return b.String()
}

// unsafeRune reports the characters that can make text display as
// something else: controls (C0, DEL, C1) and format characters (bidi
// overrides, zero-width joiners and spaces).
func unsafeRune(r rune) bool {
	return unicode.IsControl(r) || unicode.Is(unicode.Cf, r) || unicode.In(r, unicode.Zl, unicode.Zp)
}

func clean(s string) bool {
	for _, r := range s {
		if r == utf8.RuneError || unsafeRune(r) {
			return false
		}
	}
	return true
}
