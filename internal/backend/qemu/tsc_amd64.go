package qemu

import "time"

func rdtsc() uint64

// measureTSCKHz times the host's TSC against the monotonic clock. Under
// TCG the guest's TSC is the host's, so this is the rate to tell a guest
// that cannot calibrate its own. /proc/cpuinfo's "cpu MHz" is no
// substitute: on hosts with frequency scaling it is the current clock.
func measureTSCKHz() int {
	const span = 50 * time.Millisecond
	t0, c0 := time.Now(), rdtsc()
	time.Sleep(span)
	t1, c1 := time.Now(), rdtsc()
	elapsed := t1.Sub(t0)
	if elapsed <= 0 || c1 <= c0 {
		return 0
	}
	return int(float64(c1-c0) / (float64(elapsed) / float64(time.Millisecond)))
}
