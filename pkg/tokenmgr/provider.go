package tokenmgr

import "time"

// Provider describes how an identity provider treats refresh tokens. The
// Manager's timing is checked against it at construction.
type Provider struct {
	Name string
	// Rotates is true when every refresh returns a new refresh token and
	// retires the old one.
	Rotates bool
	// ReuseLeeway is how long the provider still accepts the previous
	// refresh token after a rotation; 0 means not at all. A holder that dies
	// after the provider rotated but before Redis saw the new pair can only
	// be recovered from inside this window.
	ReuseLeeway time.Duration
	// HTTPTimeout bounds one call to the token endpoint. Default 10s.
	HTTPTimeout time.Duration
	// IdleExpiry is how long a refresh token lives unused (Atlassian: 90
	// days); 0 if it does not expire. Recorded as a countdown in Redis.
	IdleExpiry time.Duration
	// AbsoluteExpiry is how long a grant lives after consent, whatever is
	// done with it (Atlassian: 365 days); 0 if unlimited.
	AbsoluteExpiry time.Duration
	// DefaultAccessTTL is assumed when a token response has no expires_in.
	// Default 5 minutes, so such a token is refreshed early rather than late.
	DefaultAccessTTL time.Duration
}

// The provider profiles (the table in docs/design.md). The fake IdP in
// tokenmgrtest implements each under the same name.
var (
	// Atlassian (Jira Cloud 3LO): rotating, previous refresh token accepted
	// for 10 minutes.
	Atlassian = Provider{Name: "atlassian", Rotates: true, ReuseLeeway: 10 * time.Minute,
		HTTPTimeout: 10 * time.Second, IdleExpiry: 90 * 24 * time.Hour, AbsoluteExpiry: 365 * 24 * time.Hour}
	// Strict (ory/fosite): rotating, no reuse at all.
	Strict = Provider{Name: "strict", Rotates: true, HTTPTimeout: 10 * time.Second}
	// Okta: rotating with a 30 second grace period.
	Okta = Provider{Name: "okta", Rotates: true, ReuseLeeway: 30 * time.Second, HTTPTimeout: 5 * time.Second}
	// Xero: rotating with a 30 minute grace period.
	Xero = Provider{Name: "xero", Rotates: true, ReuseLeeway: 30 * time.Minute, HTTPTimeout: 10 * time.Second}
	// NonRotating (Google): refresh responses carry no refresh token.
	NonRotating = Provider{Name: "non-rotating", HTTPTimeout: 10 * time.Second}
)
