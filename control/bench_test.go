package control

import (
	"context"
	"path/filepath"
	"testing"
)

// BenchmarkCall: one request and its answer over a fresh connection, as
// every Client call makes (a list of 100 volumes).
func BenchmarkCall(b *testing.B) {
	vols := make([]Volume, 100)
	for i := range vols {
		vols[i] = Volume{ID: uint64(i + 1), Name: "vm", Kind: "clone", Size: 1 << 30}
	}
	path := filepath.Join(b.TempDir(), "c.sock")
	s, err := Listen(path, func(context.Context, Request) (any, error) { return vols, nil }, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	c := Dial(path)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.List(ctx); err != nil {
			b.Fatal(err)
		}
	}
}
