package tokenmgr

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func sampleMessage(tb testing.TB, s Sealer) (body string, rec *record) {
	tb.Helper()
	rec = &record{V: 2, Family: "1764633600000.0123456789abcdef", Status: StatusOK, AccessToken: "at-" + secret(strings.Repeat("a", 48)),
		RefreshToken: "rt-" + secret(strings.Repeat("r", 48)), TokenType: "Bearer", Expiry: time.UnixMilli(1764637200000),
		RotatedAt: time.UnixMilli(1764633600000), RotatedBy: "host-1234", Scope: "read:jira-work offline_access", RefreshCount: 1}
	f, err := rec.fields("g", s)
	if err != nil {
		tb.Fatal(err)
	}
	msg, err := message("g", rec, f)
	if err != nil {
		tb.Fatal(err)
	}
	return strings.TrimPrefix(msg, "g 2 "+messagePrefix), rec
}

// A rotation message carries its record: decoded, it is the record.
func TestMessageRoundTrip(t *testing.T) {
	k1, _ := GenerateKey("k1")
	kr, _ := NewKeyring(k1)
	body, want := sampleMessage(t, kr)
	got, err := decodeMessage("g", body, kr)
	if err != nil {
		t.Fatal(err)
	}
	if got.V != want.V || got.Family != want.Family || got.AccessToken != want.AccessToken || got.RefreshToken != want.RefreshToken ||
		!got.Expiry.Equal(want.Expiry) || got.Scope != want.Scope || got.RefreshCount != want.RefreshCount {
		t.Errorf("decoded %+v, want %+v", got, want)
	}
	if _, err := decodeMessage("other-grant", body, kr); err == nil {
		t.Error("a message opened for another grant")
	}
}

// FuzzDecodeMessage: anyone who can publish reaches the decoder; it returns
// a record or a *CorruptRecordError, never a panic.
func FuzzDecodeMessage(f *testing.F) {
	body, _ := sampleMessage(f, plaintext{})
	f.Add(body)
	f.Add("v=1:2status=2:ok")
	f.Add("v=99999999999999999999:x")
	f.Add("=0:")
	f.Fuzz(func(t *testing.T, body string) {
		rec, err := decodeMessage("g", body, plaintext{})
		if err != nil {
			var ce *CorruptRecordError
			if !errors.As(err, &ce) {
				t.Fatalf("error of type %T", err)
			}
			return
		}
		if rec.V < 1 {
			t.Fatalf("accepted version %d", rec.V)
		}
	})
}

// BenchmarkDecodeMessage is the cost of adopting a rotation without a read,
// which every subscribed process pays per rotation (figure 5).
func BenchmarkDecodeMessage(b *testing.B) {
	k1, _ := GenerateKey("k1")
	kr, _ := NewKeyring(k1)
	body, _ := sampleMessage(b, kr)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := decodeMessage("g", body, kr); err != nil {
			b.Fatal(err)
		}
	}
}
