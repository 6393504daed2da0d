package tokenmgrtest_test

import (
	"html"
	"io"
	"net/http"
	"net/url"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// noRedirect is a client that returns redirects instead of following them.
var noRedirect = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

var hiddenInput = regexp.MustCompile(`<input type="hidden" name="([^"]*)" value="([^"]*)">`)

// consentPage GETs authURL and returns the page and its hidden fields.
func consentPage(t *testing.T, authURL string) (page string, form url.Values) {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, authURL, nil)
	res, err := noRedirect.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	if res.StatusCode != http.StatusOK || !strings.HasPrefix(res.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("GET authorize: got %d %s, want 200 HTML", res.StatusCode, res.Header.Get("Content-Type"))
	}
	form = url.Values{}
	for _, m := range hiddenInput.FindAllStringSubmatch(string(b), -1) {
		form.Add(html.UnescapeString(m[1]), html.UnescapeString(m[2]))
	}
	return string(b), form
}

// decide posts the consent form as the button named decision would.
func decide(t *testing.T, s *tokenmgrtest.Server, form url.Values, decision string) *http.Response {
	t.Helper()
	form = cloneValues(form)
	form.Set("decision", decision)
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, s.AuthURL(), strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	res, err := noRedirect.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	return res
}

// redirectedTo checks for a 303 to the client's callback and returns its query.
func redirectedTo(t *testing.T, res *http.Response) url.Values {
	t.Helper()
	loc, err := url.Parse(res.Header.Get("Location"))
	if res.StatusCode != http.StatusSeeOther || err != nil || loc.Host != "app.example" || loc.Query().Get("tenant") != "1" {
		t.Fatalf("got %d to %q, want 303 to the callback with its own query", res.StatusCode, res.Header.Get("Location"))
	}
	return loc.Query()
}

func TestConsentPage(t *testing.T) {
	s, _ := start(t, tokenmgrtest.Config{Profile: tokenmgrtest.Atlassian, AuthStyle: oauth2.AuthStyleInParams, ConsentPage: true})
	conf := s.OAuthConfig(oauth2.AuthStyleInParams)
	conf.RedirectURL = "https://app.example/callback?tenant=1"
	conf.Scopes = []string{"read:jira-work", "offline_access"}
	verifier := oauth2.GenerateVerifier()
	const state = `st"<&>`
	authURL := conf.AuthCodeURL(state, oauth2.S256ChallengeOption(verifier))

	t.Run("page", func(t *testing.T) {
		u, _ := url.Parse(authURL)
		q := u.Query()
		q.Set("scope", "read:jira-work <script>alert(1)</script>")
		page, form := consentPage(t, s.AuthURL()+"?"+q.Encode())
		for _, want := range []string{
			"<title>Fake IdP: consent</title>",
			`<code id="client-id">client-id</code>`,
			"<li>read:jira-work</li>",
			"<li>&lt;script&gt;alert(1)&lt;/script&gt;</li>",
			`<form method="post" action="/authorize">`,
			`<button id="allow" name="decision" value="allow">Allow</button>`,
			`<button id="deny" name="decision" value="deny">Deny</button>`,
		} {
			if !strings.Contains(page, want) {
				t.Errorf("page lacks %s:\n%s", want, page)
			}
		}
		if strings.Contains(page, "<script>") || strings.Contains(page, state) {
			t.Errorf("page has unescaped input:\n%s", page)
		}
		if !reflect.DeepEqual(form, q) {
			t.Errorf("hidden fields: got %v, want %v", form, q)
		}
	})

	t.Run("allow", func(t *testing.T) {
		_, form := consentPage(t, authURL)
		rq := redirectedTo(t, decide(t, s, form, "allow"))
		if rq.Get("state") != state || rq.Get("code") == "" || rq.Has("error") {
			t.Fatalf("redirect query %v: want the code and state", rq)
		}
		tok, err := conf.Exchange(t.Context(), rq.Get("code"), oauth2.VerifierOption(verifier))
		if err != nil {
			t.Fatalf("exchange: %v", err)
		}
		if tok.Extra("scope") != "read:jira-work offline_access" || apiStatus(t, s, tok.AccessToken) != http.StatusOK {
			t.Errorf("exchange: scope %v, or the access token is not accepted", tok.Extra("scope"))
		}
	})

	t.Run("deny", func(t *testing.T) {
		_, form := consentPage(t, authURL)
		rq := redirectedTo(t, decide(t, s, form, "deny"))
		if rq.Get("error") != "access_denied" || rq.Get("state") != state || rq.Has("code") {
			t.Errorf("redirect query %v: want error=access_denied and the state", rq)
		}
	})

	t.Run("rejects", func(t *testing.T) {
		_, form := consentPage(t, authURL)
		bad := cloneValues(form)
		bad.Set("client_id", "someone-else")
		for _, tt := range []struct {
			name, decision string
			form           url.Values
			wantErr        string
		}{
			{"bad client_id", "allow", bad, "invalid_client"},
			{"bad client_id on deny", "deny", bad, "invalid_client"},
			{"no decision", "", form, "invalid_request"},
		} {
			tt.form = cloneValues(tt.form)
			tt.form.Set("decision", tt.decision)
			req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, s.AuthURL(), strings.NewReader(tt.form.Encode()))
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			if r := do(t, req); r.status != http.StatusBadRequest || r.str("error") != tt.wantErr {
				t.Errorf("%s: got %d %s, want 400 %s", tt.name, r.status, r.raw, tt.wantErr)
			}
		}
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, s.AuthURL()+"?"+bad.Encode(), nil)
		if r := do(t, req); r.status != http.StatusBadRequest || r.str("error") != "invalid_client" {
			t.Errorf("GET with a bad client_id: got %d %s, want 400 invalid_client", r.status, r.raw)
		}
	})
}

// Without the knob, GET redirects at once (TestAuthorizationCodeFlow) and
// there is no form to POST to.
func TestConsentPageOff(t *testing.T) {
	s, _ := start(t, tokenmgrtest.Config{})
	res, err := http.PostForm(s.AuthURL(), url.Values{"decision": {"allow"}})
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /authorize: got %d, want 405", res.StatusCode)
	}
}
