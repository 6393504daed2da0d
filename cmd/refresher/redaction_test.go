package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tokenmgr/tokenmgr/internal/testbin"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// A fleet with debug logging through rotations, a 429, a dropped answer and
// a dead grant: no token the IdP issued appears in any log line, error
// string or /metrics page.
func TestNoTokenInLogsErrorsOrMetrics(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Atlassian)
	logs := &testbin.Buffer{}
	debug := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	key, _ := tokenmgr.GenerateKey("k1")
	keyring, _ := tokenmgr.NewKeyring(key)
	opts := func() tokenmgr.Options {
		o := w.options(tokenmgr.Atlassian)
		o.Logger, o.Sealer = debug, keyring
		return o
	}
	rf, err := newSingle(t.Context(), defaultRun(), opts())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rf.m.Close(context.Background()) })
	var workers []*tokenmgr.Manager
	for range 3 {
		m, err := tokenmgr.New(t.Context(), opts())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = m.Close(context.Background()) })
		workers = append(workers, m)
	}
	for i := range 3 {
		tok := w.idp.NewGrant("read:jira-work")
		tok.Expiry = w.clock.Now().Add(time.Hour)
		if _, err := rf.m.Seed(t.Context(), fmt.Sprintf("g%d", i), tok, tokenmgr.SeedOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	dead := w.idp.NewGrant("")
	dead.RefreshToken = "fake-rt-unknown-to-the-idp-" + strings.Repeat("x", 20)
	dead.Expiry = w.clock.Now().Add(time.Hour)
	if _, err := rf.m.Seed(t.Context(), "dead", dead, tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	var errs []string
	for step := range 60 * 4 { // four hours in one-minute steps
		switch step {
		case 50:
			w.idp.Fail429(1, 10*time.Second)
		case 110:
			w.idp.DropResponses(1)
		}
		tickAndWait(t.Context(), rf.sched)
		for _, m := range workers {
			for _, g := range []string{"g0", "g1", "g2", "dead"} {
				tok, err := m.Token(t.Context(), g)
				if err != nil {
					errs = append(errs, err.Error(), fmt.Sprintf("%v %+v %#v", err, err, err))
				} else {
					_ = tok
				}
			}
		}
		w.clock.Advance(time.Minute)
	}
	rec := httptest.NewRecorder()
	rf.handler.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	metrics, _ := io.ReadAll(rec.Body)
	if !strings.Contains(string(metrics), "tokenmgr_refresher_refreshes_total") {
		t.Fatalf("no metrics page")
	}
	s := w.idp.Stats()
	if s.Rotations < 9 || s.Injected429 != 1 || s.Dropped != 1 || len(errs) == 0 {
		t.Fatalf("the run did not exercise what it should: %+v, %d errors", s, len(errs))
	}
	haystacks := map[string]string{"logs": logs.String(), "errors": strings.Join(errs, "\n"), "metrics": string(metrics)}
	tokens := append(w.idp.IssuedTokens(), dead.RefreshToken)
	for where, text := range haystacks {
		for _, tok := range tokens {
			if strings.Contains(text, tok) {
				t.Errorf("a token appears in the %s", where)
				break
			}
		}
	}
	t.Logf("scanned %d log bytes, %d error strings and %d metrics bytes for %d issued tokens: 0 hits expected", len(haystacks["logs"]), len(errs), len(metrics), len(tokens))
}
