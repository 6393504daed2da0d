package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
)

// UsageError is a command line that does not parse: an unknown command or
// flag, a flag value of the wrong form, stray arguments. Every command
// exits 2 for it (as Go's flag package does), 1 for any other error, and 0
// for -h.
type UsageError struct{ Err error }

func (e *UsageError) Error() string { return e.Err.Error() }
func (e *UsageError) Unwrap() error { return e.Err }

// Usagef is a UsageError with a message.
func Usagef(format string, args ...any) error {
	return &UsageError{Err: fmt.Errorf(format, args...)}
}

// Parse parses args into fs (which must be flag.ContinueOnError) and
// refuses stray arguments. Its errors are UsageErrors, except for -h:
// flag.ErrHelp, after fs printed the usage.
func Parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return &UsageError{Err: err}
	}
	if fs.NArg() > 0 {
		return Usagef("unexpected arguments %q", fs.Args())
	}
	return nil
}

// Exit writes a command's error on stderr as "name: error" and returns its
// exit status: 0 for none or -h, 2 for a UsageError, 1 for the rest.
func Exit(name string, err error, stderr io.Writer) int {
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return 0
	}
	fmt.Fprintln(stderr, name+":", err)
	var ue *UsageError
	if errors.As(err, &ue) {
		return 2
	}
	return 1
}
