package testbin

import (
	"bytes"
	"sync"
)

// Buffer collects what other goroutines write (a logger, a child
// process's output) while the test reads it, e.g. to scan for tokens.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
