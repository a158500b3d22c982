package archive

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
)

// testBackend checks the Backend contract the repository relies on.
func testBackend(t *testing.T, be Backend) {
	ctx := context.Background()
	_, err := be.Get(ctx, "a/missing")
	require.ErrorIs(t, err, ErrNotFound)
	_, err = be.GetRange(ctx, "a/missing", 0, 1)
	require.ErrorIs(t, err, ErrNotFound)
	require.NoError(t, be.Delete(ctx, "a/missing"))

	for _, k := range []string{"a/x/2", "a/x/1", "a/y", "b/z", "ab"} {
		require.NoError(t, be.Put(ctx, k, []byte("value of "+k)))
	}
	got, err := be.Get(ctx, "a/x/1")
	require.NoError(t, err)
	require.Equal(t, "value of a/x/1", string(got))
	got, err = be.GetRange(ctx, "a/x/1", 6, 2)
	require.NoError(t, err)
	require.Equal(t, "of", string(got))
	require.NoError(t, be.Put(ctx, "a/y", []byte("replaced")))
	got, err = be.Get(ctx, "a/y")
	require.NoError(t, err)
	require.Equal(t, "replaced", string(got))

	list := func(prefix string) []string {
		var keys []string
		for o, err := range be.List(ctx, prefix) {
			require.NoError(t, err)
			require.Positive(t, o.Size)
			require.False(t, o.ModTime.IsZero())
			keys = append(keys, o.Key)
		}
		return keys
	}
	require.Equal(t, []string{"a/x/1", "a/x/2", "a/y"}, list("a/"))
	require.Equal(t, []string{"a/x/1", "a/x/2"}, list("a/x/"))
	require.Empty(t, list("c/"))
	for range be.List(ctx, "a/") {
		break // stopping early is allowed
	}
	require.NoError(t, be.Delete(ctx, "a/x/1"))
	require.Equal(t, []string{"a/x/2", "a/y"}, list("a/"))
}

func TestDirBackend(t *testing.T) {
	testBackend(t, mustDir(t, t.TempDir()))
	_, err := mustDir(t, t.TempDir()).Get(context.Background(), "../escape")
	require.ErrorIs(t, err, ErrBadKey)
}

func TestS3Backend(t *testing.T) {
	g := startGateway(t)
	testBackend(t, g.backend(t, "contract", "some/prefix"))
}
