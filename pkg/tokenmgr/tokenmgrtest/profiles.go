package tokenmgrtest

import (
	"fmt"
	"strings"
	"time"
)

// RevokeOldAccess says when a rotation kills the access tokens issued before it.
type RevokeOldAccess int

const (
	// RevokeAccessNever keeps old access tokens alive until their expiry
	// (grace and non-rotating providers).
	RevokeAccessNever RevokeOldAccess = iota
	// RevokeAccessOnRotation revokes them at the rotation (strict).
	RevokeAccessOnRotation
	// RevokeAccessAfterLeeway revokes them when that rotation's reuse leeway
	// ends (Atlassian).
	RevokeAccessAfterLeeway
)

// Profile is one provider's refresh-token semantics. See the "Provider
// profiles" table in docs/design.md.
type Profile struct {
	// Name identifies the profile. "atlassian" also selects Atlassian's
	// error bodies (access_denied for a wrong secret, its exact
	// invalid_grant description).
	Name string
	// Rotates is false for providers whose refresh responses carry no
	// refresh_token: the refresh token stays valid (Google).
	Rotates bool
	// ReuseLeeway is how long the previous refresh token is still accepted
	// after a rotation; 0 means not at all. Only the immediately previous
	// token has a leeway.
	ReuseLeeway time.Duration
	// RevokeOldAccess says when access tokens issued before a rotation die.
	RevokeOldAccess RevokeOldAccess
	// RevokeFamilyOnReuse makes reuse outside the leeway revoke the whole
	// family (re-consent needed); otherwise the request just gets
	// invalid_grant.
	RevokeFamilyOnReuse bool
	// InvalidGrantStatus is the HTTP status of invalid_grant answers: 403
	// for Atlassian, 400 (RFC 6749) otherwise. 0 means 400.
	InvalidGrantStatus int
}

// The provider profiles (the table in docs/design.md), named as
// tokenmgr's Provider presets are.
var (
	Atlassian   = Profile{"atlassian", true, 10 * time.Minute, RevokeAccessAfterLeeway, true, 403}
	Strict      = Profile{"strict", true, 0, RevokeAccessOnRotation, true, 400}
	Okta        = Profile{"okta", true, 30 * time.Second, RevokeAccessNever, false, 400}
	Xero        = Profile{"xero", true, 30 * time.Minute, RevokeAccessNever, false, 400}
	NonRotating = Profile{"non-rotating", false, 0, RevokeAccessNever, false, 400}
)

// Deprecated: the grace-period profiles are named after their providers,
// as tokenmgr.Okta and tokenmgr.Xero are. Use Okta and Xero.
var (
	GraceOkta = Okta
	GraceXero = Xero
)

// profiles lists the named profiles in the order error messages show them.
func profiles() []Profile {
	return []Profile{Atlassian, Strict, Okta, Xero, NonRotating}
}

// formerNames are the names the grace-period profiles had before they
// were named after their providers; commands still accept them.
var formerNames = map[string]string{"grace": "okta", "grace-xero": "xero"}

// ProfileByName returns the profile with the given name, so commands and
// configuration files can select one by string.
func ProfileByName(name string) (Profile, error) {
	if n, ok := formerNames[name]; ok {
		name = n
	}
	var names []string
	for _, p := range profiles() {
		if p.Name == name {
			return p, nil
		}
		names = append(names, fmt.Sprintf("%q", p.Name))
	}
	return Profile{}, fmt.Errorf("tokenmgrtest: unknown profile %q (valid: %s)", name, strings.Join(names, ", "))
}
