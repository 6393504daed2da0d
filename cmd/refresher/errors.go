package main

import (
	"log/slog"

	"github.com/redis/go-redis/v9"

	"github.com/tokenmgr/tokenmgr/internal/cli"
)

// deniedByRedis reports a Redis call refused for the credentials
// (WRONGPASS, NOAUTH) or by the ACL (NOPERM), whether the library passed
// the error on or wrapped it in a *tokenmgr.StoreError.
func deniedByRedis(err error) bool { return redis.IsAuthError(err) || redis.IsPermissionError(err) }

// redisTrouble names a failed Redis call in an operator's words. Refused
// credentials and refused commands are their own classes: a wrong password
// must never read as a missing grant.
func redisTrouble(err error) string {
	switch {
	case redis.IsAuthError(err):
		return "Redis refused the credentials (check the user and password of --redis)"
	case redis.IsPermissionError(err):
		return "Redis refused a command or key to this user (check its ACL against the README's)"
	}
	return "Redis unavailable"
}

// logErr is an error as the refresher logs it: bounded and on one line,
// since it may quote a provider's answer or a value read from Redis.
func logErr(err error) slog.Attr { return slog.String("err", cli.Shown(err.Error())) }
