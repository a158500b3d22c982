package snapshot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// slices returns views of two devices that cannot be locked (a Slice is
// not a blockdev.Locker): only the owner record guards a store on them.
func sliceViews(t *testing.T, origin, store blockdev.Device) (blockdev.Device, blockdev.Device) {
	t.Helper()
	o, err := blockdev.Slice(origin, 0, origin.Size())
	require.NoError(t, err)
	s, err := blockdev.Slice(store, 0, store.Size())
	require.NoError(t, err)
	return o, s
}

// fillDev writes n bytes of b at off of d.
func fillDev(t *testing.T, d blockdev.Device, b byte, off, n int64) {
	t.Helper()
	_, err := d.WriteAt(bytes.Repeat([]byte{b}, int(n)), off)
	require.NoError(t, err)
}

// readGeometry decodes the store's superblock.
func readGeometry(t *testing.T, store blockdev.Device) geometry {
	t.Helper()
	b := make([]byte, superblockSize)
	_, err := store.ReadAt(b, 0)
	require.NoError(t, err)
	g, err := decodeSuperblock(b)
	require.NoError(t, err)
	return g
}

// rewriteIdentity changes the store's identity state with f and writes
// both slots, as a Store would.
func rewriteIdentity(t *testing.T, store blockdev.Device, f func(st *identState)) {
	t.Helper()
	g := readGeometry(t, store)
	st, err := readIdentity(store, &g)
	require.NoError(t, err)
	f(&st)
	st.seq++
	for slot := range 2 {
		_, err := store.WriteAt(st.encode(slot), g.idOff+int64(slot)*identitySlot)
		require.NoError(t, err)
	}
	require.NoError(t, store.Flush())
}

func ownerOf(t *testing.T, store blockdev.Device) ownerRecord {
	t.Helper()
	g := readGeometry(t, store)
	st, err := readIdentity(store, &g)
	require.NoError(t, err)
	return st.owner
}

// A second Open of a store open in this process, through devices that
// cannot be locked, is refused by the owner record, naming this process;
// a read-only Open goes ahead and reports the holder; Close clears the
// record, and the next Open succeeds.
func TestSecondOpenRefusedWithoutFlock(t *testing.T) {
	origin, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	store, err := blockdev.NewMem(4<<20, 4096)
	require.NoError(t, err)
	o1, s1 := sliceViews(t, origin, store)
	st, err := Format(o1, s1, Options{ChunkSize: 16 << 10})
	require.NoError(t, err)
	_, err = st.CreateSnapshot("kept", st.Origin())
	require.NoError(t, err)
	own, ok := st.Owner()
	require.True(t, ok)
	require.Equal(t, os.Getpid(), own.PID)
	require.False(t, own.Flock, "a Slice takes no flock")

	o2, s2 := sliceViews(t, origin, store)
	_, err = Open(o2, s2, Options{})
	require.ErrorIs(t, err, ErrLocked)
	var oe *OwnerError
	require.ErrorAs(t, err, &oe)
	require.Equal(t, os.Getpid(), oe.PID)
	require.Equal(t, own.OpenID, oe.OpenID)
	require.Contains(t, err.Error(), fmt.Sprintf("held by pid %d on host", os.Getpid()))

	ro, err := Open(o2, s2, Options{ReadOnly: true})
	require.NoError(t, err)
	seen, ok := ro.Owner()
	require.True(t, ok, "a read-only Open reports the live holder")
	require.Equal(t, own, seen)
	_, err = ro.OpenVolume("kept")
	require.NoError(t, err)
	require.NoError(t, ro.Close())

	require.NoError(t, st.Close())
	require.False(t, ownerOf(t, store).held(), "Close clears the record")
	st, err = Open(o2, s2, Options{})
	require.NoError(t, err)
	_, err = st.OpenVolume("kept")
	require.NoError(t, err)
	mustCheck(t, st)
	require.NoError(t, st.Close())
}

// A crash leaves the owner record of a Store that is gone: the next Open
// of this process takes it over (so does one after a crash of another
// process of this host, whose pid is gone, and one that gets the flock
// the holder had); a holder on another host is refused unless TakeOver.
func TestStaleOwnerTakenOver(t *testing.T) {
	origin := blockdevtest.MustCrashSim(1<<20, 512)
	store := blockdevtest.MustCrashSim(4<<20, 512)
	s, err := Format(origin, store, Options{ChunkSize: 16 << 10, CommitInterval: -1})
	require.NoError(t, err)
	_, err = s.CreateSnapshot("kept", s.Origin())
	require.NoError(t, err)
	fillAt(t, s.Origin(), 3, 0, 64<<10) // touches sample 0, not flushed
	store2 := store.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Drop})
	origin2 := origin.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Keep})
	_ = s.Close()
	require.True(t, ownerOf(t, store2).held())

	s, err = Open(origin2, store2, Options{})
	require.NoError(t, err, "the crashed Store's record is taken over")
	_, err = s.OpenVolume("kept")
	require.NoError(t, err)
	require.NoError(t, s.Close())

	gone := exitedPid(t)
	cases := []struct {
		name  string
		owner ownerRecord
		ok    bool
	}{
		{"this host, pid gone", ownerRecord{pid: uint64(gone), host: thisHost()}, true},
		{"this host, pid alive", ownerRecord{pid: 1, host: thisHost()}, false},
		{"another host", ownerRecord{pid: uint64(gone), host: "elsewhere"}, false},
		{"another host, had the flock (this device has none)", ownerRecord{pid: 7, host: "elsewhere", flock: true}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.owner
			o.id, o.since = [16]byte{1, 2, 3}, time.Now().UnixNano()
			rewriteIdentity(t, store2, func(st *identState) { st.owner = o })
			s, err := Open(origin2, store2, Options{})
			if tc.ok {
				require.NoError(t, err)
				require.NoError(t, s.Close())
				return
			}
			var oe *OwnerError
			require.ErrorAs(t, err, &oe)
			require.ErrorIs(t, err, ErrLocked)
			require.Equal(t, o.host, oe.Host)
			require.Equal(t, int(o.pid), oe.PID)
			require.Contains(t, err.Error(), "Options.TakeOver")
			s, err = Open(origin2, store2, Options{ReadOnly: true})
			require.NoError(t, err, "read-only opens beside it")
			require.NoError(t, s.Close())
			require.Equal(t, o, ownerOf(t, store2), "a read-only Open writes nothing")
			s, err = Open(origin2, store2, Options{TakeOver: true})
			require.NoError(t, err)
			mustCheck(t, s)
			require.NoError(t, s.Close())
		})
	}
}

// A holder on another host that had the store file's flock is gone once
// this Open gets the flock.
func TestOwnerWithFreeFlockTakenOver(t *testing.T) {
	originPath, storePath := fileStore(t)
	store := openFile(t, storePath, false)
	rewriteIdentity(t, store, func(st *identState) {
		st.owner = ownerRecord{id: [16]byte{9}, pid: 7, host: "elsewhere", since: 1, flock: true}
	})
	s, err := Open(openFile(t, originPath, false), store, Options{})
	require.NoError(t, err)
	own, _ := s.Owner()
	require.True(t, own.Flock)
	require.NoError(t, s.Close())
}

// exitedPid is the pid of a process that has exited (and been reaped).
func exitedPid(t *testing.T) int {
	t.Helper()
	exe, err := os.Executable()
	require.NoError(t, err)
	cmd := exec.Command(exe, "-test.run=^$")
	require.NoError(t, cmd.Run())
	return cmd.Process.Pid
}

// TestOwnerRefusedAcrossProcesses holds the store open in a child process
// through devices without flock (TestOwnerHolderProcess) and sees Open
// refused with the child's pid by the owner record, then succeed once the
// child has closed the store and exited.
func TestOwnerRefusedAcrossProcesses(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("needs a unix child process")
	}
	originPath, storePath := fileStore(t)
	pid, finish := blockdevtest.StartChild(t, "TestOwnerHolderProcess",
		"BLOCKSNAP_OWNER_ORIGIN="+originPath, "BLOCKSNAP_OWNER_STORE="+storePath)
	o, s := sliceViews(t, openFile(t, originPath, false), openFile(t, storePath, false))
	_, err := Open(o, s, Options{})
	var oe *OwnerError
	require.ErrorAs(t, err, &oe)
	require.Equal(t, pid, oe.PID)
	finish()
	st, err := Open(o, s, Options{})
	require.NoError(t, err)
	_, err = st.OpenVolume("child")
	require.NoError(t, err, "the child's snapshot is there")
	require.NoError(t, st.Close())
}

// TestOwnerHolderProcess is the child of TestOwnerRefusedAcrossProcesses.
func TestOwnerHolderProcess(t *testing.T) {
	originPath, storePath := os.Getenv("BLOCKSNAP_OWNER_ORIGIN"), os.Getenv("BLOCKSNAP_OWNER_STORE")
	if storePath == "" {
		t.Skip("run by TestOwnerRefusedAcrossProcesses")
	}
	o, s := sliceViews(t, openFile(t, originPath, false), openFile(t, storePath, false))
	st, err := Open(o, s, Options{})
	require.NoError(t, err)
	_, err = st.CreateSnapshot("child", st.Origin())
	require.NoError(t, err)
	blockdevtest.ChildReady()
	require.NoError(t, st.Close())
}

// Open with another origin than the store's is refused with the identity
// message: a device of another size, and one of the same size with other
// contents. The store's own origin, written and flushed through the
// store, opens.
func TestWrongOriginRefused(t *testing.T) {
	s, origin, store := newMemStore(t, 1<<20, 4<<20, Options{ChunkSize: 16 << 10})
	fp := func() uint64 {
		s.id.mu.Lock()
		defer s.id.mu.Unlock()
		return s.id.st.fingerprint()
	}()
	require.NotZero(t, fp)
	// Writes over every sample, flushed: the fingerprint follows them.
	for off := int64(0); off < 1<<20; off += 64 << 10 {
		fillAt(t, s.Origin(), 5, off, 64<<10)
	}
	require.NoError(t, s.Origin().Flush())
	require.Zero(t, s.id.durable.Load(), "every sample settled after the Flush")
	require.NoError(t, s.Close())

	bigger, err := blockdev.NewMem(2<<20, 512)
	require.NoError(t, err)
	_, err = Open(bigger, store, Options{})
	require.ErrorIs(t, err, ErrWrongOrigin)
	require.NotErrorIs(t, err, ErrCorrupt)
	require.ErrorContains(t, err, "this store belongs to a different origin (size 1048576, fingerprint ")
	require.ErrorContains(t, err, "the origin device has 2097152 bytes")

	other := memCopy(t, origin)
	pos, _ := samplePositions(1 << 20)
	fillDev(t, other, 6, pos[7], 4096) // a sampled block, changed outside the store
	_, err = Open(other, store, Options{ReadOnly: true})
	var oe *OriginError
	require.ErrorAs(t, err, &oe)
	require.Equal(t, int64(1<<20), oe.Size)
	require.NotEqual(t, oe.Fingerprint, oe.GotFingerprint)
	require.Len(t, oe.Samples, 1)
	require.ErrorContains(t, err, fmt.Sprintf("this store belongs to a different origin (size 1048576, fingerprint %016x)", oe.Fingerprint))

	blank, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	_, err = Open(blank, store, Options{})
	require.ErrorIs(t, err, ErrWrongOrigin)

	s, err = Open(origin, store, Options{})
	require.NoError(t, err, "the store's own origin")
	mustCheck(t, s)
	require.NoError(t, s.Close())
}

// A crash after unflushed writes over every sample, with any policy,
// never makes Open refuse the store's own origin: the samples were marked
// dirty before the writes reached the origin. The Open hashes them again,
// so that a later change of the origin outside the store is refused.
func TestNoFalseOriginRefusalAfterCrash(t *testing.T) {
	seed := blockdevtest.Seed(t)
	for _, p := range blockdevtest.AllPolicies(seed) {
		origin := blockdevtest.MustCrashSim(512<<10, 512)
		store := blockdevtest.MustCrashSim(4<<20, 512)
		fillPattern(t, origin, 2)
		s, err := Format(origin, store, Options{ChunkSize: 4 << 10, CommitInterval: -1, OriginBuffer: -1})
		require.NoError(t, err)
		for off := int64(0); off < 512<<10; off += 32 << 10 {
			fillAt(t, s.Origin(), 7, off, 32<<10)
		}
		require.NotZero(t, s.id.durable.Load())
		st2, o2 := store.MustCrash(p), origin.MustCrash(p)
		_ = s.Close()
		s, err = Open(o2, st2, Options{})
		require.NoError(t, err, "%v", p)
		require.Zero(t, s.id.durable.Load(), "%v: Open settles the dirty samples", p)
		require.NoError(t, s.Close())
		fillDev(t, o2, 8, 0, 4096)
		_, err = Open(o2, st2, Options{})
		require.ErrorIs(t, err, ErrWrongOrigin, "%v", p)
	}
}

// Flipping any bit of one identity slot is harmless: the slot is rejected
// and its twin holds the same state. Both slots bad is ErrCorrupt, never
// a panic.
func TestIdentitySlotBitFlips(t *testing.T) {
	s, origin, store := newMemStore(t, 1<<20, 4<<20, Options{ChunkSize: 16 << 10})
	require.NoError(t, s.Close())
	g := readGeometry(t, store)
	good := make([]byte, identityLen)
	_, err := store.ReadAt(good, g.idOff)
	require.NoError(t, err)
	want, err := readIdentity(store, &g)
	require.NoError(t, err)
	for i := 0; i < 512*8; i++ { // the encoded part of slot 0; the tail is zero-checked the same way
		b := bytes.Clone(good)
		b[i/8] ^= 1 << (i % 8)
		_, err := decodeIdentity(b, 0, &g)
		require.ErrorIs(t, err, ErrCorrupt, "bit %d", i)
		got, err := readIdentity(bytes.NewReader(b), &geometry{idOff: 0, uuid: g.uuid, originSize: g.originSize})
		require.NoError(t, err, "bit %d", i)
		require.Equal(t, want.fingerprint(), got.fingerprint())
	}
	b := bytes.Clone(good)
	b[100] ^= 1
	b[identitySlot+100] ^= 1
	_, err = store.WriteAt(b, g.idOff)
	require.NoError(t, err)
	_, err = Open(origin, store, Options{})
	require.ErrorIs(t, err, ErrCorrupt)
	require.ErrorContains(t, err, fmt.Sprintf("identity slot 0 at store offset %d", g.idOff))
}

// FuzzIdentity: a slot image decodes or fails with ErrCorrupt, never
// panics; one that decodes re-encodes to itself. Inputs are the slot's
// encoded prefix (the rest zero), checksummed when sum is set.
func FuzzIdentity(f *testing.F) {
	g := geometry{originSize: 1 << 20, uuid: [16]byte{1}, idOff: superblockSize}
	st := identState{seq: 3, uuid: g.uuid, originSize: g.originSize, n: sampleCount(g.originSize), sampleLen: sampleBytes, dirty: 5}
	st.hash[0], st.hash[15] = 1, 2
	st.owner = ownerRecord{id: [16]byte{7}, pid: 42, since: 5, flock: true, host: "host"}
	f.Add(bytes.TrimRight(st.encode(0), "\x00"), true)
	f.Add(bytes.TrimRight((&identState{uuid: g.uuid, originSize: g.originSize}).encode(0), "\x00"), true)
	f.Add([]byte(identityMagic), false)
	f.Fuzz(func(t *testing.T, prefix []byte, sum bool) {
		b := make([]byte, identitySlot)
		copy(b, prefix)
		if sum {
			binary.LittleEndian.PutUint32(b[8:], 0)
			binary.LittleEndian.PutUint32(b[8:], checksum(saltIdentity, b))
		}
		st, err := decodeIdentity(b, 0, &g)
		if err != nil {
			require.ErrorIs(t, err, ErrCorrupt)
			return
		}
		require.Equal(t, b, st.encode(0))
	})
}

// The samples: spread over the origin, 4096-aligned, inside it, first and
// last block included; a small origin has fewer.
func TestSamplePositions(t *testing.T) {
	for _, size := range []int64{512, 4096, 12 << 10, 64 << 10, 300<<10 + 1536, 1 << 20, 1 << 40} {
		pos, n := samplePositions(size)
		l := sampleLen(size)
		require.Equal(t, sampleCount(size), n)
		require.Zero(t, pos[0])
		for i := 0; i < n; i++ {
			require.Zero(t, pos[i]%sampleBytes, "size %d sample %d", size, i)
			require.LessOrEqual(t, pos[i]+l, size, "size %d sample %d", size, i)
			if i > 0 {
				require.Greater(t, pos[i], pos[i-1], "size %d sample %d", size, i)
			}
		}
		require.Greater(t, pos[n-1]+l, size-2*sampleBytes, "size %d: the last block is sampled", size)
	}
}

// A store on a file keeps its fingerprint across a Close and an Open on
// fresh handles; errors.Is finds the identity error through the CLI's
// wrapping too.
func TestWrongOriginFile(t *testing.T) {
	originPath, storePath := fileStore(t)
	other := filepath.Join(t.TempDir(), "other")
	o := createFile(t, other, 1<<20)
	fillDev(t, o, 9, 0, 1<<20)
	_, err := Open(o, openFile(t, storePath, false), Options{})
	err = fmt.Errorf("blocksnap: open %s: %w", storePath, err)
	require.True(t, errors.Is(err, ErrWrongOrigin), "%v", err)
	s, err := openFiles(t, originPath, storePath, Options{})
	require.NoError(t, err)
	require.NoError(t, s.Close())
}
