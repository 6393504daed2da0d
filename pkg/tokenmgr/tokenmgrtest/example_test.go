package tokenmgrtest_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// Two workers share one Atlassian grant without coordination. The second
// refresh presents the already-rotated token: inside the 10-minute leeway it
// is a replay, after it the whole family is revoked and a human must consent
// again.
func Example() {
	start := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	idp := tokenmgrtest.NewServer(tokenmgrtest.Config{
		Profile:   tokenmgrtest.Atlassian,
		AuthStyle: oauth2.AuthStyleInParams,
		Now:       func() time.Time { return start },
	})
	defer idp.Close()

	ctx := context.Background()
	conf := idp.OAuthConfig(oauth2.AuthStyleInParams)
	grant := idp.NewGrant("read:jira-work offline_access")
	refresh := func(rt string) (*oauth2.Token, error) {
		return conf.TokenSource(ctx, &oauth2.Token{RefreshToken: rt}).Token()
	}

	first, _ := refresh(grant.RefreshToken)
	fmt.Println("rotated:", first.RefreshToken != grant.RefreshToken)

	second, _ := refresh(grant.RefreshToken) // replay inside the leeway
	fmt.Println("replay got the current token:", second.RefreshToken == first.RefreshToken)

	res, _ := oauth2.NewClient(ctx, oauth2.StaticTokenSource(second)).Get(idp.APIURL())
	res.Body.Close()
	fmt.Println("API:", res.StatusCode)

	idp.SetClock(func() time.Time { return start.Add(10 * time.Minute) }) // the leeway is over
	_, err := refresh(grant.RefreshToken)
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		fmt.Println("late replay:", re.Response.StatusCode, re.ErrorCode)
	}
	fmt.Println("family revoked:", idp.FamilyRevoked(first.RefreshToken))
	fmt.Println("old access token valid:", idp.AccessTokenValid(grant.AccessToken))

	st := idp.Stats()
	fmt.Println("rotations:", st.Rotations, "reuse detected:", st.ReuseDetected, "api 200:", st.API200)
	// Output:
	// rotated: true
	// replay got the current token: true
	// API: 200
	// late replay: 403 invalid_grant
	// family revoked: true
	// old access token valid: false
	// rotations: 1 reuse detected: 1 api 200: 1
}
