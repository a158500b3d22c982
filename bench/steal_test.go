package bench

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestParseSteal(t *testing.T) {
	stat := []byte(`cpu  821432 116632 177664 701654 14254 0 2860 582 0 0
cpu0 410000 58000 88000 350000 7000 0 1400 300 0 0
cpu1 411432 58632 89664 351654 7254 0 1460 282 0 0
intr 123 0 0
ctxt 999
`)
	require.Equal(t, []uint64{300, 282}, parseSteal(stat))
	require.Nil(t, parseSteal([]byte("cpu0 1 2 3 4 5 6 7 x 0 0\n")), "a field that is not a number")
	require.Empty(t, parseSteal([]byte("cpu0 1 2 3\n")), "a kernel before steal was counted")
}

func TestStealSampler(t *testing.T) {
	s := StartSteal(time.Millisecond)
	time.Sleep(5 * time.Millisecond)
	total, worst := s.Stop()
	require.GreaterOrEqual(t, total, worst, "one CPU's burst is part of the total")
	require.Zero(t, total%stealTick, "a whole number of ticks")
}
