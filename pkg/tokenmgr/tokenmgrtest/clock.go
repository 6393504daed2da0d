package tokenmgrtest

import (
	"sync/atomic"
	"time"
)

// Clock is a manual clock for tests: give its Now to Config.Now and to
// tokenmgr.Options.Now, and Advance it to make tokens expire and reuse
// leeways pass without waiting. Safe for concurrent use.
type Clock struct{ ns atomic.Int64 }

// NewClock returns a Clock set to start.
func NewClock(start time.Time) *Clock {
	c := &Clock{}
	c.ns.Store(start.UnixNano())
	return c
}

// Now returns the clock's time.
func (c *Clock) Now() time.Time { return time.Unix(0, c.ns.Load()) }

// Advance moves the clock forward by d (backward if d is negative).
func (c *Clock) Advance(d time.Duration) { c.ns.Add(int64(d)) }
