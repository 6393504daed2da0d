package tokenmgr_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// world is an embedded Redis and a fake Atlassian for the examples; in
// production they are your Redis and auth.atlassian.com.
type world struct {
	rdb     *redis.Client
	idp     *tokenmgrtest.Server
	keyring *tokenmgr.Keyring
	close   func()
}

func newWorld() *world {
	mr, _ := miniredis.Run()
	idp := tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: tokenmgrtest.Atlassian, AuthStyle: oauth2.AuthStyleInParams})
	key, _ := tokenmgr.GenerateKey("k1")
	kr, _ := tokenmgr.NewKeyring(key)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	return &world{rdb: rdb, idp: idp, keyring: kr, close: func() { rdb.Close(); idp.Close(); mr.Close() }}
}

func (w *world) options() tokenmgr.Options {
	return tokenmgr.Options{
		Redis:    w.rdb,
		OAuth2:   w.idp.OAuthConfig(oauth2.AuthStyleInParams),
		Provider: tokenmgr.Atlassian,
		Sealer:   w.keyring,
		Logger:   slog.New(slog.DiscardHandler),
	}
}

// New builds one Manager per process; every goroutine shares it.
func ExampleNew() {
	w := newWorld()
	defer w.close()
	ctx := context.Background()
	m, err := tokenmgr.New(ctx, tokenmgr.Options{
		Redis: w.rdb, // single, Sentinel or Cluster
		OAuth2: &oauth2.Config{
			ClientID: "client-id", ClientSecret: "client-secret",
			Endpoint: oauth2.Endpoint{TokenURL: w.idp.TokenURL(), AuthStyle: oauth2.AuthStyleInParams}, // explicit
		},
		Provider: tokenmgr.Atlassian,
		Sealer:   w.keyring,
		Logger:   slog.New(slog.DiscardHandler),
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close(ctx)

	tok, err := m.Token(ctx, "jira-prod") // nothing seeded yet
	fmt.Println(tok == nil, errors.Is(err, tokenmgr.ErrGrantNotFound))
	// Output: true true
}

// Options that cannot work are refused, with a reason.
func ExampleNew_refused() {
	w := newWorld()
	defer w.close()
	o := w.options()
	o.OAuth2.Endpoint.AuthStyle = oauth2.AuthStyleAutoDetect
	_, err := tokenmgr.New(context.Background(), o)
	fmt.Println(err != nil)
	// Output: true
}

// Seed imports a consented grant (the refresher's /connect does it after
// consent); every Manager serves it at once.
func ExampleManager_Seed() {
	w := newWorld()
	defer w.close()
	ctx := context.Background()
	m, _ := tokenmgr.New(ctx, w.options())
	defer m.Close(ctx)
	v, err := m.Seed(ctx, "jira-prod", w.idp.NewGrant("read:jira-work offline_access"), tokenmgr.SeedOptions{})
	if err != nil {
		fmt.Println(err)
		return
	}
	st, _ := m.Status(ctx, "jira-prod")
	fmt.Println(v, st.Status, st.HasRefreshToken)
	// Output: 1 ok true
}

// Client adds the grant's token to every request and applies the 401 rule.
func ExampleGrant_Client() {
	w := newWorld()
	defer w.close()
	ctx := context.Background()
	m, _ := tokenmgr.New(ctx, w.options())
	defer m.Close(ctx)
	m.Seed(ctx, "jira-prod", w.idp.NewGrant(""), tokenmgr.SeedOptions{})

	jira := m.Grant("jira-prod")
	resp, err := jira.Client().Get(w.idp.APIURL())
	if err != nil {
		fmt.Println(err)
		return
	}
	resp.Body.Close()
	fmt.Println(resp.StatusCode == http.StatusOK)
	// Output: true
}

// TokenSource plugs a grant into code that takes an oauth2.TokenSource.
func ExampleGrant_TokenSource() {
	w := newWorld()
	defer w.close()
	ctx := context.Background()
	m, _ := tokenmgr.New(ctx, w.options())
	defer m.Close(ctx)
	m.Seed(ctx, "jira-prod", w.idp.NewGrant(""), tokenmgr.SeedOptions{})

	client := oauth2.NewClient(ctx, m.Grant("jira-prod").TokenSource())
	resp, err := client.Get(w.idp.APIURL())
	if err != nil {
		fmt.Println(err)
		return
	}
	resp.Body.Close()
	fmt.Println(resp.StatusCode == http.StatusOK)
	// Output: true
}

// Errors carry structure: match them with errors.Is and errors.As.
func Example_errors() {
	w := newWorld()
	defer w.close()
	ctx := context.Background()
	m, _ := tokenmgr.New(ctx, w.options())
	defer m.Close(ctx)

	_, err := m.Token(ctx, "never-seeded")
	fmt.Println(errors.Is(err, tokenmgr.ErrGrantNotFound))

	// A grant whose refresh token the provider refuses is dead: every
	// worker gets the same typed error at once, until it is seeded again.
	dead := w.idp.NewGrant("")
	dead.RefreshToken = "unknown-to-the-provider"
	m.Seed(ctx, "jira-dead", dead, tokenmgr.SeedOptions{})
	_, err = m.Rotate(ctx, "jira-dead")
	var reauth *tokenmgr.ReauthRequiredError
	fmt.Println(errors.Is(err, tokenmgr.ErrReauthRequired), errors.As(err, &reauth) && reauth.Grant == "jira-dead")

	switch {
	case errors.Is(err, tokenmgr.ErrStoreUnavailable):
		// Redis is down or refused us (see StoreError.Denied): retry later.
	case errors.As(err, new(*tokenmgr.RefreshError)):
		// The provider failed for a while: retry after RetryAfter.
	}
	// Output:
	// true
	// true true
}
