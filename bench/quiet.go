package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// waitQuiet waits, at most limit, until the machine's CPUs are at most
// a tenth busy over two quarter-second windows in a row: a spare still
// importing Python, or a sandbox of the previous row being torn down,
// would otherwise land in the warm figures (a full run's p99 was 11–22
// ms, against 1–4 ms measured on a quiet machine). touch runs once per
// window, so that a program with a short REUSE_TIMEOUT stays warm
// meanwhile instead of being started again from the next spare.
func waitQuiet(limit time.Duration, touch func()) {
	deadline := time.Now().Add(limit)
	quiet := 0
	busy0, total0, err := cpuTicks()
	for err == nil && time.Now().Before(deadline) {
		time.Sleep(250 * time.Millisecond)
		touch()
		busy, total, err2 := cpuTicks()
		if err2 != nil || total == total0 {
			return
		}
		if float64(busy-busy0)/float64(total-total0) <= 0.10 {
			quiet++
			if quiet == 2 {
				return
			}
		} else {
			quiet = 0
		}
		busy0, total0 = busy, total
	}
	fmt.Fprintf(os.Stderr, "   (the machine did not quieten within %s)\n", limit)
}

// cpuTicks reads the busy and total ticks of all CPUs from /proc/stat.
func cpuTicks() (busy, total uint64, err error) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return 0, 0, fmt.Errorf("/proc/stat: empty")
	}
	fields := strings.Fields(sc.Text()) // cpu user nice system idle iowait irq softirq steal ...
	if len(fields) < 5 || fields[0] != "cpu" {
		return 0, 0, fmt.Errorf("/proc/stat: unexpected first line %q", sc.Text())
	}
	for i, v := range fields[1:] {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("/proc/stat: %w", err)
		}
		total += n
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
	}
	return busy, total, nil
}
