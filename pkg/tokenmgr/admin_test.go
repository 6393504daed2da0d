package tokenmgr

import (
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
	"golang.org/x/oauth2"
)

func testSeedAndServe(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Atlassian)
	m := e.manager(Atlassian, nil)
	seeded := e.seed(m)
	tok, err := m.Token(t.Context(), e.grant)
	if err != nil {
		t.Fatalf("Token: %v", err)
	}
	if tok.AccessToken != seeded.AccessToken {
		t.Errorf("Token returned another access token than the seeded one")
	}
	st := e.status(m)
	if st.Version != 1 || st.Status != StatusOK || !st.HasRefreshToken || st.AbsoluteExpiry.IsZero() {
		t.Errorf("status = %+v, want version 1, ok, a refresh token and an absolute expiry", st)
	}
	resp, err := m.Client(e.grant).Get(e.idp.APIURL())
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("API through the managed client: %v %v", resp, err)
	}
	resp.Body.Close()
	if _, err := m.Token(t.Context(), "unknown-grant"); !errors.Is(err, ErrGrantNotFound) {
		t.Errorf("Token(unknown) = %v, want ErrGrantNotFound", err)
	}
	if _, err := m.Token(t.Context(), "bad{grant}"); err == nil {
		t.Errorf("Token(bad name) succeeded")
	}
}

// Operators see a refresh in flight (the intent of the current version) and
// the fleet's rotations of the last hour.
func testStatusRefreshingAndLastHour(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Atlassian)
	m := e.manager(Atlassian, func(o *Options) { o.Holder = "pod-a" })
	e.seed(m)
	if st := e.status(m); st.Refreshing || lastHourOf(st) != 0 {
		t.Fatalf("after seed: refreshing %v, %d refreshes in the last hour; want none", st.Refreshing, lastHourOf(st))
	}
	var during GrantStatus
	setIdPTransport(t, m, &hookTransport{before: func(*hookTransport) { during = e.status(m) }})
	for i := range 3 {
		if _, err := m.Rotate(t.Context(), e.grant); err != nil {
			t.Fatal(err)
		}
		if !during.Refreshing || during.RefreshHolder != "pod-a" || !during.RefreshStartedAt.Equal(e.clock.Now().Truncate(time.Millisecond)) {
			t.Errorf("during the provider call: refreshing %v by %q since %v; want true, pod-a, %v",
				during.Refreshing, during.RefreshHolder, during.RefreshStartedAt, e.clock.Now())
		}
		if st := e.status(m); st.Refreshing || lastHourOf(st) != int64(i+1) {
			t.Errorf("after rotation %d: refreshing %v, %d in the last hour", i+1, st.Refreshing, lastHourOf(st))
		}
		e.clock.Advance(20 * time.Minute)
	}
	// 60 minutes after the first rotation it has left the window.
	if st := e.status(m); lastHourOf(st) != 2 {
		t.Errorf("an hour after the first rotation: %d in the last hour, want 2", lastHourOf(st))
	}
	e.clock.Advance(time.Hour)
	if st := e.status(m); lastHourOf(st) != 0 {
		t.Errorf("two hours on: %d in the last hour, want 0", lastHourOf(st))
	}
	// A rotation trims what left the window, so the set stays small.
	setIdPTransport(t, m, nil)
	if _, err := m.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	k := grantKeys(m.opts.KeyPrefix, e.grant)
	if n, err := m.opts.Redis.ZCard(t.Context(), k.rotations).Result(); err != nil || n != 1 {
		t.Errorf("rotations set holds %d members (%v), want 1 after trimming", n, err)
	}
	// Statuses reads many grants at once, with an error per grant.
	sts, errs := m.Statuses(t.Context(), []string{e.grant, "missing", "bad{name}"})
	if errs[0] != nil || sts[0].Version != 5 || !errors.Is(errs[1], ErrGrantNotFound) || errs[2] == nil {
		t.Errorf("Statuses = %+v, %v; want version 5, not found, invalid name", sts, errs)
	}
}

// A wrong Redis password or a refused command is a *StoreError that says
// so (Denied), never a missing grant: an operator is told to fix the
// credentials, not to seed a grant that exists.
func TestRefusedCredentialsAreNotNotFound(t *testing.T) {
	e := newEnv(t, realBackend, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	e.seed(m)
	if err := e.client().ConfigSet(t.Context(), "requirepass", "right-password").Err(); err != nil {
		t.Fatal(err)
	}
	wrong := redis.NewClient(&redis.Options{Addr: e.addr, Password: "wrong-password", MaxRetries: -1})
	t.Cleanup(func() { wrong.Close() })
	a, err := NewAdmin(Options{Redis: wrong, Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	check := func(what string, err error) {
		t.Helper()
		var se *StoreError
		if !errors.As(err, &se) || !se.Denied() || errors.Is(err, ErrGrantNotFound) || !redis.IsAuthError(err) {
			t.Errorf("%s = %v, want a *StoreError that is Denied and unwraps to the auth error", what, err)
		}
	}
	_, err = a.Status(t.Context(), e.grant)
	check("Status", err)
	_, errs := a.Statuses(t.Context(), []string{e.grant, "other"})
	check("Statuses[0]", errs[0])
	check("Statuses[1]", errs[1])
	_, err = a.DueGrants(t.Context(), e.clock.Now(), 10)
	check("DueGrants", err)
	_, err = a.Grants(t.Context())
	check("Grants", err)
	_, err = a.DeadGrants(t.Context())
	check("DeadGrants", err)
	check("Check", a.Check(t.Context(), e.grant))
	w := e.manager(Strict, func(o *Options) { o.Redis = wrong })
	_, err = w.Token(t.Context(), e.grant)
	check("Token", err)
}

// Seed refuses what would break every request or the record: an access
// token a header cannot carry, a token type other than Bearer, an expiry
// out of range. Nothing is written.
func TestSeedRefusesBadInput(t *testing.T) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	now := e.clock.Now()
	for name, tok := range map[string]*oauth2.Token{
		"CRLF in the access token":  {AccessToken: "at\r\nX-Evil: 1", RefreshToken: "rt"},
		"space in the access token": {AccessToken: "at x", RefreshToken: "rt"},
		"CRLF in the token type":    {AccessToken: "at", RefreshToken: "rt", TokenType: "Bearer\r\nX-Evil: 1"},
		"a MAC token":               {AccessToken: "at", RefreshToken: "rt", TokenType: "mac"},
		"expiry in 1734":            {AccessToken: "at", RefreshToken: "rt", Expiry: time.Date(1734, 1, 1, 0, 0, 0, 0, time.UTC)},
		"expiry in 3000":            {AccessToken: "at", RefreshToken: "rt", Expiry: now.AddDate(974, 0, 0)},
	} {
		if _, err := m.Seed(t.Context(), e.grant, tok, SeedOptions{}); err == nil {
			t.Errorf("%s: seeded", name)
		}
	}
	if _, err := m.Status(t.Context(), e.grant); !errors.Is(err, ErrGrantNotFound) {
		t.Errorf("something was written: %v", err)
	}
	// An operator's HSET of a bad token type is a corrupt record, not a
	// header that fails every request.
	e.seed(m)
	if err := e.client().HSet(t.Context(), grantKeys("tm", e.grant).record, fType, "Bearer\r\nX-Evil: 1").Err(); err != nil {
		t.Fatal(err)
	}
	var ce *CorruptRecordError
	if _, err := m.Status(t.Context(), e.grant); !errors.As(err, &ce) || ce.Field != fType {
		t.Errorf("Status = %v, want a CorruptRecordError for %s", err, fType)
	}
}

// lastHourOf is st's count of the last hour's rotations, -1 when unknown.
func lastHourOf(st GrantStatus) int64 {
	if st.RefreshesLastHour == nil {
		return -1
	}
	return *st.RefreshesLastHour
}
