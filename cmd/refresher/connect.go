package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"html"
	"log/slog"
	"net/http"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

// connector bootstraps grants with the authorization-code flow:
// GET /connect/{grant} sends the user to the provider with a single-use,
// expiring state (and PKCE); GET /callback exchanges the code and seeds
// the grant.
type connector struct {
	cfg      *oauth2.Config // with RedirectURL and Scopes
	params   []oauth2.AuthCodeOption
	pkce     bool
	rdb      redis.UniversalClient
	prefix   string // Redis key prefix for pending states
	admin    *tokenmgr.Admin
	stateTTL time.Duration
	log      *slog.Logger
	// httpClient carries the code exchange (timeouts).
	httpClient *http.Client
}

type pendingConnect struct {
	Grant    string    `json:"grant"`
	Verifier string    `json:"verifier,omitempty"`
	Started  time.Time `json:"started"`
}

func (c *connector) stateKey(state string) string { return c.prefix + ":connect:" + state }

func (c *connector) handleConnect(w http.ResponseWriter, r *http.Request) {
	grant := r.PathValue("grant")
	if err := tokenmgr.ValidateGrantName(grant); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	state := base64.RawURLEncoding.EncodeToString(b)
	p := pendingConnect{Grant: grant, Started: time.Now()}
	opts := append([]oauth2.AuthCodeOption{}, c.params...)
	if c.pkce {
		p.Verifier = oauth2.GenerateVerifier()
		opts = append(opts, oauth2.S256ChallengeOption(p.Verifier))
	}
	js, _ := json.Marshal(p)
	if err := c.rdb.Set(r.Context(), c.stateKey(state), js, c.stateTTL).Err(); err != nil {
		http.Error(w, "cannot store the login state: Redis unavailable", http.StatusServiceUnavailable)
		return
	}
	c.log.Info("connect started", "grant", grant)
	http.Redirect(w, r, c.cfg.AuthCodeURL(state, opts...), http.StatusFound)
}

func (c *connector) handleCallback(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	state := q.Get("state")
	if state == "" {
		http.Error(w, "missing state", http.StatusBadRequest)
		return
	}
	// GETDEL: a state works once, whatever happens next.
	js, err := c.rdb.GetDel(r.Context(), c.stateKey(state)).Bytes()
	if err == redis.Nil {
		http.Error(w, "unknown, expired or already used state: start again at /connect/{grant}", http.StatusBadRequest)
		return
	}
	if err != nil {
		http.Error(w, "cannot read the login state: Redis unavailable", http.StatusServiceUnavailable)
		return
	}
	var p pendingConnect
	if err := json.Unmarshal(js, &p); err != nil || tokenmgr.ValidateGrantName(p.Grant) != nil {
		http.Error(w, "corrupt login state", http.StatusBadRequest)
		return
	}
	if e := q.Get("error"); e != "" {
		c.log.Warn("provider refused consent", "grant", p.Grant, "error", e)
		http.Error(w, "the provider answered "+e+": "+q.Get("error_description"), http.StatusBadRequest)
		return
	}
	code := q.Get("code")
	if code == "" {
		http.Error(w, "missing code", http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	ctx = context.WithValue(ctx, oauth2.HTTPClient, c.httpClient)
	var opts []oauth2.AuthCodeOption
	if p.Verifier != "" {
		opts = append(opts, oauth2.VerifierOption(p.Verifier))
	}
	tok, err := c.cfg.Exchange(ctx, code, opts...)
	if err != nil {
		c.log.Error("code exchange failed", "grant", p.Grant, "err", describeErr(err))
		http.Error(w, "code exchange failed: "+describeErr(err), http.StatusBadGateway)
		return
	}
	v, err := c.admin.Seed(ctx, p.Grant, tok, tokenmgr.SeedOptions{ConsentedAt: time.Now()})
	if err != nil {
		c.log.Error("seeding the connected grant failed", "grant", p.Grant, "err", err)
		http.Error(w, "could not store the grant: "+err.Error(), http.StatusInternalServerError)
		return
	}
	c.log.Info("grant connected", "grant", p.Grant, "version", v)
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	fmt.Fprintf(w, "<!doctype html><title>Connected</title><p>Grant <b>%s</b> connected (version %d). You can close this page.</p>\n", html.EscapeString(p.Grant), v)
}

// describeErr summarises a provider error without its body.
func describeErr(err error) string {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		s := "provider answered"
		if re.Response != nil {
			s += " " + re.Response.Status
		}
		if re.ErrorCode != "" {
			s += " " + re.ErrorCode
		}
		return s
	}
	return err.Error()
}
