// Command printversion prints buildinfo.String, for the test that stamps
// it with -ldflags -X as the Dockerfile does.
package main

import (
	"fmt"

	"github.com/tokenmgr/tokenmgr/internal/buildinfo"
)

func main() {
	fmt.Println(buildinfo.String("printversion"))
	fmt.Println(buildinfo.Version)
}
