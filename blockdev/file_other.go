//go:build !linux

package blockdev

import "os"

const directFlag = 0

func datasync(f *os.File) error { return f.Sync() }

func punchHole(*os.File, int64, int64) error { return ErrNotSupported }

func zeroRange(*os.File, int64, int64) error { return ErrNotSupported }

func blockDeviceGeometry(*os.File) (int64, int, error) { return 0, 0, ErrNotSupported }

func seekMap(_ *os.File, _, n int64) (int64, bool) { return n, false }
