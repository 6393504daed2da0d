package tokenmgr

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"golang.org/x/oauth2"
)

// SeedOptions qualify an imported pair.
type SeedOptions struct {
	// ConsentedAt is when the user consented; with Provider.AbsoluteExpiry
	// it sets the absolute expiry countdown. Default: now.
	ConsentedAt time.Time
}

// Seed imports a token pair for grant: it creates or replaces the record,
// bumps the version, clears a dead status and any refresh intent, and tells
// the fleet. It returns the new version. tok needs an access token, and a
// refresh token unless the provider does not rotate.
func (m *Manager) Seed(ctx context.Context, grant string, tok *oauth2.Token, so SeedOptions) (int64, error) {
	if err := ValidateGrantName(grant); err != nil {
		return 0, err
	}
	if tok == nil || tok.AccessToken == "" {
		return 0, errors.New("tokenmgr: seed: the token has no access_token")
	}
	if tok.RefreshToken == "" {
		return 0, errors.New("tokenmgr: seed: the token has no refresh_token; the grant could not be refreshed")
	}
	now := m.opts.Now()
	if so.ConsentedAt.IsZero() {
		so.ConsentedAt = now
	}
	rec := &record{
		Status:       StatusOK,
		AccessToken:  secret(tok.AccessToken),
		RefreshToken: secret(tok.RefreshToken),
		TokenType:    tok.TokenType,
		Expiry:       tok.Expiry,
		RotatedAt:    now,
		RotatedBy:    m.opts.Holder + " (seed)",
	}
	if rec.TokenType == "" {
		rec.TokenType = "Bearer"
	}
	if s, ok := tok.Extra("scope").(string); ok {
		rec.Scope = s
	}
	if m.opts.Provider.IdleExpiry > 0 {
		rec.IdleExpiry = now.Add(m.opts.Provider.IdleExpiry)
	}
	if m.opts.Provider.AbsoluteExpiry > 0 {
		rec.AbsoluteExpiry = so.ConsentedAt.Add(m.opts.Provider.AbsoluteExpiry)
	}
	k := grantKeys(m.opts.KeyPrefix, grant)
	v, err := m.store.seed(ctx, grant, k, rec)
	if err != nil {
		return 0, fmt.Errorf("tokenmgr: seed grant %q: %w", grant, err)
	}
	rec.V = v
	if soft, _ := m.deadlines(rec, false); !rec.Expiry.IsZero() {
		if err := m.store.schedule(ctx, grant, soft); err != nil {
			m.log.Warn("could not update the refresh schedule", "grant", grant, "err", err)
		}
	}
	if g := m.lookup(grant); g != nil {
		m.install(g, rec)
	}
	m.log.Info("grant seeded", "grant", grant, "version", v)
	return v, nil
}

// GrantStatus is a grant's metadata as stored in Redis: never a token.
type GrantStatus struct {
	Grant           string    `json:"grant"`
	Version         int64     `json:"version"`
	Status          string    `json:"status"`
	Reason          string    `json:"reason,omitempty"`
	TokenType       string    `json:"token_type"`
	Expiry          time.Time `json:"expiry"`
	Scope           string    `json:"scope,omitempty"`
	RotatedAt       time.Time `json:"rotated_at"`
	RotatedBy       string    `json:"rotated_by"`
	RefreshCount    int64     `json:"refresh_count"`
	IdleExpiry      time.Time `json:"idle_expiry,omitzero"`
	AbsoluteExpiry  time.Time `json:"absolute_expiry,omitzero"`
	RetryAt         time.Time `json:"retry_at,omitzero"`
	Restored        bool      `json:"restored,omitempty"`
	HasRefreshToken bool      `json:"has_refresh_token"`
}

// LogValue lets a GrantStatus be logged as a group.
func (s GrantStatus) LogValue() slog.Value {
	return slog.GroupValue(slog.String("grant", s.Grant), slog.Int64("version", s.Version),
		slog.String("status", s.Status), slog.String("reason", s.Reason), slog.Time("expiry", s.Expiry))
}

// Status reads grant's metadata from Redis.
func (m *Manager) Status(ctx context.Context, grant string) (GrantStatus, error) {
	if err := ValidateGrantName(grant); err != nil {
		return GrantStatus{}, err
	}
	rec, err := m.store.read(ctx, grant, grantKeys(m.opts.KeyPrefix, grant))
	if errors.Is(err, errMissing) {
		return GrantStatus{}, &NotFoundError{Grant: grant}
	}
	if err != nil {
		return GrantStatus{}, err
	}
	return GrantStatus{
		Grant: grant, Version: rec.V, Status: rec.Status, Reason: rec.Reason, TokenType: rec.TokenType,
		Expiry: rec.Expiry, Scope: rec.Scope, RotatedAt: rec.RotatedAt, RotatedBy: rec.RotatedBy,
		RefreshCount: rec.RefreshCount, IdleExpiry: rec.IdleExpiry, AbsoluteExpiry: rec.AbsoluteExpiry,
		RetryAt: rec.RetryAt, Restored: rec.Restored, HasRefreshToken: rec.RefreshToken != "",
	}, nil
}

// Rotate forces one fenced refresh of grant's current version now, as a
// 401 would, ignoring MinForcedRefreshAge. It returns the new version. If
// another process rotates first, that rotation counts.
func (m *Manager) Rotate(ctx context.Context, grant string) (int64, error) {
	st, err := m.Status(ctx, grant)
	if err != nil {
		return 0, err
	}
	if st.Status != StatusOK {
		return 0, &ReauthRequiredError{Grant: grant, Reason: st.Reason}
	}
	g := m.lookup(grant)
	if g == nil {
		if g, err = m.addGrant(grant); err != nil {
			return 0, err
		}
	}
	e, err := m.obtain(ctx, g, need{staleV: st.Version, force: true})
	if err != nil {
		return 0, err
	}
	return e.v, nil
}
