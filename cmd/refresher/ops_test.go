package main

import (
	"io"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tokenmgr/tokenmgr/internal/compose"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

func FuzzParseSeed(f *testing.F) {
	f.Add(`{"access_token":"a","refresh_token":"r","expires_in":3600}`)
	f.Add(`{"access_token":"a","refresh_token":"r","expiry":"2026-01-01T00:00:00Z","scope":"x"}`)
	f.Add(`{"access_token":1}`)
	f.Add(`<html>`)
	f.Add(`{"access_token":"a","refresh_token":"r","expires_in":9223372037}`)
	f.Add(`{"access_token":"a","refresh_token":"r","expires_in":315360001}`)
	f.Add(`{"access_token":"a","refresh_token":"r","expiry":"9999-12-31T23:59:59Z"}`)
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
		if tok.Expiry.Year() < 2000 || tok.Expiry.After(now.Add(maxSeedLifetime)) {
			t.Fatalf("accepted expiry %v, outside 2000..now+10 years", tok.Expiry)
		}
	})
}

// Out-of-range lifetimes are refused with a message saying the range,
// not stored as a date the decoder then calls corrupt.
func TestParseSeedBounds(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	for in, want := range map[string]string{
		`{"access_token":"a","refresh_token":"r","expires_in":9223372037}`:         "want 1 to 315360000 seconds",
		`{"access_token":"a","refresh_token":"r","expires_in":0}`:                  "want 1 to 315360000 seconds",
		`{"access_token":"a","refresh_token":"r","expiry":"9999-12-31T23:59:59Z"}`: "more than 10 years ahead",
		`{"access_token":"a","refresh_token":"r","expires_in":315360000}`:          "",
		`{"access_token":"a","refresh_token":"r","expiry":"2020-01-01T00:00:00Z"}`: "", // expired: the fleet refreshes at once
	} {
		_, err := parseSeed(strings.NewReader(in), now)
		if (want == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", in, err, want)
		}
	}
}

// docker-compose.yml cannot run here: check that its refresher command
// parses with the flags this binary really has.
func TestComposeCommands(t *testing.T) {
	f, err := compose.Load("../../docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	cmds := f.Commands("refresher")
	if len(cmds) == 0 {
		t.Fatal("no refresher service")
	}
	for name, args := range cmds {
		if len(args) == 0 || args[0] != "run" {
			t.Fatalf("%s: want 'refresher run ...', have %v", name, args)
		}
		c, err := parseRunFlags(args[1:], f.Services[name].Env(), io.Discard)
		if err != nil {
			t.Errorf("service %s: %v", name, err)
			continue
		}
		checkComposeHealthcheck(t, name, f.Services[name].Healthcheck, c.listen)
	}
}

// checkComposeHealthcheck: the refresher's healthcheck is its own probe
// (the image has no curl), parses with the probe's flags, asks /healthz
// and /readyz on the port the service listens on, and its timeout leaves
// time for every request.
func checkComposeHealthcheck(t *testing.T, service string, hc *compose.Healthcheck, listen string) {
	t.Helper()
	if hc == nil {
		t.Errorf("service %s has no healthcheck", service)
		return
	}
	test, _ := hc.Test.([]any)
	var cmd []string
	for _, a := range test {
		s, _ := a.(string)
		cmd = append(cmd, s)
	}
	if len(cmd) < 3 || cmd[0] != "CMD" || cmd[1] != "refresher" || cmd[2] != "probe" {
		t.Errorf("service %s: healthcheck %v, want [CMD refresher probe ...]", service, cmd)
		return
	}
	urls, timeout, err := parseProbeFlags(cmd[3:], io.Discard)
	if err != nil {
		t.Errorf("service %s: healthcheck: %v", service, err)
		return
	}
	_, port, _ := strings.Cut(listen, ":")
	var paths []string
	for _, raw := range urls {
		u, _ := url.Parse(raw)
		if u.Hostname() != "127.0.0.1" || u.Port() != port {
			t.Errorf("service %s: healthcheck asks %s, not the refresher on 127.0.0.1:%s (--listen %s)", service, raw, port, listen)
		}
		paths = append(paths, u.Path)
	}
	if !slices.Contains(paths, "/healthz") || !slices.Contains(paths, "/readyz") {
		t.Errorf("service %s: healthcheck asks %v, want /healthz and /readyz", service, paths)
	}
	if d, err := time.ParseDuration(hc.Timeout); err != nil || d <= time.Duration(len(urls))*timeout {
		t.Errorf("service %s: healthcheck timeout %q, want more than %d x the probe's %s", service, hc.Timeout, len(urls), timeout)
	}
}

func FuzzConfigFile(f *testing.F) {
	f.Add(`{"registrations":[{"name":"j","provider":"atlassian","client_id":"a","client_secret_env":"S","grants":["g"]}]}`)
	f.Add(`{"registrations":[{"provider":"strict","grants":["a b"]}]}`)
	f.Add(`{"registrations":null}`)
	f.Add(`[]`)
	env := func(k string) string {
		return map[string]string{"S": "secret", "TOKENMGR_ENCRYPTION_KEY": testKey}[k]
	}
	f.Fuzz(func(t *testing.T, doc string) {
		c := &runConfig{}
		c.common.RedisURL = "redis://127.0.0.1:1"
		c.common.UseEnv(env)
		if err := c.parseConfig([]byte(doc), env); err != nil {
			return
		}
		if len(c.regs) == 0 {
			t.Fatal("a config without registrations was accepted")
		}
		for _, r := range c.regs {
			if len(r.grants) == 0 || r.common.OAuth2Config().ClientSecret == "" {
				t.Fatalf("registration %s accepted without grants or a secret", r.name)
			}
		}
	})
}

// refresher status shows a refresh in flight and the last hour's count,
// "?" when Redis would not say.
func TestPrintStatus(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	var out strings.Builder
	printStatus(&out, []tokenmgr.GrantStatus{
		{Grant: "busy", Version: 4, Status: tokenmgr.StatusOK, Expiry: now.Add(time.Hour), RotatedAt: now.Add(-time.Hour), RefreshCount: 3,
			RefreshesLastHour: new(int64(2)), Refreshing: true, RefreshHolder: "pod-b", RefreshStartedAt: now.Add(-3 * time.Second)},
		{Grant: "old-acl", Version: 1, Status: tokenmgr.StatusOK, Expiry: now.Add(time.Hour)},
	}, now)
	lines := strings.Split(out.String(), "\n")
	if !strings.Contains(lines[0], "LAST HOUR") || !strings.Contains(lines[1], "ok (refreshing: pod-b, 3s ago)") || !regexp.MustCompile(`\b3\s+2\s`).MatchString(lines[1]) {
		t.Errorf("busy row:\n%s", out.String())
	}
	if !regexp.MustCompile(`\b0\s+\?\s`).MatchString(lines[2]) {
		t.Errorf("an unknown count is not shown as ?:\n%s", out.String())
	}
}
