package tokenmgr

import (
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Untrusted text (a provider's error code and reason phrase, a value found in
// a corrupt record, a 401's challenge) reaches errors, logs and the record's
// reason, where a person reads it. It is bounded and made printable first
// (invariant 12): a provider cannot fill a log with megabytes, or a
// terminal with escape sequences.

// The bounds, in bytes.
const (
	maxShownCode   = 64  // an OAuth error code, a reason phrase
	maxShownValue  = 64  // a value quoted from a corrupt record
	maxStoredNote  = 400 // a reason stored in the record
	cutMark        = "…"
	replacementOut = '?'
)

// printable replaces control and format characters and invalid UTF-8 with
// '?' and line breaks with spaces, then bounds s to n bytes, marking a cut.
func printable(s string, n int) string {
	clean := strings.Map(func(r rune) rune {
		switch {
		case r == '\n' || r == '\r' || r == '\t':
			return ' '
		case r == utf8.RuneError, unicode.IsControl(r), unicode.Is(unicode.Cf, r):
			return replacementOut
		}
		return r
	}, strings.ToValidUTF8(s, string(replacementOut)))
	return bounded(clean, n)
}

// bounded cuts s to at most n bytes, on a rune boundary, marking the cut.
func bounded(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n - len(cutMark)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + cutMark
}

// quoted is strconv.Quote of a bounded value: for corrupt record values.
func quoted(s string) string {
	q := strconv.Quote(bounded(s, maxShownValue))
	if len(q) > 2*maxShownValue {
		// Mostly escapes (invalid UTF-8, control bytes): each byte would
		// print as four characters. Show it with them replaced instead.
		q = strconv.Quote(printable(s, maxShownValue))
	}
	return q
}
