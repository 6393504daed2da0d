// Package tokenmgrtest provides a fake OAuth 2.0 identity provider with real
// refresh-token rotation semantics, in the style of net/http/httptest, for
// tests of code that uses tokenmgr (or any OAuth client).
//
// The provider models what breaks fleets that share one grant: rotating
// refresh tokens, a reuse leeway for the previous refresh token, reuse
// detection that revokes the whole token family, and access tokens revoked
// before their expiry. Profiles (Atlassian, Strict, Okta, Xero, NonRotating)
// select those behaviours, named as tokenmgr's Provider presets are. Fault
// knobs (latency, an answer delayed after the rotation, 5xx, 429, Hydra's
// retryable invalid_request, dropped answers, an API that keeps answering
// 401) reproduce the failures a token manager must survive, and counters
// (Stats) say what the provider saw. Every expiry and leeway decision reads
// an injectable clock (Config.Now, Clock), so tests need no sleeps.
//
// NewServer starts one on a local port; IdP is the http.Handler to serve
// yourself. The IdP never logs tokens.
package tokenmgrtest
