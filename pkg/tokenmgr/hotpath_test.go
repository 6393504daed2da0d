package tokenmgr

import (
	"context"
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
