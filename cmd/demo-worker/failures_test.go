package main

import (
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/internal/testbin"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// A worker's report and log name what made its requests fail, with a
// bounded message that never holds a token: a wrong encryption key, a
// corrupt record, a token no header can carry, refused Redis credentials.
func TestFailureClasses(t *testing.T) {
	idp := tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: tokenmgrtest.Strict, AuthStyle: oauth2.AuthStyleInParams})
	defer idp.Close()
	mr := miniredis.RunT(t)
	mine, _ := tokenmgr.GenerateKey("k1")
	other, _ := tokenmgr.GenerateKey("k1") // the same id, other key material
	keyring, _ := tokenmgr.NewKeyring(mine)
	wrongKeyring, _ := tokenmgr.NewKeyring(other)
	options := func(s tokenmgr.Sealer, password string) tokenmgr.Options {
		rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), Password: password})
		t.Cleanup(func() { rdb.Close() })
		return tokenmgr.Options{Redis: rdb, Sealer: s, AllowPlaintext: s == nil, OAuth2: idp.OAuthConfig(oauth2.AuthStyleInParams), Provider: tokenmgr.Strict, Logger: slog.New(slog.DiscardHandler)}
	}
	seeder, err := tokenmgr.NewAdmin(options(keyring, ""))
	if err != nil {
		t.Fatal(err)
	}
	var tokens []string
	seed := func(grant string, tok *oauth2.Token) {
		t.Helper()
		tokens = append(tokens, tok.AccessToken, tok.RefreshToken)
		if _, err := seeder.Seed(t.Context(), grant, tok, tokenmgr.SeedOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	seed("good", idp.NewGrant(""))
	seed("damaged", idp.NewGrant(""))
	mr.HSet("tm:{damaged}:tok", "expiry", "soon")
	// The library refuses to seed a token no header can carry; one written
	// to Redis by other means is a corrupt record (here in clear, so the
	// test can write it).
	bad := idp.NewGrant("")
	if _, err := seeder.Seed(t.Context(), "crlf", &oauth2.Token{AccessToken: bad.AccessToken + "\r\nX-Injected: 1", RefreshToken: bad.RefreshToken}, tokenmgr.SeedOptions{}); err == nil {
		t.Fatal("a token with a line break was seeded")
	}
	plain, err := tokenmgr.NewAdmin(options(nil, ""))
	if err != nil {
		t.Fatal(err)
	}
	tokens = append(tokens, bad.AccessToken, bad.RefreshToken)
	if _, err := plain.Seed(t.Context(), "crlf", bad, tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	mr.HSet("tm:{crlf}:tok", "access_token", "plain:"+bad.AccessToken+"\r\nX-Injected: 1")

	for _, tc := range []struct {
		name, grant, password string
		sealer                tokenmgr.Sealer
		class, says           string
	}{
		{"wrong key", "good", "", wrongKeyring, "corrupt_record", `does not decrypt with key "k1"`},
		{"corrupt record", "damaged", "", keyring, "corrupt_record", "field expiry"},
		{"bad token", "crlf", "", nil, "corrupt_record", "not a bearer token"},
		{"wrong Redis password", "good", "not-the-password", keyring, "store_denied", "WRONGPASS"},
	} {
		if tc.password != "" {
			mr.RequireAuth("the-password")
		}
		m, err := tokenmgr.New(t.Context(), options(tc.sealer, tc.password))
		if err != nil {
			t.Fatal(err)
		}
		logs := &testbin.Buffer{}
		rep := runLoad(t.Context(), loadSpec{client: workerClient(m, tc.grant), url: idp.APIURL(), concurrency: 2, requests: 6,
			log: slog.New(slog.NewTextHandler(logs, nil))})
		_ = m.Close(context.Background())
		if rep.Failed != 6 || rep.Failures[tc.class] != 6 || !strings.Contains(rep.Errors[tc.class], tc.says) {
			t.Errorf("%s: failures %v, errors %q; want 6 %s saying %q", tc.name, rep.Failures, rep.Errors, tc.class, tc.says)
		}
		if n := strings.Count(logs.String(), "class="+tc.class); n != 1 {
			t.Errorf("%s: %d log lines name class %s, want 1:\n%s", tc.name, n, tc.class, logs.String())
		}
		var out strings.Builder
		_ = rep.write(&out, "text")
		for _, tok := range tokens {
			if strings.Contains(out.String()+logs.String()+strings.Join(mapValues(rep.Errors), ""), strings.TrimSuffix(tok, "\r\nX-Injected: 1")) {
				t.Errorf("%s: a token appears in the report or the log", tc.name)
			}
		}
	}
}

func mapValues(m map[string]string) []string {
	var vs []string
	for _, v := range m {
		vs = append(vs, v)
	}
	return vs
}
