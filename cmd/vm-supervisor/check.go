package main

import (
	"fmt"
	"io"

	"github.com/aleph-vm-go/vm-supervisor/internal/config"
)

// cmdCheck prints what this host can run and what is missing, and where
// the guest cache lives.
func cmdCheck(s *config.Settings, stdout io.Writer) int {
	hostReport(s).Print(stdout)
	fmt.Fprintf(stdout, "guest cache: %s\n", s.GuestCacheStore())
	return 0
}
