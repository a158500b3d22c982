package clone

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// A dirty bit past the last region (memory damage, or a bug elsewhere)
// must not turn takeDirty into a loop without end: the spans stop at the
// region count.
func TestTakeDirtyStopsAtRegions(t *testing.T) {
	m := newMetadata(&Clone{}, geometry{Regions: 10})
	m.dirty.Set(3)
	m.dirty.Set(4)
	m.dirty.Set(9)
	m.dirty.Set(12)
	m.takeDirty()
	require.Equal(t, []span{{start: 3, n: 2}, {start: 9, n: 1}}, m.spans)
}
