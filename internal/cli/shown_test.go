package cli

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestShown(t *testing.T) {
	long := strings.Repeat("x", 2<<20)
	for _, tc := range []struct{ in, want string }{
		{"invalid_grant: refresh token reused", "invalid_grant: refresh token reused"},
		{"two\nlines\r\tand a tab", "two lines  and a tab"},
		{"\x1b[2Jcleared \x1b]0;title\x07", "?[2Jcleared ?]0;title?"},
		{"rtl \u202Egnp.exe", "rtl ?gnp.exe"},
		{"bad \xff byte", "bad ? byte"},
		{long, strings.Repeat("x", MaxShown) + "… [2096752 bytes cut]"},
		{strings.Repeat("é", MaxShown), strings.Repeat("é", MaxShown/2) + "… [400 bytes cut]"},
	} {
		if got := Shown(tc.in); got != tc.want {
			t.Errorf("Shown(%.40q) = %.80q, want %.80q", tc.in, got, tc.want)
		}
	}
}

func FuzzShown(f *testing.F) {
	for _, s := range []string{"", "ok", "a\nb", "\x1b[31mred", "\u202E", "\xff\xfe", strings.Repeat("ü", 300), "\u0085\u2028"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out := Shown(in)
		if !utf8.ValidString(out) {
			t.Fatalf("Shown(%q) = %q: not valid UTF-8", in, out)
		}
		body, _, cut := strings.Cut(out, "… [")
		if cut && len(in) <= MaxShown {
			t.Fatalf("Shown(%q) = %q: cut a string within the bound", in, out)
		}
		if len(body) > MaxShown {
			t.Fatalf("Shown(%q): %d bytes shown, want at most %d", in, len(body), MaxShown)
		}
		for _, r := range body {
			if r == utf8.RuneError || unsafeRune(r) {
				t.Fatalf("Shown(%q) = %q keeps %U", in, out, r)
			}
		}
		if clean(in) && len(in) <= MaxShown && out != in {
			t.Fatalf("Shown(%q) = %q: changed a clean string", in, out)
		}
	})
}
