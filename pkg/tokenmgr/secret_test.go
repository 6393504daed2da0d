package tokenmgr

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// Invariant 8: a record printed or logged in any way shows no token.
func TestRecordNeverPrintsTokens(t *testing.T) {
	rec := &record{V: 3, Status: StatusOK, AccessToken: "AT-SECRET-123", RefreshToken: "RT-SECRET-456", TokenType: "Bearer", Expiry: time.Now()}
	var logs bytes.Buffer
	slog.New(slog.NewJSONHandler(&logs, nil)).Info("rec", "rec", rec, "val", *rec, "at", rec.AccessToken)
	slog.New(slog.NewTextHandler(&logs, nil)).Info("rec", "rec", rec, "at", rec.RefreshToken)
	js, _ := json.Marshal(rec)
	outputs := []string{
		fmt.Sprintf("%v %+v %#v %s %q %x %X", rec, rec, rec, rec.AccessToken, rec.RefreshToken, rec.AccessToken, rec.RefreshToken),
		fmt.Sprintf("%v %+v %#v", *rec, *rec, *rec),
		fmt.Sprint(rec.AccessToken), fmt.Sprintln(rec.RefreshToken),
		string(js), logs.String(),
		(&CorruptRecordError{Grant: "g", Field: fAccess, Err: errors.New("x")}).Error(),
	}
	for _, out := range outputs {
		if strings.Contains(out, "SECRET") {
			t.Errorf("a token leaked: %s", out)
		}
	}
	if !strings.Contains(outputs[0], redacted) {
		t.Errorf("redaction marker missing: %s", outputs[0])
	}
}

// Bad records give a clear error naming the grant and field, and no panic.
func TestDecodeRecordErrors(t *testing.T) {
	good := func() map[string]string {
		return map[string]string{fV: "2", fStatus: StatusOK, fAccess: "plain:at", fRefresh: "plain:rt", fType: "Bearer", fExpiry: "1700000000000"}
	}
	tests := []struct {
		name, field string
		mod         func(map[string]string)
	}{
		{"bad version", fV, func(h map[string]string) { h[fV] = "two" }},
		{"zero version", fV, func(h map[string]string) { h[fV] = "0" }},
		{"bad status", fStatus, func(h map[string]string) { h[fStatus] = "fine" }},
		{"bad expiry", fExpiry, func(h map[string]string) { h[fExpiry] = "tomorrow" }},
		{"encrypted access token without key", fAccess, func(h map[string]string) { h[fAccess] = "enc:v1:k1:abcd" }},
		{"truncated refresh token", fRefresh, func(h map[string]string) { h[fRefresh] = "pla" }},
		{"empty access token", fAccess, func(h map[string]string) { h[fAccess] = "plain:" }},
		{"bad count", fCount, func(h map[string]string) { h[fCount] = "many" }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := good()
			tc.mod(h)
			_, err := decodeRecord("jira", h, plaintext{})
			var ce *CorruptRecordError
			if !errors.As(err, &ce) || ce.Field != tc.field || ce.Grant != "jira" {
				t.Errorf("decode = %v, want a CorruptRecordError for field %s", err, tc.field)
			}
		})
	}
	if _, err := decodeRecord("jira", good(), plaintext{}); err != nil {
		t.Errorf("good record: %v", err)
	}
}

func FuzzDecodeRecord(f *testing.F) {
	f.Add("2", StatusOK, "plain:at", "plain:rt", "1700000000000", "", "", "Bearer", "")
	f.Add("1", StatusReauthRequired, "", "", "", "5", "", "", "1764633600000.ab12")
	f.Add("x", "", "enc:v1:k:zz", "plain:", "-1", "a", "1", "mac", "x.y")
	f.Add("3", StatusOK, "plain:a\r\nb", "plain:rt", "", "", "", "Bearer\r\nX: y", "")
	f.Fuzz(func(t *testing.T, v, status, at, rt, expiry, count, retry, tokenType, family string) {
		h := map[string]string{fV: v, fStatus: status, fAccess: at, fRefresh: rt, fExpiry: expiry, fCount: count, fRetry: retry, fType: tokenType, fFamily: family}
		rec, err := decodeRecord("g", h, plaintext{})
		if err != nil {
			var ce *CorruptRecordError
			if !errors.As(err, &ce) {
				t.Fatalf("error of type %T, want *CorruptRecordError", err)
			}
			if msg := err.Error(); len(msg) > 600 || strings.ContainsAny(msg, "\r\n\x1b") {
				t.Fatalf("an error a person reads is unbounded or carries control characters: %q", msg)
			}
			return
		}
		if rec.V < 1 || (rec.Status != StatusOK && rec.Status != StatusReauthRequired) || !validFamily(rec.Family) {
			t.Fatalf("accepted an invalid record: %+v", rec)
		}
		if rec.TokenType != "" && checkTokenType(rec.TokenType) != nil {
			t.Fatalf("accepted token type %q", rec.TokenType)
		}
		if rec.Status == StatusOK && checkAccessToken(string(rec.AccessToken)) != nil {
			t.Fatalf("accepted an access token no header can carry")
		}
		if rec.Status == StatusOK {
			// Round trip: encoding and decoding again gives the same tokens.
			f, err := rec.fields("g", plaintext{})
			if err != nil {
				t.Fatal(err)
			}
			h2 := map[string]string{fV: v}
			if rec.Family == "" {
				h2 = map[string]string{fV: v} // sealed for this version now
			}
			for i := 0; i < len(f); i += 2 {
				h2[f[i].(string)] = f[i+1].(string)
			}
			rec2, err := decodeRecord("g", h2, plaintext{})
			if err != nil || rec2.AccessToken != rec.AccessToken || rec2.RefreshToken != rec.RefreshToken || !rec2.Expiry.Equal(rec.Expiry) {
				t.Fatalf("round trip failed: %v", err)
			}
		}
	})
}
