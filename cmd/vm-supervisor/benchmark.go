package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strings"
	"time"
)

// runBenchmark is aleph-vm's --benchmark N: N sequential requests to the
// self-test program through the whole request path (a loopback HTTP
// server, router, pool, sandbox, agent, program), then a timing summary.
// The first request includes the cold start.
func runBenchmark(ctx context.Context, api http.Handler, program func(context.Context) (string, error), n int, out io.Writer) error {
	hash, err := program(ctx)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("benchmark listener: %w", err)
	}
	srv := &http.Server{Handler: api, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }() // ends with Close below
	defer srv.Close()
	url := "http://" + ln.Addr().String() + "/vm/" + hash + "/"
	durations := make([]time.Duration, 0, n)
	for i := range n {
		start := time.Now()
		status, body, err := benchmarkGet(ctx, url)
		if err != nil {
			return fmt.Errorf("benchmark request %d: %w", i+1, err)
		}
		durations = append(durations, time.Since(start))
		if status != http.StatusOK {
			return fmt.Errorf("benchmark request %d: status %d: %s", i+1, status, body)
		}
	}
	fmt.Fprintf(out, "program %s\n%s\n", hash, summarize(durations))
	return nil
}

func summarize(durations []time.Duration) string {
	lines := []string{
		fmt.Sprintf("requests:        %d", len(durations)),
		fmt.Sprintf("first (cold):    %v", durations[0].Round(time.Microsecond)),
	}
	warm := append([]time.Duration(nil), durations[1:]...)
	if len(warm) == 0 {
		return strings.Join(lines, "\n")
	}
	sort.Slice(warm, func(i, j int) bool { return warm[i] < warm[j] })
	pick := func(q float64) time.Duration { return warm[int(q*float64(len(warm)-1))].Round(time.Microsecond) }
	var total time.Duration
	for _, d := range warm {
		total += d
	}
	lines = append(lines,
		fmt.Sprintf("warm min:        %v", pick(0)),
		fmt.Sprintf("warm p50:        %v", pick(0.5)),
		fmt.Sprintf("warm p90:        %v", pick(0.9)),
		fmt.Sprintf("warm mean:       %v", (total/time.Duration(len(warm))).Round(time.Microsecond)),
	)
	return strings.Join(lines, "\n")
}

// benchmarkGet reads one whole answer, so that the time includes the body.
func benchmarkGet(ctx context.Context, url string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, body, err
}
