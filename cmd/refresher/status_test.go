package main

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/internal/redisserver"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

// command runs one refresher subcommand in this process with env as its
// whole environment.
func command(t *testing.T, env map[string]string, stdin string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var o, e bytes.Buffer
	err = run(t.Context(), args, func(k string) string { return env[k] }, strings.NewReader(stdin), &o, &e)
	return o.String(), e.String(), err
}

// seedDirect seeds grant through a tokenmgr.Admin on rdb, sealed with key.
func seedDirect(t *testing.T, rdb redis.UniversalClient, key, grant string) {
	t.Helper()
	kr, err := tokenmgr.ParseKeyring(key)
	if err != nil {
		t.Fatal(err)
	}
	a, err := tokenmgr.NewAdmin(tokenmgr.Options{Redis: rdb, Sealer: kr, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	tok := &oauth2.Token{AccessToken: "at-" + grant, RefreshToken: "rt-" + grant, TokenType: "Bearer", Expiry: time.Now().Add(time.Hour)}
	if _, err := a.Seed(t.Context(), grant, tok, tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
}

// A wrong Redis password is reported as refused credentials, never as a
// grant that does not exist.
func TestStatusWithWrongRedisPassword(t *testing.T) {
	mr := miniredis.RunT(t)
	mr.RequireAuth("the-right-password")
	env := map[string]string{"TOKENMGR_REDIS_URL": "redis://:a-wrong-password@" + mr.Addr(), "TOKENMGR_ENCRYPTION_KEY": testKey}
	for _, args := range [][]string{{"status"}, {"status", "--grant", "jira"}, {"status", "--grant", "jira", "--json"}} {
		out, _, err := command(t, env, "", args...)
		if err == nil || !strings.Contains(err.Error(), "Redis refused the credentials") || strings.Contains(err.Error(), "no such grant") || strings.Contains(out, "jira") {
			t.Errorf("%v with a wrong password: %v (stdout %q); want the refused credentials, no row", args, err, out)
		}
	}
}

// A user the ACL does not let read records gets "refused a command", not
// "no such grant".
func TestStatusWithoutPermission(t *testing.T) {
	srv := redisserver.Start(t)
	admin := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer admin.Close()
	seedDirect(t, admin, testKey, "jira")
	if err := admin.Do(t.Context(), "acl", "setuser", "reader", "on", ">reader-password", "resetkeys", "~tm:*", "-@all", "+ping", "+zrange").Err(); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"TOKENMGR_REDIS_URL": "redis://reader:reader-password@" + srv.Addr(), "TOKENMGR_ENCRYPTION_KEY": testKey}
	_, _, err := command(t, env, "", "status")
	if err == nil || !strings.Contains(err.Error(), "jira: Redis refused a command") || strings.Contains(err.Error(), "no such grant") {
		t.Errorf("status as a user without HGETALL: %v; want jira refused by the ACL", err)
	}
}

// A corrupt row shows as corrupt with its field, and the exit status says
// so; text from Redis reaches the terminal without control characters,
// bounded, and the JSON stays valid.
func TestStatusCorruptAndUntrustedText(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()
	for _, g := range []string{"fine", "damaged", "noisy"} {
		seedDirect(t, rdb, testKey, g)
	}
	mr.HSet("tm:{damaged}:tok", "access_token", "enc:v1:k1:garbage")
	mr.HSet("tm:{noisy}:tok", "status", "reauth_required", "reason", "\x1b[2J\x1b]0;owned\x07\rinvalid_grant"+strings.Repeat("A", 1<<20),
		"rotated_by", "worker\x1b[31m-7")
	env := map[string]string{"TOKENMGR_REDIS_URL": "redis://" + mr.Addr(), "TOKENMGR_ENCRYPTION_KEY": testKey}

	out, _, err := command(t, env, "", "status")
	if err == nil || !strings.Contains(err.Error(), "1 of 3 grants have a corrupt record") {
		t.Errorf("status with a corrupt row: %v, want an error naming it", err)
	}
	rows := strings.Split(strings.TrimSpace(out), "\n")
	if len(rows) != 4 {
		t.Fatalf("status printed %d lines, want a header and 3 rows:\n%.2000s", len(rows), out)
	}
	if !strings.Contains(rows[1], "damaged") || !strings.Contains(rows[1], "corrupt") || !strings.Contains(rows[1], "field access_token") {
		t.Errorf("the damaged row does not say corrupt with its field: %s", rows[1])
	}
	if strings.ContainsAny(out, "\x1b\r\x07") || len(out) > 4096 || !strings.Contains(rows[3], "bytes cut]") {
		t.Errorf("status printed %d bytes, control characters %v: %.600q", len(out), strings.ContainsAny(out, "\x1b\r\x07"), out)
	}

	js, _, err := command(t, env, "", "status", "--json")
	var sts []tokenmgr.GrantStatus
	if jerr := json.Unmarshal([]byte(js), &sts); jerr != nil || err == nil || len(sts) != 3 || len(js) > 8192 {
		t.Fatalf("status --json: %d bytes, %v, exit error %v", len(js), jerr, err)
	}
	if sts[0].Status != "corrupt" || !strings.Contains(sts[0].Reason, "access_token") || strings.ContainsAny(sts[2].Reason+sts[2].RotatedBy, "\x1b\r") {
		t.Errorf("status --json rows: %+v", sts)
	}
}

// rewrap --accept-plaintext seals a plain: value only for a grant the
// operator names: without --grant it lists what it found and writes
// nothing, so a value someone slipped into Redis is not laundered.
func TestRewrapAcceptPlaintextNeedsTheGrant(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()
	plain, _ := tokenmgr.NewAdmin(tokenmgr.Options{Redis: rdb, AllowPlaintext: true, Logger: slog.New(slog.DiscardHandler)}) // before encryption was on
	for _, g := range []string{"legacy", "injected"} {
		if _, err := plain.Seed(t.Context(), g, &oauth2.Token{AccessToken: "at", RefreshToken: "rt", Expiry: time.Now().Add(time.Hour)}, tokenmgr.SeedOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	seedDirect(t, rdb, testKey, "sealed")
	env := map[string]string{"TOKENMGR_REDIS_URL": "redis://" + mr.Addr(), "TOKENMGR_ENCRYPTION_KEY": testKey}
	stored := func(g string) string { return mr.HGet("tm:{"+g+"}:tok", "refresh_token") }

	out, _, err := command(t, env, "", "rewrap", "--accept-plaintext")
	if err == nil || !strings.Contains(err.Error(), "nothing was written") {
		t.Errorf("rewrap --accept-plaintext without --grant: %v, want a refusal", err)
	}
	for _, want := range []string{"grant injected (version 1", "grant legacy (version 1", "access_token, refresh_token stored in plaintext", "refresher rewrap --accept-plaintext --grant legacy"} {
		if !strings.Contains(out, want) {
			t.Errorf("the listing lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "grant sealed") || !strings.HasPrefix(stored("legacy"), "plain:") || !strings.HasPrefix(stored("injected"), "plain:") {
		t.Errorf("listing sealed something or listed a sealed grant:\n%s", out)
	}

	out, _, err = command(t, env, "", "rewrap", "--accept-plaintext", "--grant", "legacy")
	if err != nil || !strings.Contains(out, "rewrapped 1 of 1") || !strings.HasPrefix(stored("legacy"), "enc:v1:k1:") || !strings.HasPrefix(stored("injected"), "plain:") {
		t.Errorf("rewrap --accept-plaintext --grant legacy: %v\n%s\nlegacy %.10s, injected %.10s", err, out, stored("legacy"), stored("injected"))
	}
	// Without --accept-plaintext, a plaintext value is refused as before.
	if _, _, err := command(t, env, "", "rewrap", "--grant", "injected"); err == nil || !strings.Contains(err.Error(), "plaintext") {
		t.Errorf("rewrap --grant injected: %v, want the plaintext refused", err)
	}
}
