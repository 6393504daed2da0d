package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/tokenmgr/tokenmgr/internal/buildinfo"
	"github.com/tokenmgr/tokenmgr/internal/cli"
	"github.com/tokenmgr/tokenmgr/internal/compose"
)

func TestFlagsRejected(t *testing.T) {
	for _, args := range [][]string{
		{"--profile", "google"}, {"--auth-style", "basic"}, {"--access-ttl", "500ms"},
		{"--fail-5xx", "-1"}, {"extra"}, {"--nope"},
	} {
		if _, err := parseFlags(args, io.Discard); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
}

func TestAdminEndpoints(t *testing.T) {
	c, err := parseFlags([]string{"--profile", "strict", "--access-ttl", "5s"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	idp, h := newIdP(c)
	srv := httptest.NewServer(h)
	defer srv.Close()
	resp, err := http.Post(srv.URL+"/admin/grant", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	var tok map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&tok)
	resp.Body.Close()
	if tok["refresh_token"] == "" || tok["expires_in"].(float64) != 5 {
		t.Errorf("grant %v", tok)
	}
	resp, _ = http.Post(srv.URL+"/admin/faults?fail_5xx=2&latency=1ms", "", nil)
	if resp.StatusCode != http.StatusNoContent {
		t.Errorf("faults: %d", resp.StatusCode)
	}
	resp, _ = http.Post(srv.URL+"/admin/faults?drop=x", "", nil)
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("bad faults: %d", resp.StatusCode)
	}
	form := "grant_type=refresh_token&refresh_token=" + tok["refresh_token"].(string) + "&client_id=client-id&client_secret=client-secret"
	resp, _ = http.Post(srv.URL+"/oauth/token", "application/x-www-form-urlencoded", strings.NewReader(form))
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("injected 5xx not applied: %d", resp.StatusCode)
	}
	resp, _ = http.Get(srv.URL + "/stats")
	var st map[string]int64
	_ = json.NewDecoder(resp.Body).Decode(&st)
	if st["injected_5xx"] != 1 || idp.Stats().Injected5xx != 1 {
		t.Errorf("stats %v", st)
	}
	resp, _ = http.Get(srv.URL + "/admin/issued")
	var issued []string
	_ = json.NewDecoder(resp.Body).Decode(&issued)
	if !slices.Contains(issued, tok["access_token"].(string)) || !slices.Contains(issued, tok["refresh_token"].(string)) {
		t.Errorf("/admin/issued lists %d tokens, not the grant's pair", len(issued))
	}
}

// docker-compose.yml cannot run here: check that its fakeidp command parses
// with the flags this binary really has.
func TestComposeCommands(t *testing.T) {
	f, err := compose.Load("../../docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	cmds := f.Commands("fakeidp")
	if len(cmds) == 0 {
		t.Fatal("no fakeidp service")
	}
	for name, args := range cmds {
		if _, err := parseFlags(args, io.Discard); err != nil {
			t.Errorf("service %s: %v", name, err)
		}
	}
}

func TestConsentPageFlag(t *testing.T) {
	authorize := "/authorize?response_type=code&client_id=client-id&redirect_uri=https%3A%2F%2Fapp.example%2Fcb"
	for _, tt := range []struct {
		args []string
		want int
	}{
		{nil, http.StatusFound},
		{[]string{"--consent-page"}, http.StatusOK},
	} {
		c, err := parseFlags(tt.args, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		_, h := newIdP(c)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, authorize, nil))
		if rec.Code != tt.want {
			t.Errorf("%v: GET /authorize got %d, want %d", tt.args, rec.Code, tt.want)
		}
	}
}

// Exit status 0 for -h, 2 for a command line that does not parse, 1 for
// flags that parse but cannot work (main is cli.Exit of run).
func TestExitStatus(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"-h"}, 0},
		{[]string{"--nope"}, 2},
		{[]string{"--latency", "slow"}, 2},
		{[]string{"extra"}, 2},
		{[]string{"--profile", "google"}, 1},
		{[]string{"--access-ttl", "500ms"}, 1},
		{[]string{"--seed-grant", "g"}, 1},
	} {
		err := run(t.Context(), tc.args, func(string) string { return "" }, io.Discard, io.Discard)
		if got := cli.Exit("fakeidp", err, io.Discard); got != tc.want {
			t.Errorf("fakeidp %v: exit %d (%v), want %d", tc.args, got, err, tc.want)
		}
	}
}

// --version prints the build; --log-format json logs JSON lines with
// durations as Go duration strings; --log-format and --log-level values
// are checked.
func TestVersionAndLogFormat(t *testing.T) {
	var out bytes.Buffer
	if err := run(t.Context(), []string{"--version"}, func(string) string { return "" }, &out, io.Discard); err != nil || out.String() != buildinfo.String("fakeidp")+"\n" {
		t.Errorf("--version: %q %v", out.String(), err)
	}
	for _, args := range [][]string{{"--log-format", "xml"}, {"--log-level", "loud"}} {
		if _, err := parseFlags(args, io.Discard); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
	ctx, cancel := context.WithCancel(t.Context())
	pr, pw := io.Pipe()
	var logs bytes.Buffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"--addr", "127.0.0.1:0", "--log-format", "json", "--access-ttl", "90s"}, func(string) string { return "" }, pw, &logs)
		pw.Close()
	}()
	if _, err := bufio.NewReader(pr).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	go func() { _, _ = io.Copy(io.Discard, pr) }()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(bytes.SplitN(logs.Bytes(), []byte("\n"), 2)[0], &m); err != nil || m["msg"] != "fake IdP serving" || m["access_ttl"] != "1m30s" {
		t.Errorf("log %q (%v): want a JSON line with access_ttl 1m30s", logs.String(), err)
	}
}
