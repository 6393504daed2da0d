package tokenmgrtest

import (
	"context"
	"net/http"
	"testing"
	"time"

	"golang.org/x/oauth2"
)

// With an answer delay, a client that gives up has still spent its
// refresh token: the rotation happened before the wait.
func TestAnswerDelaySpendsTheToken(t *testing.T) {
	srv := NewServer(Config{Profile: Strict, AuthStyle: oauth2.AuthStyleInParams})
	defer srv.Close()
	tok := srv.NewGrant("")
	srv.SetAnswerDelay(500 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	ctx = context.WithValue(ctx, oauth2.HTTPClient, &http.Client{})
	if _, err := srv.OAuthConfig(oauth2.AuthStyleInParams).TokenSource(ctx, &oauth2.Token{RefreshToken: tok.RefreshToken}).Token(); err == nil {
		t.Fatal("the client did not time out")
	}
	if s := srv.Stats(); s.Rotations != 1 {
		t.Errorf("rotations %d, want 1: the token was spent before the delay", s.Rotations)
	}
}

func TestClock(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	c := NewClock(start)
	c.Advance(90 * time.Minute)
	if got := c.Now().Sub(start); got != 90*time.Minute {
		t.Errorf("advanced %s, want 90m", got)
	}
}
