package tokenmgr

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
	"golang.org/x/oauth2"
)

// Invariant 7: Token() on a fresh cached token does no I/O and allocates
// nothing.
func TestHotPathNoRedisNoAllocs(t *testing.T) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Atlassian)
	m := e.manager(Atlassian, nil)
	e.seed(m)
	eventually(t, "the subscription", m.Subscribed)
	ctx := t.Context()
	if _, err := m.Token(ctx, e.grant); err != nil {
		t.Fatal(err)
	}
	before := e.commands.Load()
	allocs := testing.AllocsPerRun(10000, func() {
		if _, err := m.Token(ctx, e.grant); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("Token() allocates %.1f times per call, want 0", allocs)
	}
	if n := e.commands.Load() - before; n != 0 {
		t.Errorf("10000 Token() calls on a fresh token sent %d Redis commands, want 0", n)
	}
}

// BenchmarkToken compares the hot path with x/oauth2's ReuseTokenSource, the
// mutex-guarded peer. Run with -cpu 1,2.
func BenchmarkToken(b *testing.B) {
	ctx := context.Background()
	tok := &oauth2.Token{AccessToken: "a", RefreshToken: "r", TokenType: "Bearer", Expiry: time.Now().Add(time.Hour)}
	reuse := oauth2.ReuseTokenSource(tok, oauth2.StaticTokenSource(tok))
	m := benchManager(b, tok)
	b.Run("impl=tokenmgr/serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := m.Token(ctx, "bench"); err != nil {
				b.Fatal(err)
			}
		}
	})
	h := m.Grant("bench")
	b.Run("impl=tokenmgr-handle/serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := h.Token(ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("impl=oauth2.ReuseTokenSource/serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := reuse.Token(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("impl=tokenmgr/parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := m.Token(ctx, "bench"); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
	b.Run("impl=tokenmgr-handle/parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := h.Token(ctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
	b.Run("impl=oauth2.ReuseTokenSource/parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := reuse.Token(); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
}

func benchManager(b *testing.B, tok *oauth2.Token) *Manager {
	b.Helper()
	mr := newBenchRedis(b)
	idp := tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: tokenmgrtest.Atlassian})
	b.Cleanup(idp.Close)
	m, err := New(context.Background(), Options{
		Redis:    mr,
		OAuth2:   idp.OAuthConfig(oauth2.AuthStyleInHeader),
		Provider: Atlassian,
		Sealer:   plaintext{},
		Logger:   discardLogger(),
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = m.Close(context.Background()) })
	if _, err := m.Seed(context.Background(), "bench", tok, SeedOptions{}); err != nil {
		b.Fatal(err)
	}
	if _, err := m.Token(context.Background(), "bench"); err != nil {
		b.Fatal(err)
	}
	return m
}

// countingClock counts reads of its time.
type countingClock struct {
	*tokenmgrtest.Clock
	reads atomic.Int64
}

func (c *countingClock) Now() time.Time { c.reads.Add(1); return c.Clock.Now() }

// Invariant 7: with a Clock, a fresh Token() reads no clock; the entry
// turns due and expired by timers at its deadlines, and a token is never
// served at or past its hard deadline (with the controlled clock the bound
// is exact: the timer fires as the clock passes it).
func TestHotPathReadsNoClock(t *testing.T) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
	clock := &countingClock{Clock: e.clock}
	m := e.manager(Strict, func(o *Options) { o.Clock = clock })
	seeded := e.seed(m)
	h := m.Grant(e.grant)
	if _, err := h.Token(t.Context()); err != nil {
		t.Fatal(err)
	}
	before := clock.reads.Load()
	for range 1000 {
		if _, err := h.Token(t.Context()); err != nil {
			t.Fatal(err)
		}
		if _, err := m.Token(t.Context(), e.grant); err != nil {
			t.Fatal(err)
		}
	}
	if n := clock.reads.Load() - before; n != 0 {
		t.Errorf("2000 fresh Token() calls read the clock %d times, want 0", n)
	}
	en := m.lookup(e.grant).entry.Load()
	e.clock.Advance(en.hardAt.Sub(e.clock.Now()) - time.Nanosecond)
	e.idp.SetLatency(time.Hour) // no refresh can finish: what is served is the cache
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	tok, err := h.Token(ctx)
	cancel()
	if err != nil || tok.AccessToken != seeded.AccessToken {
		t.Fatalf("a nanosecond before the hard deadline the cached token was not served: %v", err)
	}
	e.clock.Advance(time.Nanosecond)
	ctx, cancel = context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	if tok, err := h.Token(ctx); err == nil && tok.AccessToken == seeded.AccessToken {
		t.Errorf("the cached token was served at its hard deadline")
	}
}
