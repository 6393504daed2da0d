package tokenmgr_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// A worker shares one rotating grant through Redis. Here Redis is an
// embedded miniredis and the provider a fake Atlassian; in production they
// are your Redis and auth.atlassian.com.
func Example() {
	ctx := context.Background()
	mr, _ := miniredis.Run()
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()
	idp := tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: tokenmgrtest.Atlassian, AuthStyle: oauth2.AuthStyleInHeader})
	defer idp.Close()

	// The encryption keys, "ID:BASE64" each, from a secret store; every
	// process of the fleet has the same ones.
	key, _ := tokenmgr.GenerateKey("k1")
	keyring, err := tokenmgr.ParseKeyring(key.Encode())
	if err != nil {
		fmt.Println(err)
		return
	}

	m, err := tokenmgr.New(ctx, tokenmgr.Options{
		Redis:    rdb,
		OAuth2:   idp.OAuthConfig(oauth2.AuthStyleInHeader), // ClientID, secret, TokenURL, explicit AuthStyle
		Provider: tokenmgr.Atlassian,
		Sealer:   keyring, // tokens are encrypted in Redis; the rest stays readable
		Logger:   slog.New(slog.DiscardHandler),
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close(ctx)

	// An operator seeds the grant once (the refresher's /connect flow does
	// this after consent).
	if _, err := m.Seed(ctx, "jira-prod", idp.NewGrant("read:jira-work offline_access"), tokenmgr.SeedOptions{}); err != nil {
		fmt.Println(err)
		return
	}

	// Workers call the API through a client that adds the token and
	// applies the 401 rule.
	jira := m.Grant("jira-prod")
	resp, err := jira.Client().Get(idp.APIURL())
	if err != nil {
		fmt.Println(err)
		return
	}
	resp.Body.Close()
	fmt.Println(resp.StatusCode == http.StatusOK)

	// Force one fenced rotation, as `refresher rotate` does.
	v, _ := m.Rotate(ctx, "jira-prod")
	st, _ := m.Status(ctx, "jira-prod")
	fmt.Println(v, st.Version, st.Status, st.RefreshCount)
	// Output:
	// true
	// 2 2 ok 1
}
