package bench

import (
	"bufio"
	"bytes"
	"os"
	"strconv"
	"strings"
	"time"
)

// StealSampler measures the CPU time a virtual machine's hypervisor took
// from this machine's CPUs (steal, from /proc/stat) during a phase: the
// total, and the most taken from one CPU within one sampling interval. A
// writer's stall of tens of milliseconds that comes with a burst of steal
// is the host's, not the store's: a lock holder whose virtual CPU does not
// run holds its lock that long (the two-vCPU VMs the project's figures
// come from lose 50-80 ms at a time now and then). On a machine without
// /proc/stat (not Linux) both are 0.
//
// /proc/stat counts in USER_HZ ticks (10 ms on Linux), so a figure is a
// multiple of 10 ms and a burst shorter than a tick may read as 0 or 10.
type StealSampler struct {
	stop chan struct{}
	done chan struct{}
	// Written by the sampling goroutine only; Stop reads them after it
	// has ended (done).
	first []uint64 // per CPU, at Start
	last  []uint64
	worst uint64 // ticks, one CPU, one interval
}

// stealTick is USER_HZ's tick: /proc/stat's unit on every Linux build.
const stealTick = 10 * time.Millisecond

// StartSteal reads the steal counters now and every interval until Stop.
func StartSteal(interval time.Duration) *StealSampler {
	s := &StealSampler{stop: make(chan struct{}), done: make(chan struct{})}
	s.first = readSteal()
	s.last = s.first
	go func() {
		defer close(s.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-s.stop:
				s.sample()
				return
			case <-t.C:
				s.sample()
			}
		}
	}()
	return s
}

func (s *StealSampler) sample() {
	now := readSteal()
	if len(now) != len(s.last) {
		return
	}
	for i := range now {
		if now[i] > s.last[i] {
			s.worst = max(s.worst, now[i]-s.last[i])
		}
	}
	s.last = now
}

// Stop ends the sampling and returns the steal of all CPUs together since
// Start, and the most of one CPU in one interval.
func (s *StealSampler) Stop() (total, worst time.Duration) {
	close(s.stop)
	<-s.done
	var ticks uint64
	if len(s.first) == len(s.last) {
		for i := range s.last {
			if s.last[i] > s.first[i] {
				ticks += s.last[i] - s.first[i]
			}
		}
	}
	return time.Duration(ticks) * stealTick, time.Duration(s.worst) * stealTick
}

// readSteal returns each CPU's steal count from /proc/stat (nil if it
// cannot be read).
func readSteal() []uint64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return nil
	}
	return parseSteal(b)
}

// parseSteal reads the per-CPU lines ("cpuN user nice system idle iowait
// irq softirq steal ..."); the aggregate "cpu" line is skipped.
func parseSteal(b []byte) []uint64 {
	var out []uint64
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 9 || !strings.HasPrefix(f[0], "cpu") || f[0] == "cpu" {
			continue
		}
		v, err := strconv.ParseUint(f[8], 10, 64)
		if err != nil {
			return nil
		}
		out = append(out, v)
	}
	return out
}
