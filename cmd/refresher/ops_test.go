package main

import (
	"strings"
	"testing"
	"time"
)

func FuzzParseSeed(f *testing.F) {
	f.Add(`{"access_token":"a","refresh_token":"r","expires_in":3600}`)
	f.Add(`{"access_token":"a","refresh_token":"r","expiry":"2026-01-01T00:00:00Z","scope":"x"}`)
	f.Add(`{"access_token":1}`)
	f.Add(`<html>`)
	now := time.Unix(1_800_000_000, 0)
	f.Fuzz(func(t *testing.T, in string) {
		tok, err := parseSeed(strings.NewReader(in), now)
		if err != nil {
			if tok != nil {
				t.Fatal("token and error")
			}
			return
		}
		if tok.AccessToken == "" || tok.RefreshToken == "" || tok.Expiry.IsZero() {
			t.Fatalf("accepted an incomplete token")
		}
	})
}
